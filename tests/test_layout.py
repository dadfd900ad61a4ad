"""The packer (megajepa.data.layout) read back through the attention mask.

The oracle is the definition of each sequence, built here from a record without the layout: the
conversation `full`; the view with the [PRED] tokens (k of them, pred_k first, at the end of the
user content or, with front_pred, at its start; the assistant view with reverse_pred), the other
view, each cut at max_length. For every token the batch says the loss or an embedding is read at,
the tokens it may attend to under megajepa.model.attention's dense mask, in row order, must be
exactly that sequence's prefix up to the token, at positions 0, 1, ...: then the packed pass is
each sequence's own forward, whatever rows, offsets and shared prefixes the packer chose.
"""

import numpy as np
import pytest
import torch

from megajepa.data.layout import IGNORE_INDEX, SEG_PAD
from megajepa.model.attention import MASK_KEYS, dense_mask
from _records import PAD, expected_views, layout, make_records

def context(batch, flat_index, prefix=""):
    """(ids, positions) of the tokens the token at `flat_index` attends to, in row order."""
    mask = dense_mask(*(batch[prefix + key] for key in MASK_KEYS))[:, 0]
    width = batch[prefix + "input_ids"].shape[1]
    row, col = divmod(int(flat_index), width)
    keys = torch.nonzero(mask[row, col]).flatten()
    return batch[prefix + "input_ids"][row, keys].tolist(), batch[prefix + "position_ids"][row, keys].tolist()


def assert_reads(batch, flat_index, sequence, index, prefix=""):
    ids, positions = context(batch, flat_index, prefix)
    assert ids == list(sequence[: index + 1])
    assert positions == list(range(index + 1))


SETTINGS = [
    {},
    {"target": "ema"},
    {"front_pred": True},
    {"reverse_pred": True},
    {"readout": "offset", "last_token": -2},
    {"k": 0},
    {"max_length": 9},
    {"share_prefix": False},
    {"pooling": "mean"},
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "default")
@pytest.mark.parametrize("shared", [False, True], ids=["system", "no-system"])
def test_every_read_sees_exactly_its_sequence(settings, shared):
    lay, pred = layout(**settings)
    records = make_records(9, seed=len(settings) + shared, shared=shared)
    batch = lay(records)
    assert batch["jepa_pairs"].tolist() == list(range(len(records)))
    teacher = "teacher_" if lay.jepa.target == "ema" else ""
    for j, record in enumerate(records):
        src, src_read, tgt, tgt_read = expected_views(record, np.array(pred), lay.jepa, lay.data.max_length)
        assert_reads(batch, batch["za_index"][j], src, src_read)
        assert_reads(batch, batch["zb_index"][j], tgt, tgt_read, teacher)
        if lay.jepa.pooling == "mean":
            for name, seq, rows in (("za", src, ""), ("zb", tgt, teacher)):
                places = batch[f"{name}_pool_index"][batch[f"{name}_pool_owner"] == j]
                ids = batch[rows + "input_ids"].flatten()[places].tolist()
                assert ids == list(seq), name
    placed = int((batch["sequence"] != 0).sum()) + int((batch.get("teacher_sequence", torch.zeros(0)) != 0).sum())
    cut = lay.data.max_length or 10**9
    separate = sum(min(len(r["full"]), cut) + sum(len(v) for v in expected_views(r, np.array(pred), lay.jepa, lay.data.max_length)[::2]) for r in records)
    if shared and lay.data.share_prefix:  # the user views read the conversation's opening there
        assert placed < separate
    else:
        assert placed == separate


