"""One optimizer step of the LLM-JEPA engine: what `megajepa train` runs and `megajepa bench` times.

    result = train_step(engine, teacher, micro_batches, step, flags={"stop": stop_requested}, accumulate="mean")

First, with target: ema, one teacher forward over the teacher rows of every micro-batch (the
EMA weights do not change within a step, and one forward gathers the teacher's parameters once
per step). Then per micro-batch (CPU tensors from the loader): the online
forward, backward and engine.step(), which applies the update on the last micro-batch only
(DeepSpeed's accumulation boundary) from the mean of the micro-batch gradients, or their sum with
`accumulate="sum"` (optim.accumulate: the reference's update). Just before that update one all-reduce agrees on every
rank's flags (`nonfinite`: a non-finite loss in any micro-batch of this step, and whatever the
caller adds, such as a stop signal) and is read once: a non-finite loss anywhere skips the update
and the EMA on every rank (the caller stops). After the update the EMA teacher follows the new
weights. A MoE family's router load-balancing loss (in the loss already) is logged as router_aux,
the mean over the micro-batches.

That read is the step's only wait for the device: the losses, the collapse statistics (summed
over the micro-batches: megajepa.jepa.collapse; the logger adds the ranks') and the
grad norm stay device tensors for the metrics to read once per logging step, and the token
counts come from the CPU batches. (DeepSpeed's ZeRO-3 step itself still reads its overflow check
and grad norm on the host.)

`section(name)` is a context manager around the teacher's forward ("teacher") and the EMA update
("ema"): the bench times them with it; training passes none.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Optional, Sequence

import torch

from megajepa import dist
from megajepa.data.mixture import SOURCE_COUNTS
from megajepa.jepa.ema_target import stack_teacher_rows
from megajepa.jepa import collapse
from megajepa.jepa.objective import JepaOutput

# Summed over the micro-batches of a step, from the CPU batches.
COUNTS = ("computed_tokens", "useful_tokens", "num_pairs")


def to_device(batch: dict, device) -> dict:
    """The batch's tensors on `device`. To CUDA through pinned memory: a copy from pageable host
    memory makes the host wait for the device's queue, a pinned one does not. The training
    loader pins on CUDA already (pin_memory() of a pinned tensor is the tensor itself)."""
    device = torch.device(device)
    pin = device.type == "cuda"
    return {
        k: ((v.pin_memory() if pin else v).to(device, non_blocking=True) if torch.is_tensor(v) else v)
        for k, v in batch.items()
    }


@dataclass
class StepResult:
    loss: torch.Tensor  # device, the mean over micro-batches; so are ce and jepa
    ce: torch.Tensor
    jepa: torch.Tensor
    lambda_: float
    counts: dict[str, float]  # COUNTS summed over the micro-batches (host)
    flags: dict[str, bool]  # agreed across ranks
    updated: bool  # False: a non-finite loss stopped the update (on every rank)
    last: JepaOutput  # the last micro-batch's output
    device_metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # jepa.regularizer's mean value
    # summed over the micro-batches: [3, S] records, pairs, tokens per source (host); with several
    # sources [2, S] CE sum and labelled tokens per source (device), else None
    source_counts: Optional[torch.Tensor] = None
    source_ce: Optional[torch.Tensor] = None
    # megajepa.jepa.collapse.statistics of this rank's pairs, summed over the micro-batches (device)
    collapse: Optional[torch.Tensor] = None


def _no_section(name: str) -> ContextManager:
    return contextlib.nullcontext()


def train_step(
    engine,
    teacher,
    micro_batches: Sequence[dict],
    step: int,
    flags: Optional[dict[str, Any]] = None,
    section: Callable[[str], ContextManager] = _no_section,
    accumulate: str = "mean",
) -> StepResult:
    """One optimizer step over `micro_batches` (as many as the engine accumulates) after `step`
    steps; `flags` are bools, 0-d device tensors or callables giving one (called at the agreement,
    after the last backward) to agree on across ranks with `nonfinite`;
    `accumulate` is optim.accumulate (mean | sum of the micro-batch gradients)."""
    accumulation = engine.gradient_accumulation_steps()
    if len(micro_batches) != accumulation:
        raise ValueError(f"train_step: {len(micro_batches)} micro-batches for {accumulation} accumulation steps")
    device = engine.device
    counts = {key: 0.0 for key in COUNTS}
    sums = torch.zeros(3, device=device)  # loss, ce, jepa
    finite = torch.ones((), dtype=torch.bool, device=device)
    source_counts, source_ce = None, None
    router_aux = None  # a MoE family's load-balancing loss, summed over the micro-batches
    targets = [None] * accumulation
    if teacher is not None:
        with section("teacher"):
            rows, pairs = stack_teacher_rows(micro_batches)
            targets = teacher.encode(to_device(rows, device)).split(pairs)
    for i, cpu_batch in enumerate(micro_batches):
        for key in COUNTS:
            counts[key] += float(cpu_batch[key])  # CPU tensors: no device wait
        if "source_records" in cpu_batch:
            batch_counts = torch.stack([cpu_batch[f"source_{key}"] for key in SOURCE_COUNTS]).double()
            source_counts = batch_counts if source_counts is None else source_counts + batch_counts
        batch = to_device(cpu_batch, device)
        out = engine(batch, step=step, target_embeddings=targets[i])
        finite &= torch.isfinite(out.loss.detach())
        sums += torch.stack([out.loss.detach(), out.ce, out.jepa]).float()
        if out.router_aux is not None:
            router_aux = out.router_aux.float() if router_aux is None else router_aux + out.router_aux.float()
        stats = collapse.statistics(out.z_a, out.z_b)
        if out.regularizer is not None:
            regularizer = out.regularizer if i == 0 else regularizer + out.regularizer
        collapse_stats = stats if i == 0 else collapse_stats + stats
        if out.source_ce is not None:
            source_ce = out.source_ce if source_ce is None else source_ce + out.source_ce
        engine.backward(out.loss, scale_wrt_gas=accumulate == "mean")  # DeepSpeed divides by grad_accum
        if i == accumulation - 1:
            now = {name: value() if callable(value) else value for name, value in (flags or {}).items()}
            agreed = dist.agree({"nonfinite": ~finite, **now}, device)
            if agreed["nonfinite"]:
                means = sums / accumulation
                return StepResult(*means, out.lambda_, counts, agreed, False, out, {}, source_counts, source_ce)
        engine.step()
    if teacher is not None:
        with section("ema"):
            teacher.update(step + 1)
    loss, ce, jepa = sums / accumulation
    metrics = {"regularizer": regularizer / accumulation} if out.regularizer is not None else {}
    if router_aux is not None:
        metrics["router_aux"] = router_aux / accumulation
    return StepResult(loss, ce, jepa, out.lambda_, counts, agreed, True, out, metrics, source_counts, source_ce, collapse_stats)


@contextlib.contextmanager
def sync_debug(mode: str):
    """torch.cuda.set_sync_debug_mode(mode) inside the block and the previous mode after it;
    "off" (and no CUDA) leaves it alone. With "warn" each host synchronisation is reported once
    per Python line that caused it."""
    if mode == "off" or not torch.cuda.is_available():
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)
