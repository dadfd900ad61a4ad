"""The whole EMA teacher from a ZeRO-3 checkpoint's per-rank shards (ema_rank{r}.pt).

Each rank's EMA mirrors its fp32 master partitions (megajepa.jepa.ema_target), so DeepSpeed's own
consolidation of the master weights (zero_to_fp32) applies to it unchanged: given the EMA laid
out as the optimizer's flat groups, it returns whole parameters by name. Used by the export
(--weights ema) and by a resume at another world size (megajepa.train.elastic).
"""

from __future__ import annotations

import os

import torch
from deepspeed.utils import zero_to_fp32

from megajepa.jepa.ema_target import STATE_FILE
from megajepa.train import pickle_guard


class EmaShardsUnusable(ValueError):
    """An EMA shard missing, unsafe or not matching the checkpoint's parameters."""


def _flat_groups(tag_dir: str, world_size: int, model_states) -> list[list[torch.Tensor]]:
    """Per rank, the EMA shards laid out as the optimizer's fp32 flat groups."""
    states = []
    for rank in range(world_size):
        path = os.path.join(tag_dir, STATE_FILE.format(rank=rank))
        if not os.path.isfile(path):
            raise EmaShardsUnusable(f"{path}: missing; --weights ema needs a run trained with jepa.target=ema")
        try:
            states.append(pickle_guard.load_plain(path))
        except pickle_guard.UnsafeCheckpointFile as err:
            raise EmaShardsUnusable(str(err)) from None
    if states[0]["layout"] == "flat":  # one buffer per optimizer sub-group: the master's own layout
        return [[t.view(-1) for t in s["ema"]] for s in states]
    # per parameter: each rank's slice of each parameter, concatenated in DeepSpeed's order
    names = [name for group in model_states[0].param_shapes for name in group]
    groups = []
    for rank, state in enumerate(states):
        by_name = dict(zip(state["names"], state["ema"]))
        missing = [n for n in names if n not in by_name]
        if missing:
            raise EmaShardsUnusable(f"ema_rank{rank}.pt has no EMA for {missing[:3]}")
        groups.append([torch.cat([by_name[n].view(-1) for n in names])])
    return groups


def consolidate_ema(tag_dir: str, world_size: int) -> dict[str, torch.Tensor]:
    """{parameter name: whole fp32 EMA} from the `world_size` shards of a ZeRO-3 checkpoint.

    The caller has run pickle_guard.refuse_unsafe on tag_dir: zero_to_fp32 unpickles DeepSpeed's
    model-state files with weights_only=False."""
    model_states = zero_to_fp32.parse_model_states(zero_to_fp32.get_model_state_files(tag_dir))
    flat = _flat_groups(tag_dir, world_size, model_states)
    merged = zero_to_fp32._get_fp32_state_dict_from_zero3_checkpoint(
        world_size, flat, model_states, exclude_frozen_parameters=False
    )
    return zero_to_fp32.to_torch_tensor(merged)
