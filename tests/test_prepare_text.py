"""`megajepa prepare-text`: plain text -> CE-only schema-v2 records, the same bytes for any number
of processes, bad records by FILE:LINE, HF datasets by DIR:ROW, read back by the loader."""

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
from streaming import StreamingDataset
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import PreTrainedTokenizerFast

from megajepa.cli import main as cli_main
from megajepa.data.fingerprint import FINGERPRINT_FILE

from megajepa.data.loader import RECORD_LENGTHS_FILE, build_loader, decode_record
from megajepa.data.prepare import BadInput
from megajepa.data.prepare_text import prepare_text
from _mixture_shards import make_layout, summary_collate

WORDS = [f"w{i}" for i in range(40)]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")
    path = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(path)
    return str(path)


def document(rng, words):
    return " ".join(rng.choice(WORDS, size=words))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A directory of two JSONL files and a .txt file; bad and blank lines in the first file."""
    root = tmp_path_factory.mktemp("corpus") / "web"
    (root / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines_a = [json.dumps({"text": document(rng, rng.integers(1, 30))}) for _ in range(40)]
    lines_a[6] = "{not json"
    lines_a[11] = json.dumps({"title": "no text"})
    lines_a[20] = ""
    lines_a[25] = json.dumps({"text": "   "})
    (root / "a.jsonl").write_text("\n".join(lines_a) + "\n")
    (root / "sub" / "b.jsonl").write_text("\n".join(json.dumps({"text": document(rng, 9)}) for _ in range(25)) + "\n")
    (root / "c.txt").write_text("\n".join(document(rng, rng.integers(1, 60)) for _ in range(30)) + "\n")
    (root / "notes.md").write_text("not part of the corpus")
    return root


def expected_records(corpus, tokenizer_dir, max_tokens):
    """(source, tokens) per record, from the files read line by line, in sorted file order."""
    tok = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    out = []
    for path in (corpus / "a.jsonl", corpus / "c.txt", corpus / "sub" / "b.jsonl"):
        for number, line in enumerate(path.read_text().split("\n"), 1):
            try:
                text = json.loads(line)["text"] if path.suffix == ".jsonl" else line
            except (ValueError, KeyError):
                continue
            if not text.strip():
                continue
            ids = tok(text)["input_ids"] + [tok.eos_token_id]
            out += [(f"{path}:{number}", ids[i : i + max_tokens]) for i in range(0, len(ids), max_tokens)]
    return out


def read_back(directory):
    dataset = StreamingDataset(local=str(directory), batch_size=1, shuffle=False)
    return [decode_record(dataset[i]) for i in range(dataset.num_samples)]


def test_records_tokens_and_sources(corpus, tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "out"
    summary = prepare_text([str(corpus)], str(out), tokenizer_dir, workers=1, max_tokens=16, progress=False)
    records = read_back(out)
    want = expected_records(corpus, tokenizer_dir, 16)
    assert [(r["source"], r["full"].tolist()) for r in records] == want
    for r in records:  # CE-only: empty views, zero spans and inserts
        assert len(r["user"]) == len(r["assistant"]) == r["prompt_len"] == 0
        assert r["full_spans"].tolist() == [0] * 4 and r["user_insert"].tolist() == [0, 0]
    assert len({r["sample_id"] for r in records}) == len(records)
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"{corpus / 'a.jsonl'}:7: unreadable (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))",
        f"{corpus / 'a.jsonl'}:12: missing field 'text'",
        f"{corpus / 'a.jsonl'}:26: empty text",
    ]
    fp = json.loads((out / FINGERPRINT_FILE).read_text())
    assert fp["format_version"] == 2 and fp["kind"] == "text-corpus"
    assert fp["counts"] == {"documents": 94, "records": len(want), "skipped": {"empty_view": 1, "missing_field": 1, "not_json": 1}}
    assert fp["tokens"] == summary["tokens"] == sum(len(t) for _, t in want)
    lengths = np.load(out / RECORD_LENGTHS_FILE)
    assert lengths.tolist() == [[len(t), 0, 0] for _, t in want]


def tree(directory):
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(Path(directory).rglob("*")) if p.is_file()}


def test_same_bytes_for_any_number_of_processes(corpus, tokenizer_dir, tmp_path):
    outputs = []
    for workers in (1, 3):
        out = tmp_path / f"w{workers}"
        summary = prepare_text([str(corpus)], str(out), tokenizer_dir, workers=workers, max_tokens=16,
                               part_bytes=700, shard_size_limit=1 << 12, progress=False)
        outputs.append(tree(out))
    assert summary["parts"] > 4 and sum(name.endswith(".mds.zstd") for name in outputs[0]) > summary["parts"] - 1
    assert outputs[0] == outputs[1]
    assert [(r["source"], r["full"].tolist()) for r in read_back(tmp_path / "w3")] == expected_records(
        corpus, tokenizer_dir, 16
    )


def test_strict_stops_at_the_first_bad_line(corpus, tokenizer_dir, tmp_path, capsys):
    with pytest.raises(BadInput, match=r"a\.jsonl:7: unreadable"):
        prepare_text([str(corpus)], str(tmp_path / "s"), tokenizer_dir, workers=2, strict=True, part_bytes=300,
                     progress=False)
    assert not (tmp_path / "s").exists()
    code = cli_main(["prepare-text", str(corpus), "--out", str(tmp_path / "c"), "--tokenizer", tokenizer_dir,
                     "--strict", "--workers", "2", "--no-progress"])
    assert code == 2 and "a.jsonl:7: unreadable" in capsys.readouterr().err


def test_cli_error_names_the_command(tokenizer_dir, tmp_path, capsys):
    missing = tmp_path / "missing"
    code = cli_main(["prepare-text", str(missing), "--out", str(tmp_path / "out"), "--tokenizer", tokenizer_dir])
    assert code == 2
    assert capsys.readouterr().err == f"megajepa prepare-text: error: no such input file or directory: {missing}\n"


def test_a_lone_surrogate_is_reported_by_line_and_skipped(tokenizer_dir, tmp_path, capsys):
    jsonl, txt = tmp_path / "a.jsonl", tmp_path / "b.txt"
    jsonl.write_text('{"text": "w1 w2"}\n{"text": "w3 \\ud800 w4"}\n{"text": "w5"}\n')  # JSON's escape of one
    txt.write_bytes(b"w6 w7\nw8 \xed\xa0\x80 w9\n")  # the surrogate's bytes (CESU-8), not UTF-8
    summary = prepare_text([str(jsonl), str(txt)], str(tmp_path / "out"), tokenizer_dir, progress=False)
    err = capsys.readouterr().err
    assert f"{jsonl}:2: a lone surrogate '\\ud800' is not text" in err and f"{txt}:2: unreadable" in err
    assert summary["counts"]["skipped"] == {"not_utf8": 2} and summary["counts"]["records"] == 3
    assert [r["source"] for r in read_back(tmp_path / "out")] == [f"{jsonl}:1", f"{jsonl}:3", f"{txt}:1"]


def test_a_full_disk_in_a_worker_is_one_line_and_leaves_nothing(corpus, tokenizer_dir, tmp_path, monkeypatch, capsys):
    import streaming

    class FullDisk(streaming.MDSWriter):
        def flush_shard(self):  # where the shard file is written, here in a worker process
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(self.local, "shard.00000.mds.zstd"))

    monkeypatch.setattr(streaming, "MDSWriter", FullDisk)  # each part imports it when it writes (forked workers)
    out = tmp_path / "out"
    code = cli_main(["prepare-text", str(corpus), "--out", str(out), "--tokenizer", tokenizer_dir, "--workers", "2",
                     "--part-bytes", "500", "--no-progress"])
    assert code == 2
    assert capsys.readouterr().err == f"megajepa prepare-text: error: no space left on device: {out}\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("out")] == []


def test_hf_dataset_rows_and_cli(tokenizer_dir, tmp_path, capsys):
    import datasets

    rng = np.random.default_rng(1)
    texts = [document(rng, rng.integers(1, 12)) for _ in range(11)]
    texts[4] = 17  # not a string
    datasets.Dataset.from_dict({"body": [str(t) if i != 4 else "" for i, t in enumerate(texts)]}).save_to_disk(
        str(tmp_path / "hf")
    )
    code = cli_main(["prepare-text", str(tmp_path / "hf"), "--out", str(tmp_path / "out"), "--tokenizer",
                     tokenizer_dir, "--field", "body", "--rows-per-part", "3", "--workers", "2"])
    captured = capsys.readouterr()
    assert code == 0 and f"{tmp_path / 'hf'}:4: empty text" in captured.err
    assert "tokens/s" in captured.out
    records = read_back(tmp_path / "out")
    assert [r["source"] for r in records] == [f"{tmp_path / 'hf'}:{row}" for row in range(11) if row != 4]


def test_loader_reads_the_corpus_by_token_budget(corpus, tokenizer_dir, tmp_path):
    out = tmp_path / "out"
    prepare_text([str(corpus)], str(out), tokenizer_dir, workers=2, max_tokens=16, part_bytes=500, progress=False)
    loader = build_loader(str(out), batch_pairs=4, layout=make_layout(row_length=32),
                          collate=summary_collate, tokens_per_batch=40, shuffle=False,
                          tokenizer=PreTrainedTokenizerFast.from_pretrained(tokenizer_dir))
    batches = list(loader.iter_epoch())
    assert all(int(b["full_tokens"].sum()) <= 40 for b in batches)  # CE-only: a record costs its tokens
    assert all(int(b["source_pairs"].sum()) == 0 for b in batches)
    sources = [s for b in batches for s in b["sources"]]
    want = [s for s, _ in expected_records(corpus, tokenizer_dir, 16)]
    # in order (shuffle off) but for the longest-first order inside each window
    assert sorted(sources) == sorted(want[: len(sources)]) and len(want) - len(sources) < loader.dataset.batch_size
