"""The packed single-pass layout (DESIGN.md): view pairs -> fixed-length rows.

Each pair contributes up to four segments:

    T   view A                      positions 0 .. a-1      attends to T (causal)
    C   view B after A, CE labels   positions a .. a+b-1    attends to T and C (causal)
    P   k [PRED] tokens             positions a .. a+k-1    attends to T and P (causal)
    C'  view B alone                positions 0 .. b-1      attends to C' (causal)

T, C and P of a pair share a row, in that order (C and P attend to T). C' attends only to itself,
so it is packed as its own unit, into the online rows (target "online") or into separate teacher
rows (target "ema"). Rows are filled first-fit-decreasing; nothing attends across pairs.

A batch is a dict of tensors:

    input_ids, position_ids, pair_index, segment, labels     [R, L]   online rows
    teacher_input_ids, teacher_position_ids,
    teacher_pair_index, teacher_segment                      [Rt, L]  target "ema" only
    za_index, zb_index, jepa_pairs                           [J]      pairs that keep the JEPA term
    sample_ids                                               [N]      one per pair, pair order
    num_pairs, useful_tokens, computed_tokens                 0-d

pair_index is the pair's position in the batch (0..N-1), -1 on padding. `labels` is already
shifted: labels[r, t] is the token predicted from position t (-100 where there is no loss), so
CE = cross_entropy(logits.flatten(0, 1), labels.flatten()). za_index and zb_index are flat indices
(row * L + column) into the online rows, or for zb with target "ema" into the teacher rows: z_a is
read at the last P token (the last T token when there are no [PRED] tokens), z_b at the last C'
token. Both mask forms (dense boolean for SDPA, FlexAttention BlockMask) are built from
pair_index, segment and the column order by megajepa.model.attention.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

SEG_PAD, SEG_T, SEG_C, SEG_P, SEG_CB = 0, 1, 2, 3, 4
IGNORE_INDEX = -100


@dataclass
class LayoutConfig:
    row_length: int
    pred_token_ids: Sequence[int] = ()  # the k [PRED] ids; empty: no P segment
    labels: str = "response"  # response | all
    target: str = "online"  # online | ema | none (next-token only: no P, no C')
    dropout: float = 0.0  # fraction of pairs without P and C'
    seed: int = 0
    pad_token_id: int = 0


@dataclass
class _Segment:
    pair: int
    kind: int
    tokens: np.ndarray
    first_position: int


def _keeps_jepa(sample_id: int, cfg: LayoutConfig) -> bool:
    """Seeded per-sample JEPA dropout: the same pair is dropped wherever and whenever it is read."""
    if cfg.target == "none":
        return False
    if cfg.dropout <= 0.0:
        return True
    digest = hashlib.blake2b(f"{cfg.seed}:{sample_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 >= cfg.dropout


def _first_fit_decreasing(units: list[list[_Segment]], row_length: int) -> list[list[list[_Segment]]]:
    sizes = [sum(len(s.tokens) for s in unit) for unit in units]
    order = sorted(range(len(units)), key=lambda i: (-sizes[i], i))
    rows: list[list[list[_Segment]]] = []
    free: list[int] = []
    for i in order:
        if sizes[i] > row_length:
            raise ValueError(f"a packed unit of {sizes[i]} tokens does not fit data.row_length={row_length}")
        for r, space in enumerate(free):
            if sizes[i] <= space:
                rows[r].append(units[i])
                free[r] -= sizes[i]
                break
        else:
            rows.append([units[i]])
            free.append(row_length - sizes[i])
    # Within a row keep pair order so the layout reads naturally.
    for row in rows:
        row.sort(key=lambda unit: (unit[0].pair, unit[0].kind))
    return rows


def _fill_rows(rows, row_length: int, pad_token_id: int, labels_mode: str | None):
    n = max(len(rows), 1)
    ids = torch.full((n, row_length), pad_token_id, dtype=torch.long)
    pos = torch.zeros((n, row_length), dtype=torch.long)
    pair = torch.full((n, row_length), -1, dtype=torch.long)
    seg = torch.full((n, row_length), SEG_PAD, dtype=torch.long)
    labels = torch.full((n, row_length), IGNORE_INDEX, dtype=torch.long)
    last_index: dict[tuple[int, int], int] = {}  # (pair, kind) -> flat index of the last token
    for r, row in enumerate(rows):
        col = 0
        for unit in row:
            for s in unit:
                n_tok = len(s.tokens)
                span = slice(col, col + n_tok)
                ids[r, span] = torch.as_tensor(s.tokens, dtype=torch.long)
                pos[r, span] = torch.arange(s.first_position, s.first_position + n_tok)
                pair[r, span] = s.pair
                seg[r, span] = s.kind
                last_index[(s.pair, s.kind)] = r * row_length + col + n_tok - 1
                col += n_tok
    if labels_mode is not None:
        _set_labels(rows, labels, labels_mode)
    return ids, pos, pair, seg, labels, last_index


def _set_labels(rows, labels: torch.Tensor, mode: str) -> None:
    """Shifted next-token labels: T (when mode is 'all') and C form one sequence A ++ B."""
    for r, row in enumerate(rows):
        col = 0
        for unit in row:
            starts = {}
            for s in unit:
                starts[s.kind] = (col, s.tokens)
                col += len(s.tokens)
            if SEG_T not in starts or SEG_C not in starts:
                continue
            t_col, a = starts[SEG_T]
            c_col, b = starts[SEG_C]
            full = np.concatenate([a, b])
            # position j of A ++ B predicts full[j + 1]; only B's tokens (or all) carry loss
            first = 0 if mode == "all" else len(a) - 1
            for j in range(first, len(full) - 1):
                column = t_col + j if j < len(a) else c_col + (j - len(a))
                labels[r, column] = int(full[j + 1])


def pack_pairs(
    view_a: Sequence[np.ndarray], view_b: Sequence[np.ndarray], sample_ids: Sequence[int], cfg: LayoutConfig
) -> dict[str, torch.Tensor]:
    """Pack N view pairs into online rows (and teacher rows for target 'ema')."""
    pred = np.asarray(cfg.pred_token_ids, dtype=np.int64)
    online_units: list[list[_Segment]] = []
    teacher_units: list[list[_Segment]] = []
    jepa_pairs: list[int] = []
    useful = 0
    for i, (a, b, sid) in enumerate(zip(view_a, view_b, sample_ids)):
        a = np.asarray(a, dtype=np.int64)
        b = np.asarray(b, dtype=np.int64)
        if len(a) == 0 or len(b) == 0:
            raise ValueError(f"sample {sid}: empty view (view A {len(a)} tokens, view B {len(b)} tokens)")
        useful += len(a) + len(b)
        unit = [_Segment(i, SEG_T, a, 0), _Segment(i, SEG_C, b, len(a))]
        if _keeps_jepa(int(sid), cfg):
            jepa_pairs.append(i)
            if len(pred):
                unit.append(_Segment(i, SEG_P, pred, len(a)))
            target_unit = [_Segment(i, SEG_CB, b, 0)]
            (teacher_units if cfg.target == "ema" else online_units).append(target_unit)
        online_units.append(unit)

    rows = _first_fit_decreasing(online_units, cfg.row_length)
    ids, pos, pair, seg, labels, last = _fill_rows(rows, cfg.row_length, cfg.pad_token_id, cfg.labels)
    za_kind = SEG_P if len(pred) else SEG_T
    batch = {
        "input_ids": ids,
        "position_ids": pos,
        "pair_index": pair,
        "segment": seg,
        "labels": labels,
        "za_index": torch.tensor([last[(p, za_kind)] for p in jepa_pairs], dtype=torch.long),
        "jepa_pairs": torch.tensor(jepa_pairs, dtype=torch.long),
        "sample_ids": torch.as_tensor(np.asarray(sample_ids, dtype=np.int64)),
        "num_pairs": torch.tensor(len(view_a)),
        "useful_tokens": torch.tensor(useful),
    }
    computed = ids.numel()
    if cfg.target == "ema":  # teacher rows even when empty: every rank runs the teacher each step
        t_rows = _first_fit_decreasing(teacher_units, cfg.row_length)
        t_ids, t_pos, t_pair, t_seg, _, t_last = _fill_rows(t_rows, cfg.row_length, cfg.pad_token_id, None)
        batch.update(
            teacher_input_ids=t_ids,
            teacher_position_ids=t_pos,
            teacher_pair_index=t_pair,
            teacher_segment=t_seg,
        )
        batch["zb_index"] = torch.tensor([t_last[(p, SEG_CB)] for p in jepa_pairs], dtype=torch.long)
        computed += t_ids.numel()
    else:
        batch["zb_index"] = torch.tensor([last[(p, SEG_CB)] for p in jepa_pairs], dtype=torch.long)
    batch["computed_tokens"] = torch.tensor(computed)
    return batch


class PairCollator:
    """collate_fn for the loader: samples {view_a, view_b, sample_id} -> one packed batch."""

    def __init__(self, cfg: LayoutConfig):
        self.cfg = cfg

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        return pack_pairs(
            [s["view_a"] for s in samples],
            [s["view_b"] for s in samples],
            [int(s["sample_id"]) for s in samples],
            self.cfg,
        )
