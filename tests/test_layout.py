"""The packer (megajepa.data.layout) against a per-pair construction written from DESIGN.md's table.

    T   view A                      positions 0 .. a-1      attends to T (causal)
    C   view B after A, CE labels   positions a .. a+b-1    attends to T and C (causal)
    P   k [PRED] tokens             positions a .. a+k-1    attends to T and P (causal)
    C'  view B alone                positions 0 .. b-1      attends to C' (causal)
"""

import itertools

import numpy as np
import pytest
import torch

from megajepa.data.layout import IGNORE_INDEX, SEG_C, SEG_CB, SEG_P, SEG_PAD, SEG_T, LayoutConfig, pack_pairs
from megajepa.model.attention import dense_mask

ROW = 64
PRED_IDS = (90, 91)


def make_pairs(n, seed, max_view=20):
    rng = np.random.default_rng(seed)

    def view(length):
        return rng.integers(2, 80, length)

    pairs = [(view(rng.integers(1, max_view + 1)), view(rng.integers(1, max_view + 1))) for _ in range(n)]
    # one pair that fills a row exactly with its [PRED] tokens (a + b + k = ROW)
    pairs.append((view(ROW - 30 - len(PRED_IDS)), view(30)))
    return pairs


def pack(pairs, cfg, sample_ids=None):
    ids = list(range(len(pairs))) if sample_ids is None else sample_ids
    return pack_pairs([a for a, _ in pairs], [b for _, b in pairs], ids, cfg)


def expected_segments(a, b, cfg, keeps_jepa):
    """kind -> (token ids, positions, labels) for one pair, built straight from the table."""
    k = len(cfg.pred_token_ids)
    ignore_a = [IGNORE_INDEX] * (len(a) - 1)
    segments = {
        SEG_T: (list(a), list(range(len(a))), (list(a[1:]) if cfg.labels == "all" else ignore_a) + [b[0]]),
        SEG_C: (list(b), list(range(len(a), len(a) + len(b))), list(b[1:]) + [IGNORE_INDEX]),
    }
    if keeps_jepa and k:
        segments[SEG_P] = (list(cfg.pred_token_ids), list(range(len(a), len(a) + k)), [IGNORE_INDEX] * k)
    if keeps_jepa:
        segments[SEG_CB] = (list(b), list(range(len(b))), [IGNORE_INDEX] * len(b))
    return segments


def segment_columns(pair_index, segment, pair, kind):
    """(row, columns) of one pair's segment; asserts it lies in one row."""
    rows, cols = torch.nonzero((pair_index == pair) & (segment == kind), as_tuple=True)
    assert len(rows), f"pair {pair}: no segment {kind}"
    assert rows.unique().numel() == 1, f"pair {pair}: segment {kind} split across rows"
    return int(rows[0]), cols


ROW_SETS = ("", "teacher_")  # key prefixes of the online and the teacher rows


def rows_of(batch, kind, cfg):
    """The rows (ids, positions, pair index, segment, labels) a segment kind is packed into."""
    prefix = "teacher_" if kind == SEG_CB and cfg.target == "ema" else ""
    keys = ("input_ids", "position_ids", "pair_index", "segment")
    return (*(batch[prefix + key] for key in keys), batch["labels"] if not prefix else None)


