"""The EMA teacher from a ZeRO-3 checkpoint's per-rank shards (ema_rank{r}.pt).

Each rank's EMA mirrors its fp32 master partitions (megajepa.jepa.ema_target), so DeepSpeed's own
consolidation of the master weights (zero_to_fp32) applies to it unchanged: given the EMA laid
out as the optimizer's flat groups, it returns whole parameters by name. The export (--weights
ema) uses that (consolidate_ema). A resume at another world size (megajepa.train.elastic) needs
only this rank's new partition of each parameter: ema_pieces reads those ranges from the few
shards that hold them, in the same layout, so no rank builds the whole fp32 EMA (32 GB at 8B).
"""

from __future__ import annotations

import math
import os

import torch
from deepspeed.utils import zero_to_fp32

from megajepa.jepa.ema_target import STATE_FILE
from megajepa.train import pickle_guard


class EmaShardsUnusable(ValueError):
    """An EMA shard missing, unsafe or not matching the checkpoint's parameters."""


def _rank_groups(tag_dir: str, rank: int, names: list[str]) -> list[torch.Tensor]:
    """One rank's EMA shard laid out as the optimizer's fp32 flat groups (`names`: the trained
    parameters in DeepSpeed's order)."""
    path = os.path.join(tag_dir, STATE_FILE.format(rank=rank))
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
        raise EmaShardsUnusable(f"ema_rank{rank}.pt has no EMA for {missing[:3]}")
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
