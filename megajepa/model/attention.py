"""Attention masks for packed rows.

A packed row holds many independent token sequences side by side. Four per-token tensors [R, L]
say who may read whom:

    sequence        row-unique id of the token's sequence (1, 2, ...); 0 on padding
    prefix_sequence id of a sequence whose first `prefix_length` tokens this token also reads
                    (0: none). A sequence that starts with the same tokens as an earlier one (the
                    user turn alone shares the conversation's opening) stores only its tail and
                    reads the shared tokens where the earlier sequence has them.
    prefix_length   see above
    position_ids    each token's position in its own sequence (a tail continues the positions of
                    the prefix it shares)

    visible(q, k) = k is not after q in the row, and
                    seq(k) == seq(q) != 0, or
                    seq(k) == prefix_sequence(q) != 0 and position(k) < prefix_length(q)

A padding token sees only itself, so no softmax row is empty. Because every token reads exactly
the tokens its sequence would hold if it ran alone, at the same positions, the packed pass equals
each sequence's own forward. The dense form feeds SDPA (CPU, tests); the BlockMask form feeds
FlexAttention, which skips fully masked blocks.
"""

from __future__ import annotations

import torch

MASK_KEYS = ("sequence", "prefix_sequence", "prefix_length", "position_ids")


def _visible(seq_q, seq_k, prefix_seq_q, prefix_len_q, pos_k, q_idx, kv_idx):
    own = (seq_q == seq_k) & (seq_q != 0)
    shared = (prefix_seq_q == seq_k) & (prefix_seq_q != 0) & (pos_k < prefix_len_q)
    padding_self = (seq_q == 0) & (q_idx == kv_idx)
    return ((own | shared) & (kv_idx <= q_idx)) | padding_self


def dense_mask(sequence, prefix_sequence, prefix_length, position_ids) -> torch.Tensor:
    """[R, L] mask tensors -> [R, 1, L, L] boolean mask (True: may attend)."""
    length = sequence.shape[1]
    idx = torch.arange(length, device=sequence.device)
    mask = _visible(
        sequence[:, :, None],
        sequence[:, None, :],
        prefix_sequence[:, :, None],
        prefix_length[:, :, None],
        position_ids[:, None, :],
        idx[:, None],
        idx[None, :],
    )
    return mask[:, None]


def block_mask(sequence, prefix_sequence, prefix_length, position_ids, block_size: int = 128):
    """The same visibility as a FlexAttention BlockMask."""
    from torch.nn.attention.flex_attention import create_block_mask

    rows, length = sequence.shape

    def mask_mod(b, h, q_idx, kv_idx):
        return _visible(
            sequence[b, q_idx],
            sequence[b, kv_idx],
            prefix_sequence[b, q_idx],
            prefix_length[b, q_idx],
            position_ids[b, kv_idx],
            q_idx,
            kv_idx,
        )

    return create_block_mask(
        mask_mod, B=rows, H=None, Q_LEN=length, KV_LEN=length, device=sequence.device, BLOCK_SIZE=block_size
    )


def attention_mask(rows: dict, implementation: str, prefix: str = ""):
    """The mask object the model's attention implementation takes, from the batch's `prefix`-ed
    mask tensors ('' for the online rows, 'teacher_' for the teacher's)."""
    tensors = [rows[prefix + key] for key in MASK_KEYS]
    if implementation == "flex_attention":
        return block_mask(*tensors)
    return dense_mask(*tensors)
