"""The packed single-pass layout (DESIGN.md): records -> fixed-length rows, one forward pass.

A record (megajepa.data.prepare's schema) holds the sequences the published LLM-JEPA reference
(galilai-group/llm-jepa, finetune.py) runs as three padded batches:

    full        the whole conversation through the chat template: the CE sequence
    user        the user turn rendered alone; k [PRED] tokens are inserted at the end of its
                content (before the end-of-turn marker) or, with jepa.front_pred, at its start
    assistant   the assistant message rendered alone, role header included

Layouts (`jepa.views`):

    reference       (default) each of the three is its own sequence, at its own positions,
                    attending only to itself: exactly the reference's three passes. A view that
                    opens with the same tokens as the conversation (the user turn when no system
                    message precedes it) stores only its tail, which reads the shared tokens where
                    the conversation has them (exact: causal attention over identical tokens at
                    identical positions gives identical states).
    shared_prefix   a cheaper deviation from the reference: the [PRED] tokens read the
                    conversation's prompt (system + user + assistant header) directly, and view B is
                    the conversation's response alone. Not the paper's objective.

With `jepa.reverse_pred` the assistant view carries the [PRED] tokens and predicts the user view.
z_a is read in the view with the [PRED] tokens, z_b in the other (`jepa.readout`):

    content_end     the last token before the view's end-of-turn marker (the last [PRED] token when
                    they are at the end), found from the tokenization: no per-family number
    offset          the reference's `--last_token`: len(sequence) + jepa.last_token

Every sequence is cut at data.max_length tokens after the [PRED] tokens are inserted, as the
reference's tokenizer call does (0: no cut). With `jepa.target=ema` the target view goes to
teacher rows of its own. Records without views (plain text) carry only CE. Rows are filled
first-fit-decreasing, a record's sequences together (the views read the conversation's tokens).

A batch is a dict of tensors:

    input_ids, position_ids, labels, pair_index, segment,
    sequence, prefix_sequence, prefix_length                 [R, L]  online rows
    teacher_{input_ids, position_ids, pair_index, segment,
             sequence, prefix_sequence, prefix_length}       [Rt, L] target "ema" only
    ce_index, ce_targets                                     [N]     labelled tokens (flat index)
    za_index, zb_index, jepa_pairs                           [J]     pairs that keep the JEPA term
    za_pool_index, za_pool_owner, zb_pool_...                [M]     jepa.pooling "mean" only
    stp_index, stp_sign, stp_slot                            [S]     jepa.objective "stp" only:
    stp_weight, stp_pairs                                    [E]     see stp_reads
    sample_ids                                               [B]     one per record, record order
    num_pairs, useful_tokens, computed_tokens                 0-d     (num_pairs: records with views)

`labels` is shifted: labels[r, t] is the token predicted at t (-100: no loss); ce_index/ce_targets
list the same labelled tokens so the loss needs no data-dependent indexing on the device.
Flat indices are row * L + column into the online rows (zb into the teacher rows with "ema").
pair_index is the record's position in the batch (-1 on padding); segment is the token's kind
(SEG_*); sequence/prefix_sequence/prefix_length/position_ids define the attention mask
(megajepa.model.attention).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from megajepa.config import DataConfig, JepaConfig, check_row_length
from megajepa.data.stp_spans import record_terms, span_seed

SEG_PAD, SEG_FULL, SEG_SOURCE, SEG_TARGET = 0, 1, 2, 3
IGNORE_INDEX = -100
FRONT, END = 0, 1  # columns of a record's *_insert arrays


@dataclass
class Segment:
    """Consecutive tokens of one sequence, placed together in a row."""

    pair: int
    kind: int
    tokens: np.ndarray
    first_position: int = 0
    reads_root: int = 0  # leading tokens of its unit's first segment this one also reads
    targets: Optional[np.ndarray] = None  # shifted CE targets (IGNORE_INDEX: none)


@dataclass
class Unit:
    """Segments that must share a row (segments[0] is the root the others may read), and the
    tokens the JEPA term reads in them: name -> (segment number, offset) or list of those."""

    segments: list[Segment]
    reads: dict[str, tuple[int, int]] = field(default_factory=dict)
    pools: dict[str, list[tuple[int, int]]] = field(default_factory=dict)

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

class Layout:
    """Packs records into rows. Reads its settings from the typed config directly.

    `pred_token_ids` are the ids of [PRED] tokens 1..k (<|pred_0|>.. in the embedded tokenizer);
    they are inserted as the reference inserts them, k first, so token 1 comes last (it appends
    <|predictor_k|> ... <|predictor_1|>). The JEPA views are built only when the JEPA term is on:
    `jepa.lambda_ > 0` (with lambda 0 the views would cost compute and contribute nothing)."""

    def __init__(self, data: DataConfig, jepa: JepaConfig, pred_token_ids: Sequence[int], pad_token_id: int):
        self.data = data
        self.jepa = jepa
        self.pred_token_ids = list(pred_token_ids)
        self.pred = np.asarray(self.pred_token_ids[::-1], dtype=np.int64)  # in insertion order
        self.pad_token_id = pad_token_id
        # STP (jepa.objective=stp) reads spans of the conversation itself: no views are built
        self.stp = jepa.objective == "stp"
        self.with_views = jepa.lambda_ > 0 and not self.stp
        self.teacher_rows = self.with_views and jepa.target == "ema"

    def check_row_length(self, fingerprint: dict, where: str) -> None:
        """Refuse (ConfigError) shards whose longest record could not fit a row: see
        megajepa.config.check_row_length."""
        check_row_length(self.data, self.jepa, fingerprint, where)

    # ----------------------------------------------------------------------------------------
    # one record -> units

    def keeps_jepa(self, sample_id: int) -> bool:
        """Seeded per-sample JEPA dropout: the same record is dropped wherever and whenever read."""
        if not (self.with_views or (self.stp and self.jepa.lambda_ > 0)):
            return False
        if self.jepa.dropout <= 0.0:
            return True
        digest = hashlib.blake2b(f"{self.data.seed}:{sample_id}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") / 2**64 >= self.jepa.dropout

    def _cut(self, tokens: np.ndarray) -> np.ndarray:
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
        source = self._cut(np.concatenate([source[:at], pred, source[at:]]))
        target = self._cut(target)
        source_read = self._readout(source, int(source_insert[END]), len(self.pred), sid, names[0] + " view")
        target_read = self._readout(target, int(target_insert[END]), 0, sid, names[1] + " view")
        return source, source_read, target, target_read

    def units(self, i: int, record: dict) -> tuple[Unit, Optional[Unit]]:
        """(the online unit of record i, its teacher unit or None)."""
        sid = int(record["sample_id"])
        full = self._cut(np.asarray(record["full"], dtype=np.int64))
        has_views = is_pair(record)
        root = Segment(i, SEG_FULL, full, targets=self._targets(full, record, has_views))
        unit = Unit([root])
        if self.stp:
            unit.reads["conversation"] = (0, 0)  # where stp_reads' token indices count from
            return unit, None
        if not (has_views and self.keeps_jepa(sid)):
            return unit, None
        if self.jepa.views == "shared_prefix":
            return self._shared_prefix_units(i, record, unit)
        source, source_read, target, target_read = self._views(record)
        self._add_view(unit, "za", SEG_SOURCE, source, source_read)
        if not self.teacher_rows:
            self._add_view(unit, "zb", SEG_TARGET, target, target_read)
            return unit, None
        teacher = Unit([Segment(i, SEG_TARGET, target)], reads={"zb": (0, target_read)})
        teacher.pools["zb"] = [(0, j) for j in range(len(target))]
        return unit, teacher

    def _add_view(self, unit: Unit, name: str, kind: int, tokens: np.ndarray, read: int) -> None:
        """Append a view to the unit: only its tail when it opens like the conversation."""
        root = unit.segments[0]
        shared = _common_prefix(tokens, root.tokens) if self.data.share_prefix else 0
        number = len(unit.segments)
        if shared < len(tokens):
            unit.segments.append(Segment(root.pair, kind, tokens[shared:], first_position=shared, reads_root=shared))
        place = lambda j: (0, j) if j < shared else (number, j - shared)  # noqa: E731
        unit.reads[name] = place(read)
        unit.pools[name] = [place(j) for j in range(len(tokens))]

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
                Segment(i, SEG_SOURCE, self.pred, first_position=prompt_len, reads_root=prompt_len)
            )
            unit.reads["za"] = (1, len(self.pred) - 1)
            unit.pools["za"] = [(0, j) for j in range(prompt_len)] + [(1, j) for j in range(len(self.pred))]
        else:
            unit.reads["za"] = (0, prompt_len - 1)
            unit.pools["za"] = [(0, j) for j in range(prompt_len)]
        content_end = int(record["full_spans"][3]) - prompt_len
        read = self._readout(response, content_end, 0, sid, "response")
        target = Unit([Segment(i, SEG_TARGET, response)], reads={"zb": (0, read)})
        target.pools["zb"] = [(0, j) for j in range(len(response))]
        return unit, target  # view B alone: its own unit, in the teacher or the online rows

    # ----------------------------------------------------------------------------------------
    # units -> rows

    def fill(self, units: list[Unit], with_labels: bool, rows: Optional[list[list[int]]] = None, width: int = 0):
        """Row tensors of `units` and the flat index of every read: {(pair, name): index}.

        Rows are packed by pack_rows unless `rows` (unit indices per row) and `width` are given
        (the bench's reference layouts put one sequence in each row, padded to max_length)."""
        if rows is None:
            rows, width = pack_rows([u.size for u in units], self.data.row_length, self.data.row_multiple)
        n = max(len(rows), 1)
        arrays = {
            "input_ids": np.full((n, width), self.pad_token_id, dtype=np.int64),
            "position_ids": np.zeros((n, width), dtype=np.int64),
            "pair_index": np.full((n, width), -1, dtype=np.int64),
            "segment": np.full((n, width), SEG_PAD, dtype=np.int64),
            "sequence": np.zeros((n, width), dtype=np.int64),
            "prefix_sequence": np.zeros((n, width), dtype=np.int64),
            "prefix_length": np.zeros((n, width), dtype=np.int64),
        }
        if with_labels:
            arrays["labels"] = np.full((n, width), IGNORE_INDEX, dtype=np.int64)
        reads: dict[tuple[int, str], int] = {}
        pools: dict[tuple[int, str], list[int]] = {}
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
                    if s.reads_root:
                        arrays["prefix_sequence"][r, col:end] = root_sequence
                        arrays["prefix_length"][r, col:end] = s.reads_root
                    if with_labels and s.targets is not None:
                        arrays["labels"][r, col:end] = s.targets
                    starts.append(r * width + col)
                    col, next_sequence = end, next_sequence + 1
                pair = unit.segments[0].pair
                for name, (seg, offset) in unit.reads.items():
                    reads[(pair, name)] = starts[seg] + offset
                for name, places in unit.pools.items():
                    pools[(pair, name)] = [starts[seg] + offset for seg, offset in places]
        return {k: torch.from_numpy(v) for k, v in arrays.items()}, reads, pools

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        """collate_fn: records (dicts of the prepare schema's columns) -> one packed batch."""
        online: list[Unit] = []
        targets: list[Unit] = []  # units of their own: teacher rows, or anywhere in the online rows
        for i, record in enumerate(samples):
            unit, target = self.units(i, record)
            online.append(unit)
            if target is not None:
                targets.append(target)
        if self.teacher_rows:
            return self.batch(samples, online, targets)
        return self.batch(samples, online + targets, [])

    def batch(self, samples: list[dict], online: list[Unit], teacher: list[Unit], **placement) -> dict:
        """The batch of `samples` from their online units and teacher units (see the module
        docstring); `placement` (rows, width) is passed to fill for the online rows."""
        batch, reads, pools = self.fill(online, with_labels=True, **placement)
        labels = batch["labels"].flatten()
        ce_index = torch.nonzero(labels != IGNORE_INDEX).flatten()  # on the host, at collate time
        batch.update(ce_index=ce_index, ce_targets=labels[ce_index])
        jepa_pairs = sorted(pair for pair, name in reads if name == "za")
        computed = batch["input_ids"].numel()
        zb_reads, zb_pools = reads, pools
        if self.teacher_rows:
            t_batch, zb_reads, zb_pools = self.fill(teacher, with_labels=False)
            batch.update({f"teacher_{k}": v for k, v in t_batch.items()})
            computed += t_batch["input_ids"].numel()
        as_long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
        batch.update(
            za_index=as_long([reads[(p, "za")] for p in jepa_pairs]),
            zb_index=as_long([zb_reads[(p, "zb")] for p in jepa_pairs]),
            jepa_pairs=as_long(jepa_pairs),
            sample_ids=as_long([int(s["sample_id"]) for s in samples]),
            num_pairs=torch.tensor(sum(is_pair(s) for s in samples)),  # records with views, not texts
            useful_tokens=torch.tensor(sum(len(u.segments[0].tokens) for u in online if u.segments[0].kind == SEG_FULL)),
            computed_tokens=torch.tensor(computed),
        )
        if self.stp:
            batch.update(self.stp_reads(samples, reads))
        if self.jepa.pooling == "mean":
            for name, source in (("za", pools), ("zb", zb_pools)):
                places = [source[(p, name)] for p in jepa_pairs]
                batch[f"{name}_pool_index"] = as_long([i for group in places for i in group])
                batch[f"{name}_pool_owner"] = as_long([j for j, group in enumerate(places) for _ in group])
        return batch

    def stp_reads(self, samples: list[dict], reads: dict[tuple[int, str], int]) -> dict[str, torch.Tensor]:
        """The flat rows the STP loss (megajepa.jepa.stp) reads, from each record's full_spans.

        Term e (E in all, record stp_pairs[e], weight stp_weight[e]) embeds its predicting side as
        the sum of stp_sign * hidden[stp_index] over the entries with stp_slot == e, its predicted
        side over stp_slot == E + e. A record's random spans come from its own generator
        (span_seed of data.seed, sample_id and the epoch its record carries, 0 if none), so they are
        the same wherever and whenever the record is packed. Records without usable spans, or
        dropped by jepa.dropout, carry CE only."""
        sides: tuple[list, list] = ([], [])  # (flat index, sign, term) per side
        weights, pairs = [], []
        for i, record in enumerate(samples):
            sid = int(record["sample_id"])
            if not self.keeps_jepa(sid):
                continue
            generator = torch.Generator().manual_seed(span_seed(self.data.seed, sid, int(record.get("epoch", 0))))
            length = len(self._cut(np.asarray(record["full"])))
            base = reads[(i, "conversation")]
            for term in record_terms(record["full_spans"], length, self.jepa.stp, generator):
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
