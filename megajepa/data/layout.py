"""The packed single-pass layout: a batch of records -> one batch of fixed-length rows (the
collate_fn). Each record becomes sequences (sequences.py), which are packed into rows
(packing.py); STP's reads come from stp_spans.py. The layouts, the reference's three sequences and
the batch's tensors are described in docs/layout.md.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from megajepa.config import DataConfig, JepaConfig, check_row_length
from megajepa.data.packing import fill_rows
from megajepa.data.sequences import IGNORE_INDEX, SEG_FULL, SEG_PAD, Sequences, Unit, is_pair
from megajepa.data.stp_spans import stp_reads

__all__ = ["IGNORE_INDEX", "SEG_FULL", "SEG_PAD", "Layout", "is_pair"]  # the batch format's names, for its readers


class Layout:
    """Records -> packed batches, from the typed config directly (see Sequences for
    `pred_token_ids`)."""

    def __init__(self, data: DataConfig, jepa: JepaConfig, pred_token_ids: Sequence[int], pad_token_id: int):
        self.data = data
        self.jepa = jepa
        self.pred_token_ids = list(pred_token_ids)
        self.pad_token_id = pad_token_id
        self.sequences = Sequences(data, jepa, self.pred_token_ids, pad_token_id)
        self.with_views = self.sequences.with_views
        self.teacher_rows = self.sequences.teacher_rows

    def check_row_length(self, fingerprint: dict, where: str) -> None:
        """Refuse (ConfigError) shards whose longest record could not fit a row: see
        megajepa.config.check_row_length."""
        check_row_length(self.data, self.jepa, fingerprint, where)

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        """collate_fn: records (dicts of the prepare schema's columns) -> one packed batch."""
        online: list[Unit] = []
        targets: list[Unit] = []  # units of their own: teacher rows, or anywhere in the online rows
        for i, record in enumerate(samples):
            unit, target = self.sequences.units(i, record)
            online.append(unit)
            if target is not None:
                targets.append(target)
        if self.teacher_rows:
            return self.batch(samples, online, targets)
        return self.batch(samples, online + targets, [])

    def batch(
        self, samples: list[dict], online: list[Unit], teacher: list[Unit],
        rows: Optional[list[list[int]]] = None, width: int = 0,
    ) -> dict:
        """The batch of `samples` from their online units and teacher units (docs/layout.md);
        `rows` and `width` place the online units as fill_rows does."""
        placed = fill_rows(
            online, self.pad_token_id, True, self.data.row_length, self.data.row_multiple, rows=rows, width=width
        )
        batch = placed.tensors
        labels = batch["labels"].flatten()
        ce_index = torch.nonzero(labels != IGNORE_INDEX).flatten()  # on the host, at collate time
        batch.update(ce_index=ce_index, ce_targets=labels[ce_index])
        jepa_pairs = sorted(pair for pair, name in placed.readout if name == "za")
        computed = batch["input_ids"].numel()
        target = placed
        if self.teacher_rows:
            target = fill_rows(teacher, self.pad_token_id, False, self.data.row_length, self.data.row_multiple)
            batch.update({f"teacher_{k}": v for k, v in target.tensors.items()})
            computed += target.tensors["input_ids"].numel()
        as_long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
        batch.update(
            za_index=as_long([placed.readout[(p, "za")] for p in jepa_pairs]),
            zb_index=as_long([target.readout[(p, "zb")] for p in jepa_pairs]),
            jepa_pairs=as_long(jepa_pairs),
            sample_ids=as_long([int(s["sample_id"]) for s in samples]),
            num_pairs=torch.tensor(sum(is_pair(s) for s in samples)),  # records with views, not texts
            useful_tokens=torch.tensor(sum(len(u.segments[0].tokens) for u in online if u.segments[0].kind == SEG_FULL)),
            computed_tokens=torch.tensor(computed),
        )
        if self.sequences.stp:
            batch.update(stp_reads(samples, placed.conversation_start, self.sequences))
        if self.jepa.pooling == "mean":
            for name, source in (("za", placed), ("zb", target)):
                places = [source.view_tokens[(p, name)] for p in jepa_pairs]
                batch[f"{name}_pool_index"] = as_long([i for group in places for i in group])
                batch[f"{name}_pool_owner"] = as_long([j for j, group in enumerate(places) for _ in group])
        return batch
