"""Checkpoints on top of DeepSpeed's save_checkpoint / load_checkpoint, complete or ignored.

Layout under train.output_dir/checkpoints:

    latest                  the newest complete checkpoint's tag, written after its marker
    step00000100/
        meta.json           what must match to resume (megajepa.train.resume_policy)
        rng_rank{r}.pt      each rank's RNG states (plain tensors: loaded with weights_only=True)
        ema_rank{r}.pt      the EMA teacher's shard (target: ema)
        ...                 DeepSpeed's model and ZeRO partition files; client_state holds the
                            loader state and the step
        complete.json       the completion marker: every file above, its size and its sha256

A checkpoint is complete only when its marker exists and every file it lists has its size; a
resume also verifies every file's sha256 (megajepa.train.digests: computed while writing, verified
by all ranks, each reading its share), so a file changed in place is caught too. Checkpoints saved
before digests were recorded load on their sizes alone, and the log says so. The
marker is written by rank 0, atomically, after every rank has written and fsync-ed its files and
passed a barrier; DeepSpeed's own `latest` (which its rank 0 writes after its *own* files, before
the other ranks finish) is turned off and rewritten by us after the marker. Resuming never trusts
`latest`: it takes the newest complete checkpoint and says why it skipped newer ones.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from megajepa import dist
from megajepa.files import atomic_path, no_space, write_text
from megajepa.train import pickle_guard
from megajepa.train.digests import Written, mismatch

CHECKPOINT_SUBDIR = "checkpoints"
COMPLETE_FILE = "complete.json"
META_FILE = "meta.json"
RNG_FILE = "rng_rank{rank}.pt"
EMA_FILE = "ema_rank{rank}.pt"  # megajepa.train.ema_checkpoint
TAG = re.compile(r"^step(\d{8})$")
# What `train.resume=restart` moves aside: everything a run writes into its output_dir.
RUN_OUTPUTS = (CHECKPOINT_SUBDIR, "logs", "metrics.jsonl", "eval.jsonl", "summary.json")


class CheckpointMismatch(RuntimeError):
    """A checkpoint this run refuses to continue; the message says which and why."""


class NoSpaceLeft(RuntimeError):
    """A checkpoint could not be written for lack of space; the previous ones are untouched."""


@dataclass(frozen=True)
class ResumePoint:
    load_dir: str  # .../checkpoints
    tag: str  # stepNNNNNNNN

    @property
    def tag_dir(self) -> str:
        return os.path.join(self.load_dir, self.tag)


def checkpoint_dir(output_dir: str) -> str:
    return os.path.join(output_dir, CHECKPOINT_SUBDIR)


def tag_for(step: int) -> str:
    return f"step{step:08d}"


# ------------------------------------------------------------------------------------ RNG


def rng_state() -> dict:
    """Every RNG this process uses, as tensors and plain values (loadable with weights_only)."""
    version, mt, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": {"version": version, "mt": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["mt"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ------------------------------------------------------------------------------- durability


def _barrier() -> None:
    dist.barrier()


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _own_files(tag_dir: str, rank: int) -> list[str]:
    """The files in tag_dir whose name carries this rank's number (ours and DeepSpeed's)."""
    mine = re.compile(rf"rank_?{rank}(?!\d)")
    return [os.path.join(tag_dir, n) for n in os.listdir(tag_dir) if mine.search(n) and ".tmp-" not in n]


def _write_durable(path: str, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    _fsync(os.path.dirname(path))


def _write_marker(tag_dir: str, step: int, world_size: int, sha256: dict[str, str]) -> None:
    """`sha256`: the digests the ranks recorded while writing; the other files (meta.json) are read."""
    files, digests = {}, {}
    for name in sorted(os.listdir(tag_dir)):
        path = os.path.join(tag_dir, name)
        if name != COMPLETE_FILE and ".tmp-" not in name and os.path.isfile(path):
            _fsync(path)  # the other ranks closed theirs before the barrier: make them durable here too
            files[name] = os.path.getsize(path)
            digests[name] = sha256.get(name) or Written().of(tag_dir, [name])[name]
    _fsync(tag_dir)
    marker = {"step": step, "world_size": world_size, "files": files, "sha256": digests}
    _write_durable(os.path.join(tag_dir, COMPLETE_FILE), json.dumps(marker, indent=1, sort_keys=True))


# ------------------------------------------------------------------------------------- save


def save(engine, output_dir: str, step: int, meta: dict, client_state: dict, rank: int, extra=None) -> str:
    """Save checkpoint `step` on every rank and mark it complete; returns its directory.

    `extra(tag_dir, written)` saves more per-rank state beside it (the EMA) with written.torch_save,
    which records the file's digest. Collective: every rank calls it."""
    load_dir = checkpoint_dir(output_dir)
    tag = tag_for(step)
    tag_dir = os.path.join(load_dir, tag)
    if rank == 0 and os.path.isdir(tag_dir):
        shutil.rmtree(tag_dir)  # an older save of this step (incomplete, or of a run resumed earlier)
    _barrier()
    os.makedirs(tag_dir, exist_ok=True)
    world_size = dist.world_size()
    if rank == 0:
        write_text(os.path.join(tag_dir, META_FILE), json.dumps({**meta, "step": step}, indent=2, sort_keys=True))
    written = Written()
    try:
        written.torch_save(rng_state(), os.path.join(tag_dir, RNG_FILE.format(rank=rank)))
        if extra is not None:
            extra(tag_dir, written)
        with written.deepspeed(engine):
            engine.save_checkpoint(load_dir, tag=tag, client_state=client_state, save_latest=False)
    except (OSError, RuntimeError) as err:
        if not no_space(err):
            raise
        previous, _ = newest_complete(load_dir)
        raise NoSpaceLeft(
            f"no space left on device: {tag_dir} (rank {rank}); this checkpoint stays incomplete, "
            f"the last complete one is {os.path.join(load_dir, previous) if previous else 'none'}"
        ) from None
    own = _own_files(tag_dir, rank)
    for path in own:
        _fsync(path)
    # this rank's digests: what it wrote (hashed while writing) and its own files written otherwise
    names = {os.path.basename(p) for p in own}
    names |= {os.path.basename(p) for p in written.sha256 if os.path.dirname(p) == os.path.abspath(tag_dir)}
    sha256 = {}
    for part in dist.all_gather_object(written.of(tag_dir, sorted(names))):  # also the barrier: all written
        sha256.update(part)
    if rank == 0:
        _write_marker(tag_dir, step, world_size, sha256)
        _write_durable(os.path.join(load_dir, "latest"), tag)
    _barrier()  # nobody leaves (or exits) before the checkpoint is complete
    return tag_dir


