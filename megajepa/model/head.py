"""The LM head as the model's own forward applies it, and a memory-bounded cross-entropy on it.

transformers' CausalLM forwards do more after the final hidden state than the output embedding:
gemma2/gemma3 soft-cap the logits (`final_logit_softcapping`), granite divides them by
`logits_scaling`, cohere multiplies them by `logit_scale`, falcon_h1 by `lm_head_multiplier`.
`lm_logits` applies exactly those steps, in the model's order and dtype, so the CE trained is the
CE of the model that is exported.

`lm_cross_entropy` never holds the fp32 logits of all tokens at once: it runs the head over chunks
of tokens, each under activation checkpointing when there is more than one (its logits are
recomputed in the backward instead of kept), or Liger-Kernel's fused linear cross-entropy on CUDA
where it is installed and the head weight is materialised on this rank. `token_cross_entropy` is
the chunked path's per-token losses (what per-source metrics need; Liger's fused kernel gives only
their mean). Neither reads a value back to the host, except what Liger-Kernel does itself (one
count of the non-ignored labels).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

log = logging.getLogger(__name__)

MAX_LOGIT_BYTES = 1 << 28  # fp32 logits of one chunk: 256 MiB (512 tokens at a 128k vocabulary)


def _transform(lm, logits: torch.Tensor) -> torch.Tensor:
    """What the model's forward does to the head's output (the transformers 4.57 families)."""
    config = lm.config
    multiplier = getattr(config, "lm_head_multiplier", None)  # falcon_h1
    if multiplier is not None:
        logits = logits * multiplier
    scaling = getattr(config, "logits_scaling", None)  # granite, granitemoe*
    if scaling is not None:
        logits = logits / scaling
    scale = getattr(config, "logit_scale", None)  # cohere, cohere2
    if scale is not None:
        logits = logits * scale
    cap = getattr(config, "final_logit_softcapping", None)  # gemma2, gemma3, vaultgemma
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def lm_logits(lm, hidden: torch.Tensor) -> torch.Tensor:
    """Logits [..., V] from final hidden states [..., d], exactly as `lm`'s own forward makes
    them (model dtype; the loss upcasts)."""
    return _transform(lm, lm.get_output_embeddings()(hidden))


def _token_ce(lm, hidden, labels):
    return F.cross_entropy(lm_logits(lm, hidden).float(), labels, reduction="none")


def token_cross_entropy(lm, hidden: torch.Tensor, labels: torch.Tensor, max_logit_bytes: int = MAX_LOGIT_BYTES):
    """Next-token CE of each of N labelled tokens, [N] fp32: `hidden` [N, d] final hidden states at
    the tokens, `labels` [N] the token each predicts (all valid: select labelled tokens first).

    Equals F.cross_entropy(lm_logits(lm, hidden).float(), labels, reduction="none") with at most
    `max_logit_bytes` of fp32 logits alive at a time. With N = 0 it still runs the head (under
    ZeRO-3 a module one rank skips leaves the others waiting in its all-gather)."""
    n = hidden.shape[0]
    vocab = lm.get_output_embeddings().out_features
    chunk = max(1, max_logit_bytes // (4 * vocab))
    if n <= chunk:  # one chunk: its logits fit the bound, so keep them rather than recompute the head
        return _token_ce(lm, hidden, labels)
    chunks = []
    for start in range(0, n, chunk):
        h, y = hidden[start:start + chunk], labels[start:start + chunk]
        chunks.append(checkpoint(_token_ce, lm, h, y, use_reentrant=False) if torch.is_grad_enabled() else _token_ce(lm, h, y))
    return torch.cat(chunks)


def lm_cross_entropy(lm, hidden: torch.Tensor, labels: torch.Tensor, max_logit_bytes: int = MAX_LOGIT_BYTES):
    """Mean next-token CE over N labelled tokens (the arguments as token_cross_entropy's): Liger's
    fused kernel where it applies, else the mean of token_cross_entropy. With N = 0 it is 0."""
    if hidden.shape[0] > 0:
        fused = _liger_loss(lm, hidden, labels)
        if fused is not None:
            return fused
    return mean_of(token_cross_entropy(lm, hidden, labels, max_logit_bytes))


def mean_of(token_ce: torch.Tensor) -> torch.Tensor:
    """The mean of per-token losses; 0 (still connected to the graph) for none."""
    return token_ce.sum() / max(token_ce.shape[0], 1)


def _liger_loss(lm, hidden, labels):
    """Liger-Kernel's fused linear CE where it applies, else None."""
    if not hidden.is_cuda:
        return None
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        return None
    head = lm.get_output_embeddings()
    weight, bias = head.weight, getattr(head, "bias", None)
    if getattr(weight, "ds_status", None) is not None and weight.numel() != head.in_features * head.out_features:
        # ZeRO-3 and not gathered here: register it as an external parameter of the module whose
        # forward calls this (deepspeed.zero.register_external_parameter) to use the fused path.
        _note_once("lm_cross_entropy: LM head weight partitioned (ZeRO-3, not registered): chunked torch CE")
        return None
    config = lm.config
    scale = 1.0
    for name, inverse in (("lm_head_multiplier", False), ("logits_scaling", True), ("logit_scale", False)):
        value = getattr(config, name, None)
        if value is not None:
            scale = scale / value if inverse else scale * value
    if scale != 1.0 and bias is not None:
        return None  # a scale after the bias is not a scale of the input
    if scale != 1.0:
        hidden = hidden * scale  # (s h) W^T = s (h W^T): the scale moves onto the input
    _note_once("lm_cross_entropy: Liger-Kernel fused linear cross-entropy")
    return liger_fused_linear_cross_entropy(
        hidden, weight, labels, bias=bias, softcap=getattr(config, "final_logit_softcapping", None)
    )


_noted: set[str] = set()


def _note_once(message: str) -> None:
    if message not in _noted:
        _noted.add(message)
        log.info(message)
