"""`megajepa prepare-text`: plain text at pretraining scale -> CE-only records in MDS shards.

    megajepa prepare-text corpus/ --out data/web --tokenizer DIR [--workers N] [--max-tokens 2048]

Inputs: JSONL files ({"text": ...} per line; `--field text=COLUMN` for another key), .txt files
(one document per line), directories of them (searched recursively, in sorted order), or a local
Hugging Face dataset directory (saved with save_to_disk, or data files for load_dataset). Each
document is tokenized as `tokenizer(text)` does by default, the eos token appended, and cut into
records of at most --max-tokens tokens: CE-only records of schema v2 (empty `user` and `assistant`,
zero spans and inserts; labels on every token, no JEPA term). `source` is FILE:LINE (1-based) or
DIR:ROW (0-based); the records of one long document share it.

Scale: the input is cut into parts that do not depend on the number of processes (files into
--part-bytes pieces at line ends, datasets into --rows-per-part rows); --workers processes write one
MDS directory per part with streaming's MDSWriter, and `streaming.base.util.merge_index` joins
their indexes. The output is therefore byte-identical for any --workers. sample_id is
part << 32 | record within the part: unique and independent of the process count (the loader
numbers records by streaming's global index anyway). record_lengths.npy (the token-budget loader's
per-record lengths) and fingerprint.json ("format_version": 2, "kind": "text-corpus") are written
beside the index.

Bad records are reported as `SOURCE: reason` on stderr (the first 20, in input order) and skipped;
--strict stops at the first one (exit code 2). The output directory appears only when complete.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import multiprocessing
import os
import sys
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Iterator, Optional, Union

import numpy as np
from tqdm import tqdm

from megajepa.data.fingerprint import FORMAT_VERSION, file_sha256, tokenizer_hash, write_fingerprint
from megajepa.data.prepare import MAX_REPORTED, BadInput, BadRecord, DatasetInput, exit_code, parse_json_line
from megajepa.data.tokenizer import load_tokenizer
from megajepa.files import staged_directory

COLUMNS = {
    "sample_id": "int64",
    "full": "ndarray:int32",
    "prompt_len": "int32",
    "full_spans": "ndarray:int32",
    "user": "bytes",  # empty for CE-only; MDS cannot encode an empty ndarray (the loader decodes bytes)
    "user_insert": "ndarray:int32",
    "assistant": "bytes",
    "assistant_insert": "ndarray:int32",
    "source": "str",
}
TEXT_SUFFIXES = (".jsonl", ".txt")
ENCODE_BATCH = 64  # documents per tokenizer call (its encodings are large)
PROGRESS_EVERY = 1024  # documents between progress updates


@dataclass(frozen=True)
class Part:
    """One piece of the input, written by one process into part-NNNNN: a file's byte range
    [start, stop) beginning at line `first_line`, or a dataset's rows [start, stop)."""

    index: int
    path: str
    kind: str  # jsonl | txt | dataset
    start: int
    stop: int
    first_line: int = 1


@dataclass
class PartResult:
    index: int
    documents: int = 0
    records: int = 0
    tokens: int = 0
    skipped: Counter = field(default_factory=Counter)
    reports: list = field(default_factory=list)  # the first MAX_REPORTED "SOURCE: reason"
    failed: Optional[str] = None  # --strict: the first bad record


@dataclass(frozen=True)
class Options:
    tokenizer_dir: str
    max_tokens: int
    text_field: str
    split: str
    strict: bool
    shard_size_limit: int


# ---------------------------------------------------------------------------------------------
# Cutting the input into parts


def corpus_files(path: str) -> list[str]:
    """The .jsonl and .txt files under a directory, recursively, in sorted order."""
    found = []
    for folder, dirs, names in os.walk(path):
        dirs.sort()
        found += [os.path.join(folder, n) for n in sorted(names) if n.endswith(TEXT_SUFFIXES)]
    return found


