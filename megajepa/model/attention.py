"""Attention masks for packed rows, built from the per-token pair index and segment kind.

visible(q, k) = same pair, k not after q in the row, and
    seg(k) == seg(q)                  (each segment is causal over itself), or
    seg(k) == T and seg(q) in {C, P}  (view B and the [PRED] tokens read view A).
A padding token sees only itself, so no softmax row is empty. The dense form feeds SDPA (CPU,
tests); the BlockMask form feeds FlexAttention, which skips fully masked blocks.
"""

from __future__ import annotations

import torch

from megajepa.data.layout import SEG_C, SEG_P, SEG_PAD, SEG_T


def _visible(pair_q, pair_k, seg_q, seg_k, q_idx, kv_idx):
    same_pair = (pair_q == pair_k) & (pair_q >= 0)
    reads = (seg_q == seg_k) | ((seg_k == SEG_T) & ((seg_q == SEG_C) | (seg_q == SEG_P)))
    padding_self = (seg_q == SEG_PAD) & (q_idx == kv_idx)
    return (same_pair & reads & (kv_idx <= q_idx)) | padding_self


def dense_mask(pair_index: torch.Tensor, segment: torch.Tensor) -> torch.Tensor:
    """[R, L] pair index and segment -> [R, 1, L, L] boolean mask (True: may attend)."""
    length = pair_index.shape[1]
    idx = torch.arange(length, device=pair_index.device)
    mask = _visible(
        pair_index[:, :, None],
        pair_index[:, None, :],
        segment[:, :, None],
        segment[:, None, :],
        idx[:, None],
        idx[None, :],
    )
    return mask[:, None]


def block_mask(pair_index: torch.Tensor, segment: torch.Tensor, block_size: int = 128):
    """The same visibility as a FlexAttention BlockMask."""
    from torch.nn.attention.flex_attention import create_block_mask

    rows, length = pair_index.shape

    def mask_mod(b, h, q_idx, kv_idx):
        return _visible(
            pair_index[b, q_idx], pair_index[b, kv_idx], segment[b, q_idx], segment[b, kv_idx], q_idx, kv_idx
        )

    return create_block_mask(
        mask_mod, B=rows, H=None, Q_LEN=length, KV_LEN=length, device=pair_index.device, BLOCK_SIZE=block_size
    )


def attention_mask(pair_index: torch.Tensor, segment: torch.Tensor, implementation: str):
    """The mask object the model's attention implementation takes ('sdpa' or 'flex_attention')."""
    if implementation == "flex_attention":
        return block_mask(pair_index, segment)
    return dense_mask(pair_index, segment)
