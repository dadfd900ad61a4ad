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

The random span is drawn on the host with the reference's rule (get_s_t: torch.randint from a
torch.Generator, rejection loops included) but from a generator of its own per conversation and
epoch, seeded with span_seed(data.seed, sample_id, epoch); the reference uses one generator per
rank (seed + 3 rank) consumed in batch order. So the distribution of spans is the reference's, a
record gets a new span every epoch as there, and the draws depend on nothing else: not on the
rank, the world size, the batch, the packing or a resume.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megajepa.config import JepaConfig, StpConfig


def span_seed(seed: int, sample_id: int, epoch: int) -> int:
    """The seed of a conversation's span generator in one epoch (63 bits of blake2b)."""
    digest = hashlib.blake2b(f"stp:{seed}:{sample_id}:{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def draw_span(length: int, generator: torch.Generator, cfg: StpConfig) -> tuple[int, int]:
    """[s, t) offsets into the region of `length` tokens: 0 <= s < t <= length, t - s < length
    (never the whole region, which would leave nothing to predict from). The reference's get_s_t."""
    if length < 2:
        raise ValueError(f"a random span needs a region of at least 2 tokens, got {length}")
    randint = lambda low, high, size=(): torch.randint(low, high, size, generator=generator)  # noqa: E731
    limit = cfg.max_span
    if cfg.draw == "both":
        while True:
            a, b = int(randint(0, length, (1,))), int(randint(1, length + 1, (1,)))
            s, t = min(a, b), max(a, b)
            s = 0 if cfg.from_start else s
            if limit >= 0 and t - s > limit:
                t = s + limit
            if s < t and t - s < length:
                return s, t
    if cfg.draw == "uniform":  # r indexes the length (length + 1) / 2 spans, by start then end
        total, n2 = length * (length + 1) // 2, 2 * length + 1
        while True:
            r = torch.randint(total, (1,), generator=generator, dtype=torch.long)
            s = torch.floor((n2 - torch.sqrt(n2**2 - 8 * r.float())) / 2).long()
            t = s + 1 + (r - s * (2 * length - s + 1) // 2)
            if int(t - s) < length:
                return int(s), int(t)
    s = 0 if cfg.from_start else int(randint(0, length))
    high = length + 1 if limit < 0 else min(length + 1, s + 1 + limit)
    while True:
        t = int(randint(s + 1, high))
        if t - s < length:
            return s, t


@dataclass
class SpanTerm:
    """One STP comparison: the predicting and the predicted embedding as {token index in the
    conversation: sign} (the hidden rows to add), and the comparison's weight."""

    source: dict[int, int]
    target: dict[int, int]
    weight: float


def _spans(*spans: tuple[int, int]) -> dict[int, int]:
    """The sum of the embeddings of spans (start, end), h[end - 1] - h[start - 1] each, as
    {token index: sign}; terms that cancel are left out."""
    terms: dict[int, int] = {}
    for start, end in spans:
        for index, sign in ((end - 1, 1), (start - 1, -1)):
            terms[index] = terms.get(index, 0) + sign
    return {i: c for i, c in sorted(terms.items()) if c != 0}


def _weight(cfg: StpConfig, length: int, span: int) -> float:
    rest = length - span
    if cfg.length_adjustment == "cosine_like":
        return 2.0 * rest * span / (rest * rest + span * span)
    if cfg.length_adjustment == "jaccard_like":
        return 1.0 - abs(rest - span) / (rest + span)
    return 1.0


def random_span_term(bounds: tuple[int, int, int, int], s: int, t: int, cfg: StpConfig) -> SpanTerm:
    """The term of span offsets [s, t) in the region user [us, ue) + assistant [as_, ae)."""
    us, ue, as_, ae = bounds
    user = ue - us
    start = us + s if s < user else as_ + s - user
    end = us + t if t < user else as_ + t - user
    if start >= as_:  # inside the assistant content: before = user + [as_, start)
        source, span = _spans((us, ue), (as_, start), (end, ae)), _spans((start, end))
    elif end <= ue:  # inside the user content: after = [end, ue) + assistant
        source, span = _spans((us, start), (end, ue), (as_, ae)), _spans((start, end))
    else:  # from the user content into the assistant content
        source, span = _spans((us, start), (end, ae)), _spans((start, ue), (as_, end))
    return SpanTerm(source, span, _weight(cfg, user + ae - as_, t - s))


def record_terms(spans, length: int, cfg: StpConfig, generator: Optional[torch.Generator]) -> list[SpanTerm]:
    """A conversation's STP terms from its full_spans [user start, end, assistant start, end)
    (token indices into the conversation, of which `length` tokens are kept). No terms where the
    record cannot carry the term: unknown spans (-1, plain text), content cut off, a span that
    would read before the first token, or too little content (the reference would fail there)."""
    us, ue, as_, ae = (int(x) for x in spans)
    if min(us, ue, as_, ae) < 0 or not us <= ue <= as_ <= ae <= length:
        return []
    if cfg.variant == "e2e":
        if us < 1 or ue == us or ae == as_:
            return []
        return [SpanTerm(_spans((us, ue)), _spans((as_, ae)), 1.0)]
    if cfg.between:
        as_ = ue
    if cfg.from_first_token:
        us = 1
    if us < 1 or (ue - us) + (ae - as_) < 2:
        return []
    bounds = (us, ue, as_, ae)
    return [random_span_term(bounds, *draw_span((ue - us) + (ae - as_), generator, cfg), cfg) for _ in range(cfg.spans)]


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
