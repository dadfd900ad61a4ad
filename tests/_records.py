"""Records of the prepare schema, built from random tokens, and the definition of their views.

Shared by the layout and equivalence tests: `expected_views` is the oracle's reading of a record
(written from the layout's contract, not from its code).
"""

import dataclasses

import numpy as np

from megajepa.config import DataConfig, JepaConfig
from megajepa.data.layout import Layout

PRED_IDS = [90, 91, 92]  # tokens 1..3
PAD = 0


def make_records(n, seed, shared=False):
    """Random records; with `shared`, every user view opens like its conversation (no system message)."""
    rng = np.random.default_rng(seed)
    tokens = lambda length: rng.integers(3, 80, length)  # noqa: E731
    records = []
    for i in range(n):
        user_content, answer = tokens(rng.integers(1, 12)), tokens(rng.integers(1, 10))
        opening = tokens(2) if shared else np.array([1, 2])
        system = np.array([], dtype=np.int64) if shared else tokens(rng.integers(1, 6))
        user = np.r_[opening, user_content, [4, 5]]
        assistant = np.r_[[6, 7], answer, [4, 5]]
        full = np.r_[system, user, assistant]
        records.append(
            {
                "sample_id": 1000 + i,
                "full": full,
                "prompt_len": len(system) + len(user) + 2,
                "full_spans": np.array([len(system) + 2, len(system) + len(user) - 2, len(full) - len(answer) - 2, len(full) - 2]),
                "user": user,
                "user_insert": np.array([2, len(user) - 2]),
                "assistant": assistant,
                "assistant_insert": np.array([2, len(assistant) - 2]),
            }
        )
    return records


def layout(**settings):
    data = DataConfig(shards="", tokenizer="", row_length=128, row_multiple=16, max_length=0)
    jepa = JepaConfig(k=len(PRED_IDS), readout="content_end")
    data_keys = {f.name for f in dataclasses.fields(DataConfig)}
    data = dataclasses.replace(data, **{k: v for k, v in settings.items() if k in data_keys})
    jepa = dataclasses.replace(jepa, **{k: v for k, v in settings.items() if k not in data_keys})
    pred = PRED_IDS[: jepa.k]
    return Layout(data, jepa, pred, PAD), pred


def expected_views(record, pred, jepa, max_length):
    """(view with [PRED], its readout index, other view, its readout index), from the definition."""
    names = ("assistant", "user") if jepa.reverse_pred else ("user", "assistant")
    src, src_insert = record[names[0]], record[names[0] + "_insert"]
    at = src_insert[0] if jepa.front_pred else src_insert[1]
    # the reference adds <|predictor_i|> for i = k .. 1: prepended (1 ends up first) or appended
    src = np.r_[src[:at], pred if jepa.front_pred else pred[::-1], src[at:]]
    tgt, tgt_end = record[names[1]], record[names[1] + "_insert"][1]
    cut = (lambda s: s[:max_length]) if max_length else (lambda s: s)
    src, tgt = cut(src), cut(tgt)
    if jepa.readout == "offset":
        return src, len(src) + jepa.last_token, tgt, len(tgt) + jepa.last_token
    return src, min(src_insert[1] + len(pred), len(src)) - 1, tgt, min(tgt_end, len(tgt)) - 1


