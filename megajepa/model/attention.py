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
each sequence's own forward.

Each layer's own pattern is part of the rule: a sliding-window layer also requires
position(q) - position(k) < window, measured in the sequence's own positions as the model does
when the sequence runs alone. Models that mix full and sliding layers get a mapping layer type ->
mask (transformers 4.57 takes it as attention_mask), the others one mask; gpt_neo's local layers
get theirs through megajepa.model.local_layers.

The forms: a dense boolean mask for SDPA, an additive float mask for eager attention, and a
FlexAttention BlockMask built directly from the sequence boundaries (no [L, L] tensor), shared by
every layer of a type. The BlockMask's block structure relies on the layout's contract: each
sequence occupies a contiguous run of its row, its positions count up by one from its first token
(from 0 for a sequence that reads no prefix), ids count 1, 2, ... within the row, and a prefix
read is the start of an earlier sequence.
"""

from __future__ import annotations

from typing import Optional

import torch

from megajepa.model.families import layer_windows
from megajepa.model.local_layers import hand_over, local_window_types

MASK_KEYS = ("sequence", "prefix_sequence", "prefix_length", "position_ids")
BLOCK_SIZE = 128  # FlexAttention's default tile


def _visible(seq_q, seq_k, prefix_seq_q, prefix_len_q, pos_q, pos_k, q_idx, kv_idx, window):
    own = (seq_q == seq_k) & (seq_q != 0)
    shared = (prefix_seq_q == seq_k) & (prefix_seq_q != 0) & (pos_k < prefix_len_q)
    allowed = (own | shared) & (kv_idx <= q_idx)
    if window is not None:
        allowed = allowed & (pos_q - pos_k < window)
    padding_self = (seq_q == 0) & (q_idx == kv_idx)
    return allowed | padding_self


def dense_mask(sequence, prefix_sequence, prefix_length, position_ids, window: Optional[int] = None) -> torch.Tensor:
    """[R, L] mask tensors -> [R, 1, L, L] boolean mask (True: may attend)."""
    length = sequence.shape[1]
    idx = torch.arange(length, device=sequence.device)
    mask = _visible(
        sequence[:, :, None],
        sequence[:, None, :],
        prefix_sequence[:, :, None],
        prefix_length[:, :, None],
        position_ids[:, :, None],
        position_ids[:, None, :],
        idx[:, None],
        idx[None, :],
        window,
    )
    return mask[:, None]


def additive_mask(sequence, prefix_sequence, prefix_length, position_ids, window=None, dtype=torch.float32):
    """The dense mask as eager attention adds it to the scores: 0 where visible, dtype's minimum elsewhere."""
    visible = dense_mask(sequence, prefix_sequence, prefix_length, position_ids, window)
    zero = torch.zeros((), dtype=dtype, device=sequence.device)
    return torch.where(visible, zero, torch.finfo(dtype).min)


def _key_intervals(sequence, prefix_sequence, prefix_length, position_ids, window):
    """Per query token, the (at most two) runs of row indices it reads: [lo, hi] inclusive, in its
    own sequence and in the prefix it shares; an empty run is lo = L, hi = -1."""
    rows, length = sequence.shape
    t = torch.arange(length, device=sequence.device).expand(rows, length)
    boundary = torch.ones_like(sequence, dtype=torch.bool)
    boundary[:, 1:] = sequence[:, 1:] != sequence[:, :-1]
    start = torch.where(boundary, t, 0).cummax(dim=1).values
    reach = length if window is None else window
    padding = sequence == 0
    own = (torch.where(padding, t, torch.maximum(start, t - reach + 1)), t)
    first = torch.full((rows, length + 1), length, dtype=t.dtype, device=t.device)
    first = first.scatter_reduce(1, sequence.long(), t, "amin")
    prefix_start = first.gather(1, prefix_sequence.long())
    low = (position_ids - reach + 1).clamp_min(0)
    reads = (prefix_sequence != 0) & (low < prefix_length) & ~padding
    shared = (
        torch.where(reads, prefix_start + low, length),
        torch.where(reads, prefix_start + prefix_length - 1, -1),
    )
    return own, shared


