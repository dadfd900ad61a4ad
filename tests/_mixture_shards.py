"""Test helper for the loader, mixture and prepare-text tests: small MDS shards of pair records
and CE-only (plain-text) records in the schema v2 columns, with a fingerprint for a tokenizer;
the token-budget cost of a record from its definition; a stand-in packer and the real one."""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from streaming import MDSWriter

from megajepa.config import DataConfig, JepaConfig
from megajepa.data.fingerprint import FINGERPRINT_FILE, tokenizer_hash
from megajepa.data.layout import Layout

V2_COLUMNS = {
    "sample_id": "int64",
    "full": "ndarray:int32",
    "prompt_len": "int32",
    "full_spans": "ndarray:int32",
    "user": "bytes",  # MDS cannot encode an empty ndarray: raw int32 bytes, empty for CE-only
    "user_insert": "ndarray:int32",
    "assistant": "bytes",
    "assistant_insert": "ndarray:int32",
    "source": "str",
}


def pair_record(user: np.ndarray, assistant: np.ndarray, source: str) -> dict:
    """A pair as a chat template would lay it out: [2] user [3] assistant (one header token each)."""
    full = np.concatenate([[2], user, [3], assistant]).astype(np.int32)
    spans = [1, 1 + len(user), 2 + len(user), len(full)]
    return {
        "full": full,
        "prompt_len": 2 + len(user),
        "full_spans": np.asarray(spans, np.int32),
        "user": np.concatenate([[2], user]).astype(np.int32),
        "user_insert": np.asarray([1, 1 + len(user)], np.int32),
        "assistant": np.concatenate([[3], assistant]).astype(np.int32),
        "assistant_insert": np.asarray([1, 1 + len(assistant)], np.int32),
        "source": source,
    }


def text_record(tokens: np.ndarray, source: str) -> dict:
    """A CE-only record: empty views, zeros in the spans and inserts."""
    empty = np.zeros(0, np.int32)
    return {
        "full": np.asarray(tokens, np.int32),
        "prompt_len": 0,
        "full_spans": np.zeros(4, np.int32),
        "user": empty,
        "user_insert": np.zeros(2, np.int32),
        "assistant": empty,
        "assistant_insert": np.zeros(2, np.int32),
        "source": source,
    }


def random_records(count: int, *, kind: str, seed: int, name: str, max_len: int = 20) -> list[dict]:
    rng = np.random.default_rng(seed)
    draw = lambda: rng.integers(4, 60, size=rng.integers(1, max_len + 1), dtype=np.int32)  # noqa: E731
    if kind == "pair":
        return [pair_record(draw(), draw(), f"{name}:{i + 1}") for i in range(count)]
    return [text_record(np.concatenate([draw(), draw()]), f"{name}:{i + 1}") for i in range(count)]


def write_records(out_dir: str, records: list[dict], tokenizer, *, size_limit: int = 2048) -> str:
    with MDSWriter(out=out_dir, columns=V2_COLUMNS, compression="zstd", size_limit=size_limit) as writer:
        for i, record in enumerate(records):
            views = {key: record[key].astype("<i4").tobytes() for key in ("user", "assistant")}
            writer.write({"sample_id": i, **record, **views})
    # as `megajepa prepare` writes it: the longest of each sequence bounds the row length
    longest = {key: {"max": max(len(r[key]) for r in records)} for key in ("full", "user", "assistant")}
    meta = {
        "format_version": 2, "tokenizer_hash": tokenizer_hash(tokenizer), "vocab_size": len(tokenizer),
        "token_lengths": longest,
    }
    with open(os.path.join(out_dir, FINGERPRINT_FILE), "w") as f:
        json.dump(meta, f)
    return out_dir


def cost(record: dict, k: int) -> int:
    """The budget's cost of a record, from its definition: all its tokens, plus k for a pair."""
    return len(record["full"]) + len(record["user"]) + len(record["assistant"]) + (k if len(record["user"]) else 0)


def summary_collate(samples: list[dict]) -> dict:
    """A stand-in for the layout's packer: what the loader put into the batch, in order."""
    return {
        "sample_ids": torch.tensor([int(s["sample_id"]) for s in samples], dtype=torch.long),
        "full_tokens": torch.tensor([len(s["full"]) for s in samples], dtype=torch.long),
        "sources": [s["source"] for s in samples],
    }


def make_layout(row_length: int = 128, k: int = 1, **jepa) -> Layout:
    """The real packer for these records ([PRED] id 1, pad id 0)."""
    return Layout(DataConfig(row_length=row_length), JepaConfig(k=k, **jepa), list(range(1, k + 1)), 0)