# ------------------------------------------------------------------------------ completeness


def _marker(tag_dir: str) -> dict:
    with open(os.path.join(tag_dir, COMPLETE_FILE)) as f:
        return json.load(f)


def incomplete_reason(tag_dir: str, verify: bool = False) -> Optional[str]:
    """Why `tag_dir` is not a complete checkpoint, or None when it is. `verify` also compares
    every file's sha256 with the marker's, which reads the whole checkpoint: a collective (each
    rank reads its share), so every rank must call it for the same checkpoints."""
    if not os.path.isfile(os.path.join(tag_dir, COMPLETE_FILE)):
        return f"no {COMPLETE_FILE} (the save did not finish on every rank)"
    try:
        marker = _marker(tag_dir)
        files = marker["files"]
        items = sorted(files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"{COMPLETE_FILE} is unreadable ({type(err).__name__}: {err})"
    for name, size in items:
        path = os.path.join(tag_dir, name)
        if not os.path.isfile(path):
            return f"{name} is missing"
        actual = os.path.getsize(path)
        if actual != size:
            return f"{name} has {actual} bytes, {size} when it was saved"
    if verify and isinstance(marker.get("sha256"), dict):
        return mismatch(tag_dir, marker["sha256"], files)
    return None


def has_digests(tag_dir: str) -> bool:
    """Whether the checkpoint's marker records sha256 digests (saved by a megajepa that wrote them)."""
    try:
        return isinstance(_marker(tag_dir).get("sha256"), dict)
    except (OSError, ValueError, AttributeError):
        return False


def checkpoints_in(load_dir: str) -> list[str]:
    """Tags of the step directories under load_dir (complete or not), newest first."""
    if not os.path.isdir(load_dir):
        return []
    tags = [n for n in os.listdir(load_dir) if TAG.match(n) and os.path.isdir(os.path.join(load_dir, n))]
    return sorted(tags, reverse=True)


def newest_complete(load_dir: str, verify: bool = False) -> tuple[Optional[str], list[str]]:
    """(the newest complete tag or None, one line per newer incomplete one saying why it was
    skipped); `verify`: digests too (collective, see incomplete_reason)."""
    skipped = []
    for tag in checkpoints_in(load_dir):
        reason = incomplete_reason(os.path.join(load_dir, tag), verify)
        if reason is None:
            return tag, skipped
        skipped.append(f"skipped {tag}: {reason}")
    return None, skipped


def resolve_resume(resume: str, output_dir: str, verify: bool = True) -> tuple[Optional[ResumePoint], list[str]]:
    """(where to resume, or None to start fresh; notes for the log). `verify`: the files' digests
    too, a collective (every rank calls it); without, sizes only.

    auto: the newest complete checkpoint under output_dir; fresh when there is none.
    none / restart: fresh; `none` refuses an output_dir that holds complete checkpoints (restart
        has moved them aside first, see start_over).
    anything else: that checkpoint directory, which must be complete."""
    load_dir = checkpoint_dir(output_dir)
    if resume in ("none", "restart"):
        complete = [t for t in checkpoints_in(load_dir) if incomplete_reason(os.path.join(load_dir, t)) is None]
        if complete:
            raise CheckpointMismatch(
                f"train.resume={resume}: {load_dir} holds checkpoints ({', '.join(complete)}); "
                "continue with train.resume=auto, or start over with train.resume=restart "
                "(moves this run's outputs aside), or pick another train.output_dir"
            )
        return None, []
    if resume == "auto":
        tag, notes = newest_complete(load_dir, verify)
        if tag is None:
            if notes:
                notes.append("no complete checkpoint: starting from step 0")
            return None, notes
        point = ResumePoint(load_dir, tag)
    else:
        path = os.path.abspath(resume.rstrip("/"))
        reason = incomplete_reason(path, verify) if os.path.isdir(path) else "no such directory"
        if reason is not None:
            raise CheckpointMismatch(f"train.resume={resume}: not a complete checkpoint: {reason}")
        point, notes = ResumePoint(os.path.dirname(path), os.path.basename(path)), []
    if verify and not has_digests(point.tag_dir):
        notes.append(f"{point.tag}: saved without sha256 digests (by an older megajepa): its files' sizes are checked, not their content")
    return point, notes


def start_over(output_dir: str) -> Optional[str]:
    """train.resume=restart: move this run's outputs into output_dir/replaced-<UTC time>/ (nothing
    is deleted); returns that directory, or None when there was nothing to move. Rank 0 only."""
    present = [n for n in RUN_OUTPUTS if os.path.exists(os.path.join(output_dir, n))]
    if not present:
        return None
    target = os.path.join(output_dir, time.strftime("replaced-%Y%m%dT%H%M%SZ", time.gmtime()))
    os.makedirs(target)
    for name in present:
        os.replace(os.path.join(output_dir, name), os.path.join(target, name))
    return target


def read_meta(point: ResumePoint) -> dict:
    path = os.path.join(point.tag_dir, META_FILE)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise CheckpointMismatch(f"{path}: unreadable ({type(err).__name__}: {err})") from None


def check_files(point: ResumePoint, rank: int, saved_world: int, ema: bool) -> None:
    """Refuse, before anything is built, a checkpoint whose files this rank cannot safely load:
    the RNG and EMA files of the ranks that wrote it, or any torch file that would run code when
    unpickled."""
    needed = [RNG_FILE.format(rank=r) for r in range(saved_world)]
    needed += [EMA_FILE.format(rank=r) for r in range(saved_world)] if ema else []
    for name in needed:
        if not os.path.isfile(os.path.join(point.tag_dir, name)):
            raise CheckpointMismatch(f"{point.tag_dir}: {name} is missing (saved with another world size or target?)")
    try:
        pickle_guard.refuse_unsafe(pickle_guard.torch_files(point.tag_dir))
    except pickle_guard.UnsafeCheckpointFile as err:
        raise CheckpointMismatch(str(err)) from None


# ------------------------------------------------------------------------------------- load


def load(engine, point: ResumePoint, rank: int, deepspeed_point: Optional[ResumePoint] = None) -> dict:
    """Load DeepSpeed's state (from `deepspeed_point`, e.g. the universal form, default `point`)
    and this rank's RNG; returns DeepSpeed's client_state. A rank the checkpoint had no RNG file
    for (a larger world) takes rank 0's.

    Call check_files first: DeepSpeed's load_checkpoint unpickles its files with weights_only=False."""
    ds_point = deepspeed_point or point
    path, client_state = engine.load_checkpoint(ds_point.load_dir, tag=ds_point.tag)
    if path is None:
        raise CheckpointMismatch(f"{ds_point.tag_dir}: DeepSpeed could not load this checkpoint")
    restore_rng(point, rank)
    return client_state


def restore_rng(point: ResumePoint, rank: int) -> None:
    """This rank's RNG as it was at the checkpoint (the loader draws from generators of its own,
    so nothing else moves it before the next step)."""
    rng_path = os.path.join(point.tag_dir, RNG_FILE.format(rank=rank))
    if not os.path.isfile(rng_path):
        rng_path = os.path.join(point.tag_dir, RNG_FILE.format(rank=0))
    try:
        set_rng_state(pickle_guard.load_plain(rng_path))
    except pickle_guard.UnsafeCheckpointFile as err:
        raise CheckpointMismatch(str(err)) from None
