"""Resuming at another world size (nodes lost or added).

Three pieces of state are partitioned by the world size, and each is carried over by the owner
of its format:

- model and optimizer: DeepSpeed's universal checkpoint. Rank 0 converts the checkpoint once with
  DeepSpeed's own converter (deepspeed.checkpoint.ds_to_universal: one folder per parameter with
  its fp32 weights and Adam moments, whole) into `<checkpoint>/universal/`, staged and renamed
  when complete; the engine is then built with `checkpoint.load_universal` and slices its own
  partitions out of it.
- the EMA teacher: its shards mirror the fp32 master partitions, so the consolidation the export
  uses too (megajepa.train.ema_shards) rebuilds whole parameters, and EmaTeacher.load_full keeps
  this rank's piece of each.
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
from argparse import Namespace
from contextlib import redirect_stdout

import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from megajepa.train import pickle_guard
from megajepa.train.checkpoint import CheckpointMismatch, ResumePoint
from megajepa.train.ema_shards import EmaShardsUnusable, consolidate_ema

UNIVERSAL_SUBDIR = "universal"


def universal_point(point: ResumePoint, rank: int) -> ResumePoint:
    """The universal form of `point` (converted by rank 0 on first use); every rank calls it."""
    target = os.path.join(point.tag_dir, UNIVERSAL_SUBDIR)
    failure = None
    if rank == 0 and not os.path.isdir(target):
        try:
            _convert(point.tag_dir, target)
        except Exception as err:  # every rank must hear of it, or the others wait forever
            failure = f"{point.tag_dir}: DeepSpeed's universal conversion failed ({type(err).__name__}: {err})"
    device = get_accelerator().current_device_name()  # NCCL reduces device tensors only
    failed = torch.tensor([float(failure is not None)], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)  # also the barrier: the conversion is done
    if failed.item():
        raise CheckpointMismatch(failure or f"{point.tag_dir}: the universal conversion failed on rank 0")
    try:  # DeepSpeed unpickles these with weights_only=False, as it did the files they came from
        pickle_guard.refuse_unsafe(pickle_guard.torch_files(target))
    except pickle_guard.UnsafeCheckpointFile as err:
        raise CheckpointMismatch(str(err)) from None
    return ResumePoint(point.tag_dir, UNIVERSAL_SUBDIR)


def _convert(tag_dir: str, target: str) -> None:
    from deepspeed.checkpoint import ds_to_universal

    staging = f"{target}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    args = Namespace(
        input_folder=tag_dir,
        output_folder=os.path.join(staging, UNIVERSAL_SUBDIR),  # it writes `latest_universal` beside it
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=False,
    )
    print(f"converting {tag_dir} to DeepSpeed's universal checkpoint format", flush=True)
    try:
        with redirect_stdout(sys.stderr):  # its progress output is not ours to print on stdout
            ds_to_universal.main(args)
        os.replace(args.output_folder, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def reshard_ema(teacher, point: ResumePoint, saved_world: int, step: int) -> None:
    """Give this rank its piece of the EMA saved by `saved_world` ranks (check_files has refused
    unsafe pickles in the checkpoint already)."""
    if teacher.zero3:
        try:
            full = consolidate_ema(point.tag_dir, saved_world)
        except EmaShardsUnusable as err:
            raise CheckpointMismatch(str(err)) from None
        teacher.load_full(full, step, source=point.tag_dir)
    else:  # below ZeRO-3 every rank's EMA is the whole model: rank 0's file serves all
        teacher.load(point.tag_dir, 0)
