"""The LM head as the model's own forward applies it, and a memory-bounded cross-entropy on it.

transformers' CausalLM forwards do more after the final hidden state than the output embedding:
gemma2/gemma3 soft-cap the logits (`final_logit_softcapping`), granite divides them by
`logits_scaling`, cohere multiplies them by `logit_scale`, falcon_h1 by `lm_head_multiplier`.
Those steps are listed once, in LOGIT_TRANSFORMS, which every path applies: `lm_logits` in the
model's order and dtype, Liger's fused kernel with the scalings moved onto its input and the cap
passed to it; so the CE trained is the CE of the model that is exported. `HeadLoss` computes the
CE of a batch's labelled tokens (and, for a mixture, its sum per source).

`lm_cross_entropy` never holds the fp32 logits of all tokens at once: it runs the head over chunks
of tokens, each under activation checkpointing when there is more than one (its logits are
recomputed in the backward instead of kept), or Liger-Kernel's fused linear cross-entropy on CUDA
where it is installed (`ce_path` says which). `token_cross_entropy` is the chunked path's per-token
losses (what per-source metrics need; Liger's fused kernel gives only their mean). Neither reads a
value back to the host, except what Liger-Kernel does itself (one count of the non-ignored labels).

Both read the head's weight and bias directly (F.linear), never calling the head module: the
number of chunks depends on the rank's labels, and under ZeRO-3 each call of a partitioned module
may all-gather its weight, so ranks would issue different collectives: one waits in a gather the
others never join (a hang until the process-group timeout; gloo may report a mismatch instead). `HeadLoss` is the one module call per forward that runs them: its
forward and backward gather the head's parameters once each, whatever the data.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

log = logging.getLogger(__name__)

MAX_LOGIT_BYTES = 1 << 28  # fp32 logits of one chunk: 256 MiB (523 tokens at a 128k vocabulary)
FUSED_DEVICE_TYPES = ("cuda",)  # where Liger-Kernel's Triton kernels run
# what the log says of each ce_path, once per process (scripts/gpu_check_summary.py counts them)
PATH_NOTES = {"liger": "Liger-Kernel fused linear cross-entropy", "chunked": "chunked torch CE"}


def register_head(module: nn.Module, lm) -> None:
    """Make `module`, whose forward computes the CE, gather `lm`'s head parameters under ZeRO-3:
    once before its forward, once before its backward (which recomputes the chunks and multiplies
    by the whole weight), whatever number of chunks. Their gradients reach ZeRO's reduction
    through each parameter's own hook, as from any use. Harmless without ZeRO-3."""
    import deepspeed

    for param in lm.get_output_embeddings().parameters(recurse=False):
        deepspeed.zero.register_external_parameter(module, param)


class HeadLoss(nn.Module):
    """The CE on `lm`'s head as one module call (see the module docstring). It owns no parameters
    (the state dict is unchanged); `lm` is passed to forward so as not to be a second parent."""

    def __init__(self, lm):
        super().__init__()
        register_head(self, lm)

    def forward(self, lm, final: torch.Tensor, batch: dict) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(mean CE over the batch's labelled tokens, the per-source sums [2, S] or None) from the
        final hidden states [R, L, d]. The head runs only where there is a label (ce_index, listed by
        the layout: no host sync); a mixture (ce_source in the batch) needs each token's loss."""
        hidden, labels = final.flatten(0, 1)[batch["ce_index"]], batch["ce_targets"]
        if "ce_source" not in batch:
            return lm_cross_entropy(lm, hidden, labels), None
        token_ce = token_cross_entropy(lm, hidden, labels)
        return mean_of(token_ce), per_source_ce(token_ce, batch["ce_source"], batch["source_records"].numel())


def per_source_ce(token_ce: torch.Tensor, ce_source: torch.Tensor, num_sources: int) -> torch.Tensor:
    """[2, S]: the sum of the per-token CE and the number of labelled tokens of each source, on the
    device (the mean per source is sum / tokens once both are summed over steps and ranks)."""
    values = torch.stack([token_ce.detach().float(), torch.ones_like(token_ce, dtype=torch.float32)])
    return values.new_zeros(2, num_sources).index_add_(1, ce_source, values)


def head_parameters(lm) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM head's (weight, bias), whole. Raises where ZeRO-3 left them partitioned (no module
    registered them with register_head) or where the head is not a plain Linear (a LoRA adapter
    on it would be skipped)."""
    head = lm.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise TypeError(f"the LM head is a {type(head).__name__}, not a Linear: the CE reads its weight directly")
    for param in (head.weight, head.bias):
        if param is not None and param.shape != getattr(param, "ds_shape", param.shape):
            raise RuntimeError(
                "the LM head's parameters are partitioned (ZeRO-3) here: compute the CE inside the forward of a "
                "module that registered them (megajepa.model.head.HeadLoss / register_head)"
            )
    return head.weight, head.bias


@dataclass(frozen=True)
class LogitTransform:
    """One step a family's forward applies to its head's output, with the value `config.<key>`
    (absent or None: the family does not apply it)."""

    key: str
    apply: Callable  # (logits, value) -> logits
    scaling: bool  # a scaling (Liger: moved onto the input) or the soft-cap (Liger's softcap argument)


def _softcap(logits, cap):
    return torch.tanh(logits / cap) * cap


# in the order the transformers 4.57 families apply them; the soft-cap comes last
LOGIT_TRANSFORMS = (
    LogitTransform("lm_head_multiplier", operator.mul, True),  # falcon_h1
    LogitTransform("logits_scaling", operator.truediv, True),  # granite, granitemoe*
    LogitTransform("logit_scale", operator.mul, True),  # cohere, cohere2
    LogitTransform("final_logit_softcapping", _softcap, False),  # gemma2, gemma3, vaultgemma
)


def logit_transforms(config) -> list[tuple[LogitTransform, float]]:
    """The transforms `config`'s model applies, with their values, in order."""
    return [(t, value) for t in LOGIT_TRANSFORMS if (value := getattr(config, t.key, None)) is not None]


