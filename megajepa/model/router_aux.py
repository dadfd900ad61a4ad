"""The auxiliary loss a mixture-of-experts family trains its router with.

A MoE CausalLM of transformers (mixtral, qwen2_moe, qwen3_moe, gpt_oss, olmoe, ...) adds
`router_aux_loss_coef * load_balancing_loss_func(router_logits, num_experts, top_k, attention_mask)`
to its CE when called with output_router_logits=True: the Switch Transformer loss
num_experts * sum_e f_e * P_e, where f_e is the share of the top-k assignments that go to expert e
and P_e the mean router probability of e, both over every non-padding token of the batch and every
MoE layer (the 2D attention mask weights the tokens). The packed pass calls that same function of
the family's own module, fed the router logits of the packed rows and, as the mask, the number of
the batch's sequences that hold each token: 0 on padding, 1 on a token of one sequence, 1 + n on a
token of a shared prefix that n tails read (each tail, run alone, holds the prefix again). So the
term equals the model's own forward on the batch of every sequence the packed rows hold, each
whole, right-padded, with its attention mask (f_e and P_e are batch-level averages: it is not a
mean of per-sequence losses, in the reference either).
"""

from __future__ import annotations

import inspect
import sys
from typing import Callable, Optional

import torch
from torch import nn

# The signature every family that has the loss shares in transformers 5.x (doge, refused, differs).
_PARAMETERS = ["gate_logits", "num_experts", "top_k", "attention_mask"]
# Where the CausalLM keeps the weight its forward multiplies the loss by (jetmoe: aux_loss_coef).
_COEF_NAMES = ("router_aux_loss_coef", "aux_loss_coef")


def _coef_name(lm: nn.Module) -> Optional[str]:
    return next((name for name in _COEF_NAMES if hasattr(lm, name)), None)


def load_balancing_function(lm: nn.Module) -> Optional[Callable]:
    """The family's own load_balancing_loss_func (from its CausalLM's module), or None if it has none."""
    fn = getattr(sys.modules.get(type(lm).__module__), "load_balancing_loss_func", None)
    if fn is None or list(inspect.signature(fn).parameters) != _PARAMETERS:
        return None
    if not (hasattr(lm, "num_experts") and hasattr(lm, "num_experts_per_tok") and _coef_name(lm)):
        return None
    return fn


def router_aux_coef(lm: nn.Module) -> float:
    """The weight of the router's auxiliary loss in the training loss: the CausalLM's own
    (router_)aux_loss_coef (the config's, or model.router_aux_loss_coef), 0 for a family without one."""
    if load_balancing_function(lm) is None:
        return 0.0
    return float(getattr(lm, _coef_name(lm)) or 0.0)


def set_router_aux_coef(lm: nn.Module, coef: Optional[float]) -> None:
    """model.router_aux_loss_coef: None keeps the config's; a value replaces it where the model
    reads it (its forward, its config, so an export keeps it)."""
    if coef is None or load_balancing_function(lm) is None:
        return
    setattr(lm, _coef_name(lm), coef)
    setattr(lm.config, _coef_name(lm), coef)


def sequences_holding(sequence: torch.Tensor, prefix_sequence: torch.Tensor, prefix_length: torch.Tensor) -> torch.Tensor:
    """[R, L] float: how many of the packed sequences hold each token when run alone (the layout's
    mask tensors, megajepa.model.attention: a tail reads the first prefix_length tokens of its
    prefix sequence, which start at that sequence's first token)."""
    rows, length = sequence.shape
    t = torch.arange(length, device=sequence.device).expand(rows, length)
    boundary = torch.ones_like(sequence, dtype=torch.bool)
    boundary[:, 1:] = sequence[:, 1:] != sequence[:, :-1]
    tail_start = boundary & (sequence != 0) & (prefix_sequence != 0)
    first = torch.full((rows, length + 1), length, dtype=t.dtype, device=t.device)
    first = first.scatter_reduce(1, sequence.long(), t, "amin")
    lo = torch.where(tail_start, first.gather(1, prefix_sequence.long()), length)
    hi = torch.where(tail_start, (lo + prefix_length).clamp_max(length), length)
    step = tail_start.float()
    delta = torch.zeros(rows, length + 1, device=sequence.device).scatter_add_(1, lo, step).scatter_add_(1, hi, -step)
    return (sequence != 0).float() + delta[:, :length].cumsum(1)


def router_aux_loss(lm: nn.Module, router_logits, rows: dict) -> Optional[torch.Tensor]:
    """The family's load-balancing loss of the packed rows (`rows`: their mask tensors) from the
    decoder's router logits (output_router_logits=True), unweighted; None when no layer routes
    (every layer dense: flint's mlp_only_layers), where the model's own function has nothing to average."""
    if not router_logits:
        return None
    weights = sequences_holding(rows["sequence"], rows["prefix_sequence"], rows["prefix_length"])
    fn = load_balancing_function(lm)
    return fn(tuple(router_logits), lm.num_experts, lm.num_experts_per_tok, weights)
