"""Model FLOPs of a training step, counted per segment, and MFU.

The count follows torchtitan and Megatron-LM: a matmul with a weight of n parameters costs 2n FLOPs
per token forward and 4n backward, so 6N per trained token; attention adds, per layer, 2w FLOPs
for q.k and 2w for the weighted sum of values per (query, visible key) pair, with w = heads x
head_dim (the hidden size for Llama), so 4 L w per pair forward and 12 L w with the backward.
Counting the keys each query really sees under the packed mask, rather than a full square of the row,
is what makes the count per segment:

    trained  = 6 N tokens  +  6 V d labelled  +  6 N_pred jepa_pairs  +  12 L w keys
    teacher  = 2 N tokens_t                                          +   4 L w keys_t

    N        parameters of the transformer body: all of the LM's but the token embedding and the
             output projection (the embedding is a lookup, not a matmul)
    V d      the output projection: the objective runs it only on labelled tokens
    N_pred   the predictor head (mlp, linear), applied once per pair with a JEPA term
    tokens   tokens of the online rows that belong to a segment (padding is not model work)
    keys     the sum over those tokens of the keys each may attend to (attended_keys)
    _t       the same over the EMA teacher's rows, forward only, no output projection

Model FLOPs leave out what the model does not need (padding, recomputation), so MFU is
(model FLOPs per second per GPU) / (the GPU's dense peak).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn

from megajepa.data.layout import SEG_PAD

# Dense (no sparsity) bf16/fp16 tensor-core peak per GPU in TFLOP/s, matched on
# torch.cuda.get_device_name(): the first entry whose words all appear wins; None: a part we
# know of but give no figure for (NVL variants differ by form factor and clock).
PEAK_TFLOPS_16BIT = [
    (("NVL",), None),
    (("H200",), 989.0),
    (("H100", "PCIe"), 756.0),
    (("H100", "HBM3"), 989.0),  # the SXM part reports itself as "NVIDIA H100 80GB HBM3"
    (("H100", "SXM"), 989.0),
    (("A100",), 312.0),
]


def peak_flops(device_name: str, precision: str) -> Optional[float]:
    """The device's dense peak in FLOP/s for a bf16/fp16 run, None when unknown (or fp32, CPU)."""
    if precision not in ("bf16", "fp16"):
        return None
    name = device_name.lower()
    for words, tflops in PEAK_TFLOPS_16BIT:
        if all(word.lower() in name for word in words):
            return None if tflops is None else tflops * 1e12
    return None


def _numel(param: nn.Parameter) -> int:
    return getattr(param, "ds_numel", param.numel())  # ZeRO-3 leaves an empty local tensor


@dataclass(frozen=True)
class FlopModel:
    body_params: int  # N
    head_params: int  # V x d
    predictor_params: int  # N_pred
    layers: int  # L
    attention_width: int  # w = heads x head_dim

    @classmethod
    def of(cls, model: nn.Module) -> "FlopModel":
        """From a JepaModel (or anything with `.lm` and `.predictor`), partitioned or not."""
        lm = model.lm
        embedding = lm.get_input_embeddings().weight
        head = lm.get_output_embeddings().weight
        lm_params = sum(_numel(p) for p in lm.parameters())  # tied weights are listed once
        body = lm_params - _numel(embedding) - (0 if head is embedding else _numel(head))
        config = lm.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            body_params=body,
            head_params=_numel(head),
            predictor_params=sum(_numel(p) for p in model.predictor.parameters()),
            layers=config.num_hidden_layers,
            attention_width=config.num_attention_heads * head_dim,
        )


def attended_keys(sequence: torch.Tensor, prefix_length: torch.Tensor) -> int:
    """Sum over non-padding tokens of the keys each attends to under megajepa.model.attention's mask.

    A sequence's tokens are one contiguous run in its row: the j-th (from 0) sees j + 1 keys of its
    own, plus the prefix_length shared tokens it reads in the sequence it opens like."""
    total = 0
    for seq, shared in zip(sequence.cpu().numpy(), prefix_length.cpu().numpy()):
        real = seq != 0
        starts = np.flatnonzero(np.r_[True, seq[1:] != seq[:-1]])
        run_start = np.repeat(starts, np.diff(np.r_[starts, len(seq)]))
        own = np.arange(len(seq)) - run_start + 1
        total += int((own + shared)[real].sum())
    return total


def _tokens(segment: torch.Tensor) -> int:
    return int((segment != SEG_PAD).sum())


def batch_flops(batch: dict, model: FlopModel) -> dict[str, int]:
    """Model FLOPs of one micro-batch (the module docstring's formula), trained and teacher."""
    keys = attended_keys(batch["sequence"], batch["prefix_length"])
    labelled = int(batch["ce_index"].numel())
    trained = (
        6 * model.body_params * _tokens(batch["segment"])
        + 6 * model.head_params * labelled
        + 6 * model.predictor_params * int(batch["jepa_pairs"].numel())
        + 12 * model.layers * model.attention_width * keys
    )
    teacher = 0
    if "teacher_segment" in batch:
        teacher_keys = attended_keys(batch["teacher_sequence"], batch["teacher_prefix_length"])
        teacher = 2 * model.body_params * _tokens(batch["teacher_segment"])
        teacher += 4 * model.layers * model.attention_width * teacher_keys
    return {"trained": trained, "teacher": teacher, "total": trained + teacher}
