"""The EMA teacher's per-rank shards in a checkpoint (ema_rank{r}.pt): save, load, reshard, consolidate.

    save(teacher, tag_dir, rank, written.torch_save)    # beside DeepSpeed's files (checkpoint.save's extra)
    load(teacher, tag_dir, rank)                        # after engine.load_checkpoint, same world size
    reshard(teacher, point, saved_world, step)          # another world size (megajepa.train.elastic)
    consolidate_ema(tag_dir, world_size)                # whole fp32 EMA by name (export --weights ema)

Each rank's EMA mirrors its fp32 master partitions, so DeepSpeed's zero_to_fp32 reads the shards
as it reads the masters; docs/ema.md says how, and what a reshard costs in memory.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings

import torch
from deepspeed.utils import zero_to_fp32

from megajepa import dist
from megajepa.files import atomic_path
from megajepa.train import pickle_guard
from megajepa.train.checkpoint import EMA_FILE, CheckpointMismatch, ResumePoint


class EmaShardsUnusable(ValueError):
    """An EMA shard missing, unsafe or not matching the checkpoint's parameters."""


# ------------------------------------------------------------------------ this rank's shard


def state_of(teacher) -> dict:
    """What ema_rank{r}.pt holds: plain tensors and values (loadable with weights_only)."""
    return {
        "step": teacher.step,
        "schedule": dataclasses.asdict(teacher.cfg),
        "total_steps": teacher.total_steps,
        "layout": teacher.layout,
        "names": [slot.name for slot in teacher.slots],
        "ema": [slot.ema.detach().to("cpu", copy=True) for slot in teacher.slots],
    }


def _describe(schedule: dict, total_steps: int) -> str:
    return f"{schedule['schedule']} {schedule['momentum_start']} -> {schedule['momentum_end']} over {total_steps} steps"


def restore(teacher, state: dict, source: str = "state") -> None:
    """Give `teacher` the step and EMA shards of `state` (state_of's, same world size and layout)."""
    names = [slot.name for slot in teacher.slots]
    if state.get("layout") != teacher.layout or state.get("names") != names:
        raise ValueError(
            f"{source}: EMA state laid out {state.get('layout')!r} over {len(state.get('names', []))} "
            f"slots, this teacher {teacher.layout!r} over {len(names)}: same config and world size needed"
        )
    for slot, saved in zip(teacher.slots, state["ema"]):
        if saved.numel() != slot.ema.numel():
            raise ValueError(f"{source}: EMA shard {slot.name} has {saved.numel()} elements, expected {slot.ema.numel()}")
    saved_schedule = (state["schedule"], state["total_steps"])
    now = (dataclasses.asdict(teacher.cfg), teacher.total_steps)
    if saved_schedule != now:
        warnings.warn(
            f"{source}: the EMA momentum schedule changed since the save (saved {_describe(*saved_schedule)}, "
            f"now {_describe(*now)}): continuing with the new one",
            stacklevel=2,
        )
    teacher.restore(state["ema"], int(state["step"]))


def save(teacher, directory: str, rank: int, write=None) -> str:
    """Write this rank's shard into `directory` atomically (a temporary name, then a rename);
    `write(state, path)` does it instead when given (a checkpoint's, which records its digest)."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, EMA_FILE.format(rank=rank))
    if write is not None:
        write(state_of(teacher), path)
        return path
    with atomic_path(path) as tmp:
        torch.save(state_of(teacher), tmp)
    return path


def load(teacher, directory: str, rank: int) -> None:
    """This rank's shard from `directory`, saved at the same world size."""
    path = os.path.join(directory, EMA_FILE.format(rank=rank))
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path}: no EMA teacher state for rank {rank} (saved without target: ema, or with another world size?)"
        )
    restore(teacher, torch.load(path, map_location="cpu", weights_only=True), source=path)


# ----------------------------------------------------------------- across world sizes


def reshard(teacher, point: ResumePoint, saved_world: int, step: int) -> None:
    """Give this rank its piece of the EMA saved by `saved_world` ranks (check_files has refused
    unsafe pickles in the checkpoint already)."""
    if not teacher.zero3:  # below ZeRO-3 every rank's EMA is the whole model: rank 0's file serves all
        load(teacher, point.tag_dir, 0)
        return
    try:
        teacher.restore(_this_ranks_emas(teacher, point.tag_dir, saved_world), step)
    except EmaShardsUnusable as err:
        raise CheckpointMismatch(str(err)) from None


