"""Units of sequences -> fixed-length rows (docs/layout.md): first-fit-decreasing, a unit's
segments side by side, each a sequence of its own for the attention mask."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from megajepa.data.sequences import IGNORE_INDEX, SEG_FULL, SEG_PAD, Unit


@dataclass
class Rows:
    """Row tensors [R, L] and the flat index (row * L + column) of every place the JEPA term reads:
    {(pair, name): index} for readouts, {(pair, name): [index]} for view tokens, {pair: index of
    its conversation's first token}."""

    tensors: dict[str, torch.Tensor]
    readout: dict[tuple[int, str], int]
    view_tokens: dict[tuple[int, str], list[int]]
    conversation_start: dict[int, int]


def fill_rows(
    units: list[Unit], pad_token_id: int, with_labels: bool, row_length: int = 0, row_multiple: int = 0,
    rows: Optional[list[list[int]]] = None, width: int = 0,
) -> Rows:
    """`units` placed in rows: packed by pack_rows at row_length / row_multiple unless `rows` (unit
    indices per row) and `width` are given (the bench's reference layouts put one sequence in each
    row, padded to max_length)."""
    if rows is None:
        rows, width = pack_rows([u.size for u in units], row_length, row_multiple)
    n = max(len(rows), 1)
    arrays = {
        "input_ids": np.full((n, width), pad_token_id, dtype=np.int64),
        "position_ids": np.zeros((n, width), dtype=np.int64),
        "pair_index": np.full((n, width), -1, dtype=np.int64),
        "segment": np.full((n, width), SEG_PAD, dtype=np.int64),
        "sequence": np.zeros((n, width), dtype=np.int64),
        "prefix_sequence": np.zeros((n, width), dtype=np.int64),
        "prefix_length": np.zeros((n, width), dtype=np.int64),
    }
    if with_labels:
        arrays["labels"] = np.full((n, width), IGNORE_INDEX, dtype=np.int64)
    readout: dict[tuple[int, str], int] = {}
    view_tokens: dict[tuple[int, str], list[int]] = {}
    conversation_start: dict[int, int] = {}
    for r, row in enumerate(rows):
        col, next_sequence = 0, 1
        for u in sorted(row):  # record order within a row reads naturally
            unit, root_sequence, starts = units[u], next_sequence, []
            for s in unit.segments:
                end = col + len(s.tokens)
                arrays["input_ids"][r, col:end] = s.tokens
                arrays["position_ids"][r, col:end] = np.arange(s.first_position, s.first_position + len(s.tokens))
                arrays["pair_index"][r, col:end] = s.pair
                arrays["segment"][r, col:end] = s.kind
                arrays["sequence"][r, col:end] = next_sequence
                if s.prefix_length:
                    arrays["prefix_sequence"][r, col:end] = root_sequence
                    arrays["prefix_length"][r, col:end] = s.prefix_length
                if with_labels and s.targets is not None:
                    arrays["labels"][r, col:end] = s.targets
                starts.append(r * width + col)
                col, next_sequence = end, next_sequence + 1
            pair = unit.segments[0].pair
            if unit.segments[0].kind == SEG_FULL:
                conversation_start[pair] = starts[0]
            for name, (seg, offset) in unit.readout.items():
                readout[(pair, name)] = starts[seg] + offset
            for name, places in unit.view_tokens.items():
                view_tokens[(pair, name)] = [starts[seg] + offset for seg, offset in places]
    return Rows({k: torch.from_numpy(v) for k, v in arrays.items()}, readout, view_tokens, conversation_start)


def pack_rows(sizes: list[int], row_length: int, multiple: int) -> tuple[list[list[int]], int]:
    """Unit indices per row and the common width.

    First-fit-decreasing at row_length fixes the number of rows; then the width shrinks to the
    smallest multiple of `multiple` that still packs into that many rows, so the last, partly
    filled row does not leave a row's worth of padding (multiple 0 keeps row_length)."""
    rows = _first_fit_decreasing(sizes, row_length)
    width = row_length
    if multiple > 0 and rows:
        candidate = max(max(sizes), -(-sum(sizes) // len(rows)))
        candidate = -(-candidate // multiple) * multiple
        while candidate < row_length:
            trial = _first_fit_decreasing(sizes, candidate)
            if len(trial) <= len(rows):
                return trial, candidate
            candidate += multiple
    return rows, width


def _first_fit_decreasing(sizes: list[int], width: int) -> list[list[int]]:
    """Unit indices per row: each unit, longest first, into the first row with room."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        if sizes[i] > width:
            raise ValueError(
                f"a record's packed sequences take {sizes[i]} tokens, more than data.row_length={width}"
            )
        for r, space in enumerate(free):
            if sizes[i] <= space:
                rows[r].append(i)
                free[r] -= sizes[i]
                break
        else:
            rows.append([i])
            free.append(width - sizes[i])
    return rows