def _transform(lm, logits: torch.Tensor) -> torch.Tensor:
    for transform, value in logit_transforms(lm.config):
        logits = transform.apply(logits, value)
    return logits


def lm_logits(lm, hidden: torch.Tensor) -> torch.Tensor:
    """Logits [..., V] from final hidden states [..., d], exactly as `lm`'s own forward makes them
    (model dtype; the loss upcasts)."""
    return _transform(lm, F.linear(hidden, *head_parameters(lm)))


def _token_ce(lm, hidden, labels):
    return F.cross_entropy(lm_logits(lm, hidden).float(), labels, reduction="none")


def token_cross_entropy(lm, hidden: torch.Tensor, labels: torch.Tensor, max_logit_bytes: int = MAX_LOGIT_BYTES):
    """Next-token CE of each of N labelled tokens, [N] fp32: `hidden` [N, d] final hidden states at
    the tokens, `labels` [N] the token each predicts (all valid: select labelled tokens first).

    Equals F.cross_entropy(lm_logits(lm, hidden).float(), labels, reduction="none") with at most
    `max_logit_bytes` of fp32 logits alive at a time. With N = 0 it still runs the head: the weight
    is then in the graph (a zero gradient) on every rank, as on the ranks that have labels."""
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
    fused kernel where ce_path chooses it, else the mean of token_cross_entropy. With N = 0 it is 0."""
    path = ce_path(lm, hidden)
    _note_once(f"lm_cross_entropy: {PATH_NOTES[path]}")
    if path == "liger":
        return _liger_loss(lm, hidden, labels)
    return mean_of(token_cross_entropy(lm, hidden, labels, max_logit_bytes))


def mean_of(token_ce: torch.Tensor) -> torch.Tensor:
    """The mean of per-token losses; 0 (still connected to the graph) for none."""
    return token_ce.sum() / max(token_ce.shape[0], 1)


def _liger():
    """Liger-Kernel's fused linear CE, or None where it is not installed."""
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        return None
    return liger_fused_linear_cross_entropy


def _input_scale(config) -> float:
    """The product of the scalings the model applies to the logits before any soft-cap."""
    scale = 1.0
    for transform, value in logit_transforms(config):
        if transform.scaling:
            scale = transform.apply(scale, value)
    return scale


def _softcap_of(config) -> Optional[float]:
    return next((value for transform, value in logit_transforms(config) if not transform.scaling), None)


def ce_path(lm, hidden: torch.Tensor) -> str:
    """Which CE lm_cross_entropy runs: "liger" (the fused kernel: on a device in
    FUSED_DEVICE_TYPES, Liger-Kernel installed, at least one token, and any logit scaling movable
    onto the input) or "chunked"."""
    _, bias = head_parameters(lm)
    if hidden.shape[0] == 0 or hidden.device.type not in FUSED_DEVICE_TYPES or _liger() is None:
        return "chunked"
    if _input_scale(lm.config) != 1.0 and bias is not None:
        return "chunked"  # a scale after the bias is not a scale of the input
    return "liger"


def _liger_loss(lm, hidden, labels):
    weight, bias = head_parameters(lm)
    scale = _input_scale(lm.config)
    if scale != 1.0:
        hidden = hidden * scale  # (s h) W^T = s (h W^T): the scale moves onto the input
    # fp32 accumulation of the weight gradient over the kernel's chunks (else in the weight's dtype)
    return _liger()(
        hidden, weight, labels, bias=bias, softcap=_softcap_of(lm.config),
        accum_dtype=torch.float32,
    )


_noted: set[str] = set()


def _note_once(message: str) -> None:
    if message not in _noted:
        _noted.add(message)
        log.info(message)
