"""Divergence that DeepSpeed hides: optimizer steps it skips.

DeepSpeed skips a step whose gradients are not finite ("OVERFLOW! Skipping step") in every
precision, fp32 included, and carries on: the loss freezes, the lr schedule stalls, and the run
ends with exit code 0. A NaN-loss guard does not see it, since the loss stays finite while the
gradients blow up (an exploding lr). The guard counts consecutive optimizer steps that were
skipped or had a non-finite gradient norm; more than `max_skipped_steps` in a row is divergence.
Under fp16 a skip is DeepSpeed's dynamic loss scaler lowering its scale, its normal job; those do
not count (DeepSpeed itself stops once the scale reaches its minimum).

Both signals are global (DeepSpeed reduces the overflow flag and the norm over all ranks), so
every rank reaches the same verdict at the same step without communicating. A step whose loss is
not finite never reaches DeepSpeed: megajepa.train.step refuses the update on every rank.
"""

from __future__ import annotations

import math
from typing import Optional


class TrainingDiverged(RuntimeError):
    pass


class DivergenceGuard:
    def __init__(self, max_skipped_steps: int, precision: str):
        self.max_skipped_steps = max_skipped_steps
        self.counts_skips = precision != "fp16"
        self.consecutive = 0  # bad optimizer steps in a row, up to the last one checked

    @property
    def healthy(self) -> bool:
        return self.consecutive == 0

    def check(self, applied: bool, grad_norm: Optional[float]) -> Optional[str]:
        """After an optimizer step: None, or why the run has diverged."""
        if not applied and not self.counts_skips:
            return None  # fp16: the loss scaler lowering its scale
        if applied and (grad_norm is None or math.isfinite(grad_norm)):
            self.consecutive = 0
            return None
        self.consecutive += 1
        if self.consecutive <= self.max_skipped_steps:
            return None
        what = "skipped by DeepSpeed (non-finite gradients)" if not applied else "applied with a non-finite gradient norm"
        return (
            f"{self.consecutive} optimizer steps in a row {what}, last gradient norm {grad_norm}; "
            f"more than train.max_skipped_steps={self.max_skipped_steps}"
        )

    def check_step(self, step: int, result, engine, last_good: Optional[str]) -> None:
        """After training step `step` (counted from 1; `result`: megajepa.train.step's): raise
        TrainingDiverged, naming the last good checkpoint, when its loss was not finite (no update)
        or the optimizer steps have diverged."""
        if not result.updated:
            loss, ce, jepa = (value.item() for value in (result.loss, result.ce, result.jepa))
            raise TrainingDiverged(
                f"step {step}: loss is {loss} (ce {ce}, jepa {jepa}); "
                f"stopped before the update. Last good checkpoint: {last_good or 'none saved yet'}"
            )
        grad_norm = engine.get_global_grad_norm()
        # DeepSpeed skips steps on non-finite gradients; whether it did is a host read
        trouble = self.check(engine.was_step_applied(), None if grad_norm is None else float(grad_norm))
        if trouble is not None:
            raise TrainingDiverged(f"step {step}: {trouble}. Last good checkpoint: {last_good or 'none saved yet'}")
