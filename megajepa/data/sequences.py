"""One record -> the sequences the packed pass runs, grouped in units (docs/layout.md).

A unit holds the segments that must share a row (the first is the conversation, which the views'
tails may read) and where the JEPA term reads them; packing.py places units in rows.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from megajepa.config import DataConfig, JepaConfig

SEG_PAD, SEG_FULL, SEG_SOURCE, SEG_TARGET = 0, 1, 2, 3
IGNORE_INDEX = -100
FRONT, END = 0, 1  # columns of a record's *_insert arrays

Place = tuple[int, int]  # (segment number in its unit, token offset in that segment)


@dataclass
class Segment:
    """Consecutive tokens of one sequence, placed together in a row."""

    pair: int
    kind: int
    tokens: np.ndarray
    first_position: int = 0
    prefix_length: int = 0  # leading tokens of its unit's first segment this one attends to as well
    targets: Optional[np.ndarray] = None  # shifted CE targets (IGNORE_INDEX: none)


@dataclass
class Unit:
    """Segments that must share a row (segments[0] is the one the others may read), and, per
    embedding name ('za', 'zb'), the token its readout is at and the view's tokens (for mean pooling)."""

    segments: list[Segment]
    readout: dict[str, Place] = field(default_factory=dict)
    view_tokens: dict[str, list[Place]] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return sum(len(s.tokens) for s in self.segments)


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


def is_pair(record: dict) -> bool:
    """A record with both views; a plain-text record (no views) carries CE only."""
    return len(record["user"]) > 0 and len(record["assistant"]) > 0


