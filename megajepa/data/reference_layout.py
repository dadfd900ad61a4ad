"""The published reference's layouts, as batches in megajepa.data.layout's format.

The reference implementation encodes every pair as separate sequences, each padded to max_length
(512 by default), one sequence per row:

    ref3   [T+C]    the full conversation A ++ B, carrying the CE labels
           [T+P]    view A + the k [PRED] tokens (z_a at the last [PRED])
           [C']     view B alone (z_b at its last token)                       3 rows per pair
    ref2   [T+C]    as above
           [T+P+C'] its additive-mask option: view A + [PRED] and view B in one row, view B
                    masked off from view A                                     2 rows per pair

The rows use the packed layout's segment kinds and positions, so the same attention-mask
builder, engine and objective run them and give the same CE, z_a and z_b: only the layout, and
so the cost, differs. (The reference's additive-mask option also reuses positions wrongly; here
C' starts at position 0 as everywhere else: we reproduce its cost, not its bug.) Rows come in
blocks: all [T+C] rows in pair order, then the second kind, then the third.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from megajepa.data.layout import (
    SEG_C,
    SEG_CB,
    SEG_P,
    SEG_T,
    LayoutConfig,
    _fill_rows,
    _keeps_jepa,
    _Segment,
    token_views,
)

REFERENCE_LAYOUTS = ("ref3", "ref2")


def pack_reference(
    view_a: Sequence[np.ndarray],
    view_b: Sequence[np.ndarray],
    sample_ids: Sequence[int],
    cfg: LayoutConfig,
    kind: str,
    max_length: int = 512,
) -> dict[str, torch.Tensor]:
    """N view pairs -> the `kind` layout ("ref3" or "ref2"), rows padded to max_length.

    cfg supplies the [PRED] ids, labels mode, JEPA dropout and padding id; its row_length is not
    used. Only the online target ("online") and next-token only ("none") exist here: the
    reference has no EMA teacher."""
    if kind not in REFERENCE_LAYOUTS:
        raise ValueError(f"reference layout: unknown kind {kind!r} (one of {', '.join(REFERENCE_LAYOUTS)})")
    if cfg.target not in ("online", "none"):
        raise ValueError(f"reference layout {kind}: target {cfg.target!r} is not available (online or none)")
    pred = np.asarray(cfg.pred_token_ids, dtype=np.int64)
    full_rows: list[list[_Segment]] = []
    view_a_rows: list[list[_Segment]] = []
    view_b_rows: list[list[_Segment]] = []
    jepa_pairs: list[int] = []
    useful = 0
    for i, a, b, sid in token_views(view_a, view_b, sample_ids):
        useful += len(a) + len(b)
        full_rows.append([_Segment(i, SEG_T, a, 0), _Segment(i, SEG_C, b, len(a))])
        if not _keeps_jepa(sid, cfg):
            continue
        jepa_pairs.append(i)
        with_pred = [_Segment(i, SEG_T, a, 0)] + ([_Segment(i, SEG_P, pred, len(a))] if len(pred) else [])
        alone = [_Segment(i, SEG_CB, b, 0)]
        if kind == "ref3":
            view_a_rows.append(with_pred)
            view_b_rows.append(alone)
        else:
            view_a_rows.append(with_pred + alone)

    units = full_rows + view_a_rows + view_b_rows
    for unit in units:
        length = sum(len(s.tokens) for s in unit)
        if length > max_length:
            raise ValueError(
                f"sample {sample_ids[unit[0].pair]}: a {kind} row of {length} tokens exceeds max_length={max_length}"
            )
    # One unit per row: the reference pads every sequence on its own.
    ids, pos, pair, seg, labels, last = _fill_rows([[unit] for unit in units], max_length, cfg.pad_token_id, cfg.labels)
    za_kind = SEG_P if len(pred) else SEG_T  # with k = 0 the last T written is the view-A-alone row's
    return {
        "input_ids": ids,
        "position_ids": pos,
        "pair_index": pair,
        "segment": seg,
        "labels": labels,
        "za_index": torch.tensor([last[(p, za_kind)] for p in jepa_pairs], dtype=torch.long),
        "zb_index": torch.tensor([last[(p, SEG_CB)] for p in jepa_pairs], dtype=torch.long),
        "jepa_pairs": torch.tensor(jepa_pairs, dtype=torch.long),
        "sample_ids": torch.as_tensor(np.asarray(sample_ids, dtype=np.int64)),
        "num_pairs": torch.tensor(len(view_a)),
        "useful_tokens": torch.tensor(useful),
        "computed_tokens": torch.tensor(ids.numel()),
    }