def _ordered(blocks: torch.Tensor):
    """[R, Q, K] bool -> (counts [R, 1, Q], indices [R, 1, Q, K]): the True columns first, as
    BlockMask stores them."""
    counts = blocks.sum(-1, dtype=torch.int32)
    indices = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return counts[:, None], indices[:, None]


def block_mask(sequence, prefix_sequence, prefix_length, position_ids, window=None, block_size: int = BLOCK_SIZE):
    """The same visibility as a FlexAttention BlockMask, its tiles found from the sequence
    boundaries in O(L * L / block_size) work instead of evaluating all L * L pairs."""
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask

    rows, length = sequence.shape

    def mask_mod(b, h, q_idx, kv_idx):
        return _visible(
            sequence[b, q_idx],
            sequence[b, kv_idx],
            prefix_sequence[b, q_idx],
            prefix_length[b, q_idx],
            position_ids[b, q_idx],
            position_ids[b, kv_idx],
            q_idx,
            kv_idx,
            window,
        )

    if length % block_size:
        # A ragged last tile: torch's own (dense) construction; bucket_width() avoids this.
        return create_block_mask(
            mask_mod, B=rows, H=None, Q_LEN=length, KV_LEN=length, device=sequence.device, BLOCK_SIZE=block_size
        )
    tiles = length // block_size
    first_key = torch.arange(tiles, device=sequence.device) * block_size
    touched = torch.zeros(rows, tiles, tiles, dtype=torch.bool, device=sequence.device)
    full = torch.zeros_like(touched)
    for lo, hi in _key_intervals(sequence, prefix_sequence, prefix_length, position_ids, window):
        lo, hi = lo[..., None], hi[..., None]
        hit = (first_key + block_size - 1 >= lo) & (first_key <= hi)  # tile meets the run
        inside = (first_key >= lo) & (first_key + block_size - 1 <= hi)  # tile lies in the run
        touched |= hit.view(rows, tiles, block_size, tiles).any(2)
        full |= inside.view(rows, tiles, block_size, tiles).all(2)
    partial_counts, partial_indices = _ordered(touched & ~full)
    full_counts, full_indices = _ordered(full)
    return BlockMask.from_kv_blocks(
        partial_counts, partial_indices, full_counts, full_indices,
        BLOCK_SIZE=block_size, mask_mod=mask_mod, seq_lengths=(length, length),
    )


def bucket_width(width: int, block_size: int = BLOCK_SIZE) -> int:
    """The row width to pad a batch to for FlexAttention: whole tiles, so at most block_size - 1
    columns of padding (a power-of-two number of tiles ran the decoder on up to 2x the tokens).
    The widths vary, but not the compiled kernels: torch.compile marks a dimension dynamic the
    second time it sees it change, so a run compiles a few graphs, not one per width
    (compiled_graphs; TORCH_LOGS=recompiles says why each one was built)."""
    return block_size * max(1, -(-width // block_size))


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process (transformers compiles FlexAttention)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def attention_mask(rows: dict, model, prefix: str = ""):
    """What `model` (a CausalLM or its decoder) takes as attention_mask for the batch's
    `prefix`-ed mask tensors ('' for the online rows, 'teacher_' for the teacher's): one mask, or
    a mapping layer type -> mask for models that mix full and sliding-window layers. Each
    distinct window is built once and shared by every layer that uses it."""
    if isinstance(model, str):
        raise TypeError("attention_mask(batch, model, prefix) takes the model (its windows, kernel and dtype), not a name")
    config = model.config
    implementation = config._attn_implementation
    tensors = [rows[prefix + key] for key in MASK_KEYS]
    built: dict[Optional[int], object] = {}

    def for_window(window):
        if window not in built:
            if implementation == "flex_attention":
                built[window] = block_mask(*tensors, window=window)
            elif implementation == "eager":
                built[window] = additive_mask(*tensors, window=window, dtype=model.dtype)
            else:
                built[window] = dense_mask(*tensors, window=window)
        return built[window]

    windows = layer_windows(config)
    if isinstance(windows, dict):
        masks = {kind: for_window(window) for kind, window in windows.items()}
        if local_window_types(config) is not None:  # gpt_neo's decoder takes one mask
            return hand_over(model, masks)
        return masks
    return for_window(windows)
