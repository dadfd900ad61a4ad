"""LoRA (`model.lora.rank` > 0), as the reference's `--lora --lora_rank N`, through peft.

The reference's LoraConfig: rank r, alpha 2r, dropout 0.1, on the q/k/v/o and gate/up/down
projections. peft injects the adapters into the Hugging Face model in place
(`inject_adapter_in_model`, no PeftModel wrapper), so the model keeps its class, its backbone and
its output head, and JepaModel drives it as any other; every other parameter is frozen, so the
optimizer (given the trainable parameters only) holds the adapters alone. Under ZeRO-3 the model is
already partitioned when the adapters are added: they are created whole on every rank from the
same seed, and deepspeed.initialize partitions them like the rest.

Checkpoints hold the frozen base and the adapters (DeepSpeed saves frozen parameters too);
`megajepa export` merges them into plain weights, W + (alpha / r) * B @ A (merge_lora_weights).
"""

from __future__ import annotations

import torch
from torch import nn

from megajepa.config import LORA_TARGETS, LoraConfig

ADAPTER = "default"  # peft's adapter name: keys `<module>.lora_A.default.weight`
ALL_LINEAR = "all-linear"  # peft's shorthand: every Linear / Conv1D but the output head


def scaling(cfg: LoraConfig) -> float:
    return lora_alpha(cfg) / cfg.rank


def lora_alpha(cfg: LoraConfig) -> float:
    return float(cfg.alpha) if cfg.alpha is not None else 2.0 * cfg.rank


def target_modules(model: nn.Module, cfg: LoraConfig):
    """What peft adapts: the configured names the model has; `all-linear` if it has none of the
    reference's default names (another family's naming). A configured list none of whose names
    exists is an error."""
    if cfg.target_modules == [ALL_LINEAR]:
        return ALL_LINEAR
    suffixes = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    present = [name for name in cfg.target_modules if name in suffixes]
    if present:
        return present
    if list(cfg.target_modules) == LORA_TARGETS:
        return ALL_LINEAR
    raise ValueError(
        f"model.lora.target_modules: none of {cfg.target_modules} is a module of {type(model).__name__} "
        f"(it has e.g. {sorted(suffixes - {''})[:12]}); name some of its linear layers or use [{ALL_LINEAR}]"
    )


def apply_lora(model: nn.Module, cfg: LoraConfig, seed: int = 0) -> nn.Module:
    """Inject the adapters into `model` in place (cfg.rank > 0) and freeze everything else."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    peft_config = PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=lora_alpha(cfg),
        lora_dropout=cfg.dropout,
        target_modules=target_modules(model, cfg),
        bias="none",
    )
    torch.manual_seed(seed)  # the same adapter init on every rank
    inject_adapter_in_model(peft_config, model, adapter_name=ADAPTER)
    # With frozen input embeddings the activations entering checkpointed layers would need no
    # grad, and reentrant checkpointing would then drop the adapters' gradients (as the reference).
    model.enable_input_require_grads()
    return model


def merge_lora_weights(state: dict[str, torch.Tensor], model: nn.Module, cfg: LoraConfig) -> dict[str, torch.Tensor]:
    """A plain state dict of `model` (the architecture without adapters) from one with adapters:
    each adapted weight becomes W + scaling * B @ A (transposed for Conv1D layers, which store
    W as [in, out]), the adapter tensors are dropped and `base_layer.` leaves the names."""
    from transformers.pytorch_utils import Conv1D

    scale = scaling(cfg)
    transposed = {name for name, module in model.named_modules() if isinstance(module, Conv1D)}
    merged = {}
    for key, value in state.items():
        if f".lora_A.{ADAPTER}." in key or f".lora_B.{ADAPTER}." in key:
            continue
        if ".base_layer." in key:
            module, param = key.split(".base_layer.")
            key = f"{module}.{param}"
            if param == "weight":
                a = state[f"{module}.lora_A.{ADAPTER}.weight"].float()
                b = state[f"{module}.lora_B.{ADAPTER}.weight"].float()
                delta = scale * (b @ a)
                value = value.float() + (delta.T if module in transposed else delta)
        merged[key] = value
    return merged