def check_batch(batch, pairs, cfg):
    k = len(cfg.pred_token_ids)
    jepa = batch["jepa_pairs"].tolist()
    assert batch["num_pairs"] == len(pairs)
    assert batch["sample_ids"].tolist() == list(range(len(pairs)))
    width = batch["input_ids"].shape[1]
    assert width <= cfg.row_length and (width == cfg.row_length or width % cfg.row_multiple == 0)
    if cfg.target == "none":
        assert jepa == [] and (batch["segment"] == SEG_P).sum() == 0 and (batch["segment"] == SEG_CB).sum() == 0
    if cfg.target == "ema":
        assert (batch["segment"] == SEG_CB).sum() == 0, "C' belongs in the teacher rows, not the online rows"
    for i, (a, b) in enumerate(pairs):
        placed = {}
        for kind, (tokens, positions, labels) in expected_segments(a, b, cfg, i in jepa).items():
            ids, pos, pair_index, segment, label_rows = rows_of(batch, kind, cfg)
            row, cols = segment_columns(pair_index, segment, i, kind)
            assert cols.tolist() == list(range(int(cols[0]), int(cols[0]) + len(tokens))), "not contiguous"
            assert ids[row, cols].tolist() == tokens
            assert pos[row, cols].tolist() == positions
            if label_rows is not None:
                assert label_rows[row, cols].tolist() == labels, f"pair {i} segment {kind} labels"
            placed[kind] = (row, cols)
        for kind in {SEG_P, SEG_CB} - placed.keys():
            for prefix in ROW_SETS:
                if prefix + "segment" in batch:
                    unexpected = (batch[prefix + "pair_index"] == i) & (batch[prefix + "segment"] == kind)
                    assert not unexpected.any(), f"pair {i}: segment {kind} without JEPA"
        # T, C and P share a row, C and P after T
        t_row, t_cols = placed[SEG_T]
        for kind in (SEG_C, SEG_P):
            if kind in placed:
                assert placed[kind][0] == t_row and placed[kind][1].min() > t_cols.max()
        if i in jepa:
            j = jepa.index(i)
            za_row, za_cols = placed[SEG_P] if k else placed[SEG_T]
            assert batch["za_index"][j] == za_row * width + za_cols.max()
            zb_row, zb_cols = placed[SEG_CB]
            zb_width = rows_of(batch, SEG_CB, cfg)[0].shape[1]
            assert batch["zb_index"][j] == zb_row * zb_width + zb_cols.max()
    assert len(batch["za_index"]) == len(batch["zb_index"]) == len(jepa)
    check_padding(batch, pairs, cfg)


def check_padding(batch, pairs, cfg):
    """Padding and token counts, and no row over-full or mergeable under first-fit."""
    k = len(cfg.pred_token_ids)
    jepa = set(batch["jepa_pairs"].tolist())
    views = sum(len(a) + len(b) for a, b in pairs)
    extra = sum(k + len(b) for i, (a, b) in enumerate(pairs) if i in jepa)
    prefixes = [prefix for prefix in ROW_SETS if prefix + "segment" in batch]
    slots = sum(batch[prefix + "segment"].numel() for prefix in prefixes)
    pads = sum(int((batch[prefix + "segment"] == SEG_PAD).sum()) for prefix in prefixes)
    assert batch["useful_tokens"] == views
    assert batch["computed_tokens"] == slots
    assert slots - pads == views + extra
    assert (batch["labels"][batch["segment"] == SEG_PAD] == IGNORE_INDEX).all()
    for prefix in prefixes:
        seg, pair_index = batch[prefix + "segment"], batch[prefix + "pair_index"]
        assert (batch[prefix + "input_ids"][seg == SEG_PAD] == cfg.pad_token_id).all()
        assert (pair_index[seg == SEG_PAD] == -1).all()
        # First-fit: a unit went to a later row only because it did not fit any earlier one.
        free = (seg == SEG_PAD).sum(1).tolist()
        for later in range(len(free)):
            units = {}
            for pair, kind in zip(pair_index[later].tolist(), seg[later].tolist()):
                if kind != SEG_PAD:
                    unit = (pair, kind == SEG_CB)
                    units[unit] = units.get(unit, 0) + 1
            assert units, "empty row"
            assert all(min(units.values()) > free[earlier] for earlier in range(later))


CASES = list(itertools.product((PRED_IDS, ()), ("online", "ema", "none"), ("response", "all")))


@pytest.mark.parametrize("pred_ids,target,labels", CASES)
def test_pairs_match_per_pair_construction(pred_ids, target, labels):
    pairs = make_pairs(30, seed=CASES.index((pred_ids, target, labels)))
    cfg = LayoutConfig(row_length=ROW, pred_token_ids=pred_ids, labels=labels, target=target)
    batch = pack(pairs, cfg)
    check_batch(batch, pairs, cfg)
    if target != "none":
        assert batch["jepa_pairs"].tolist() == list(range(len(pairs)))
    if target == "ema":
        assert batch["teacher_input_ids"].shape[1] <= ROW
    else:
        assert "teacher_input_ids" not in batch


