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
import re
from typing import Optional

import torch
from torch import nn

log = logging.getLogger(__name__)

# Families whose packed pass tests/test_families.py compares with the model's own forward.
TESTED_FAMILIES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
    "gemma3_text", "phi", "phi3", "olmo", "olmo2", "gpt2", "gpt_neox", "gptj", "opt", "falcon",
    "starcoder2", "granite", "cohere",
    # exact in the generated sweep over transformers' causal-LM mapping (scripts/families_table.py)
    "afmoe", "apertus", "apertus1p5_text", "arcee", "aria_text", "beam", "biogpt", "bitnet", "cohere2", "cohere2_moe", "ctrl", "cwm", "diffllama", "emu3", "ergo", "ernie4_5", "ernie4_5_moe", "exaone", "exaone4", "exaone_moe", "flex_olmo", "flint", "git", "glm", "glm4", "glm4_moe", "gpt-sw3",
    # MoE families exact with their router's load-balancing loss (tests/test_router_aux.py)
    "gpt_oss", "granitemoe", "jetmoe", "olmoe", "phimoe",
    "gpt_neo",  # local layers windowed in positions (megajepa.model.local_layers)
    "gemma3n_text",  # padding fed a token other than the pad id (families.packed_input_ids)
    "xglm",
})
# A composite config (gemma3's image-text Gemma3Config) is verified when the text-only causal LM
# megajepa builds from it is (causal_lm_config, verified).

FULL, SLIDING = "full_attention", "sliding_attention"

_ALIBI_REASON = (
    "its ALiBi attention bias is computed inside the model from a 2D padding mask as offsets within "
    "the whole row, so packed sequences would read each other's positions; transformers offers no "
    "way to pass per-sequence positions or a 4D mask to it"
)


class UnsupportedArchitecture(ValueError):
    """A family the packed pass cannot run exactly. The message names it and says why."""


def text_config(config):
    """The decoder's config: `text_config` of a composite (gemma3's image-text configs), else `config`."""
    try:
        return config.get_text_config(decoder=True)
    except (AttributeError, ValueError):  # several candidate text configs (musicgen): keep the top level
        return config


def verified(config) -> bool:
    """Whether the model megajepa builds for `config` is in the verified matrix."""
    return causal_lm_config(config).model_type in TESTED_FAMILIES


