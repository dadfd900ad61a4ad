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
reference's LinearPredictor, Xavier-uniform initialised). Each embedding is a signed sum of hidden
rows; the layout (megajepa.data.layout, Layout.stp_reads) lists, per batch, which flat row of the
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


class LinearPredictor(nn.Linear):
    """The reference's LinearPredictor: d x d, no bias, Xavier-uniform. The initialisation lives in
    reset_parameters, which nn.Linear runs inside its own constructor."""

    def __init__(self, hidden_size: int):
        super().__init__(hidden_size, hidden_size, bias=False)

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.weight, gain=1.0)


def build_predictor(cfg: JepaConfig, hidden_size: int) -> nn.Module:
    return LinearPredictor(hidden_size) if cfg.stp.linear_predictor else nn.Identity()


def embeddings(hidden: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicting, predicted) embeddings [E, d] in fp32: the signed sums of hidden rows the
    layout listed (stp_index, stp_sign, stp_slot: slot e < E is term e's source, E + e its target)."""
    flat = hidden.flatten(0, 1)
    terms = batch["stp_weight"].numel()
    rows = flat[batch["stp_index"]].float() * batch["stp_sign"].to(torch.float32)[:, None]
    both = rows.new_zeros(2 * terms, flat.shape[-1]).index_add(0, batch["stp_slot"], rows)
    return both[:terms], both[terms:]


def stp_loss(hidden: torch.Tensor, batch: dict, predictor: nn.Module, cfg: JepaConfig):
    """(loss, pred(source) [E, d], target [E, d]) of the batch's STP terms."""
    source, target = embeddings(hidden, batch)
    # The predictor runs on every rank every step, even on no terms (ZeRO-3's all-gathers).
    weight = next(predictor.parameters(), None)
    source = predictor(source.to(weight.dtype)).float() if weight is not None else source
    if cfg.stop_grad:
        target = target.detach()
    if source.shape[0] == 0:
        return source.sum() * 0.0, source, target
    if cfg.distance == "mse":
        return F.mse_loss(source, target), source, target
    weights = batch["stp_weight"].float()
    cosine = F.cosine_similarity(source, target, dim=-1)
    return 1.0 - (cosine * weights).sum() / weights.sum(), source, target
