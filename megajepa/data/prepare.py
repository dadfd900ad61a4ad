"""`megajepa prepare`: JSONL files or local HF datasets -> tokenized view pairs in MDS shards.

    megajepa prepare train.jsonl --out data/train [--tokenizer DIR] [--strict] [--overwrite]

Input records, recognised per record (or fixed with --format):

    chat   {"messages": [{"role": ..., "content": ...}, ...]}  last message the assistant's; split
           by megajepa.data.tokenizer.split_conversation (view A: prompt + assistant header,
           view B: the answer and its end of turn)
    pair   {"view_a": str, "view_b": str}    view B gets the eos token appended
    text   {"text": str}                     split into prefix / continuation at the sentence or
                                             paragraph boundary nearest --text-split (eos appended)

A directory input is a local Hugging Face dataset (saved with save_to_disk, or a directory of data
files for load_dataset); `--field view_a=question` maps its columns (or JSONL keys) to the names
above. Sources are `FILE:LINE` (1-based) for JSONL and `DIR:ROW` (0-based) for datasets.

Bad records are reported as `SOURCE: reason` on stderr and skipped (--strict: stop at the first,
exit code 2). The output directory appears only when complete: shards are written into a
temporary sibling that is renamed at the end, and removed if anything fails. Re-running on the
same input gives byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import sys
import time
from collections import Counter
from contextlib import contextmanager
from typing import Iterable, Iterator, Optional, Union

import numpy as np
from streaming import MDSWriter
from tqdm import tqdm

from megajepa.data.fingerprint import FINGERPRINT_FILE, file_sha256, tokenizer_hash
from megajepa.data.tokenizer import ROLES, chat_template, encode_text, load_tokenizer, split_conversation

COLUMNS = {"sample_id": "int64", "view_a": "ndarray:int32", "view_b": "ndarray:int32", "source": "str"}
FORMAT_VERSION = 1
FORMATS = ("auto", "chat", "pair", "text")
FIELDS = ("messages", "view_a", "view_b", "text")
MAX_REPORTED = 20  # bad records printed before only counting them

SENTENCE_OR_PARAGRAPH_END = re.compile(r"(?<=[.!?])(?=\s)|(?<=\S)(?=[ \t]*\n\s*\n)")
WORD_END = re.compile(r"(?<=\S)(?=\s)")


class BadRecord(ValueError):
    """One input record that cannot become a pair; `reason` is the key it is counted under."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


class BadInput(ValueError):
    """prepare cannot produce a dataset from its input (a bad record under --strict, or none usable)."""


# ---------------------------------------------------------------------------------------------
# Publishing a directory atomically


def _is_nonempty(path: str) -> bool:
    return os.path.exists(path) and (not os.path.isdir(path) or bool(os.listdir(path)))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_staging(final: str) -> list[str]:
    """Remove the staging siblings of `final` (`final.tmp-HOST-PID`, `final.old-HOST-PID`) left by
    dead processes of this host, e.g. a run killed by SIGKILL; returns what was removed. Another
    host's directories are left alone: its processes cannot be checked from here."""
    parent, base = os.path.split(final)
    pattern = re.compile(rf"^{re.escape(base)}\.(?:tmp|old)-{re.escape(socket.gethostname())}-(\d+)$")
    removed = []
    for name in os.listdir(parent or "."):
        match = pattern.match(name)
        if match and int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1))):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
            removed.append(os.path.join(parent, name))
    return removed