class Sequences:
    """Turns records into units, from the typed config directly.

    `pred_token_ids` are the ids of [PRED] tokens 1..k (<|pred_0|>.. in the embedded tokenizer);
    they are inserted as the reference inserts them, k first, so token 1 comes last (it appends
    <|predictor_k|> ... <|predictor_1|>). The JEPA views are built only when the JEPA term is on:
    `jepa.lambda_ > 0` (with lambda 0 the views would cost compute and contribute nothing)."""

    def __init__(self, data: DataConfig, jepa: JepaConfig, pred_token_ids: Sequence[int], pad_token_id: int):
        self.data = data
        self.jepa = jepa
        self.pred = np.asarray(list(pred_token_ids)[::-1], dtype=np.int64)  # in insertion order
        self.pad_token_id = pad_token_id
        # STP (jepa.objective=stp) reads spans of the conversation itself: no views are built
        self.stp = jepa.objective == "stp"
        self.with_views = jepa.lambda_ > 0 and not self.stp
        self.teacher_rows = self.with_views and jepa.target == "ema"

    def keeps_jepa(self, sample_id: int) -> bool:
        """Seeded per-sample JEPA dropout: the same record is dropped wherever and whenever read."""
        if not (self.with_views or (self.stp and self.jepa.lambda_ > 0)):
            return False
        if self.jepa.dropout <= 0.0:
            return True
        digest = hashlib.blake2b(f"{self.data.seed}:{sample_id}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") / 2**64 >= self.jepa.dropout

    def cut(self, tokens: np.ndarray) -> np.ndarray:
        """`tokens` cut at data.max_length (0: no cut), as the reference's tokenizer call does."""
        return tokens[: self.data.max_length] if self.data.max_length > 0 else tokens

    def _targets(self, full: np.ndarray, record: dict, has_views: bool) -> np.ndarray:
        """Shifted CE targets of the conversation: position t predicts full[t + 1]."""
        targets = np.full(len(full), IGNORE_INDEX, dtype=np.int64)
        targets[:-1] = full[1:]
        mode = self.data.labels if has_views else "all"  # plain text: every token
        if mode == "response":
            targets[: max(int(record["prompt_len"]) - 1, 0)] = IGNORE_INDEX
        elif mode == "conversation":  # the published reference's LM collator: labels = input ids, pad ignored
            targets[:-1][full[1:] == self.pad_token_id] = IGNORE_INDEX
        elif mode == "content":  # an unmerged fork's assistant-only labels: the reply's content tokens
            start, end = (int(x) for x in record["full_spans"][2:4])
            if start < 0 or end < 0:
                raise ValueError(
                    f"sample {record['sample_id']}: data.labels=content needs the assistant content's place in "
                    f"the conversation, which prepare could not find"
                )
            predicted = np.arange(1, len(full) + 1)
            targets[(predicted < start) | (predicted >= end)] = IGNORE_INDEX
        return targets

    def _readout(self, tokens: np.ndarray, content_end: int, inserted: int, sample_id: int, what: str) -> int:
        """Index in `tokens` the embedding is read at."""
        if self.jepa.readout == "offset":
            index = len(tokens) + self.jepa.last_token
        else:
            index = min(content_end + inserted, len(tokens)) - 1
        if not 0 <= index < len(tokens):
            raise ValueError(
                f"sample {sample_id}: jepa.last_token={self.jepa.last_token} reads outside its {what} "
                f"of {len(tokens)} tokens"
            )
        return index

    def _views(self, record: dict) -> tuple[np.ndarray, int, np.ndarray, int]:
        """(source view with [PRED], its readout, target view, its readout) of the reference layout."""
        sid = int(record["sample_id"])
        names = ("assistant", "user") if self.jepa.reverse_pred else ("user", "assistant")
        source = np.asarray(record[names[0]], dtype=np.int64)
        source_insert = np.asarray(record[names[0] + "_insert"])
        target = np.asarray(record[names[1]], dtype=np.int64)
        target_insert = np.asarray(record[names[1] + "_insert"])
        at = int(source_insert[FRONT if self.jepa.front_pred else END])
        if at < 0:
            raise ValueError(
                f"sample {sid}: jepa.front_pred: prepare found no place for [PRED] tokens before its {names[0]} "
                f"content that keeps the content's tokens (the template's text before it merges with it)"
            )
        # the reference prepends <|predictor_i|> for i = k .. 1 at the front (so 1 comes first) and
        # appends them in that order at the end (so 1 comes last)
        pred = self.pred[::-1] if self.jepa.front_pred else self.pred
        source = self.cut(np.concatenate([source[:at], pred, source[at:]]))
        target = self.cut(target)
        source_read = self._readout(source, int(source_insert[END]), len(self.pred), sid, names[0] + " view")
        target_read = self._readout(target, int(target_insert[END]), 0, sid, names[1] + " view")
        return source, source_read, target, target_read

    def units(self, i: int, record: dict) -> tuple[Unit, Optional[Unit]]:
        """(the online unit of record i, the unit of its target view when that goes alone: to the
        teacher rows, or with jepa.views=shared_prefix; else None)."""
        sid = int(record["sample_id"])
        full = self.cut(np.asarray(record["full"], dtype=np.int64))
        has_views = is_pair(record)
        unit = Unit([Segment(i, SEG_FULL, full, targets=self._targets(full, record, has_views))])
        if self.stp or not (has_views and self.keeps_jepa(sid)):
            return unit, None
        if self.jepa.views == "shared_prefix":
            return self._shared_prefix_units(i, record, unit)
        source, source_read, target, target_read = self._views(record)
        self._add_view(unit, "za", SEG_SOURCE, source, source_read)
        if not self.teacher_rows:
            self._add_view(unit, "zb", SEG_TARGET, target, target_read)
            return unit, None
        teacher = Unit([Segment(i, SEG_TARGET, target)], readout={"zb": (0, target_read)})
        teacher.view_tokens["zb"] = [(0, j) for j in range(len(target))]
        return unit, teacher

    def _add_view(self, unit: Unit, name: str, kind: int, tokens: np.ndarray, read: int) -> None:
        """Append a view to the unit: only its tail when it opens like the conversation."""
        root = unit.segments[0]
        shared = _common_prefix(tokens, root.tokens) if self.data.share_prefix else 0
        number = len(unit.segments)
        if shared < len(tokens):
            unit.segments.append(Segment(root.pair, kind, tokens[shared:], first_position=shared, prefix_length=shared))
        place = lambda j: (0, j) if j < shared else (number, j - shared)  # noqa: E731
        unit.readout[name] = place(read)
        unit.view_tokens[name] = [place(j) for j in range(len(tokens))]

    def _shared_prefix_units(self, i: int, record: dict, unit: Unit) -> tuple[Unit, Optional[Unit]]:
        """The cheaper deviation: [PRED] after the conversation's prompt; view B = its response."""
        sid = int(record["sample_id"])
        full = unit.segments[0].tokens
        prompt_len = min(int(record["prompt_len"]), len(full))
        response = full[prompt_len:]
        if prompt_len == 0 or len(response) == 0:
            raise ValueError(f"sample {sid}: jepa.views=shared_prefix needs a prompt and a response in `full`")
        if len(self.pred):
            unit.segments.append(
                Segment(i, SEG_SOURCE, self.pred, first_position=prompt_len, prefix_length=prompt_len)
            )
            unit.readout["za"] = (1, len(self.pred) - 1)
            unit.view_tokens["za"] = [(0, j) for j in range(prompt_len)] + [(1, j) for j in range(len(self.pred))]
        else:
            unit.readout["za"] = (0, prompt_len - 1)
            unit.view_tokens["za"] = [(0, j) for j in range(prompt_len)]
        content_end = int(record["full_spans"][3]) - prompt_len
        read = self._readout(response, content_end, 0, sid, "response")
        target = Unit([Segment(i, SEG_TARGET, response)], readout={"zb": (0, read)})
        target.view_tokens["zb"] = [(0, j) for j in range(len(response))]
        return unit, target  # view B alone: its own unit, in the teacher or the online rows
