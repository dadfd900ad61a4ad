"""Which spans of a conversation STP's terms read (jepa.objective=stp; the loss is megajepa.jepa.stp).

The random span is drawn on the host with the reference's rule (galilai-group/llm-jepa, stp.py,
get_s_t: torch.randint from a torch.Generator, rejection loops included) but from a generator of
its own per conversation and epoch, seeded with span_seed(data.seed, sample_id, epoch); the
reference uses one generator per rank (seed + 3 rank) consumed in batch order. So the
distribution of spans is the reference's, a record gets a new span every epoch as there, and the
draws depend on nothing else: not on the rank, the world size, the batch, the packing or a resume.
stp_reads turns a batch's records' terms into the batch's stp_* index tensors.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional

import torch

from megajepa.config import StpConfig
from megajepa.data.sequences import Sequences


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


def stp_reads(samples: list[dict], conversation_start: dict[int, int], sequences: Sequences) -> dict[str, torch.Tensor]:
    """The flat rows the STP loss (megajepa.jepa.stp) reads, from each record's full_spans;
    `conversation_start[i]` is the flat index of record i's first token in the packed rows,
    `sequences` the records' (its cut, its JEPA dropout, its config).

    Term e (E in all, record stp_pairs[e], weight stp_weight[e]) embeds its predicting side as
    the sum of stp_sign * hidden[stp_index] over the entries with stp_slot == e, its predicted
    side over stp_slot == E + e. A record's random spans come from its own generator
    (span_seed of data.seed, sample_id and the epoch its record carries, 0 if none), so they are
    the same wherever and whenever the record is packed. Records without usable spans, or not
    dropped by jepa.dropout, carry CE only."""
    sides: tuple[list, list] = ([], [])  # (flat index, sign, term) per side
    weights, pairs = [], []
    for i, record in enumerate(samples):
        sid = int(record["sample_id"])
        if not sequences.keeps_jepa(sid):
            continue
        generator = torch.Generator().manual_seed(span_seed(sequences.data.seed, sid, int(record.get("epoch", 0))))
        length = len(sequences.cut(record["full"]))
        base = conversation_start[i]
        for term in record_terms(record["full_spans"], length, sequences.jepa.stp, generator):
            for side, terms in zip(sides, (term.source, term.target)):
                side.extend((base + index, sign, len(weights)) for index, sign in terms.items())
            weights.append(term.weight)
            pairs.append(i)
    count = len(weights)
    entries = sides[0] + [(index, sign, count + e) for index, sign, e in sides[1]]
    as_long = lambda column: torch.tensor([entry[column] for entry in entries], dtype=torch.long)  # noqa: E731
    return {
        "stp_index": as_long(0),
        "stp_sign": as_long(1),
        "stp_slot": as_long(2),
        "stp_weight": torch.tensor(weights, dtype=torch.float32),
        "stp_pairs": torch.tensor(pairs, dtype=torch.long),
    }
