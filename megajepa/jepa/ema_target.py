"""The EMA teacher: an fp32 EMA of the online model's master weights, sharded exactly like them,
encoded by a second ZeRO-3 engine. docs/ema.md explains the layout and what it relies on in DeepSpeed.

    teacher = EmaTeacher(engine, twin_module, cfg.jepa.ema, total_steps, teacher_config(ds_config))
    rows, pairs = stack_teacher_rows(micro_batches)    # every micro-batch of the step
    z_bs = teacher.encode(rows).split(pairs)           # every rank, once per step: no_grad forward
    ... engine(batch, step, z_b); engine.backward(loss); engine.step()
    teacher.update(step)    # one fused kernel per slot, this rank's slices only: no communication

Saving, loading and resharding it: megajepa.train.ema_checkpoint; its memory: megajepa.bench.memory.
"""

from __future__ import annotations

import math
import warnings
from functools import partial
from typing import Callable, NamedTuple, Optional, Sequence

import deepspeed
import torch
import torch.nn.functional as F
from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
from deepspeed.utils import safe_get_local_fp32_param
from torch import nn

from megajepa.config import EmaConfig
from megajepa.kernels.ema import ema_update
from megajepa.model.attention import MASK_KEYS

_TEACHER_ROWS = tuple(f"teacher_{key}" for key in ("input_ids", *MASK_KEYS))


def stack_teacher_rows(batches: Sequence[dict]) -> tuple[dict, list[int]]:
    """(one batch of the teacher rows of every micro-batch in `batches`, each one's pair count).

    Rows are padded on the right to the widest (padding: sequence 0, which attends only to
    itself), and the z_b reads are re-indexed into the stacked rows, so that
    encode(rows).split(pairs) is each micro-batch's own z_b. CPU tensors in and out."""
    width = max(b["teacher_input_ids"].shape[1] for b in batches)
    keys = (*_TEACHER_ROWS, "zb_index", "zb_pool_index", "zb_pool_owner")
    stacked: dict[str, list[torch.Tensor]] = {key: [] for key in keys}
    row_offset, pairs = 0, []
    for b in batches:
        rows, own_width = b["teacher_input_ids"].shape
        for key in _TEACHER_ROWS:
            stacked[key].append(F.pad(b[key], (0, width - own_width)))

        def moved(flat: torch.Tensor) -> torch.Tensor:  # row * own_width + col -> into the stacked rows
            return (flat // own_width + row_offset) * width + flat % own_width

        stacked["zb_index"].append(moved(b["zb_index"]))
        if "zb_pool_index" in b:
            stacked["zb_pool_index"].append(moved(b["zb_pool_index"]))
            stacked["zb_pool_owner"].append(b["zb_pool_owner"] + sum(pairs))
        pairs.append(b["jepa_pairs"].numel())
        row_offset += rows
    out = {key: torch.cat(values) for key, values in stacked.items() if values}
    out["jepa_pairs"] = torch.arange(sum(pairs))  # read_embeddings counts the pairs from it
    return out, pairs


def momentum_at(cfg: EmaConfig, step: int, total_steps: int) -> float:
    """The EMA momentum for the update after optimizer step `step` (0-based) of `total_steps`.

    constant: momentum_start throughout; linear and cosine: from momentum_start at step 0 to
    momentum_end at total_steps (held there after), cosine flat at both ends.
    """
    if total_steps <= 0:
        raise ValueError(f"EMA schedule: total_steps must be > 0, got {total_steps}")
    m0, m1 = cfg.momentum_start, cfg.momentum_end
    progress = min(max(step, 0) / total_steps, 1.0)
    if cfg.schedule == "constant":
        return m0
    if cfg.schedule == "linear":
        return m0 + (m1 - m0) * progress
    if cfg.schedule == "cosine":
        return m1 - (m1 - m0) * (1.0 + math.cos(math.pi * progress)) / 2.0
    raise ValueError(f"jepa.ema.schedule: unknown schedule {cfg.schedule!r} (constant, linear or cosine)")


class _TargetEncoder(nn.Module):
    """Makes `encode_targets` the forward of the teacher engine's root module: DeepSpeed resets its
    parameter-fetch trace in a hook on the root's forward, which a bare method call would skip."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict) -> torch.Tensor:
        return self.model.encode_targets(batch)


class _Slot(NamedTuple):
    """One `ema_update` call: a sub-group (flat path) or one parameter (fallback paths)."""

    name: str  # "sub-group i" or the parameter's name (a checkpoint's "names")
    params: tuple[str, ...]  # the trained parameters it covers, in their order in `ema`
    master: Callable[[], torch.Tensor]  # this rank's fp32 master slice, read fresh every update
    ema: torch.Tensor  # fp32, same numel
    teacher: Callable[[], torch.Tensor]  # the teacher's slice, written from the EMA


def _whole_fp32(param: nn.Parameter) -> torch.Tensor:
    return param.detach().reshape(-1).float()


def _whole(param: nn.Parameter) -> torch.Tensor:
    return param.data.view(-1)


def _flat_layout_unavailable(engine) -> Optional[str]:
    """Why the online optimizer's flat fp32 buffers cannot be mirrored, or None when they can."""
    optimizer = engine.optimizer
    if engine.zero_optimization_stage() != 3:
        return f"ZeRO stage {engine.zero_optimization_stage()} keeps whole parameters on every rank"
    if not isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3):
        return f"the engine's optimizer is {type(optimizer).__name__}, not ZeRO stage 3's"
    if optimizer.offload_optimizer:
        return "optimizer offload keeps the fp32 master weights off the teacher's device"
    if optimizer.offload_param:
        return "parameter offload keeps the low-precision partitions outside DeepSpeed's flat buffers"
    for i, master in enumerate(optimizer.fp32_partitioned_groups_flat):
        if master.dtype != torch.float32:
            return f"the master weights are {master.dtype}, not float32"
        if master.numel() != optimizer.fp16_partitioned_groups_flat_numel[i]:
            return f"sub-group {i}'s fp32 master buffer is not resident (swapped out to NVMe)"
    return None


