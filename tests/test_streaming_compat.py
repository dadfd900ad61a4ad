"""Shards prepared before the move to streaming-community and transformers 5 load unchanged.

tests/fixtures/streaming-0.13 was written by `megajepa prepare` under mosaicml-streaming 0.13.0 and
transformers 4.57.6 (48 demo records, the tokenizer trained on them, saved by that transformers).
The oracle is the current stack preparing the same records with the same tokenizer directory.
"""

import shutil
from pathlib import Path

import numpy as np
from streaming import StreamingDataset

from megajepa.data.fingerprint import check_fingerprint
from megajepa.data.prepare import prepare
from megajepa.data.tokenizer import load_tokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "streaming-0.13"


def read_all(shard_dir) -> list[dict]:
    dataset = StreamingDataset(local=str(shard_dir), batch_size=1, shuffle=False)
    return [dataset[i] for i in range(len(dataset))]


def test_shards_written_by_mosaicml_streaming_0_13_read_as_the_current_stack_writes_them(tmp_path):
    old = tmp_path / "old"
    shutil.copytree(FIXTURE / "shards", old)  # streaming may write beside the index; keep the fixture clean
    tokenizer = load_tokenizer(str(FIXTURE / "tokenizer"))
    check_fingerprint(str(old), tokenizer)  # the old tokenizer folder, loaded by transformers 5, is the one hashed

    prepare([str(FIXTURE / "records.jsonl")], str(tmp_path / "new"), str(FIXTURE / "tokenizer"), progress=False)
    before, after = read_all(old), read_all(tmp_path / "new")

    assert len(before) == len(after) == 48
    for i, (a, b) in enumerate(zip(before, after)):
        assert a.keys() == b.keys(), i
        assert a.pop("source").rsplit(":", 1)[1] == b.pop("source").rsplit(":", 1)[1] == str(i + 1)  # FILE:LINE
        for column in a:
            equal = np.array_equal(a[column], b[column]) if isinstance(a[column], np.ndarray) else a[column] == b[column]
            assert equal, f"record {i}, column {column}: {a[column]!r} != {b[column]!r}"


def test_the_tokenizer_hash_ignores_state_that_leaves_token_ids_alone():
    from tokenizers import processors

    from megajepa.data.fingerprint import tokenizer_hash

    tokenizer = load_tokenizer(str(FIXTURE / "tokenizer"))
    plain = tokenizer_hash(tokenizer)
    tokenizer.backend_tokenizer.enable_truncation(max_length=7)  # what the reference's saved tokenizers carry
    tokenizer.backend_tokenizer.enable_padding(length=9)
    assert tokenizer_hash(tokenizer) == plain
    bos = (tokenizer.bos_token, tokenizer.bos_token_id)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[bos])
    assert tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id
    assert tokenizer_hash(tokenizer) != plain  # a BOS the post-processor adds changes every record's ids
