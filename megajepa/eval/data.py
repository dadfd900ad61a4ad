"""Held-out view pairs for `megajepa eval`, from MDS shards or a chat JSONL file.

Each pair keeps its prepared record (megajepa.data.prepare's columns, for the teacher-forced
metrics in the training layout), the prompt the model generates from (the conversation up to the
assistant header) and the reply that follows it, as ids and as text, for exact match and the task
checker. Shards must have been prepared with the model's tokenizer (their fingerprint says so).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from megajepa.data.fingerprint import check_fingerprint, read_fingerprint
from megajepa.data.loader import RECORD_ARRAYS
from megajepa.data.prepare import BadRecord, RecordEncoder
from megajepa.data.shard_hashes import check_file, shard_file


@dataclass
class EvalPair:
    sample_id: int
    record: dict  # the prepared sequences
    view_a: list[int]  # the prompt: the conversation up to and including the assistant header
    view_b: list[int]  # the reply and its end of turn
    prompt: str  # the prompt as text (special tokens kept), to recognise the task
    reference: str  # the reply as text, without special tokens


def _pair(record: dict, tokenizer, reference: Optional[str] = None) -> EvalPair:
    full, cut = record["full"].tolist(), record["prompt_len"]
    return EvalPair(
        sample_id=record["sample_id"],
        record=record,
        view_a=full[:cut],
        view_b=full[cut:],
        prompt=tokenizer.decode(full[:cut]),
        reference=reference if reference is not None else tokenizer.decode(full[cut:], skip_special_tokens=True),
    )


def _from_shards(path: str, tokenizer, limit: Optional[int]) -> list[EvalPair]:
    from streaming import StreamingDataset

    check_fingerprint(path, tokenizer)
    dataset = StreamingDataset(local=path, shuffle=False, batch_size=1)
    count = dataset.size if limit is None else min(limit, dataset.size)
    _check_shards(dataset, path, count)
    pairs = []
    for i in range(count):
        sample = dataset.get_item(i)
        record = {name: np.asarray(sample[name], dtype=np.int64) for name in RECORD_ARRAYS}
        record.update(prompt_len=int(sample["prompt_len"]), sample_id=int(sample["sample_id"]))
        pairs.append(_pair(record, tokenizer))
    return pairs


def _check_shards(dataset, path: str, count: int) -> None:
    """The shards holding the first `count` samples against their index's digests (CorruptShard),
    as the training loader checks them: the raw file where it is here, else the compressed one."""
    last_shard = dataset.spanner[count - 1][0] if count else -1
    for shard in dataset.shards[: last_shard + 1]:
        for raw_info, zip_info in shard.file_pairs:
            raw = shard_file(shard, raw_info)
            if os.path.isfile(raw):
                check_file(raw, raw_info, path)
            elif zip_info is not None:
                check_file(shard_file(shard, zip_info), zip_info, path)


def _from_jsonl(path: str, tokenizer, limit: Optional[int]) -> list[EvalPair]:
    encoder = RecordEncoder(tokenizer, max_length=0)
    pairs = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if limit is not None and len(pairs) >= limit:
                break
            if not line.strip():
                continue
            try:
                messages = json.loads(line)["messages"]
                sample, _ = encoder({"messages": messages})
            except (json.JSONDecodeError, KeyError, TypeError, BadRecord) as err:
                raise ValueError(f"{path}:{number}: not a chat record ending with the assistant's: {err}") from None
            record = {k: (np.asarray(v, dtype=np.int64) if k in RECORD_ARRAYS else v) for k, v in sample.items()}
            record["sample_id"] = number - 1
            pairs.append(_pair(record, tokenizer, reference=messages[-1]["content"]))
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
