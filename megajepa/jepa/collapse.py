"""Collapse: do z_a and z_b still carry information about their record?

    report = collapse_report(z_a, z_b)   # over the global batch (every rank's pairs), one all-reduce

Two figures, each from sums that add up over micro-batches and ranks (`statistics`), so the
global batch's value needs no all-gather and the training step computes it on the device:

  - spread: the std across the pairs of the L2-normalised embeddings, averaged over the d
    dimensions, times sqrt(d) (z_a_std, z_b_std). About 1 for embeddings spread over the sphere;
    with every pairwise cosine c it is about sqrt(1 - c), so a batch collapsed to one point
    (c -> 1) reads near 0.
  - matching: the mean cosine of pred(z_a_i) with its own z_b_i (cos_matched) and with the other
    pairs' z_b_j, j != i (cos_mismatched). Embeddings that identify their record have
    matched > mismatched; equal means pred(z_a) says nothing about which z_b is its own.

The judgement (`verdict`, `collapsed` 1/0 in the logged rows): collapsed when z_a_std or z_b_std
is below STD_MIN (pairwise cosines above ~0.99: one point) or cos_matched - cos_mismatched is below
GAP_MIN (no match). The effective rank of the embeddings is not used: it needs the d x d Gram
matrix on every rank, and over a batch collapsed to one point plus float noise it reads the
noise's rank, not 1.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from megajepa import dist

STD_MIN = 0.1  # z_a_std / z_b_std (std x sqrt(d)) below this: one point
GAP_MIN = 0.01  # cos_matched - cos_mismatched below this: no match
FIGURES = ("z_a_std", "z_b_std", "cos_matched", "cos_mismatched", "collapsed")


def statistics(z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
    """[4d + 2] float64 sums over the pairs of the normalised embeddings a, b: sum a, sum a^2,
    sum b, sum b^2 (per dimension), sum cos(a_i, b_i), count. Summed over micro-batches and ranks
    they are the statistics of the union; on the device, no read."""
    a = F.normalize(z_a.detach().double(), dim=-1)
    b = F.normalize(z_b.detach().double(), dim=-1)
    count = torch.full((1,), a.shape[0], dtype=torch.float64, device=a.device)
    return torch.cat([a.sum(0), a.square().sum(0), b.sum(0), b.square().sum(0), (a * b).sum().reshape(1), count])


def _spread(total: torch.Tensor, squares: torch.Tensor, n: float) -> float:
    variance = ((squares - total.square() / n) / (n - 1)).clamp_min(0)
    return variance.sqrt().mean().item() * math.sqrt(total.numel())


def figures(stats) -> dict[str, Optional[float]]:
    """FIGURES from `statistics` (a tensor or a list of floats, summed over what they cover);
    None where fewer than 2 pairs leave them undefined."""
    stats = torch.as_tensor(stats, dtype=torch.float64).cpu()
    d = (stats.numel() - 2) // 4
    sum_a, squares_a, sum_b, squares_b = stats[: 4 * d].view(4, d)
    matched_sum, n = stats[4 * d].item(), stats[4 * d + 1].item()
    if n < 2:
        return dict.fromkeys(FIGURES)
    mismatched = (torch.dot(sum_a, sum_b).item() - matched_sum) / (n * (n - 1))
    out = {
        "z_a_std": _spread(sum_a, squares_a, n),
        "z_b_std": _spread(sum_b, squares_b, n),
        "cos_matched": matched_sum / n,
        "cos_mismatched": mismatched,
    }
    out["collapsed"] = float(verdict(out).startswith("collapsed"))
    return out


def verdict(values: dict) -> str:
    """The judgement in words, from z_a_std, z_b_std, cos_matched and cos_mismatched (any source:
    the logged rows, `megajepa eval`'s metrics)."""
    spread = [values.get(k) for k in ("z_a_std", "z_b_std")]
    matched, mismatched = values.get("cos_matched"), values.get("cos_mismatched")
    if None in (*spread, matched, mismatched):
        return "n/a (fewer than 2 pairs)"
    gap = matched - mismatched
    if min(spread) < STD_MIN:
        return f"collapsed: one point for every record (std x sqrt(d) {min(spread):.3f} < {STD_MIN})"
    if gap < GAP_MIN:
        return f"collapsed: pred(z_a) does not pick its own z_b (cos matched - mismatched {gap:.4f} < {GAP_MIN})"
    return f"not collapsed (std x sqrt(d) {min(spread):.3f}, cos matched - mismatched {gap:.4f})"


def collapse_report(z_a: torch.Tensor, z_b: torch.Tensor) -> dict:
    """FIGURES and the verdict over the global batch: every rank calls it with its own pairs."""
    out = figures(dist.all_reduce(statistics(z_a, z_b)).tolist())
    return {**out, "verdict": verdict(out)}
