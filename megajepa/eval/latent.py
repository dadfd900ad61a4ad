"""Teacher-forced metrics of one batch of pairs, in the training's packed single pass.

The batch is packed as in training (megajepa.data.layout with the model's own views and readout,
online target, no JEPA dropout) and run through the JepaModel: CE over the reply given the prompt,
and pred(z_a), z_b for every pair.
From the embeddings: the cosine of pred(z_a) with its own z_b (matched) and with the batch's other
z_b (mismatched), where its own z_b ranks among all of the batch's by that cosine (1 = first),
and the collapse statistics (megajepa.jepa.collapse), summed over batches for the whole set.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from megajepa.config import DataConfig
from megajepa.data.layout import Layout
from megajepa.eval.data import EvalPair
from megajepa.jepa import collapse
from megajepa.jepa.objective import JepaModel

MIN_ROW_LENGTH = 512


@dataclass
class BatchMetrics:
    ce_sum: float  # summed over view-B tokens
    tokens: int
    latent_sum: float  # D(pred(z_a), z_b) summed over pairs
    cos_matched: list[float]
    cos_mismatched: list[float]  # per pair, the mean over the batch's other pairs
    ranks: list[int]  # per pair, 1-based
    collapse: torch.Tensor  # megajepa.jepa.collapse.statistics of the batch (CPU)


def _layout(model: JepaModel, pairs: Sequence[EvalPair], pred_ids: list[int], pad_id: int) -> Layout:
    """The training layout for these pairs: one row can hold the longest record, nothing is cut."""
    longest = max(len(p.record["full"]) + len(p.record["user"]) + len(p.record["assistant"]) for p in pairs)
    data = DataConfig(
        shards="", tokenizer="", row_length=max(MIN_ROW_LENGTH, -(-(longest + len(pred_ids)) // 16) * 16),
        max_length=0, labels="response",
    )
    jepa = dataclasses.replace(model.cfg, target="online", dropout=0.0, lambda_=max(model.cfg.lambda_, 1.0))
    return Layout(data, jepa, pred_ids, pad_id)


def similarity_ranks(z_a: torch.Tensor, z_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per pair i: cos(z_a_i, z_b_i), the mean cos(z_a_i, z_b_j) over j != i, and the rank of
    z_b_i among all z_b by cosine with z_a_i (1 = first; ties count in its favour)."""
    cos = F.normalize(z_a.float(), dim=-1) @ F.normalize(z_b.float(), dim=-1).T  # row i: z_a_i vs every z_b
    matched = cos.diagonal()
    n = cos.shape[0]
    mismatched = (cos.sum(dim=1) - matched) / max(n - 1, 1)
    ranks = 1 + (cos > matched[:, None]).sum(dim=1)
    return matched, mismatched, ranks


@torch.no_grad()
def batch_metrics(model: JepaModel, pairs: Sequence[EvalPair], pred_ids: list[int], pad_id: int) -> BatchMetrics:
    device = next(model.parameters()).device
    layout = _layout(model, pairs, pred_ids, pad_id)
    batch = layout([p.record for p in pairs])
    batch = {k: v.to(device) for k, v in batch.items()}
    out = model(batch)
    tokens = batch["ce_index"].numel()
    matched, mismatched, ranks = similarity_ranks(out.z_a, out.z_b)
    n = len(pairs)
    return BatchMetrics(
        ce_sum=out.ce.item() * tokens,
        tokens=tokens,
        latent_sum=out.jepa.item() * n,
        cos_matched=matched.tolist(),
        cos_mismatched=mismatched.tolist() if n > 1 else [],
        ranks=ranks.tolist(),
        collapse=collapse.statistics(out.z_a, out.z_b).cpu(),
    )
