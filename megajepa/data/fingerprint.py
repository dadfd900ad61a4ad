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
FORMAT_VERSION = 2


class FingerprintMismatch(RuntimeError):
    pass


def tokenizer_hash(tokenizer) -> str:
    """sha256 of the fast tokenizer's canonical JSON (vocabulary, merges, normalizer, special
    tokens, post-processor), without the state that does not change a text's token ids.

    Left out: truncation and padding (transformers saves whatever a call last set), and a
    post-processor that adds no token (transformers 5 installs an empty TemplateProcessing where
    4.x had none). Canonical JSON is the tokenizers library's own serialisation, so a tokenizer
    without that state hashes as it always did: shards prepared before keep their fingerprint."""
    from tokenizers import Tokenizer

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec["truncation"] = spec["padding"] = None
    if _adds_no_token(spec.get("post_processor")):
        spec["post_processor"] = None
    canonical = Tokenizer.from_str(json.dumps(spec)).to_str()
    return hashlib.sha256(canonical.encode()).hexdigest()


def _adds_no_token(post_processor) -> bool:
    if not post_processor or post_processor.get("type") != "TemplateProcessing":
        return False
    pieces = post_processor.get("single", []) + post_processor.get("pair", [])
    return not post_processor.get("special_tokens") and all("SpecialToken" not in piece for piece in pieces)


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
