"""Resuming at another world size (nodes lost or added).

Three pieces of state are partitioned by the world size, and each is carried over by the owner
of its format:

- model and optimizer: DeepSpeed's universal checkpoint, converted once with DeepSpeed's own
  converter (deepspeed.checkpoint.ds_to_universal: one folder per parameter with its fp32
  weights and Adam moments, whole) into `<checkpoint>/universal/`, staged and renamed when
  complete; the engine is then built with `checkpoint.load_universal` and slices its own
  partitions out of it. The conversion of an 8B checkpoint takes longer than any collective's
  timeout, so it happens before a process group exists: either `megajepa universal CHECKPOINT`
  before the launch, or, at the start of `megajepa train`, rank 0 converting while the other
  ranks wait for the folder on the file system (convert_before_start). Both use several
  extract and merge worker processes (conversion_workers).
- the EMA teacher: each rank reads only its new partition of each parameter from the few old
  shards that hold it (megajepa.train.ema_checkpoint.reshard; docs/ema.md), never the whole EMA.
- the loader: mosaicml-streaming's elastic determinism. The sample order depends on the shuffle
  seed, num_canonical_nodes and the global batch only; num_canonical_nodes is stored in the
  loader state (fixed by the first run) and restored from it, and the resume policy requires the
  global batch (data.pairs_per_batch x world size) to be the one the checkpoint was written with.

Losses after the change are close to, not bit-identical with, an uninterrupted run's: each rank
packs its own pairs into rows, so another split of the same global batch gives other rows, a
per-rank mean over other tokens and other floating-point reduction orders.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from argparse import Namespace
from contextlib import redirect_stdout
from typing import Optional

from megajepa import dist
from megajepa.config import Config
from megajepa.train import checkpoint, pickle_guard
from megajepa.train.checkpoint import CheckpointMismatch, ResumePoint

UNIVERSAL_SUBDIR = "universal"
WAIT_REPORT_SECONDS = 60


def conversion_workers() -> int:
    """Worker processes for the conversion: the node's cores, at most 16 (each extract worker
    holds one saved rank's optimizer file, 12 B x parameters / saved world size)."""
    return max(1, min(16, len(os.sched_getaffinity(0))))


def convert(tag_dir: str, workers: Optional[int] = None) -> str:
    """The universal form of checkpoint `tag_dir` (converted unless there already); its folder."""
    target = os.path.join(tag_dir, UNIVERSAL_SUBDIR)
    if not os.path.isdir(target):
        _convert(tag_dir, target, workers or conversion_workers())
    return target


def launch_rank_world() -> tuple[int, int]:
    """(rank, world size) as the launcher set them, before the process group exists (torchrun,
    the deepspeed launcher and Slurm set RANK; plain mpirun OMPI_COMM_WORLD_*; none: one process)."""
    env = os.environ
    if "RANK" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"])
    return int(env.get("OMPI_COMM_WORLD_RANK", 0)), int(env.get("OMPI_COMM_WORLD_SIZE", 1))


def convert_before_start(cfg: Config, rank: int, world: int) -> None:
    """Before any process group exists: when this launch will resume a checkpoint written at
    another world size, rank 0 converts it and the other ranks wait for the universal folder on
    the file system, so no rank sits in a collective, under its timeout, meanwhile. A rank 0 that
    fails exits, and the launcher stops the others. Whatever this cannot read is left to
    choose_resume, which refuses it on every rank."""
    try:
        point, _ = checkpoint.resolve_resume(cfg.train.resume, cfg.train.output_dir, verify=False)  # no group yet
        saved_world = int(checkpoint.read_meta(point)["world_size"]) if point is not None else world
    except (CheckpointMismatch, KeyError, TypeError, ValueError):
        return
    if saved_world == world:
        return
    target = os.path.join(point.tag_dir, UNIVERSAL_SUBDIR)
    if rank == 0:
        try:
            convert(point.tag_dir)
        except Exception as err:
            raise CheckpointMismatch(
                f"{point.tag_dir}: DeepSpeed's universal conversion failed ({type(err).__name__}: {err})"
            ) from err
        return
    waited = 0.0
    while not os.path.isdir(target):
        time.sleep(1.0)
        waited += 1.0
        if waited % WAIT_REPORT_SECONDS == 0:
            print(f"rank {rank}: waiting {waited:.0f} s for rank 0 to convert {point.tag_dir}", file=sys.stderr, flush=True)


def universal_point(point: ResumePoint, rank: int) -> ResumePoint:
    """The universal form of `point`, converted before the process group started (or here, by
    rank 0, when a checkpoint appeared in between); every rank calls it."""
    target = os.path.join(point.tag_dir, UNIVERSAL_SUBDIR)
    failure = None
    if rank == 0 and not os.path.isdir(target):
        try:
            convert(point.tag_dir)
        except Exception as err:  # every rank must hear of it, or the others wait forever
            failure = f"{point.tag_dir}: DeepSpeed's universal conversion failed ({type(err).__name__}: {err})"
    if dist.agree({"failed": failure is not None})["failed"]:
        raise CheckpointMismatch(failure or f"{point.tag_dir}: the universal conversion failed on rank 0")
    try:  # DeepSpeed unpickles these with weights_only=False, as it did the files they came from
        pickle_guard.refuse_unsafe(pickle_guard.torch_files(target))
    except pickle_guard.UnsafeCheckpointFile as err:
        raise CheckpointMismatch(str(err)) from None
    return ResumePoint(point.tag_dir, UNIVERSAL_SUBDIR)


def _convert(tag_dir: str, target: str, workers: int) -> None:
    from deepspeed.checkpoint import ds_to_universal

    staging = f"{target}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    args = Namespace(
        input_folder=tag_dir,
        output_folder=os.path.join(staging, UNIVERSAL_SUBDIR),  # it writes `latest_universal` beside it
        num_extract_workers=workers,
        num_merge_workers=workers,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=False,
    )
    print(f"converting {tag_dir} to DeepSpeed's universal checkpoint format ({workers} workers)", flush=True)
    try:
        with redirect_stdout(sys.stderr):  # its progress output is not ours to print on stdout
            ds_to_universal.main(args)
        os.replace(args.output_folder, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

