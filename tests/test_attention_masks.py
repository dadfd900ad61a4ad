"""The packed masks: the BlockMask built from sequence boundaries against torch's own
create_block_mask over the same rule, windows, per-layer-type masks, eager's additive form."""

import random

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

from _families import build, pack
from megajepa.model.attention import MASK_KEYS, attention_mask, block_mask, bucket_width, dense_mask


def random_rows(rows: int, width: int, seed: int) -> dict:
    """Rows under the layout's contract: contiguous sequences numbered 1, 2, ... with positions
    from 0, some of them tails that read the start of an earlier sequence, then padding."""
    rng = random.Random(seed)
    batch = {key: torch.zeros(rows, width, dtype=torch.long) for key in MASK_KEYS}
    for r in range(rows):
        t, seq, lengths = 0, 0, {}
        while t < width - 8:
            n = min(rng.randint(1, 40), width - t)
            seq += 1
            shared = 0
            if lengths and rng.random() < 0.4:
                target = rng.choice(sorted(lengths))
                shared = rng.randint(1, lengths[target])
                batch["prefix_sequence"][r, t:t + n] = target
                batch["prefix_length"][r, t:t + n] = shared
            else:
                lengths[seq] = n
            batch["sequence"][r, t:t + n] = seq
            batch["position_ids"][r, t:t + n] = torch.arange(shared, shared + n)
            t += n
    return batch


def tiles(num, indices, n):
    """(counts [R, 1, Q], indices [R, 1, Q, K]) -> [R, Q, K] bool of the listed tiles."""
    out = torch.zeros(num.shape[0], num.shape[2], n, dtype=torch.bool)
    for r in range(num.shape[0]):
        for q in range(num.shape[2]):
            out[r, q, indices[r, 0, q, : num[r, 0, q]].long()] = True
    return out


@pytest.mark.parametrize("window", [None, 1, 5, 37])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_block_mask_tiles_match_create_block_mask(window, seed):
    batch = random_rows(3, 192, seed)
    tensors = [batch[key] for key in MASK_KEYS]
    ours = block_mask(*tensors, window=window, block_size=16)
    dense = dense_mask(*tensors, window=window)
    theirs = create_block_mask(
        lambda b, h, q, k: dense[b, 0, q, k], B=3, H=None, Q_LEN=192, KV_LEN=192, device="cpu", BLOCK_SIZE=16
    )
    n = 192 // 16
    our_full = tiles(ours.full_kv_num_blocks, ours.full_kv_indices, n)
    their_full = tiles(theirs.full_kv_num_blocks, theirs.full_kv_indices, n)
    our_any = our_full | tiles(ours.kv_num_blocks, ours.kv_indices, n)
    their_any = their_full | tiles(theirs.kv_num_blocks, theirs.kv_indices, n)
    assert torch.equal(our_any, their_any)  # every tile with a visible pair, and no other
    # a tile skips mask_mod only where all pairs are visible (ours may miss a tile that is full
    # only through a prefix and its tail lying side by side: a cost, never an error)
    assert not (our_full & ~their_full).any()
    # and mask_mod is the dense rule itself
    assert torch.equal(ours.to_dense().bool(), our_any[:, None])
    q, k = torch.meshgrid(torch.arange(192), torch.arange(192), indexing="ij")
    for b in range(3):
        assert torch.equal(ours.mask_mod(torch.tensor(b), 0, q, k), dense[b, 0])


def test_ragged_width_falls_back_to_create_block_mask():
    batch = random_rows(2, 100, 5)
    ours = block_mask(*[batch[key] for key in MASK_KEYS], window=7, block_size=16)
    assert ours.shape[-2:] == (100, 100)


def test_bucket_width_is_a_power_of_two_number_of_tiles():
    assert [bucket_width(w) for w in (1, 128, 129, 300, 513)] == [128, 128, 256, 512, 1024]


def test_window_counts_positions_within_each_sequence():
    packed = pack()
    mask = dense_mask(*[packed.batch[key] for key in MASK_KEYS], window=4)[1, 0]
    # D (row 1, tokens 0..14): token 10 reads 7..10 only
    assert mask[10].nonzero().flatten().tolist() == [7, 8, 9, 10]
    # C's tail (row 0, cols 16..19, positions 5..8) reads A's positions 2..4 and its own tokens
    row0 = dense_mask(*[packed.batch[key] for key in MASK_KEYS], window=4)[0, 0]
    assert row0[16].nonzero().flatten().tolist() == [2, 3, 4, 16]


def test_mixed_layer_models_get_a_mask_per_layer_type(tmp_path):
    lm = build(tmp_path, "gemma2", attention="eager")  # transformers 5: gemma2 has no SDPA (soft-capping)
    masks = attention_mask(pack().batch, lm)
    assert set(masks) == {"full_attention", "sliding_attention"}
    visible = {kind: mask == 0 for kind, mask in masks.items()}  # eager: an additive mask
    assert not torch.equal(visible["full_attention"], visible["sliding_attention"])
    assert torch.equal(visible["sliding_attention"], visible["sliding_attention"] & visible["full_attention"])


def test_eager_gets_an_additive_mask_in_the_model_dtype(tmp_path):
    lm = build(tmp_path, "llama", attention="eager").to(torch.bfloat16)
    mask = attention_mask(pack().batch, lm)
    boolean = dense_mask(*[pack().batch[key] for key in MASK_KEYS])
    assert mask.dtype == torch.bfloat16
    assert torch.equal(mask == 0, boolean)
    assert torch.equal(mask[~boolean], torch.full_like(mask[~boolean], torch.finfo(torch.bfloat16).min))
