"""Checkpoints on top of DeepSpeed's save_checkpoint / load_checkpoint.

Layout under train.output_dir/checkpoints:

    latest                  DeepSpeed's marker, written last: a checkpoint is complete only then
    step00000100/
        meta.json           what must match to resume (model, tokenizer, world size, layout)
        rng_rank{r}.pt      each rank's RNG states
        ema_rank{r}.pt      the EMA teacher's shard (target: ema)
        ...                 DeepSpeed's model and ZeRO partition files; client_state holds the
                            loader state, the step and the resolved config

Our files are written before DeepSpeed's, so a run killed mid-save still has `latest` pointing
at the previous complete checkpoint and resumes from there.
"""

from __future__ import annotations

import json
import os
import random
from typing import Optional

import numpy as np
import torch

from megajepa.files import atomic_path, write_text

CHECKPOINT_SUBDIR = "checkpoints"


class CheckpointMismatch(RuntimeError):
    pass


def checkpoint_dir(output_dir: str) -> str:
    return os.path.join(output_dir, CHECKPOINT_SUBDIR)


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def resolve_resume(resume: str, output_dir: str) -> Optional[tuple[str, str]]:
    """(load_dir, tag) to resume from, or None to start fresh.

    'none': fresh. 'auto': the checkpoint DeepSpeed's `latest` names under output_dir, fresh when
    there is none. Anything else: a checkpoint directory (…/checkpoints/stepNNNNNNNN)."""
    if resume == "none":
        return None
    if resume == "auto":
        load_dir = checkpoint_dir(output_dir)
        latest = os.path.join(load_dir, "latest")
        if not os.path.isfile(latest):
            return None
        with open(latest) as f:
            tag = f.read().strip()
        return load_dir, tag
    path = os.path.abspath(resume.rstrip("/"))
    if not os.path.isfile(os.path.join(path, "meta.json")):
        raise CheckpointMismatch(f"train.resume={resume}: not a checkpoint directory (no meta.json)")
    return os.path.dirname(path), os.path.basename(path)


def check_compatible(saved: dict, current: dict, where: str) -> None:
    """Refuse a checkpoint written for another model, tokenizer, layout or world size."""
    for key in sorted(current):
        if saved.get(key) != current[key]:
            raise CheckpointMismatch(
                f"{where}: written with {key}={saved.get(key)!r}, this run has {key}={current[key]!r}; "
                f"resume with the same settings or start a new train.output_dir"
            )


def save(engine, output_dir: str, step: int, meta: dict, client_state: dict, rank: int, extra=None) -> str:
    """Save a complete checkpoint; `extra(tag_dir)` saves per-rank state beside it (the EMA)."""
    load_dir = checkpoint_dir(output_dir)
    tag = tag_for(step)
    tag_dir = os.path.join(load_dir, tag)
    os.makedirs(tag_dir, exist_ok=True)
    if rank == 0:
        write_text(os.path.join(tag_dir, "meta.json"), json.dumps({**meta, "step": step}, indent=2, sort_keys=True))
    with atomic_path(os.path.join(tag_dir, f"rng_rank{rank}.pt")) as tmp:
        torch.save(rng_state(), tmp)
    if extra is not None:
        extra(tag_dir)
    engine.save_checkpoint(load_dir, tag=tag, client_state=client_state)  # writes `latest` last
    return tag_dir


def validate(load_dir: str, tag: str, current_meta: dict) -> None:
    """Refuse, before anything is built, a checkpoint this run cannot continue."""
    tag_dir = os.path.join(load_dir, tag)
    meta_path = os.path.join(tag_dir, "meta.json")
    if not os.path.isfile(meta_path):
        raise CheckpointMismatch(f"{tag_dir}: incomplete checkpoint (no meta.json)")
    with open(meta_path) as f:
        saved = json.load(f)
    check_compatible(saved, current_meta, meta_path)


def load(engine, load_dir: str, tag: str, rank: int) -> tuple[dict, str]:
    """Load DeepSpeed's state and this rank's RNG; returns (client_state, tag_dir)."""
    tag_dir = os.path.join(load_dir, tag)
    path, client_state = engine.load_checkpoint(load_dir, tag=tag)
    if path is None:
        raise CheckpointMismatch(f"{tag_dir}: DeepSpeed could not load this checkpoint")
    rng_path = os.path.join(tag_dir, f"rng_rank{rank}.pt")
    if os.path.isfile(rng_path):
        set_rng_state(torch.load(rng_path, weights_only=False))
    return client_state, tag_dir
