"""Shard fingerprints: which tokenizer and sources a dataset was prepared with.

prepare writes `fingerprint.json` beside the shards; the loader refuses shards whose tokenizer
hash differs from the tokenizer the model uses.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

FINGERPRINT_FILE = "fingerprint.json"
# 2: the reference's three sequences per record (full, user, assistant); 1 had view A / view B
# 3: tokenizer_hash over the sections that decide token ids only (2 hashed the whole JSON)
FORMAT_VERSION = 3


class FingerprintMismatch(RuntimeError):
    pass


# The parts of a fast tokenizer's JSON that decide the token ids of a text (not its truncation or
# padding state, which every call with truncation=/padding= leaves in a saved tokenizer, nor its decoder).
ID_SECTIONS = ("added_tokens", "normalizer", "pre_tokenizer", "model", "post_processor")


def tokenizer_hash(tokenizer) -> str:
    """sha256 of what decides the fast tokenizer's token ids (vocabulary, merges, special tokens,
    normalisation, pre-tokenisation, the template of special tokens around a text), canonical JSON."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    ids = json.dumps({key: spec.get(key) for key in ID_SECTIONS}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(ids.encode()).hexdigest()


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_fingerprint(shard_dir: str) -> dict[str, Any]:
    path = os.path.join(shard_dir, FINGERPRINT_FILE)
    if not os.path.isfile(path):
        raise FingerprintMismatch(f"{path}: missing; prepare the data with `megajepa prepare`")
    with open(path) as f:
        return json.load(f)


def write_fingerprint(shard_dir: str, fingerprint: dict[str, Any]) -> None:
    """fingerprint.json in shard_dir (prepare's staging directory, which appears whole or not at all)."""
    with open(os.path.join(shard_dir, FINGERPRINT_FILE), "w") as f:
        json.dump(fingerprint, f, indent=2, sort_keys=True)
        f.write("\n")


def check_fingerprint(shard_dir: str, tokenizer) -> dict[str, Any]:
    """Raise FingerprintMismatch unless the shards were tokenized by `tokenizer`."""
    fingerprint = read_fingerprint(shard_dir)
    if fingerprint.get("format_version") != FORMAT_VERSION:
        raise FingerprintMismatch(
            f"{os.path.join(shard_dir, FINGERPRINT_FILE)}: shards of format version "
            f"{fingerprint.get('format_version')}, this megajepa reads version {FORMAT_VERSION}; re-run "
            f"`megajepa prepare` on their source"
        )
    expected = tokenizer_hash(tokenizer)
    if fingerprint.get("tokenizer_hash") != expected:
        raise FingerprintMismatch(
            f"{os.path.join(shard_dir, FINGERPRINT_FILE)}: shards were tokenized with tokenizer "
            f"{str(fingerprint.get('tokenizer_hash'))[:12]} (vocab {fingerprint.get('vocab_size')}), "
            f"but the model uses {expected[:12]} (vocab {len(tokenizer)}); re-run `megajepa prepare` "
            f"with this tokenizer"
        )
    return fingerprint
