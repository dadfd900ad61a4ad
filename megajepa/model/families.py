"""What the packed pass needs to know about a Hugging Face causal-LM family.

The packed pass hands the model a ready-made attention mask, and transformers 4.57 then uses it
unchanged: every per-layer pattern (sliding windows) is ours to build, and position schemes that
the model derives from a 2D padding mask (ALiBi) cannot see the packed sequences at all. This
module says, from the HF config alone, which attention pattern each layer type has, which families
the packed pass cannot run exactly (refused by name, before any work), which attention kernel to
use, and where the decoder body of a CausalLM is.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

log = logging.getLogger(__name__)

# Families whose packed pass tests/test_families.py compares with the model's own forward.
TESTED_FAMILIES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
    "gemma3_text", "phi", "phi3", "olmo", "olmo2", "gpt2", "gpt_neox", "gptj", "opt", "falcon",
    "starcoder2", "granite", "cohere",
})

FULL, SLIDING = "full_attention", "sliding_attention"

_ALIBI_REASON = (
    "its ALiBi attention bias is computed inside the model from a 2D padding mask as offsets within "
    "the whole row, so packed sequences would read each other's positions; transformers offers no "
    "way to pass per-sequence positions or a 4D mask to it"
)


class UnsupportedArchitecture(ValueError):
    """A family the packed pass cannot run exactly. The message names it and says why."""


def refusal(config) -> Optional[str]:
    """Why the packed pass cannot run this architecture exactly, or None if it can."""
    kind = config.model_type
    if kind in ("bloom", "mpt") or (kind == "falcon" and getattr(config, "alibi", False)):
        return f"{kind}{' (alibi=True)' if kind == 'falcon' else ''}: {_ALIBI_REASON}"
    if getattr(config, "alibi", False) or getattr(config, "position_embedding_type", None) == "alibi":
        return f"{kind}: {_ALIBI_REASON}"
    if getattr(config, "use_bidirectional_attention", False):
        return f"{kind}: use_bidirectional_attention=True is not causal; the packed mask is causal"
    if getattr(config, "attention_chunk_size", None) is not None:
        return f"{kind}: chunked attention (attention_chunk_size) is not built into the packed mask"
    unknown = sorted(set(getattr(config, "layer_types", None) or ()) - {FULL, SLIDING})
    if unknown:
        return f"{kind}: layer types {unknown} (only full and sliding-window attention layers are packed)"
    return None


def check_supported(config) -> None:
    """Raise UnsupportedArchitecture for a family the packed pass would compute wrongly; note
    once in the log a family the test matrix has not covered."""
    reason = refusal(config)
    if reason is not None:
        raise UnsupportedArchitecture(f"model architecture {reason}")
    if config.model_type not in TESTED_FAMILIES:
        log.warning(
            "model family %r is not in megajepa's tested matrix (tests/test_families.py): its packed "
            "pass has not been compared with the model's own forward", config.model_type,
        )


def layer_windows(config) -> dict[str, Optional[int]] | Optional[int]:
    """Each layer's sliding window in tokens (None: full causal attention).

    A mapping layer type -> window for models that mix layer types (their config has
    `layer_types`; transformers then takes a mapping layer type -> mask as attention_mask), else
    the one window every layer uses (mistral, mixtral, phi3, starcoder2, qwen2_moe, qwen3_moe set
    `sliding_window` for all layers; their configs already clear it when `use_sliding_window` is off).
    """
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types:
        return {kind: (window if kind == SLIDING else None) for kind in sorted(set(types))}
    return window


def causal_lm_class(config) -> Optional[type]:
    """The transformers class AutoModelForCausalLM builds for `config` (None for remote code)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        return None


_ATTENTION = {"flex": "flex_attention", "sdpa": "sdpa", "eager": "eager"}
_SUPPORT_FLAG = {"flex_attention": "_supports_flex_attn", "sdpa": "_supports_sdpa"}
_announced: set[tuple[str, str]] = set()


def attention_implementation(choice: str, config) -> str:
    """The transformers attn_implementation for `model.attention`.

    `auto`: FlexAttention on CUDA where the model supports it, else SDPA where it does, else eager;
    said once in the log. An explicit choice the model does not support is refused by name."""
    cls = causal_lm_class(config)

    def supports(impl: str) -> bool:
        # Remote code: only what every model can do is assumed.
        return impl == "eager" or (cls is not None and bool(getattr(cls, _SUPPORT_FLAG[impl], False)))

    if choice == "auto":
        if torch.cuda.is_available() and supports("flex_attention"):
            impl = "flex_attention"
        elif supports("sdpa"):
            impl = "sdpa"
        else:
            impl = "eager"
        if (config.model_type, impl) not in _announced:
            _announced.add((config.model_type, impl))
            log.info("model.attention=auto: %s uses %s attention", config.model_type, impl)
        return impl
    impl = _ATTENTION[choice]
    if not supports(impl):
        name = cls.__name__ if cls is not None else f"{config.model_type} (remote code)"
        raise UnsupportedArchitecture(
            f"model.attention={choice}: {name} does not support {impl} in this transformers version; "
            "use model.attention=auto or eager"
        )
    return impl


def decoder_of(lm: nn.Module) -> nn.Module:
    """The decoder body of a CausalLM: the module that maps input_ids (+ position_ids,
    attention_mask) to the final hidden states its LM head reads.

    `lm.base_model` was not it for every family (transformers 4.57's Gemma3ForCausalLM named an
    attribute it did not have, so `base_model` was the CausalLM itself); this looks for the module
    that holds the input embeddings instead, which holds across versions and remote code."""
    candidates = [getattr(lm, "base_model_prefix", "")] + ["model", "transformer", "gpt_neox", "decoder"]
    embeddings = lm.get_input_embeddings()
    for name in candidates:
        body = getattr(lm, name, None) if name else None
        if isinstance(body, nn.Module) and body is not lm and _owns(body, embeddings):
            return body
    raise UnsupportedArchitecture(
        f"{type(lm).__name__}: no decoder body found (tried attributes {candidates}) that holds its input embeddings"
    )


def _owns(module: nn.Module, embeddings: nn.Module) -> bool:
    return any(sub is embeddings for sub in module.modules())
