"""The embedded default data: built on first use, reused afterwards, safe to call from every rank.

    root/jsonl/{train,eval,paraphrases}.jsonl   NL -> regex pairs (megajepa.data.synthetic)
    root/tokenizer/                             byte-level BPE trained on the train text
    root/shards/{train,eval}/                   MDS shards (megajepa.data.prepare)

Each step publishes its directory atomically and is skipped when the directory exists. A file
lock (root/.lock) makes one process build while the others wait, then reuse its result.
"""

from __future__ import annotations

import json
import os
import sys
import time

from filelock import FileLock

from megajepa.config import EMBEDDED_ROOT, embedded_paths
from megajepa.data.fingerprint import FINGERPRINT_FILE, FORMAT_VERSION
from megajepa.data.prepare import prepare
from megajepa.data.synthetic import generate
from megajepa.data.tokenizer import train_tokenizer
from megajepa.files import staged_directory

TOKENIZER_VOCAB_SIZE = 2048


def _lock(root: str) -> FileLock:
    os.makedirs(root, exist_ok=True)
    return FileLock(os.path.join(root, ".lock"))


def _format_version(shards: str):
    path = os.path.join(shards, FINGERPRINT_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f).get("format_version")


def _log(message: str) -> None:
    print(f"[embedded data] {message}", file=sys.stderr)


def _ensure_jsonl(paths: dict[str, str], seed: int, n_train: int, n_eval: int) -> None:
    if os.path.isdir(paths["jsonl"]):
        return
    started = time.perf_counter()
    with staged_directory(paths["jsonl"]) as staging:
        generate(staging, seed=seed, n_train=n_train, n_eval=n_eval)
    _log(f"generated {n_train} train / {n_eval} eval pairs in {time.perf_counter() - started:.1f} s")


def _training_texts(train_jsonl: str):
    with open(train_jsonl) as f:
        for line in f:
            for message in json.loads(line)["messages"]:
                yield message["content"]


def _ensure_tokenizer(paths: dict[str, str]) -> None:
    if os.path.isdir(paths["tokenizer"]):
        return
    started = time.perf_counter()
    with staged_directory(paths["tokenizer"]) as staging:
        train_tokenizer(_training_texts(paths["train_jsonl"]), staging, vocab_size=TOKENIZER_VOCAB_SIZE)
    _log(f"trained the tokenizer in {time.perf_counter() - started:.1f} s")


def ensure_tokenizer(root: str = EMBEDDED_ROOT, *, seed: int = 0, n_train: int = 20000, n_eval: int = 1000) -> str:
    """The embedded tokenizer directory under root, generating its training text when missing."""
    paths = embedded_paths(root)
    with _lock(root):
        _ensure_jsonl(paths, seed, n_train, n_eval)
        _ensure_tokenizer(paths)
    return paths["tokenizer"]


def ensure_embedded(
    root: str = EMBEDDED_ROOT,
    *,
    seed: int = 0,
    n_train: int = 20000,
    n_eval: int = 1000,
    max_length: int = 512,
    progress: bool = True,
) -> dict[str, str]:
    """Build whatever of the embedded data is missing under root; return embedded_paths(root)."""
    paths = embedded_paths(root)
    with _lock(root):
        _ensure_jsonl(paths, seed, n_train, n_eval)
        _ensure_tokenizer(paths)
        for split in ("train", "eval"):
            shards = paths[f"{split}_shards"]
            stale = os.path.isdir(shards) and _format_version(shards) != FORMAT_VERSION
            if stale:
                _log(f"{shards}: prepared by an older megajepa (another record format); preparing again")
            if stale or not os.path.isdir(shards):
                prepare(
                    [paths[f"{split}_jsonl"]], shards, paths["tokenizer"],
                    max_length=max_length, overwrite=stale, progress=progress,
                )
    return paths