def is_hf_dataset(path: str) -> bool:
    saved = any(os.path.exists(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json"))
    return saved or not corpus_files(path)


def file_parts(path: str, part_bytes: int, first_index: int) -> list[Part]:
    """Byte ranges of about part_bytes ending at line ends, with the line each one starts at."""
    kind = "jsonl" if path.endswith(".jsonl") else "txt"
    size = os.path.getsize(path)
    parts, start, line = [], 0, 1
    with open(path, "rb") as f:
        while start < size:
            f.seek(min(start + part_bytes, size))
            if f.tell() < size:
                f.readline()  # to the end of the line the cut falls in
            stop = f.tell()
            parts.append(Part(first_index + len(parts), path, kind, start, stop, line))
            f.seek(start)
            line += f.read(stop - start).count(b"\n")
            start = stop
    return parts


def plan_parts(inputs: list[str], split: str, part_bytes: int, rows_per_part: int) -> list[Part]:
    parts: list[Part] = []
    for path in inputs:
        if os.path.isdir(path) and is_hf_dataset(path):
            rows = len(DatasetInput(path, split))
            for start in range(0, rows, rows_per_part):
                parts.append(Part(len(parts), path, "dataset", start, min(start + rows_per_part, rows)))
        elif os.path.isdir(path):
            for name in corpus_files(path):
                parts += file_parts(name, part_bytes, len(parts))
        elif os.path.isfile(path):
            if not path.endswith(TEXT_SUFFIXES):
                raise ValueError(f"{path}: expected a .jsonl or .txt file, a directory of them, or an HF dataset")
            parts += file_parts(path, part_bytes, len(parts))
        else:
            raise FileNotFoundError(f"no such input file or directory: {path}")
    return parts


# ---------------------------------------------------------------------------------------------
# Reading one part


def _text_of(record: object, text_field: str) -> str:
    if not isinstance(record, dict):
        raise BadRecord("invalid", f"expected a JSON object, got {type(record).__name__}")
    if text_field not in record:
        raise BadRecord("missing_field", f"missing field '{text_field}'")
    text = record[text_field]
    if not isinstance(text, str):
        raise BadRecord("invalid", f"'{text_field}' must be a string, got {type(text).__name__}")
    return text


def read_documents(part: Part, options: Options) -> Iterator[tuple[str, Union[str, BadRecord]]]:
    """(source, text or BadRecord) for each document of the part; blank lines are not documents."""
    if part.kind == "dataset":
        dataset = DatasetInput(part.path, options.split).dataset
        for row in range(part.start, part.stop):
            try:
                yield f"{part.path}:{row}", _text_of(dataset[row], options.text_field)
            except BadRecord as bad:
                yield f"{part.path}:{row}", bad
        return
    with open(part.path, "rb") as f:
        f.seek(part.start)
        data = f.read(part.stop - part.start)
    for number, line in enumerate(data.splitlines(), part.first_line):
        if not line.strip():
            continue
        source = f"{part.path}:{number}"
        try:
            yield source, _text_of(parse_json_line(line), options.text_field) if part.kind == "jsonl" else line.decode("utf-8")
        except BadRecord as bad:
            yield source, bad
        except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
            yield source, BadRecord("not_json" if part.kind == "jsonl" else "not_utf8", f"unreadable ({err})")


def text_record(sample_id: int, tokens: list[int], source: str) -> dict:
    """A CE-only record of schema v2: the text is `full`, the views are empty."""
    zeros = np.zeros(4, np.int32)
    return {
        "sample_id": sample_id,
        "full": np.asarray(tokens, np.int32),
        "prompt_len": 0,
        "full_spans": zeros,
        "user": b"",
        "user_insert": zeros[:2],
        "assistant": b"",
        "assistant_insert": zeros[:2],
        "source": source,
    }


_worker: dict = {}  # per process: the tokenizer and where documents done are counted


def _init_worker(tokenizer_dir: str, counter) -> None:
    """Pool initializer: counter is a shared multiprocessing Value the main process shows."""

    def count(n: int) -> None:
        with counter.get_lock():
            counter.value += n

    _init_process(tokenizer_dir, count)


def _init_process(tokenizer_dir: str, progress) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    _worker["tokenizer"] = load_tokenizer(tokenizer_dir)
    _worker["progress"] = progress


def write_part(part: Part, options: Options, out_root: str) -> PartResult:
    """Tokenize one part into out_root/part-NNNNN (MDS + its record lengths)."""
    from streaming import MDSWriter  # here, not at the top: `megajepa prepare-text --help` stays instant

    from megajepa.data.loader import RECORD_LENGTHS_FILE
    from megajepa.data.shard_hashes import SHARD_HASHES

    tokenizer = _worker["tokenizer"]
    eos = tokenizer.eos_token_id
    result = PartResult(part.index)
    lengths: list[int] = []
    out = os.path.join(out_root, f"part-{part.index:05d}")
    pending: list[tuple[str, str]] = []

    def flush(writer) -> None:
        encoded = tokenizer([text for _, text in pending])["input_ids"]
        for (source, _), tokens in zip(pending, encoded):
            if eos is not None and (not tokens or tokens[-1] != eos):
                tokens = tokens + [eos]
            for start in range(0, len(tokens), options.max_tokens):
                chunk = tokens[start : start + options.max_tokens]
                writer.write(text_record((part.index << 32) | result.records, chunk, source))
                lengths.append(len(chunk))
                result.records += 1
                result.tokens += len(chunk)
        _worker["progress"](len(pending))
        pending.clear()

    with MDSWriter(out=out, columns=COLUMNS, compression="zstd", hashes=SHARD_HASHES,
                   size_limit=options.shard_size_limit) as writer:
        for source, text in read_documents(part, options):
            result.documents += 1
            if isinstance(text, str) and not text.strip():
                text = BadRecord("empty_view", "empty text")
            if isinstance(text, BadRecord):
                message = f"{source}: {text}"
                if options.strict:
                    result.failed = message
                    break
                result.skipped[text.reason] += 1
                if len(result.reports) < MAX_REPORTED:
                    result.reports.append(message)
                continue
            pending.append((source, text))
            if len(pending) == ENCODE_BATCH:
                flush(writer)
        if pending:
            flush(writer)
    with open(os.path.join(out, RECORD_LENGTHS_FILE), "wb") as f:
        np.save(f, np.asarray(lengths, np.int32))
    return result


# ---------------------------------------------------------------------------------------------
# The run


def _run_parts(parts: list[Part], options: Options, staging: str, workers: int, progress: bool) -> list[PartResult]:
    """Write every part; results in part order. With --strict, parts after a failed one are cancelled."""
    bar = tqdm(desc="prepare-text", unit="doc", disable=not progress)  # documents tokenized
    if workers == 1:
        _init_process(options.tokenizer_dir, bar.update)
        results = []
        for part in parts:
            results.append(write_part(part, options, staging))
            if results[-1].failed:
                break
        bar.close()
        return results
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    counter = context.Value("q", 0)
    results: dict[int, PartResult] = {}
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                             initargs=(options.tokenizer_dir, counter)) as pool:
        futures: dict[Future, Part] = {pool.submit(write_part, p, options, staging): p for p in parts}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            bar.n = counter.value
            bar.refresh()
            for future in done:
                if future.cancelled():
                    continue
                result = future.result()
                results[result.index] = result
                if result.failed:  # later parts cannot matter: the earliest failure is reported
                    for other in pending:
                        if futures[other].index > result.index:
                            other.cancel()
        bar.n = counter.value
    bar.close()
    return [results[i] for i in sorted(results)]


def _percentiles(values: np.ndarray) -> dict[str, int]:
    stats = {f"p{q}": int(np.percentile(values, q, method="inverted_cdf")) for q in (50, 90, 99)}
    stats["max"] = int(values.max())
    return stats


@contextlib.contextmanager
def quiet_logs():
    """No log records of WARNING or below inside the block (ours are printed, not logged)."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def prepare_text(
    inputs: list[str],
    out_dir: str,
    tokenizer_dir: Optional[str] = None,
    *,
    workers: int = 1,
    max_tokens: int = 2048,
    text_field: str = "text",
    split: str = "train",
    strict: bool = False,
    overwrite: bool = False,
    part_bytes: int = 64 << 20,
    rows_per_part: int = 100_000,
    shard_size_limit: int = 1 << 26,
    progress: bool = True,
) -> dict:
    """Tokenize plain-text `inputs` into CE-only MDS shards at out_dir; return the summary.

    Raises BadInput (a bad record under strict, or no usable record), FileNotFoundError,
    FileExistsError (out_dir not empty and not overwrite) or ValueError (bad options).
    """
    from streaming.base.util import merge_index  # here, not at the top: --help stays instant

    from megajepa.data.loader import RECORD_LENGTHS_FILE, write_record_lengths

    if not inputs:
        raise ValueError("no inputs given")
    for name, value in (("workers", workers), ("max_tokens", max_tokens), ("part_bytes", part_bytes),
                        ("rows_per_part", rows_per_part)):
        if value < 1:
            raise ValueError(f"{name}={value}: must be at least 1")
    if tokenizer_dir is None:
        from megajepa.data.embedded import ensure_tokenizer

        tokenizer_dir = ensure_tokenizer()
    tokenizer = load_tokenizer(tokenizer_dir)
    parts = plan_parts(list(inputs), split, part_bytes, rows_per_part)
    options = Options(tokenizer_dir, max_tokens, text_field, split, strict, shard_size_limit)
    started = time.perf_counter()
    with staged_directory(out_dir, overwrite) as staging:
        results = _run_parts(parts, options, staging, min(workers, max(len(parts), 1)), progress)
        failed = next((r.failed for r in results if r.failed), None)
        if failed:
            raise BadInput(failed)
        skipped = sum((r.skipped for r in results), Counter())
        reports = [line for r in results for line in r.reports]
        for line in reports[:MAX_REPORTED]:
            print(line, file=sys.stderr)
        if sum(skipped.values()) > MAX_REPORTED:
            print(f"... and {sum(skipped.values()) - MAX_REPORTED} more skipped records", file=sys.stderr)
        records = sum(r.records for r in results)
        documents = sum(r.documents for r in results)
        if records == 0:
            raise BadInput(f"no usable documents in {', '.join(inputs)} ({documents} read, all skipped)")
        part_dirs = [os.path.join(staging, f"part-{p.index:05d}") for p in parts]
        with quiet_logs():  # streaming warns that it stages the index files and that `staging` is not empty
            merge_index([os.path.join(d, "index.json") for d in part_dirs], staging)
        lengths = np.concatenate([np.load(os.path.join(d, RECORD_LENGTHS_FILE)) for d in part_dirs])
        for d in part_dirs:
            os.remove(os.path.join(d, RECORD_LENGTHS_FILE))
        write_record_lengths(staging, np.stack([lengths, np.zeros_like(lengths), np.zeros_like(lengths)], axis=1))
        seconds = time.perf_counter() - started
        files = sorted({p.path for p in parts if p.kind != "dataset"})
        datasets = sorted({p.path for p in parts if p.kind == "dataset"})
        fingerprint = {
            "format_version": FORMAT_VERSION,
            "kind": "text-corpus",
            "tokenizer_hash": tokenizer_hash(tokenizer),
            "vocab_size": len(tokenizer),
            "eos_token_id": tokenizer.eos_token_id,
            "columns": COLUMNS,
            "sources": {path: file_sha256(path) for path in files + [
                name for d in datasets for name in DatasetInput(d, split).files()]},
            "options": {"max_tokens": max_tokens, "text_field": text_field, "split": split,
                        "part_bytes": part_bytes, "rows_per_part": rows_per_part},
            "counts": {"documents": documents, "records": records, "skipped": dict(sorted(skipped.items()))},
            "tokens": int(lengths.sum()),
            "token_lengths": {"record": _percentiles(lengths)},
        }
        write_fingerprint(staging, fingerprint)
    summary = {**fingerprint, "out": out_dir, "seconds": seconds, "parts": len(parts), "workers": workers,
               "tokens_per_second": fingerprint["tokens"] / seconds}
    if progress:
        print(format_summary(summary))
    return summary


def format_summary(summary: dict) -> str:
    counts = summary["counts"]
    skipped = ", ".join(f"{reason} {n}" for reason, n in counts["skipped"].items()) or "none"
    stats = summary["token_lengths"]["record"]
    return "\n".join([
        f"prepared {counts['records']} records ({counts['documents']} documents, skipped: {skipped}) "
        f"-> {summary['out']}",
        f"  {summary['tokens']} tokens; record tokens p50 {stats['p50']} p90 {stats['p90']} p99 {stats['p99']} "
        f"max {stats['max']}",
        f"  {summary['tokens_per_second']:,.0f} tokens/s ({summary['seconds']:.1f} s, {summary['parts']} parts, "
        f"{summary['workers']} workers)",
    ])


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megajepa prepare-text",
        description="Tokenize plain text (JSONL / .txt files, directories of them, a local HF dataset) "
        "into CE-only MDS shards, in parallel.",
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT")
    parser.add_argument("--out", required=True, metavar="DIR", help="output shard directory (created atomically)")
    parser.add_argument("--tokenizer", metavar="DIR", help="HF tokenizer directory (default: the embedded one)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)")
    parser.add_argument("--max-tokens", type=int, default=2048, help="longest record; longer documents are cut")
    parser.add_argument("--field", default="text", metavar="COLUMN", help="the text's key or column (default: text)")
    parser.add_argument("--split", default="train", help="split of an HF DatasetDict input")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad record (exit code 2)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--part-bytes", type=int, default=64 << 20, help="input bytes per part (files)")
    parser.add_argument("--rows-per-part", type=int, default=100_000, help="rows per part (datasets)")
    parser.add_argument("--shard-size", type=int, default=1 << 26, metavar="BYTES", help="shard size limit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or summary")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    return exit_code("megajepa prepare-text", lambda: prepare_text(
        args.inputs, args.out, args.tokenizer, workers=args.workers, max_tokens=args.max_tokens,
        text_field=args.field, split=args.split, strict=args.strict, overwrite=args.overwrite,
        part_bytes=args.part_bytes, rows_per_part=args.rows_per_part, shard_size_limit=args.shard_size,
        progress=not args.no_progress,
    ), args.out)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
