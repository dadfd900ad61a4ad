"""SHA-256 digests of a checkpoint's files, computed while the files are written.

A file changed in place keeps its size (one flipped bit in an optimizer partition), so the
completion marker records a digest of every file besides its size, and a resume verifies them.
Hashing while writing costs no second read of the state: torch.save writes into a file object
that hashes what passes through it, for our own files (RNG, EMA) and for DeepSpeed's (its
checkpoint engine's `save` is routed through the same writer during the save). A file written
some other way (a checkpoint engine other than torch's) is hashed after it is written, by reading
it in chunks. Verifying on resume reads every file once, split across the ranks.
"""

from __future__ import annotations

import hashlib
import io
import os
from contextlib import contextmanager
from typing import Iterator, Optional

import torch

from megajepa import dist
from megajepa.files import atomic_path

CHUNK = 8 << 20


class _HashingFile(io.RawIOBase):
    """A writable file object that hashes the bytes written through it."""

    def __init__(self, f):
        super().__init__()
        self._f = f
        self.sha256 = hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        n = self._f.write(data)
        self.sha256.update(memoryview(data)[:n])
        return n


def file_sha256(path: str) -> str:
    """The file's digest, read in chunks of CHUNK bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _torch_save(obj, path: str, **kwargs) -> str:
    with open(path, "wb") as f:
        writer = _HashingFile(f)
        torch.save(obj, writer, **kwargs)
        f.flush()
    return writer.sha256.hexdigest()


class Written:
    """The digests of the files this process wrote into a checkpoint: {absolute path: sha256}."""

    def __init__(self):
        self.sha256: dict[str, str] = {}

    def torch_save(self, obj, path: str) -> None:
        """torch.save to `path` atomically (a temporary name, then a rename), hashed on the way."""
        with atomic_path(path) as tmp:
            digest = _torch_save(obj, tmp)
        self.sha256[os.path.abspath(path)] = digest

    @contextmanager
    def deepspeed(self, engine) -> Iterator[None]:
        """Route DeepSpeed's torch checkpoint engine's writes through the hashing writer while
        engine.save_checkpoint runs. Another engine (async, a user's) is left alone: its files are
        hashed after writing."""
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

        ckpt_engine = getattr(engine, "checkpoint_engine", None)
        if type(ckpt_engine) is not TorchCheckpointEngine:
            yield
            return

        def save(state_dict, path: str):
            self.sha256[os.path.abspath(path)] = _torch_save(
                state_dict, path, _use_new_zipfile_serialization=ckpt_engine.zipfile_serialization
            )

        ckpt_engine.save = save
        try:
            yield
        finally:
            del ckpt_engine.save  # the class's own method again

    def of(self, tag_dir: str, names: list[str]) -> dict[str, str]:
        """{name: sha256} for `names` in tag_dir: recorded while writing, else read now."""
        out = {}
        for name in names:
            path = os.path.abspath(os.path.join(tag_dir, name))
            out[name] = self.sha256.get(path) or file_sha256(path)
        return out


def mismatch(tag_dir: str, expected: dict[str, str], sizes: dict[str, int]) -> Optional[str]:
    """The first file of tag_dir whose content no longer has its recorded digest, as a reason, or
    None. Collective: each rank reads its share of the files (the largest spread first), and every
    rank returns the same answer."""
    names = sorted(expected, key=lambda n: (-sizes.get(n, 0), n))
    rank, world = dist.rank(), dist.world_size()
    reason = None
    for name in names[rank::world]:
        if file_sha256(os.path.join(tag_dir, name)) != expected[name]:
            reason = f"{name} does not match its sha256 digest (changed since it was saved, same size)"
            break
    reasons = dist.all_gather_object(reason) if world > 1 else [reason]
    found = [r for r in reasons if r is not None]
    return min(found) if found else None
