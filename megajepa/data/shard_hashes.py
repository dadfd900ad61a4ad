"""Shard integrity: prepare writes each shard's digest into index.json (streaming's MDSWriter
`hashes`); the loader checks a shard against it once per process, when it first opens the shard.

Streaming itself checks a digest only when it downloads or decompresses a shard (its
`validate_hash`), never a raw shard already in the local directory, and refuses an index without
that digest; so the check is ours: the compressed file before streaming decompresses it, the raw
file after, each against the index's digest when the index has one. Shards prepared without
digests (before this check, or by other tools) are read unchecked.
"""

from __future__ import annotations

import os
from typing import Optional

from streaming.base.hashing import get_hash

SHARD_HASHES = ["xxh64"]  # what prepare and prepare-text write: fast (GB/s), in streaming's list


class CorruptShard(ValueError):
    """A shard file whose bytes are not those its index recorded; one line naming the file and the
    dataset directory. Its one-argument constructor lets a DataLoader worker's copy reach the main
    process as a CorruptShard (whose message then ends with this line: see one_line)."""

    def one_line(self) -> str:
        last = str(self).strip().splitlines()[-1]
        return last.split(f"{type(self).__name__}: ", 1)[-1]


def _algorithm(hashes: dict[str, str]) -> Optional[str]:
    preferred = [a for a in SHARD_HASHES if a in hashes]
    return (preferred or sorted(hashes) or [None])[0]


def shard_file(shard, info) -> str:
    """The local path of a shard's file `info` (its raw or compressed FileInfo), where streaming
    keeps it."""
    return os.path.join(shard.dirname, shard.split, info.basename)


def check_file(path: str, info, dataset: str) -> None:
    """Raise CorruptShard unless the file at `path` has the digest that `info` (a FileInfo of the
    index) records; nothing is checked where the index records none."""
    algo = _algorithm(info.hashes or {})
    if algo is None:
        return
    with open(path, "rb") as f:
        data = f.read()
    if len(data) != info.bytes or get_hash(algo, data) != info.hashes[algo]:
        raise CorruptShard(
            f"{path}: corrupt shard of the dataset {dataset}: its {algo} digest or size is not the one "
            f"in index.json; prepare the dataset again (or restore the file)"
        )