@contextmanager
def staged_directory(final: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a fresh temporary sibling of `final`; when the block completes it becomes `final`.

    If the block raises (KeyboardInterrupt included; SIGTERM too, see main) the temporary
    directory is removed and `final` is left as it was. Stale siblings that dead processes left
    behind are removed first.
    """
    final = os.path.normpath(final)
    if _is_nonempty(final) and not overwrite:
        raise FileExistsError(f"{final}: exists and is not empty; pass --overwrite to replace it")
    if os.path.isdir(os.path.dirname(final) or "."):
        for path in remove_stale_staging(final):
            print(f"removed {path}: staging directory of a process that no longer runs", file=sys.stderr)
    owner = f"{socket.gethostname()}-{os.getpid()}"
    staging = f"{final}.tmp-{owner}"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        yield staging
        if _is_nonempty(final):  # --overwrite: retire the old one only once the new one is complete
            retired = f"{final}.old-{owner}"
            os.replace(final, retired)
            os.replace(staging, final)
            shutil.rmtree(retired)
        else:
            os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------------
# Reading inputs


class JsonlInput:
    def __init__(self, path: str):
        self.path = path

    def __len__(self) -> int:
        with open(self.path, "rb") as f:
            return sum(1 for line in f if line.strip())

    def __iter__(self) -> Iterator[tuple[str, Union[dict, BadRecord]]]:
        with open(self.path, "rb") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                source = f"{self.path}:{number}"
                try:
                    record = json.loads(line)
                except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
                    yield source, BadRecord("not_json", f"not valid JSON ({err})")
                    continue
                if not isinstance(record, dict):
                    yield source, BadRecord("invalid", f"expected a JSON object, got {type(record).__name__}")
                else:
                    yield source, record

    def files(self) -> list[str]:
        return [self.path]


class DatasetInput:
    """A local Hugging Face dataset directory; never touches the hub."""

    def __init__(self, path: str, split: str):
        import datasets

        self.path = path
        saved = any(os.path.exists(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json"))
        loaded = datasets.load_from_disk(path) if saved else datasets.load_dataset(path)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"{path}: no split {split!r} (has {', '.join(loaded)}); choose one with --split")
            loaded = loaded[split]
        self.dataset = loaded

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[tuple[str, Union[dict, BadRecord]]]:
        for row, record in enumerate(self.dataset):
            yield f"{self.path}:{row}", record

    def files(self) -> list[str]:
        found = []
        for folder, dirs, names in os.walk(self.path):
            dirs.sort()
            found += [os.path.join(folder, name) for name in sorted(names)]
        return found


def open_input(path: str, split: str) -> Union[JsonlInput, DatasetInput]:
    if os.path.isdir(path):
        return DatasetInput(path, split)
    if os.path.isfile(path):
        return JsonlInput(path)
    raise FileNotFoundError(f"no such input file or directory: {path}")


# ---------------------------------------------------------------------------------------------
# Records -> token pairs


def split_text(text: str, fraction: float) -> tuple[str, str]:
    """Cut a document at the sentence or paragraph end nearest `fraction` of its length.

    Falls back to a word boundary when there is no sentence end; both parts are non-empty.
    The whitespace at the cut starts the continuation, so prefix + continuation == text.
    """
    target = fraction * len(text)
    for boundary in (SENTENCE_OR_PARAGRAPH_END, WORD_END):
        cuts = [m.start() for m in boundary.finditer(text) if text[m.start():].strip()]
        if cuts:
            cut = min(cuts, key=lambda c: (abs(c - target), c))
            return text[:cut], text[cut:]
    raise BadRecord("empty_view", "'text' has no sentence or word boundary to split it into two non-empty views")


def _string_field(fields: dict, name: str) -> str:
    if name not in fields:
        raise BadRecord("missing_field", f"missing field '{name}'")
    value = fields[name]
    if not isinstance(value, str):
        raise BadRecord("invalid", f"'{name}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise BadRecord("empty_view", f"empty view: '{name}' is empty")
    return value


class PairEncoder:
    """One input record -> (view A ids, view B ids) of at most max_pair_tokens together, or BadRecord."""

    def __init__(
        self,
        tokenizer,
        max_pair_tokens: int,
        input_format: str = "auto",
        field_map: Optional[dict] = None,
        text_split: float = 0.5,
    ):
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token: view B must end with one")
        self.tokenizer = tokenizer
        self.max_pair_tokens = max_pair_tokens
        self.input_format = input_format
        self.field_map = field_map or {}
        self.text_split = text_split

    def __call__(self, record: dict) -> tuple[list[int], list[int]]:
        view_a, view_b = self._encode(record)
        if len(view_a) + len(view_b) > self.max_pair_tokens:
            raise BadRecord(
                "too_long",
                f"pair of {len(view_a) + len(view_b)} tokens (view A {len(view_a)} + view B {len(view_b)}) "
                f"is longer than max_pair_tokens={self.max_pair_tokens}",
            )
        return view_a, view_b

    def _encode(self, record: dict) -> tuple[list[int], list[int]]:
        fields = {name: record[name] for name in FIELDS if name in record}
        for name, column in self.field_map.items():
            if column not in record:
                raise BadRecord("missing_field", f"missing field '{column}' (--field {name}={column})")
            fields[name] = record[column]
        kind = self.input_format if self.input_format != "auto" else self._detect(fields)
        if kind == "chat":
            return self._chat(fields)
        if kind == "pair":
            view_a, view_b = _string_field(fields, "view_a"), _string_field(fields, "view_b")
        else:
            view_a, view_b = split_text(_string_field(fields, "text"), self.text_split)
        eos = self.tokenizer.eos_token_id
        return encode_text(self.tokenizer, view_a), encode_text(self.tokenizer, view_b) + [eos]

    @staticmethod
    def _detect(fields: dict) -> str:
        if "messages" in fields:
            return "chat"
        if "view_a" in fields or "view_b" in fields:
            return "pair"
        if "text" in fields:
            return "text"
        raise BadRecord("missing_field", "no 'messages', 'view_a'/'view_b' or 'text' field (see --format, --field)")

    def _chat(self, fields: dict) -> tuple[list[int], list[int]]:
        if "messages" not in fields:
            raise BadRecord("missing_field", "missing field 'messages'")
        messages = fields["messages"]
        if not isinstance(messages, list) or not messages:
            raise BadRecord("invalid", "'messages' must be a non-empty list")
        turns = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise BadRecord("invalid", f"messages[{i}] is not an object")
            for key in ("role", "content"):
                if key not in message:
                    raise BadRecord("missing_field", f"messages[{i}]: missing '{key}'")
            if message["role"] not in ROLES:
                expected = ", ".join(ROLES)
                raise BadRecord("invalid", f"messages[{i}]: unknown role {message['role']!r} (expected {expected})")
            if not isinstance(message["content"], str):
                raise BadRecord("invalid", f"messages[{i}]: 'content' must be a string")
            turns.append({"role": message["role"], "content": message["content"]})
        if turns[-1]["role"] != "assistant":
            raise BadRecord("invalid", f"the last message must be the assistant's, not the {turns[-1]['role']}'s")
        if not turns[-1]["content"].strip():
            raise BadRecord("empty_view", "empty view B: the assistant message is empty")
        if not any(turn["content"].strip() for turn in turns[:-1]):
            raise BadRecord("empty_view", "empty view A: no non-empty message before the assistant's")
        return split_conversation(self.tokenizer, turns)


# ---------------------------------------------------------------------------------------------
# The run


def _percentiles(lengths: list[int]) -> dict[str, int]:
    values = np.asarray(lengths)
    stats = {f"p{q}": int(np.percentile(values, q, method="inverted_cdf")) for q in (50, 90, 99)}
    stats["max"] = int(values.max())
    return stats


class _SkipReporter:
    """Counts skipped records by reason; prints the first MAX_REPORTED as `SOURCE: reason`."""

    def __init__(self):
        self.counts: Counter = Counter()

    def __call__(self, message: str, reason: str) -> None:
        self.counts[reason] += 1
        if sum(self.counts.values()) <= MAX_REPORTED:
            tqdm.write(message, file=sys.stderr)

    def close(self) -> None:
        hidden = sum(self.counts.values()) - MAX_REPORTED
        if hidden > 0:
            print(f"... and {hidden} more skipped records", file=sys.stderr)


def _write_pairs(sources, encoder: PairEncoder, writer, strict: bool, skip: _SkipReporter, progress: bool):
    lengths_a: list[int] = []
    lengths_b: list[int] = []
    read = 0
    with tqdm(total=sum(len(s) for s in sources), unit="pair", desc="prepare", disable=not progress) as bar:
        for source_input in sources:
            for source, record in source_input:
                read += 1
                bar.update()
                try:
                    if isinstance(record, BadRecord):
                        raise record
                    view_a, view_b = encoder(record)
                except BadRecord as bad:
                    message = f"{source}: {bad}"
                    if strict:
                        raise BadInput(message) from None
                    skip(message, bad.reason)
                    continue
                writer.write(
                    {
                        "sample_id": len(lengths_a),
                        "view_a": np.asarray(view_a, dtype=np.int32),
                        "view_b": np.asarray(view_b, dtype=np.int32),
                        "source": source,
                    }
                )
                lengths_a.append(len(view_a))
                lengths_b.append(len(view_b))
    return read, lengths_a, lengths_b


def prepare(
    inputs: Iterable[str],
    out_dir: str,
    tokenizer_dir: Optional[str] = None,
    *,
    strict: bool = False,
    max_pair_tokens: int = 256,
    shard_size_limit: int = 1 << 26,
    input_format: str = "auto",
    field_map: Optional[dict[str, str]] = None,
    text_split: float = 0.5,
    split: str = "train",
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Tokenize `inputs` into MDS shards + fingerprint.json at out_dir; return the summary.

    tokenizer_dir None uses the embedded tokenizer (built under data/demo when missing).
    Raises BadInput (a bad record under strict, or no usable record), FileNotFoundError,
    FileExistsError (out_dir not empty and not overwrite) or ValueError (bad options).
    """
    inputs = list(inputs)
    if not inputs:
        raise ValueError("no inputs given")
    if input_format not in FORMATS:
        raise ValueError(f"input_format {input_format!r}: expected one of {', '.join(FORMATS)}")
    unknown = sorted(set(field_map or {}) - set(FIELDS))
    if unknown:
        raise ValueError(f"--field {unknown[0]}=...: the name must be one of {', '.join(FIELDS)}")
    if not 0.0 < text_split < 1.0:
        raise ValueError(f"text_split={text_split}: expected a fraction strictly between 0 and 1")
    if max_pair_tokens < 2:
        raise ValueError(f"max_pair_tokens={max_pair_tokens}: a pair needs at least 2 tokens")
    with staged_directory(out_dir, overwrite) as staging:
        sources = [open_input(path, split) for path in inputs]
        if tokenizer_dir is None:
            from megajepa.data.embedded import ensure_tokenizer

            tokenizer_dir = ensure_tokenizer()
        tokenizer = load_tokenizer(tokenizer_dir)
        encoder = PairEncoder(tokenizer, max_pair_tokens, input_format, field_map, text_split)
        skip = _SkipReporter()
        started = time.perf_counter()
        writer = MDSWriter(out=staging, columns=COLUMNS, compression="zstd", size_limit=shard_size_limit)
        try:
            read, lengths_a, lengths_b = _write_pairs(sources, encoder, writer, strict, skip, progress)
            if not lengths_a:
                raise BadInput(f"no usable pairs in {', '.join(inputs)} ({read} read, all skipped)")
            writer.finish()
        except BaseException:
            writer.cancel_future_jobs()
            raise
        finally:
            skip.close()
        fingerprint = {
            "format_version": FORMAT_VERSION,
            "tokenizer_hash": tokenizer_hash(tokenizer),
            "vocab_size": len(tokenizer),
            "eos_token_id": tokenizer.eos_token_id,
            "chat_template": chat_template(tokenizer),
            "columns": COLUMNS,
            "sources": {path: file_sha256(path) for s in sources for path in s.files()},
            "options": {
                "input_format": input_format,
                "field_map": dict(sorted((field_map or {}).items())),
                "text_split": text_split,
                "split": split,
            },
            "max_pair_tokens": max_pair_tokens,
            "counts": {"read": read, "written": len(lengths_a), "skipped": dict(sorted(skip.counts.items()))},
            "token_lengths": {
                "view_a": _percentiles(lengths_a),
                "view_b": _percentiles(lengths_b),
                "pair": _percentiles([a + b for a, b in zip(lengths_a, lengths_b)]),
            },
        }
        with open(os.path.join(staging, FINGERPRINT_FILE), "w") as f:
            json.dump(fingerprint, f, indent=2, sort_keys=True)
            f.write("\n")
    seconds = time.perf_counter() - started
    summary = {**fingerprint, "out": out_dir, "seconds": seconds, "pairs_per_second": len(lengths_a) / seconds}
    if progress:
        print(format_summary(summary))
    return summary


def format_summary(summary: dict) -> str:
    counts = summary["counts"]
    skipped = ", ".join(f"{reason} {n}" for reason, n in counts["skipped"].items()) or "none"
    lines = [
        f"prepared {counts['written']} pairs -> {summary['out']}  (read {counts['read']}, skipped: {skipped})",
        f"  {'tokens':8} {'p50':>6} {'p90':>6} {'p99':>6} {'max':>6}",
    ]
    for name, stats in summary["token_lengths"].items():
        lines.append(f"  {name:8} " + " ".join(f"{stats[k]:>6}" for k in ("p50", "p90", "p99", "max")))
    lines.append(f"  {summary['pairs_per_second']:.0f} pairs/s ({summary['seconds']:.1f} s)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line


def _field_mapping(text: str) -> tuple[str, str]:
    name, sep, column = text.partition("=")
    if not sep or not column or name not in FIELDS:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=COLUMN with NAME one of {', '.join(FIELDS)}")
    return name, column


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megajepa prepare",
        description="Tokenize view pairs (chat / view_a+view_b / text JSONL, or a local HF dataset) into MDS shards.",
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="JSONL file or local HF dataset directory")
    parser.add_argument("--out", required=True, metavar="DIR", help="output shard directory (created atomically)")
    parser.add_argument("--tokenizer", metavar="DIR", help="HF tokenizer directory (default: the embedded one)")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad record (exit code 2)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--max-pair-tokens", type=int, default=256, help="longest view A + view B kept")
    parser.add_argument("--shard-size", type=int, default=1 << 26, metavar="BYTES", help="shard size limit")
    parser.add_argument("--format", choices=FORMATS, default="auto", help="record format (default: per record)")
    parser.add_argument(
        "--field", type=_field_mapping, action="append", default=[], metavar="NAME=COLUMN",
        help=f"take NAME ({', '.join(FIELDS)}) from COLUMN; repeatable",
    )
    parser.add_argument("--text-split", type=float, default=0.5, help="where to cut text documents (fraction)")
    parser.add_argument("--split", default="train", help="split of an HF DatasetDict input")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or summary")
    return parser


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds through staged_directory, which removes its staging


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        prepare(
            args.inputs,
            args.out,
            args.tokenizer,
            strict=args.strict,
            max_pair_tokens=args.max_pair_tokens,
            shard_size_limit=args.shard_size,
            input_format=args.format,
            field_map=dict(args.field),
            text_split=args.text_split,
            split=args.split,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except BadInput as err:
        print(err, file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"megajepa prepare: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
