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

Rows are at most L = row_length long: the width shrinks to the smallest multiple of
row_multiple that packs the same number of rows, so the last, partly filled row wastes little.
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
    # Rows are trimmed to the shortest multiple of this that packs the same number of rows
    # (0: always row_length). Bigger multiples mean fewer distinct shapes to compile on GPU.
    row_multiple: int = 16


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


def _first_fit_decreasing(sizes: list[int], width: int) -> list[list[int]]:
    """Unit indices per row: each unit, longest first, into the first row with room."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        if sizes[i] > width:
            raise ValueError(f"a packed unit of {sizes[i]} tokens does not fit data.row_length={width}")
        for r, space in enumerate(free):
            if sizes[i] <= space:
                rows[r].append(i)
                free[r] -= sizes[i]
                break
        else:
            rows.append([i])
            free.append(width - sizes[i])
    return rows


def _pack_rows(units: list[list[_Segment]], row_length: int, multiple: int):
    """Rows of units and their common width.

    First-fit-decreasing at row_length fixes the number of rows; then the width shrinks to the
    smallest multiple of `multiple` that still packs into that many rows, so the last, partly
    filled row does not leave a row's worth of padding (multiple 0 keeps row_length)."""
    sizes = [sum(len(s.tokens) for s in unit) for unit in units]
    rows = _first_fit_decreasing(sizes, row_length)
    width = row_length
    if multiple > 0 and rows:
        n_rows = len(rows)
        candidate = max(max(sizes), -(-sum(sizes) // n_rows))
        candidate = -(-candidate // multiple) * multiple
        while candidate < row_length:
            trial = _first_fit_decreasing(sizes, candidate)
            if len(trial) <= n_rows:
                rows, width = trial, candidate
                break
            candidate += multiple
    # Within a row keep pair order so the layout reads naturally.
    packed = [sorted((units[i] for i in row), key=lambda unit: (unit[0].pair, unit[0].kind)) for row in rows]
    return packed, width


def _fill_rows(rows, width: int, pad_token_id: int, labels_mode: str | None):
    n = max(len(rows), 1)
    ids = np.full((n, width), pad_token_id, dtype=np.int64)
    pos = np.zeros((n, width), dtype=np.int64)
    pair = np.full((n, width), -1, dtype=np.int64)
    seg = np.full((n, width), SEG_PAD, dtype=np.int64)
    labels = np.full((n, width), IGNORE_INDEX, dtype=np.int64)
    last_index: dict[tuple[int, int], int] = {}  # (pair, kind) -> flat index of the last token
    for r, row in enumerate(rows):
        col = 0
        for unit in row:
            for s in unit:
                end = col + len(s.tokens)
                ids[r, col:end] = s.tokens
                pos[r, col:end] = np.arange(s.first_position, s.first_position + len(s.tokens))
                pair[r, col:end] = s.pair
                seg[r, col:end] = s.kind
                last_index[(s.pair, s.kind)] = r * width + end - 1
                col = end
    if labels_mode is not None:
        _set_labels(rows, labels, labels_mode)
    tensors = tuple(torch.from_numpy(a) for a in (ids, pos, pair, seg, labels))
    return (*tensors, last_index)


def _set_labels(rows, labels: np.ndarray, mode: str) -> None:
    """Shifted next-token labels: T and C form one sequence A ++ B; position j predicts j + 1.
    Only B's tokens carry loss ('response': from A's last token on) or all of them ('all')."""
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
            if mode == "all":
                labels[r, t_col : t_col + len(a) - 1] = a[1:]
            labels[r, t_col + len(a) - 1] = b[0]
            labels[r, c_col : c_col + len(b) - 1] = b[1:]


def token_views(view_a, view_b, sample_ids):
    """(pair index, view A, view B, sample id) as int64 arrays, refusing empty views."""
    for i, (a, b, sid) in enumerate(zip(view_a, view_b, sample_ids)):
        a = np.asarray(a, dtype=np.int64)
        b = np.asarray(b, dtype=np.int64)
        if len(a) == 0 or len(b) == 0:
            raise ValueError(f"sample {sid}: empty view (view A {len(a)} tokens, view B {len(b)} tokens)")
        yield i, a, b, int(sid)


def pack_pairs(
    view_a: Sequence[np.ndarray], view_b: Sequence[np.ndarray], sample_ids: Sequence[int], cfg: LayoutConfig
) -> dict[str, torch.Tensor]:
    """Pack N view pairs into online rows (and teacher rows for target 'ema')."""
    pred = np.asarray(cfg.pred_token_ids, dtype=np.int64)
    online_units: list[list[_Segment]] = []
    teacher_units: list[list[_Segment]] = []
    jepa_pairs: list[int] = []
    useful = 0
    for i, a, b, sid in token_views(view_a, view_b, sample_ids):
        useful += len(a) + len(b)
        unit = [_Segment(i, SEG_T, a, 0), _Segment(i, SEG_C, b, len(a))]
        if _keeps_jepa(sid, cfg):
            jepa_pairs.append(i)
            if len(pred):
                unit.append(_Segment(i, SEG_P, pred, len(a)))
            target_unit = [_Segment(i, SEG_CB, b, 0)]
            (teacher_units if cfg.target == "ema" else online_units).append(target_unit)
        online_units.append(unit)

    rows, width = _pack_rows(online_units, cfg.row_length, cfg.row_multiple)
    ids, pos, pair, seg, labels, last = _fill_rows(rows, width, cfg.pad_token_id, cfg.labels)
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
        t_rows, t_width = _pack_rows(teacher_units, cfg.row_length, cfg.row_multiple)
        t_ids, t_pos, t_pair, t_seg, _, t_last = _fill_rows(t_rows, t_width, cfg.pad_token_id, None)
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
