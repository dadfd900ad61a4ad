"""Held-out view pairs for `megajepa eval`, from MDS shards or a chat JSONL file.

Each pair keeps its token ids (view A is the prompt: system + user + assistant header; view B the
answer and its end-of-turn token) and the reference answer as text, for exact match and the task
checker. Shards must have been prepared with the model's tokenizer (their fingerprint says so).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

from megajepa.data.fingerprint import check_fingerprint, read_fingerprint
from megajepa.data.tokenizer import split_conversation


@dataclass
class EvalPair:
    sample_id: int
    view_a: list[int]
    view_b: list[int]
    prompt: str  # view A as text (special tokens kept), to recognise the task
    reference: str  # view B as text, without special tokens


def _from_shards(path: str, tokenizer, limit: Optional[int]) -> list[EvalPair]:
    from streaming import StreamingDataset

    check_fingerprint(path, tokenizer)
    dataset = StreamingDataset(local=path, shuffle=False, batch_size=1)
    count = dataset.size if limit is None else min(limit, dataset.size)
    pairs = []
    for i in range(count):
        sample = dataset.get_item(i)
        view_a, view_b = sample["view_a"].tolist(), sample["view_b"].tolist()
        pairs.append(
            EvalPair(
                sample_id=int(sample["sample_id"]),
                view_a=view_a,
                view_b=view_b,
                prompt=tokenizer.decode(view_a),
                reference=tokenizer.decode(view_b, skip_special_tokens=True),
            )
        )
    return pairs


def _from_jsonl(path: str, tokenizer, limit: Optional[int]) -> list[EvalPair]:
    pairs = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if limit is not None and len(pairs) >= limit:
                break
            if not line.strip():
                continue
            try:
                messages = json.loads(line)["messages"]
                view_a, view_b = split_conversation(tokenizer, messages)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                raise ValueError(f"{path}:{number}: not a chat record ending with the assistant's: {err}") from None
            pairs.append(
                EvalPair(
                    sample_id=number - 1,
                    view_a=view_a,
                    view_b=view_b,
                    prompt=tokenizer.decode(view_a),
                    reference=messages[-1]["content"],
                )
            )
    return pairs


def load_eval_pairs(path: str, tokenizer, limit: Optional[int] = None) -> list[EvalPair]:
    """The first `limit` (default all) pairs of an MDS shard directory or a chat JSONL file."""
    if os.path.isdir(path):
        pairs = _from_shards(path, tokenizer, limit)
    elif os.path.isfile(path):
        pairs = _from_jsonl(path, tokenizer, limit)
    else:
        raise FileNotFoundError(f"--data: no such shard directory or JSONL file: {path}")
    if not pairs:
        raise ValueError(f"--data {path}: no pairs to evaluate")
    return pairs


def data_sources(path: str) -> list[str]:
    """The files the pairs came from: the JSONL itself, or the inputs a shard directory's
    fingerprint.json records (what the task checker is recognised by, beside the prompt)."""
    if os.path.isdir(path):
        return sorted(read_fingerprint(path).get("sources", {}))
    return [path]
