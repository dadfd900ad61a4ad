"""gpt_neo's local layers in packed rows: a sliding window measured in sequence positions.

GPTNeoSelfAttention applies its local window itself, from a [max_positions, max_positions]
buffer indexed by row index, and its decoder passes one mask to every layer. In packed rows the
row distance is not the distance in the sequence: a tail that shares a prefix stored earlier in
the row would lose the prefix tokens within its window. So for the packed pass each local layer
gets the mask built with the window in positions (megajepa.model.attention, window_size) and, for
that call only, the plain causal buffer in place of its own; every other call (the model's own
forward, generation) is left as transformers runs it. The packed call is recognised by its mask:
the global layers' tensor that attention_mask() handed over (so gradient checkpointing's
recomputation, which passes the same tensor again, is recognised too).
"""

from __future__ import annotations

import torch
from torch import nn

GLOBAL, LOCAL = "global", "local"
_MASKS = "_megajepa_layer_masks"  # the masks of the last packed call, on the CausalLM and its decoder


def local_window_types(config) -> list[str] | None:
    """gpt_neo's layer types (config.attention_layers: 'global' / 'local'), else None."""
    if config.model_type != "gpt_neo":
        return None
    return list(config.attention_layers)


def install(lm: nn.Module) -> None:
    """Give gpt_neo's local layers their packed mask and causal buffer (no-op for other families)."""
    if local_window_types(lm.config) is None or hasattr(lm, _MASKS):
        return
    from megajepa.model.families import decoder_of

    masks: dict = {}
    setattr(lm, _MASKS, masks)
    setattr(decoder_of(lm), _MASKS, masks)
    for module in lm.modules():
        if getattr(module, "attention_type", None) == LOCAL and isinstance(getattr(module, "bias", None), torch.Tensor):
            _hook(module, masks)


def _hook(attention: nn.Module, masks: dict) -> None:
    own = {}

    def before(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is None or masks.get(GLOBAL) is not mask:
            return None
        own["bias"] = module.bias
        module.bias = torch.ones_like(module.bias).tril()  # the window is in the local mask
        return args, {**kwargs, "attention_mask": masks[LOCAL]}

    def after(module, args, kwargs, output):
        if "bias" in own:
            module.bias = own.pop("bias")

    attention.register_forward_pre_hook(before, with_kwargs=True)
    attention.register_forward_hook(after, with_kwargs=True, always_call=True)


def hand_over(model: nn.Module, masks: dict):
    """The one mask the decoder takes (the global layers'), the local layers' kept for their hooks."""
    store = getattr(model, _MASKS, None)
    if store is None:
        raise ValueError(f"{type(model).__name__}: gpt_neo's local layers are not set up (megajepa.model.local_layers.install)")
    store.clear()
    store.update(masks)
    return masks[GLOBAL]
