"""Test helper: small view-pair MDS shards in the `megajepa prepare` format, and a tiny tokenizer."""

from __future__ import annotations

import json
import os

import numpy as np
from streaming import MDSWriter
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import PreTrainedTokenizerFast

from megajepa.data.fingerprint import FINGERPRINT_FILE, tokenizer_hash

COLUMNS = {"sample_id": "int64", "view_a": "ndarray:int32", "view_b": "ndarray:int32", "source": "str"}


def tiny_tokenizer(vocab_size: int = 64) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over w0, w1, ...; a different vocab_size gives a different hash."""
    vocab = {"<pad>": 0, "<unk>": 1, **{f"w{i}": i + 2 for i in range(vocab_size - 2)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>")


def random_pairs(num_pairs: int, *, seed: int = 0, max_view: int = 24, vocab_size: int = 64):
    """(view_a, view_b) int32 arrays of 1..max_view tokens each."""
    rng = np.random.default_rng(seed)
    return [
        tuple(rng.integers(2, vocab_size, size=rng.integers(1, max_view + 1), dtype=np.int32) for _ in range(2))
        for _ in range(num_pairs)
    ]


def write_pair_shards(out_dir: str, pairs, tokenizer, *, size_limit: int = 4096) -> str:
    """MDS shards (sample_id = index) and fingerprint.json for `tokenizer`; small shards, so several."""
    with MDSWriter(out=out_dir, columns=COLUMNS, compression="zstd", size_limit=size_limit) as writer:
        for i, (view_a, view_b) in enumerate(pairs):
            writer.write({"sample_id": i, "view_a": view_a, "view_b": view_b, "source": "test"})
    fingerprint = {"tokenizer_hash": tokenizer_hash(tokenizer), "vocab_size": len(tokenizer), "num_pairs": len(pairs)}
    path = os.path.join(out_dir, FINGERPRINT_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(fingerprint, f)
    os.replace(path + ".tmp", path)
    return out_dir
