"""Semantic Tube Prediction (STP): the latent term from one ordinary pass of the conversation.

The reference (galilai-group/llm-jepa, stp.py, `--linear`) embeds a span [a, b) of the
conversation as the difference of two hidden states, h[b - 1] - h[a - 1] (h: one hidden layer,
the last by default), so no extra sequence is run:

    e2e           the user content predicts the assistant content:
                  D( pred(span(user)), span(assistant) )
    random_span   a random span [s, t) of the user + assistant content (offsets into their
                  concatenation, mapped back to the conversation's tokens) is predicted from the
                  rest of it, before + after: D( pred(before + after), span ),
                  D = 1 - sum_i w_i cos_i / sum_i w_i (w_i = 1 unless jepa.stp.length_adjustment)
                  or the mean squared error (jepa.distance=mse, the reference's --jepa_mse)

pred is the identity or, with jepa.stp.linear_predictor, a d x d linear map without bias (the
reference's LinearPredictor, megajepa.model.predictor). Each embedding is a signed sum of hidden
rows; the layout (megajepa.data.stp_spans, stp_reads) lists, per batch, which flat row of the
packed hidden states enters which embedding with which sign, so packed rows of many
conversations keep every conversation's spans to itself and the loss needs no host sync.

The spans themselves (the reference's random draw, e2e's parts, the length weights) are chosen
on the host at collate time by megajepa.data.stp_spans.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megajepa.config import JepaConfig
from megajepa.model.predictor import LinearPredictor


def embeddings(hidden: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicting, predicted) embeddings [E, d] in fp32: the signed sums of hidden rows the
    layout listed (stp_index, stp_sign, stp_slot: slot e < E is term e's source, E + e its target)."""
    flat = hidden.flatten(0, 1)
    terms = batch["stp_weight"].numel()
    rows = flat[batch["stp_index"]].float() * batch["stp_sign"].to(torch.float32)[:, None]
    both = rows.new_zeros(2 * terms, flat.shape[-1]).index_add(0, batch["stp_slot"], rows)
    return both[:terms], both[terms:]


class Stp:
    """jepa.objective=stp: the latent term from spans of the conversation's own hidden states."""

    def __init__(self, cfg: JepaConfig):
        self.cfg = cfg

    def make_predictor(self, hidden_size: int) -> nn.Module:
        return LinearPredictor(hidden_size) if self.cfg.stp.linear_predictor else nn.Identity()

    def latent(self, hidden: torch.Tensor, batch: dict, predictor: nn.Module, target_embeddings=None):
        """(loss, pred(source) [E, d], target [E, d]) of the batch's STP terms (no EMA target:
        the configuration refuses one)."""
        source, target = embeddings(hidden, batch)
        # The predictor runs on every rank every step, even on no terms (ZeRO-3's all-gathers).
        weight = next(predictor.parameters(), None)
        source = predictor(source.to(weight.dtype)).float() if weight is not None else source
        if self.cfg.stop_grad:
            target = target.detach()
        if source.shape[0] == 0:
            return source.sum() * 0.0, source, target
        if self.cfg.distance == "mse":
            return F.mse_loss(source, target), source, target
        weights = batch["stp_weight"].float()
        cosine = F.cosine_similarity(source, target, dim=-1)
        return 1.0 - (cosine * weights).sum() / weights.sum(), source, target
