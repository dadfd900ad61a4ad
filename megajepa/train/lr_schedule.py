"""The learning-rate schedule: a linear warm-up over optim.warmup_steps updates, then a cosine
decay to optim.min_lr_ratio x optim.lr.

    engine = deepspeed.initialize(..., lr_scheduler=lr_scheduler(cfg.optim, schedule_steps))

Update s (0-based) of a schedule of T updates with W warm-up updates runs at lr x lr_ratio(s):
(s + 1) / W while s < W (W = 0: no warm-up, the first update at the full lr), then the HF
Trainer's cosine, min + (1 - min) (1 + cos(pi p)) / 2 with p = (s - W) / (T - W), held at the
minimum past T (a resumed run longer than its schedule).
"""

from __future__ import annotations

import functools
import math

import torch

from megajepa.config import OptimConfig


def lr_ratio(optim: OptimConfig, schedule_steps: int, step: int) -> float:
    """The fraction of optim.lr that update `step` (0-based) runs at."""
    warmup = optim.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, schedule_steps - warmup))
    return optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * (1.0 + math.cos(math.pi * progress)) / 2.0


def lr_scheduler(optim: OptimConfig, schedule_steps: int):
    """A factory of the schedule's LambdaLR for deepspeed.initialize, which steps it after each update."""
    ratio = functools.partial(lr_ratio, optim, schedule_steps)
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, ratio)
