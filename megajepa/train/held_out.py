"""The held-out loss during training (data.eval_shards): CE, JEPA loss and the collapse figures."""

from __future__ import annotations

import torch

from megajepa import dist
from megajepa.jepa import collapse
from megajepa.train.step import to_device


@torch.no_grad()
def evaluate(engine, teacher, loader, batches: int) -> dict:
    """Held-out CE and JEPA loss, averaged over `batches` batches per rank and across ranks, and
    the collapse figures (eval_z_a_std, ...) of all those batches' pairs together."""
    engine.eval()
    device = engine.device
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # ce, jepa, batches: read once
    stats = 0.0
    for i, batch in enumerate(loader.iter_epoch()):
        if i >= batches:
            break
        batch = to_device(batch, device)
        target = teacher.encode(batch) if teacher is not None else None
        out = engine(batch, step=10**9, target_embeddings=target)
        totals += torch.stack([out.ce, out.jepa, torch.ones_like(out.ce)]).double()
        stats = stats + collapse.statistics(out.z_a, out.z_b)
    if not torch.is_tensor(stats):  # no batch on this rank: zero pairs of the others' width
        stats = torch.zeros(4 * engine.module.lm.config.hidden_size + 2, dtype=torch.float64, device=device)
    reduced = dist.all_reduce(torch.cat([totals, stats])).tolist()
    ce, jepa, count = reduced[:3]
    engine.train()
    n = max(count, 1.0)
    figures = {f"eval_{k}": v for k, v in collapse.figures(reduced[3:]).items() if v is not None}
    return {"eval_ce": ce / n, "eval_jepa": jepa / n, "eval_batches": int(count), **figures}
