"""Build any Hugging Face causal LM, sharded from birth under ZeRO-3.

From an architecture config (random init) or a local pretrained directory. With a live
HfDeepSpeedConfig at ZeRO stage 3, transformers creates the model inside deepspeed.zero.Init and
loads pretrained weights shard by shard, so no rank ever holds the full model.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, Optional

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from megajepa.config import ModelConfig
from megajepa.model.families import (
    UnsupportedArchitecture, attention_implementation, causal_lm_config, check_supported, text_config,
)
from megajepa.model.pretrained import load_partitions, partitioned_loading
from megajepa.model.local_layers import install as install_local_layers
from megajepa.model.router_aux import set_router_aux_coef


def embedding_rows(cfg: ModelConfig, tokenizer_size: int) -> int:
    """The embedding and LM head rows for a tokenizer of `tokenizer_size` tokens: model.vocab_size
    when set (refused if smaller), else the tokenizer's size."""
    if cfg.vocab_size is None:
        return tokenizer_size
    if cfg.vocab_size < tokenizer_size:
        raise ValueError(
            f"model.vocab_size: {cfg.vocab_size} rows cannot hold the tokenizer's {tokenizer_size} tokens "
            "(with its [PRED] tokens); set it >= that, or null"
        )
    return cfg.vocab_size


def load_architecture(cfg: ModelConfig, vocab_size: Optional[int], pad_token_id: Optional[int] = None):
    """The HF config of the model to train, with `vocab_size` rows (None: the config's own).

    A composite (gemma3's image-text config) gives its text config: megajepa trains the text-only
    causal LM (families.causal_lm_config). A config's pad id outside that vocabulary (phi3's
    default 32000 in a resized vocabulary) becomes `pad_token_id` (the tokenizer's) if that one is
    inside it, else None."""
    if cfg.pretrained is not None:
        if not os.path.isdir(cfg.pretrained):
            raise FileNotFoundError(f"model.pretrained: no such directory: {cfg.pretrained}")
        config = AutoConfig.from_pretrained(cfg.pretrained, trust_remote_code=cfg.trust_remote_code)
        if causal_lm_config(config) is not config:
            raise UnsupportedArchitecture(
                f"model.pretrained: {cfg.pretrained} is a composite {config.model_type} checkpoint; megajepa trains "
                "its text-only causal LM, whose weights it does not read from a composite checkpoint: start from "
                "model.config (random init) or a text-only checkpoint"
            )
        return config
    if not os.path.isfile(cfg.config):
        raise FileNotFoundError(f"model.config: no such file: {cfg.config}")
    with open(cfg.config) as f:
        try:
            spec: dict[str, Any] = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{cfg.config}: not valid JSON: {err}") from None
    model_type = spec.pop("model_type", None)
    if model_type is None:
        raise ValueError(f"{cfg.config}: missing 'model_type' (e.g. \"llama\")")
    config = causal_lm_config(AutoConfig.for_model(model_type, **spec))
    inner = text_config(config)  # a composite without a text-only LM keeps rows and pad id there too
    if vocab_size is not None:
        inner.vocab_size = vocab_size
    vocab_size = inner.vocab_size
    if inner.pad_token_id is not None and not 0 <= inner.pad_token_id < vocab_size:
        inside = pad_token_id is not None and 0 <= pad_token_id < vocab_size
        inner.pad_token_id = pad_token_id if inside else None
    return config


def check_architecture(cfg: ModelConfig) -> str:
    """Refuse, from the config alone, a family the packed pass cannot run exactly or an explicit
    model.attention the model lacks (UnsupportedArchitecture naming both): call it before any
    work starts. Returns the attention implementation build_model will use."""
    config = load_architecture(cfg, None)
    check_supported(config, cfg.allow_unverified_family, cfg.trust_remote_code)
    return attention_implementation(cfg.attention, config)


def _without_pad_id(config, build):
    """`build()` with config.pad_token_id cleared, then the pad id put back on the config and the
    input embedding. Under zero.Init post_init runs on already-partitioned (empty) weights, and
    zeroing `weight[padding_idx]` of an empty shard raises IndexError; _initialize_partitioned
    zeroes the row afterwards on the gathered weight."""
    pad = config.pad_token_id
    config.pad_token_id = None
    model = build()
    model.config.pad_token_id = pad
    model.get_input_embeddings().padding_idx = pad
    for module in model.modules():
        if hasattr(module, "padding_idx") and not isinstance(module, torch.nn.Embedding):
            module.padding_idx = pad  # the decoder body keeps a copy of the id
    return model