def test_cross_entropy_over_labels_is_next_token_loss_on_view_b():
    """labels="response": the loss the trainer computes equals CE of B's tokens given A ++ B."""
    pairs = make_pairs(6, seed=3)
    cfg = LayoutConfig(row_length=ROW, pred_token_ids=PRED_IDS)
    batch = pack(pairs, cfg)
    vocab = 100
    logits = torch.randn(*batch["input_ids"].shape, vocab, generator=torch.Generator().manual_seed(0))
    packed = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum")
    expected = 0.0
    for i, (a, b) in enumerate(pairs):
        row, t_cols = segment_columns(batch["pair_index"], batch["segment"], i, SEG_T)
        _, c_cols = segment_columns(batch["pair_index"], batch["segment"], i, SEG_C)
        predicting = torch.cat([t_cols[-1:], c_cols[:-1]])  # A's last predicts b[0], then b[j] -> b[j+1]
        expected += torch.nn.functional.cross_entropy(logits[row, predicting], torch.as_tensor(b), reduction="sum")
    torch.testing.assert_close(packed, expected)


def test_jepa_dropout_is_seeded_per_sample():
    pairs = [(np.array([5]), np.array([6]))] * 2000
    ids = list(range(2000))
    cfg = LayoutConfig(row_length=ROW, pred_token_ids=PRED_IDS, dropout=0.3, seed=11)

    def kept(sample_ids, batch_size, cfg):
        out = set()
        for start in range(0, len(sample_ids), batch_size):
            chunk = sample_ids[start : start + batch_size]
            batch = pack(pairs[: len(chunk)], cfg, chunk)
            out |= {chunk[j] for j in batch["jepa_pairs"].tolist()}
        return out

    forward = kept(ids, 50, cfg)
    assert kept(ids[::-1], 37, cfg) == forward, "the same sample must keep or drop JEPA in any batch"
    assert abs(1 - len(forward) / len(ids) - 0.3) < 0.035
    other_seed = kept(ids, 50, LayoutConfig(row_length=ROW, pred_token_ids=PRED_IDS, dropout=0.3, seed=12))
    assert other_seed != forward
    assert kept(ids[:200], 50, LayoutConfig(row_length=ROW, pred_token_ids=PRED_IDS)) == set(ids[:200])


@pytest.mark.parametrize("target", ["online", "ema"])
def test_dropped_pairs_keep_their_language_modelling_rows(target):
    pairs = make_pairs(40, seed=5)
    cfg = LayoutConfig(row_length=ROW, pred_token_ids=PRED_IDS, dropout=0.5, seed=2, target=target)
    batch = pack(pairs, cfg)
    assert 0 < len(batch["jepa_pairs"]) < len(pairs)
    check_batch(batch, pairs, cfg)


def test_bad_pairs_refused():
    cfg = LayoutConfig(row_length=ROW, pred_token_ids=PRED_IDS)
    with pytest.raises(ValueError, match="does not fit"):
        pack([(np.arange(40), np.arange(23))], cfg)  # 40 + 23 + 2 > 64
    with pytest.raises(ValueError, match="sample 0: empty view"):
        pack([(np.arange(0), np.arange(3))], cfg)


def reference_mask(pair_index, segment):
    """Visibility straight from the table, one (query, key) at a time."""
    reads = {SEG_T: {SEG_T}, SEG_C: {SEG_T, SEG_C}, SEG_P: {SEG_T, SEG_P}, SEG_CB: {SEG_CB}}
    rows, length = pair_index.shape
    mask = torch.zeros(rows, 1, length, length, dtype=torch.bool)
    for r in range(rows):
        pairs, kinds = pair_index[r].tolist(), segment[r].tolist()
        for q in range(length):
            if kinds[q] == SEG_PAD:
                mask[r, 0, q, q] = True
                continue
            for key in range(q + 1):
                mask[r, 0, q, key] = pairs[key] == pairs[q] and kinds[key] in reads[kinds[q]]
    return mask


@pytest.mark.parametrize("target", ["online", "ema"])
def test_dense_mask_matches_segment_table(target):
    pairs = make_pairs(12, seed=9)
    cfg = LayoutConfig(row_length=ROW, pred_token_ids=PRED_IDS, target=target)
    batch = pack(pairs, cfg)
    views = [("pair_index", "segment")] + ([("teacher_pair_index", "teacher_segment")] if target == "ema" else [])
    for pair_name, seg_name in views:
        pair_index, segment = batch[pair_name], batch[seg_name]
        assert torch.equal(dense_mask(pair_index, segment), reference_mask(pair_index, segment))