@pytest.mark.parametrize("labels", ["response", "all", "conversation", "content"])
def test_every_labelled_token_predicts_the_next_token_of_its_conversation(labels):
    lay, _ = layout(labels=labels)
    records = make_records(7, seed=3)
    records[0]["full"] = np.r_[records[0]["full"][:4], [PAD], records[0]["full"][4:]]  # a pad id inside
    batch = lay(records)
    width = batch["input_ids"].shape[1]
    seen = set()
    for index, target in zip(batch["ce_index"].tolist(), batch["ce_targets"].tolist()):
        ids, positions = context(batch, index)
        pair = int(batch["pair_index"].flatten()[index])
        full = records[pair]["full"]
        t = len(ids) - 1
        assert ids == list(full[: t + 1]) and positions == list(range(t + 1))
        assert target == full[t + 1]
        seen.add((pair, t))
        assert batch["labels"][index // width, index % width] == target
    expected = set()
    for pair, record in enumerate(records):
        full = record["full"]
        for t in range(len(full) - 1):
            if labels == "response" and t + 1 < record["prompt_len"]:
                continue
            if labels == "conversation" and full[t + 1] == PAD:
                continue
            if labels == "content" and not record["full_spans"][2] <= t + 1 < record["full_spans"][3]:
                continue
            expected.add((pair, t))
    assert seen == expected
    assert (batch["labels"] != IGNORE_INDEX).sum() == len(expected)


def test_shared_prefix_views_read_the_prompt_and_the_reply():
    """The named deviation: [PRED] after the conversation's prompt, view B its reply alone."""
    lay, pred = layout(views="shared_prefix")
    records = make_records(6, seed=5)
    batch = lay(records)
    for j, record in enumerate(records):
        full, cut = record["full"], record["prompt_len"]
        assert_reads(batch, batch["za_index"][j], np.r_[full[:cut], np.array(pred)[::-1]], cut + len(pred) - 1)
        reply = full[cut:]
        assert_reads(batch, batch["zb_index"][j], reply, record["full_spans"][3] - cut - 1)


def test_jepa_dropout_is_seeded_per_sample_and_keeps_the_conversation():
    lay, _ = layout(dropout=0.5)
    records = make_records(40, seed=7)
    first = lay(records)["jepa_pairs"].tolist()
    assert 5 < len(first) < 35
    shuffled = lay(records[::-1])  # the same samples in another order: the same ones dropped
    kept = {records[::-1][p]["sample_id"] for p in shuffled["jepa_pairs"].tolist()}
    assert kept == {records[p]["sample_id"] for p in first}
    assert lay(records)["ce_index"].numel() == layout()[0](records)["ce_index"].numel()


def test_lambda_zero_packs_conversations_only_and_plain_records_carry_ce_only():
    records = make_records(5, seed=9)
    plain = {**records[0], "user": np.array([], dtype=np.int64), "assistant": np.array([], dtype=np.int64)}
    lay, _ = layout()
    batch = lay([plain] + records[1:])
    assert batch["jepa_pairs"].tolist() == [1, 2, 3, 4]
    assert set((batch["pair_index"].flatten()[batch["ce_index"]] == 0).nonzero().flatten().tolist())
    off, _ = layout(lambda_=0.0)
    batch = off(records)
    assert batch["jepa_pairs"].numel() == 0
    assert int((batch["segment"] != SEG_PAD).sum()) == sum(len(r["full"]) for r in records)


def test_rows_are_trimmed_and_padding_sees_only_itself():
    lay, _ = layout()
    batch = lay(make_records(11, seed=11))
    width = batch["input_ids"].shape[1]
    assert width <= 128 and width % 16 == 0
    mask = dense_mask(*(batch[key] for key in MASK_KEYS))[:, 0]
    pad = batch["sequence"] == 0
    rows, cols = torch.nonzero(pad, as_tuple=True)
    for r, c in zip(rows.tolist(), cols.tolist()):
        assert torch.nonzero(mask[r, c]).flatten().tolist() == [c]
    assert (batch["input_ids"][pad] == PAD).all() and (batch["labels"][pad] == IGNORE_INDEX).all()


def test_a_readout_outside_its_view_is_refused_with_the_sample():
    lay, _ = layout(readout="offset", last_token=-50)
    with pytest.raises(ValueError, match="sample 1000: jepa.last_token=-50"):
        lay(make_records(2, seed=1))


def test_a_record_longer_than_a_row_is_refused():
    lay, _ = layout(row_length=32)
    with pytest.raises(ValueError, match="more than data.row_length=32"):
        lay(make_records(3, seed=2) + [{**make_records(1, seed=4)[0], "full": np.arange(3, 40)}])
