"""Test helper: small MDS shards in the `megajepa prepare` format (schema v2), and a tiny tokenizer.

A pair (view A, view B) becomes the record of a conversation A ++ B whose user view is A and
whose assistant view is B ([PRED] tokens at the end of A).
"""

from __future__ import annotations

import json
import os

import numpy as np
from streaming import MDSWriter
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import PreTrainedTokenizerFast

from megajepa.data.fingerprint import FINGERPRINT_FILE, FORMAT_VERSION, tokenizer_hash
from megajepa.data.prepare import COLUMNS


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


def pair_record(view_a, view_b) -> dict:
    """The prepare schema's columns for the conversation view_a ++ view_b."""
    a, b = np.asarray(view_a, dtype=np.int32), np.asarray(view_b, dtype=np.int32)
    return {
        "full": np.concatenate([a, b]),
        "prompt_len": len(a),
        "full_spans": np.array([0, len(a), len(a), len(a) + len(b)], dtype=np.int32),
        "user": a,
        "user_insert": np.array([0, len(a)], dtype=np.int32),
        "assistant": b,
        "assistant_insert": np.array([0, len(b)], dtype=np.int32),
    }


def write_pair_shards(out_dir: str, pairs, tokenizer, *, size_limit: int = 4096) -> str:
    """MDS shards (sample_id = index) and fingerprint.json for `tokenizer`; small shards, so several."""
    with MDSWriter(out=out_dir, columns=COLUMNS, compression="zstd", size_limit=size_limit) as writer:
        for i, (view_a, view_b) in enumerate(pairs):
            writer.write({"sample_id": i, **pair_record(view_a, view_b), "source": "test"})
    fingerprint = {
        "format_version": FORMAT_VERSION,
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "vocab_size": len(tokenizer),
        "num_pairs": len(pairs),
    }
    path = os.path.join(out_dir, FINGERPRINT_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(fingerprint, f)
    os.replace(path + ".tmp", path)
    return out_dir
