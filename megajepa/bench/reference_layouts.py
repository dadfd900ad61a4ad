"""The published reference's layouts, as batches of megajepa.data.layout's format.

The reference (galilai-group/llm-jepa, finetune.py) runs every record as separate sequences, each
padded to its --max_length (512 by default), one sequence per row:

    ref3   [conversation] [user view + k [PRED]] [assistant view]          3 rows per record
    ref2   [conversation] [user view + k [PRED], assistant view]           its --additive_mask
                          option: both views in one row, each seeing only itself

The sequences are the layout's own (Sequences.units with no shared prefix), so the same mask builder,
engine and objective run them and give the same CE, z_a and z_b as the packed layout: only the
placement, and so the cost, differs. (The reference's additive-mask option also reuses positions
wrongly; here the assistant view starts at position 0 as everywhere else: we reproduce its cost,
not its bug.)
"""

from __future__ import annotations

import dataclasses

import torch

from megajepa.config import DataConfig, JepaConfig
from megajepa.data.layout import Layout
from megajepa.data.sequences import Unit

REFERENCE_LAYOUTS = ("ref3", "ref2")


def _split(unit: Unit, groups: list[list[int]]) -> list[Unit]:
    """The unit's segments regrouped (segment numbers per new unit), readouts and view tokens re-pointed."""
    where = {seg: (g, j) for g, group in enumerate(groups) for j, seg in enumerate(group)}
    parts = [Unit([unit.segments[seg] for seg in group]) for group in groups]
    for name, (seg, offset) in unit.readout.items():
        g, j = where[seg]
        parts[g].readout[name] = (j, offset)
    for name, places in unit.view_tokens.items():
        g = where[places[0][0]][0]
        parts[g].view_tokens[name] = [(where[seg][1], offset) for seg, offset in places]
    return parts


def pack_reference(
    samples: list[dict], data: DataConfig, jepa: JepaConfig, pred_token_ids, pad_token_id: int, kind: str,
    max_length: int = 512,
) -> dict[str, torch.Tensor]:
    """Records -> the `kind` layout ("ref3" or "ref2"), each row padded to max_length.

    Only the reference's own objective exists here: views `reference`, the online target (the
    reference has no EMA teacher)."""
    if kind not in REFERENCE_LAYOUTS:
        raise ValueError(f"reference layout: unknown kind {kind!r} (one of {', '.join(REFERENCE_LAYOUTS)})")
    if jepa.target != "online" or jepa.views != "reference":
        raise ValueError(
            f"reference layout {kind}: needs jepa.target=online and jepa.views=reference "
            f"(got {jepa.target}, {jepa.views}): the reference has no EMA teacher and no shared prefix"
        )
    layout = Layout(dataclasses.replace(data, share_prefix=False), jepa, pred_token_ids, pad_token_id)
    units: list[Unit] = []
    for i, record in enumerate(samples):
        unit, _ = layout.sequences.units(i, record)
        views = list(range(1, len(unit.segments)))
        groups = [[0]] + ([[v] for v in views] if kind == "ref3" else ([views] if views else []))
        units += _split(unit, groups)
    for unit in units:
        if unit.size > max_length:
            sample = samples[unit.segments[0].pair]["sample_id"]
            raise ValueError(f"sample {sample}: a {kind} row of {unit.size} tokens exceeds max_length={max_length}")
    return layout.batch(samples, units, [], rows=[[u] for u in range(len(units))], width=max_length)