def choose_layout(engine, requested: str = "auto") -> str:
    """The slot layout for `engine` (docs/ema.md): "flat" where DeepSpeed keeps resident flat
    fp32 masters, else "per_parameter" (with a warning under "auto"). "flat" or "per_parameter"
    force one; forcing "flat" where it is unavailable raises, naming the reason."""
    if requested not in ("auto", "flat", "per_parameter"):
        raise ValueError(f"EmaTeacher: layout must be auto, flat or per_parameter, got {requested!r}")
    reason = _flat_layout_unavailable(engine)
    if reason is None:
        return "per_parameter" if requested == "per_parameter" else "flat"
    if requested == "flat":
        raise ValueError(f"EmaTeacher: the flat layout is unavailable: {reason}")
    if requested == "auto":
        warnings.warn(f"EMA teacher: updating per parameter, not per flat sub-group: {reason}", stacklevel=3)
    return "per_parameter"


class EmaTeacher:
    """The EMA copy of the online model, run as its own ZeRO-3 engine (docs/ema.md).

    `teacher_module` must be built exactly like the online module (same architecture, dtype,
    DeepSpeed config and data-parallel group, under deepspeed.zero.Init at stage 3). It starts as
    a copy of the online model's fp32 master weights. `layout` is "auto" (flat where DeepSpeed
    allows it), or forces "flat" or "per_parameter".
    """

    def __init__(
        self,
        online_engine,
        teacher_module: nn.Module,
        ema_cfg: EmaConfig,
        total_steps: int,
        teacher_ds_config: dict,
        layout: str = "auto",
    ):
        momentum_at(ema_cfg, 0, total_steps)  # validates the schedule and total_steps now
        self.cfg = ema_cfg
        self.total_steps = total_steps
        self.online = online_engine
        self.step = 0  # optimizer steps whose update has been applied
        self._last_global_step = online_engine.global_steps

        teacher_module.requires_grad_(False)
        teacher_module.eval()
        self.engine, *_ = deepspeed.initialize(
            model=_TargetEncoder(teacher_module), config=teacher_ds_config
        )
        self.engine.eval()
        self.teacher_params = dict(teacher_module.named_parameters())
        self.online_params = dict(online_engine.module.named_parameters())
        missing = sorted(set(self.online_params) ^ set(self.teacher_params))
        if missing:
            raise ValueError(
                f"EmaTeacher: the teacher and the online model differ in parameters {missing[:5]}: "
                "build the teacher exactly like the online model"
            )

        self.zero3 = online_engine.zero_optimization_stage() == 3
        self.layout = choose_layout(online_engine, layout)
        if self.zero3:
            for name in self.teacher_params:
                self._check_same_partition(name)
        with torch.no_grad():
            self.slots = self._flat_slots() if self.layout == "flat" else self._per_parameter_slots()
            self._copy_frozen()
            self._write_teacher()

    # ----------------------------------------------------------------------------------- layout

    def _check_same_partition(self, name: str) -> None:
        online, teacher = self.online_params[name], self.teacher_params[name]
        if not hasattr(teacher, "ds_tensor"):
            raise ValueError(f"EmaTeacher: teacher parameter {name} is not ZeRO-3 partitioned: build it in zero.Init")
        if teacher.ds_persist:
            raise ValueError(
                f"EmaTeacher: teacher parameter {name} is persistent (a full copy kept between forwards that "
                "nothing would refresh after an update): build the teacher engine with megajepa.train.deepspeed_json.teacher_config"
            )
        if teacher.ds_tensor.numel() != online.ds_tensor.numel() or teacher.ds_shape != online.ds_shape:
            raise ValueError(
                f"EmaTeacher: teacher parameter {name} is partitioned differently from the online one "
                f"({tuple(teacher.ds_shape)}, {teacher.ds_tensor.numel()} local elements vs "
                f"{tuple(online.ds_shape)}, {online.ds_tensor.numel()}): same config and world size needed"
            )

    def _flat_slots(self) -> list[_Slot]:
        """One slot per optimizer sub-group; the teacher's partitions become views of one buffer."""
        optimizer = self.online.optimizer
        name_of = {id(p): name for name, p in self.online_params.items()}
        slots = []
        for i, (group, master) in enumerate(zip(optimizer.fp16_groups, optimizer.fp32_partitioned_groups_flat)):
            names = tuple(name_of[id(p)] for p in group)
            twins = [self.teacher_params[name] for name in names]
            dtypes = {t.ds_tensor.dtype for t in twins}
            if len(dtypes) != 1:
                raise ValueError(f"EmaTeacher: sub-group {i} mixes teacher dtypes {sorted(map(str, dtypes))}")
            flat = torch.empty(master.numel(), dtype=dtypes.pop(), device=master.device)
            offset = 0
            for twin in twins:
                n = twin.ds_tensor.numel()
                twin.ds_tensor.data = flat.narrow(0, offset, n)
                offset += n
            assert offset == master.numel(), f"sub-group {i}: {offset} teacher elements, {master.numel()} master"
            slots.append(_Slot(f"sub-group {i}", names, lambda m=master: m, master.detach().clone(), lambda f=flat: f))
        return slots

    def _per_parameter_slots(self) -> list[_Slot]:
        """One slot per trainable parameter: its local slice under ZeRO-3, the whole of it below."""
        slots = []
        for name, online in self.online_params.items():
            numel = online.ds_numel if self.zero3 else online.numel()
            if not online.requires_grad or numel == 0:
                continue
            teacher = self.teacher_params[name]
            if self.zero3:
                master, target = partial(safe_get_local_fp32_param, online), partial(getattr, teacher, "ds_tensor")
            else:  # replicated: every rank holds whole parameters (in bf16/fp16, the rounded masters)
                master, target = partial(_whole_fp32, online), partial(_whole, teacher)
            ema = master().detach().to(target().device, torch.float32, copy=True)
            slots.append(_Slot(name, (name,), master, ema, target))
        return slots

    def _copy_frozen(self) -> None:
        """Parameters the optimizer does not own never change: the teacher copies them once."""
        owned = {name for slot in self.slots for name in slot.params}
        for name, online in self.online_params.items():
            if name in owned:
                continue
            teacher = self.teacher_params[name]
            if self.zero3:
                teacher.ds_tensor.copy_(online.ds_tensor)
            else:
                teacher.data.copy_(online.data)

    def _write_teacher(self) -> None:
        """teacher <- EMA for every slot, with no averaging (after init and load)."""
        for slot in self.slots:
            slot.teacher().view(-1).copy_(slot.ema)

    # ----------------------------------------------------------------------------------- update

    @torch.no_grad()
    def update(self, step: int) -> dict:
        """EMA <- m * EMA + (1 - m) * master and teacher <- EMA, for the optimizer step just taken.

        `step` counts the optimizer steps done, this one included (1 at the first update); the
        momentum is momentum_at(step - 1), so the first update uses momentum_start. It does
        nothing (`updated`: False) unless the engine applied a step since the last update, so a
        call after a micro-batch's engine.step() that only accumulated is harmless."""
        momentum = momentum_at(self.cfg, step - 1, self.total_steps)
        if self.online.global_steps == self._last_global_step:
            return {"momentum": momentum, "updated": False}
        self._last_global_step = self.online.global_steps
        for slot in self.slots:
            master, teacher = slot.master(), slot.teacher()
            if master.device != slot.ema.device:
                master = master.to(slot.ema.device)
            if teacher.device == slot.ema.device:
                ema_update(master, slot.ema, teacher, momentum)
            else:
                ema_update(master, slot.ema, None, momentum)
                teacher.copy_(slot.ema)
        # No device synchronisation: the teacher engine gathers on the compute stream
        # (megajepa.train.deepspeed_json.teacher_config turns overlap_comm off), so its next
        # forward's all-gathers are ordered after these writes.
        self.step = step
        return {"momentum": momentum, "updated": True}

    @torch.no_grad()
    def encode(self, batch: dict) -> torch.Tensor:
        """z_b from the teacher rows of `batch` (one micro-batch's, or stack_teacher_rows' of a
        whole step). Every rank must call it as often as the others: the forward all-gathers the
        teacher's parameters."""
        return self.engine(batch)

    @torch.no_grad()
    def restore(self, emas: Sequence[torch.Tensor], step: int) -> None:
        """Set each slot's EMA to `emas` (a checkpoint's, in slot order), re-copy the frozen
        parameters from the online model and rewrite the teacher; `step`: the optimizer steps the
        EMA has seen. Call after engine.load_checkpoint (megajepa.train.ema_checkpoint does)."""
        for slot, ema in zip(self.slots, emas, strict=True):
            slot.ema.copy_(ema.view(-1))
        self._copy_frozen()
        self._write_teacher()
        self.step = step
        self._last_global_step = self.online.global_steps