# Parameters a family's code reads outside its own module's call (module class -> parameter names):
# gemma3n's AltUp.scale_corrected_output calls self.forward directly. ZeRO-3 gathers a module's
# parameters in hooks around its call only, so these are registered as external parameters of the
# module that calls them (DeepSpeed's mechanism for exactly this).
_READ_OUTSIDE_CALL = {"Gemma3nTextAltUp": ("correct_output_scale",)}


def _register_external_parameters(model) -> None:
    import deepspeed

    for parent in model.modules():
        for child in parent.children():
            for name in _READ_OUTSIDE_CALL.get(type(child).__name__, ()):
                deepspeed.zero.register_external_parameter(parent, getattr(child, name))


def _initialize_partitioned(model) -> None:
    """Re-run the model's own weight init on a ZeRO-3 model, one module at a time.

    Under zero.Init every module is partitioned as soon as it is built, so the model's post_init
    ran on empty shards and left PyTorch's defaults (N(0, 1) embeddings: a CE of ~100 at step 0).
    Gathering one module at a time keeps the full model off every rank; rank 0 initialises and
    DeepSpeed scatters the result."""
    import deepspeed

    done: set[int] = set()
    for module in model.modules():
        params = [p for p in module.parameters(recurse=False) if id(p) not in done]
        if not params:
            continue  # a tied head: its weight was initialised as the input embedding (pad row zero)
        done.update(id(p) for p in params)
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            model._init_weights(module)


def architecture_spec(cfg: ModelConfig) -> dict[str, Any]:
    """What identifies the architecture (not the path it was read from), for checkpoint checks."""
    source = cfg.pretrained if cfg.pretrained is not None else cfg.config
    if cfg.pretrained is not None:
        path = os.path.join(cfg.pretrained, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model.pretrained: {source} has no config.json")
    else:
        path = cfg.config
    with open(path) as f:
        spec = json.load(f)
    return {k: v for k, v in spec.items() if k not in ("_name_or_path", "transformers_version", "torch_dtype", "dtype")}


def build_model(
    cfg: ModelConfig,
    tokenizer,
    *,
    dtype: torch.dtype = torch.float32,
    ds_config: Optional[dict] = None,
    seed: int = 0,
):
    """The causal LM for `tokenizer` (whose [PRED] tokens must already be added).

    `ds_config` at ZeRO stage 3 makes construction and loading partitioned. New embedding rows
    (tokens added to a pretrained tokenizer) start at the mean of the existing ones plus a little
    of their covariance (transformers' mean_resizing), not at zero.
    """
    from transformers.integrations import HfDeepSpeedConfig

    zero3 = ds_config is not None and ds_config.get("zero_optimization", {}).get("stage") == 3
    rows = embedding_rows(cfg, len(tokenizer))
    config = load_architecture(cfg, rows, getattr(tokenizer, "pad_token_id", None))
    # Before any weight is built or read, and before the ZeRO-3 context below exists: the check
    # builds the model on the meta device, which zero.Init cannot partition.
    check_supported(config, cfg.allow_unverified_family, cfg.trust_remote_code)
    # transformers consults this (weakly referenced) object while it lives.
    hf_ds_config = HfDeepSpeedConfig(ds_config) if zero3 else None
    impl = attention_implementation(cfg.attention, config)
    torch.manual_seed(seed)  # every rank initialises identically
    common = dict(dtype=dtype, attn_implementation=impl, trust_remote_code=cfg.trust_remote_code)
    if cfg.pretrained is not None and partitioned_loading(cfg.pretrained, zero3):
        # each rank reads only its own partitions of the checkpoint (megajepa.model.pretrained)
        model = _without_pad_id(config, lambda: AutoModelForCausalLM.from_config(config, **common))
        load_partitions(model, cfg.pretrained)
    elif cfg.pretrained is not None:
        model = AutoModelForCausalLM.from_pretrained(cfg.pretrained, config=config, **common)
    elif zero3:
        model = _without_pad_id(config, lambda: AutoModelForCausalLM.from_config(config, **common))
        _initialize_partitioned(model)
    else:
        model = AutoModelForCausalLM.from_config(config, **common)
    if zero3:
        _register_external_parameters(model)
    if model.get_input_embeddings().num_embeddings < rows:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the mean-resizing notice
            model.resize_token_embeddings(rows, mean_resizing=True)
    set_router_aux_coef(model, cfg.router_aux_loss_coef)
    install_local_layers(model)
    if cfg.lora.rank > 0:
        from megajepa.model.lora import apply_lora

        apply_lora(model, cfg.lora, seed)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.config.use_cache = False
    del hf_ds_config
    return model