def _this_ranks_emas(teacher, tag_dir: str, saved_world: int) -> list[torch.Tensor]:
    """Each slot's EMA for this rank of a ZeRO-3 teacher, read from the `saved_world` shards of
    `tag_dir`: ZeRO-3 pads a parameter of n elements to a multiple of the world size and gives rank
    r the r-th of the equal pieces, which is what ds_tensor holds."""
    wanted = {}
    for name in (name for slot in teacher.slots for name in slot.params):
        param = teacher.online_params[name]
        n = param.ds_tensor.numel()
        start = n * dist.group_rank(param.ds_process_group)  # the rank in its partition group, not the world
        wanted[name] = (start, start + n)
    pieces = ema_pieces(tag_dir, saved_world, wanted)
    return [torch.cat([pieces[name] for name in slot.params]) for slot in teacher.slots]


def _rank_groups(tag_dir: str, rank: int, names: list[str]) -> list[torch.Tensor]:
    """One rank's EMA shard laid out as the optimizer's fp32 flat groups (`names`: the trained
    parameters in DeepSpeed's order)."""
    path = os.path.join(tag_dir, EMA_FILE.format(rank=rank))
    if not os.path.isfile(path):
        raise EmaShardsUnusable(f"{path}: missing; --weights ema needs a run trained with jepa.target=ema")
    try:
        state = pickle_guard.load_plain(path)
    except pickle_guard.UnsafeCheckpointFile as err:
        raise EmaShardsUnusable(str(err)) from None
    if state["layout"] == "flat":  # one buffer per optimizer sub-group: the master's own layout
        return [t.view(-1) for t in state["ema"]]
    # per parameter: this rank's slice of each parameter, concatenated in DeepSpeed's order
    by_name = dict(zip(state["names"], state["ema"]))
    missing = [n for n in names if n not in by_name]
    if missing:
        raise EmaShardsUnusable(f"{EMA_FILE.format(rank=rank)} has no EMA for {missing[:3]}")
    return [torch.cat([by_name[n].view(-1) for n in names])]


def _trained_shapes(tag_dir: str) -> list[tuple[str, int]]:
    """(name, numel) of the optimizer's parameters in DeepSpeed's flat order: from one rank's
    model-state file (every rank's holds the same shapes)."""
    first = zero_to_fp32.get_model_state_files(tag_dir)[:1]
    (states,) = zero_to_fp32.parse_model_states(first)
    return [(name, shape.numel()) for group in states.param_shapes for name, shape in group.items()]


def consolidate_ema(tag_dir: str, world_size: int) -> dict[str, torch.Tensor]:
    """{parameter name: whole fp32 EMA} from the `world_size` shards of a ZeRO-3 checkpoint.

    The caller has run pickle_guard.refuse_unsafe on tag_dir: zero_to_fp32 unpickles DeepSpeed's
    model-state files with weights_only=False."""
    model_states = zero_to_fp32.parse_model_states(zero_to_fp32.get_model_state_files(tag_dir))
    names = [name for group in model_states[0].param_shapes for name in group]
    flat = [_rank_groups(tag_dir, rank, names) for rank in range(world_size)]
    merged = zero_to_fp32._get_fp32_state_dict_from_zero3_checkpoint(
        world_size, flat, model_states, exclude_frozen_parameters=False
    )
    return zero_to_fp32.to_torch_tensor(merged)


def ema_pieces(tag_dir: str, world_size: int, wanted: dict[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
    """{name: elements [start, stop) of the flattened whole fp32 EMA of parameter `name` (zeros
    past its end, as ZeRO-3 pads a partition)} from the `world_size` shards of a ZeRO-3
    checkpoint, loading only the shards those ranges fall in.

    In the saved layout rank k holds elements [k * n, (k + 1) * n) of each parameter, n =
    ceil(numel / world_size), at the parameter's offset in its flat shard (the sum of the
    partitions before it, as zero_to_fp32 reads them). The caller has run
    pickle_guard.refuse_unsafe on tag_dir (the model-state file is unpickled in full)."""
    shapes = _trained_shapes(tag_dir)
    names = [name for name, _ in shapes]
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        raise EmaShardsUnusable(f"{tag_dir}: no EMA for {unknown[:3]} among the checkpoint's trained parameters")
    shards: dict[int, torch.Tensor] = {}

    def shard(rank: int) -> torch.Tensor:
        if rank not in shards:
            shards[rank] = torch.cat(_rank_groups(tag_dir, rank, names))
        return shards[rank]

    pieces, offset = {}, 0
    for name, numel in shapes:
        n = math.ceil(numel / world_size)
        if name in wanted:
            start, stop = wanted[name]
            piece = torch.zeros(stop - start, dtype=torch.float32)
            at = start
            while at < min(stop, numel):
                rank = at // n
                end = min(stop, numel, (rank + 1) * n)
                local = offset + at - rank * n
                piece[at - start : end - start] = shard(rank)[local : local + end - at]
                at = end
            pieces[name] = piece
        offset += n
    return pieces