def causal_lm_config(config):
    """The config the text-only causal LM is built from: a composite's text config where that
    has a causal LM of its own (Gemma3Config, Gemma 3 4B/12B/27B -> Gemma3TextConfig ->
    Gemma3ForCausalLM; AutoModelForCausalLM would build the image-text model), else `config`."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    inner = text_config(config)
    if inner is not config and type(inner) in MODEL_FOR_CAUSAL_LM_MAPPING:
        return inner
    return config


# Config keys transformers uses to lay out layers that are not all attention (jamba, zamba, bamba,
# falcon_h1, granitemoehybrid, recurrent_gemma, nemotron_h, ...).
_HYBRID_KEYS = ("layers_block_type", "block_types", "attn_layer_period", "attn_layer_indices", "hybrid_override_pattern")
# Mixer classes that carry state along the sequence (recurrences, scans, linear attention).
_STATEFUL_MIXER = re.compile(r"mamba|rwkv|recurrent|rglru|deltanet|lightning|linearattention|shortconv|lstm", re.I)
_ATTENTION_MODULE = re.compile(r"attention|attn|mla", re.I)
# What the architecture does that neither its config nor its module classes say.
_KNOWN = {
    "cpmant": "it builds its own attention mask from input_ids and ignores the one it is given",
    "doge": "its dynamic mask keeps a learned top-k window of keys over the whole row",
}


def _config_refusal(config) -> Optional[str]:
    kind = config.model_type
    if kind in _KNOWN:
        return f"{kind}: {_KNOWN[kind]}"
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
    hybrid = [key for key in _HYBRID_KEYS if getattr(config, key, None) is not None]
    if hybrid:
        return f"{kind}: layers other than attention (laid out by {', '.join(hybrid)}): state flows across packed sequences"
    return None


def decoder_layers(lm: nn.Module) -> nn.ModuleList:
    """The decoder's stack of layers: the ModuleList of its decoder body nearest the top that has
    num_hidden_layers entries (not an audio or vision tower's)."""
    depth = getattr(text_config(lm.config), "num_hidden_layers", None)
    lists = [
        (name.count("."), name, m) for name, m in decoder_of(lm).named_modules()
        if isinstance(m, nn.ModuleList) and len(m) == depth
    ]
    if not lists:
        raise UnsupportedArchitecture(f"{type(lm).__name__}: no stack of {depth} decoder layers found")
    return min(lists, key=lambda item: item[:2])[2]


def mixer_refusal(lm: nn.Module) -> Optional[str]:
    """Why the decoder layers of `lm` (any device, meta included) are not all attention that the
    packed mask expresses, or None: a convolution or recurrent/state-space mixer in a layer carries
    state from one packed sequence into the next; a layer with no attention module is not attention."""
    kind = lm.config.model_type
    for index, layer in enumerate(decoder_layers(lm)):
        names = [type(m).__name__ for m in layer.modules()]
        for module in layer.modules():
            if isinstance(module, (nn.Conv1d, nn.Conv2d)) or _STATEFUL_MIXER.search(type(module).__name__):
                return (
                    f"{kind}: decoder layer {index} holds {type(module).__name__}, a convolution or "
                    "recurrent mixer along the sequence: state flows across packed sequences"
                )
        if not any(_ATTENTION_MODULE.search(name) for name in names):
            return f"{kind}: decoder layer {index} ({type(layer).__name__}) has no attention module to take the packed mask"
    return None


def refusal(config, allow_unverified: bool = False, trust_remote_code: bool = False) -> Optional[str]:
    """Why the packed pass cannot run this architecture exactly, or None if it can.

    From the config (composites through their text config), then from the model itself, built on
    the meta device: every decoder layer's mixer must be attention. A family outside the verified
    matrix (TESTED_FAMILIES) is refused unless `allow_unverified` (model.allow_unverified_family).
    A composite with a text-only causal LM is judged as that model (causal_lm_config)."""
    config = causal_lm_config(config)
    reason = _config_refusal(config)
    inner = text_config(config)
    if reason is None and inner is not config:
        reason = _config_refusal(inner)
    if reason is not None:
        return reason
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        reason = mixer_refusal(lm)
    except UnsupportedArchitecture as err:
        reason = f"{config.model_type}: {err}"
    except Exception as err:  # noqa: BLE001 - whatever transformers raises, the family is not buildable as given
        reason = f"{config.model_type}: transformers cannot build it as configured ({type(err).__name__}: {err})"
    if reason is not None:
        return reason
    if not verified(config) and not allow_unverified:
        return (
            f"{config.model_type}: not in megajepa's verified matrix (tests/test_families.py compares the "
            "packed pass with the model's own forward); model.allow_unverified_family=true builds it anyway"
        )
    return None


def check_supported(config, allow_unverified: bool = False, trust_remote_code: bool = False) -> None:
    """Raise UnsupportedArchitecture for a family the packed pass would compute wrongly, or one
    outside the verified matrix unless `allow_unverified` (then noted in the log)."""
    reason = refusal(config, allow_unverified, trust_remote_code)
    if reason is not None:
        raise UnsupportedArchitecture(f"model architecture {reason}")
    if not verified(config):
        config = causal_lm_config(config)
        log.warning(
            "model family %r is not in megajepa's verified matrix (tests/test_families.py): its packed "
            "pass has not been compared with the model's own forward (model.allow_unverified_family=true)",
            config.model_type,
        )


def layer_windows(config) -> dict[str, Optional[int]] | Optional[int]:
    """Each layer's sliding window in tokens (None: full causal attention).

    gpt_neo: its 'global' and 'local' layer types (attention_layers), the local ones windowed by
    window_size.

    A mapping layer type -> window for models that mix layer types (their config has
    `layer_types`; transformers then takes a mapping layer type -> mask as attention_mask), else
    the one window every layer uses (mistral, mixtral, phi3, starcoder2, qwen2_moe, qwen3_moe set
    `sliding_window` for all layers; their configs already clear it when `use_sliding_window` is off).
    """
    config = text_config(config)
    if config.model_type == "gpt_neo":  # local layers: megajepa.model.local_layers
        return {kind: (config.window_size if kind == "local" else None) for kind in sorted(set(config.attention_layers))}
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


def packed_input_ids(lm: nn.Module, input_ids: torch.Tensor, sequence: torch.Tensor) -> torch.Tensor:
    """The input ids the decoder gets for packed rows: on padding (sequence 0) a token other than
    the input embedding's padding_idx. A padding token's output is never read, but its gradient
    path is still computed: the padding_idx row is zero, and a family that normalises by the
    embedding's magnitude (gemma3n's AltUp projections: sqrt(mean(x^2)) at 0) turns the zero
    upstream gradient into NaN in every parameter. Any other token's row is nonzero and leaves the
    real tokens exactly as they were (a padding token attends only to itself)."""
    pad = getattr(lm.get_input_embeddings(), "padding_idx", None)
    if pad is None:
        return input_ids
    return torch.where(sequence == 0, (pad + 1) % lm.get_input_embeddings().num_embeddings, input_ids)


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
