"""`megajepa export`: a DeepSpeed ZeRO checkpoint -> a Hugging Face model directory.

    megajepa export runs/demo/checkpoints/step00000300 --out runs/demo/hf [--weights online|ema]

The output loads with AutoModelForCausalLM.from_pretrained / AutoTokenizer.from_pretrained:

    config.json, generation_config.json, model*.safetensors   the causal LM (`lm.` prefix stripped)
    tokenizer files                                           with its [PRED] tokens and chat template
    predictor.safetensors                                     the mlp / linear head g_phi, if any
    megajepa.json                                             the JEPA settings, for `megajepa eval`

Weights are consolidated by DeepSpeed's own zero_to_fp32. `--weights ema` consolidates the EMA
teacher instead: its per-rank shards (ema_rank{r}.pt, megajepa.train.ema_checkpoint) mirror the
optimizer's fp32 master partitions, so the same merge applies to them. A LoRA run's adapters
(model.lora.rank > 0) are merged into plain weights, W + alpha / r * B @ A
(megajepa.model.lora.merge_lora_weights). The directory appears only when complete (a temporary
sibling, renamed at the end).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

import torch
from deepspeed.utils import zero_to_fp32

from megajepa.config import Config, from_dict, to_dict
from megajepa.data.fingerprint import tokenizer_hash
from megajepa.files import staged_directory
from megajepa.data.tokenizer import add_pred_tokens, chat_template, load_tokenizer, pred_token_ids
from megajepa.model.lora import merge_lora_weights
from megajepa.model.predictor import uses_pred_tokens
from megajepa.train import pickle_guard
from megajepa.train.checkpoint import CHECKPOINT_SUBDIR, incomplete_reason, newest_complete
from megajepa.train.ema_checkpoint import EmaShardsUnusable, consolidate_ema

LM_PREFIX, PREDICTOR_PREFIX = "lm.", "predictor."
PREDICTOR_FILE = "predictor.safetensors"
EXPORT_MODE = 0o644  # an export is read by other users of a shared cluster
JEPA_FILE = "megajepa.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ExportError(RuntimeError):
    pass


@dataclass
class CheckpointInfo:
    tag_dir: str  # .../checkpoints/stepNNNNNNNN
    meta: dict  # meta.json
    config: Config  # the resolved training config (meta.json)

    @property
    def world_size(self) -> int:
        return int(self.meta["world_size"])


def resolve_checkpoint(path: str) -> str:
    """The checkpoint directory for a checkpoint, a checkpoints/ directory or a run's output_dir
    (the last two: its newest complete checkpoint, megajepa.train.checkpoint's marker)."""
    path = os.path.abspath(path.rstrip("/"))
    if os.path.isfile(os.path.join(path, "meta.json")):
        reason = incomplete_reason(path)
        if reason is not None:
            raise ExportError(f"{path}: not a complete checkpoint: {reason}")
        return path
    for parent in (path, os.path.join(path, CHECKPOINT_SUBDIR)):
        tag, skipped = newest_complete(parent)
        if tag is not None:
            return os.path.join(parent, tag)
        if skipped:
            raise ExportError(f"{parent}: no complete checkpoint ({'; '.join(skipped)})")
    raise ExportError(f"{path}: not a megajepa checkpoint (no meta.json, no checkpoints/step*)")


def is_checkpoint(path: str) -> bool:
    try:
        resolve_checkpoint(path)
    except ExportError:
        return False
    return True


def read_checkpoint(path: str) -> CheckpointInfo:
    tag_dir = resolve_checkpoint(path)
    with open(os.path.join(tag_dir, "meta.json")) as f:
        meta = json.load(f)
    if "config" not in meta:
        raise ExportError(f"{tag_dir}/meta.json: no 'config'; not written by this version of megajepa train")
    # zero_to_fp32 unpickles DeepSpeed's files with weights_only=False: refuse planted code first
    try:
        pickle_guard.refuse_unsafe(pickle_guard.torch_files(tag_dir))
    except pickle_guard.UnsafeCheckpointFile as err:
        raise ExportError(str(err)) from None
    return CheckpointInfo(tag_dir, meta, from_dict(meta["config"]))


# ------------------------------------------------------------------------------ consolidation


def consolidate(info: CheckpointInfo, weights: str = "online") -> dict[str, torch.Tensor]:
    """The full fp32 state dict of the JepaModel (keys `lm.*`, `predictor.*`)."""
    if weights not in ("online", "ema"):
        raise ExportError(f"--weights must be online or ema, got {weights!r}")
    load_dir, tag = os.path.split(info.tag_dir)
    if weights == "online":
        return zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(load_dir, tag=tag)
    if info.config.deepspeed.zero_stage != 3:
        raise ExportError(f"{info.tag_dir}: --weights ema supports ZeRO stage 3 checkpoints only")
    try:
        return consolidate_ema(info.tag_dir, info.world_size)
    except EmaShardsUnusable as err:
        raise ExportError(str(err)) from None


def split_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(causal LM weights, predictor head weights), prefixes stripped."""
    lm, predictor = {}, {}
    for key, value in state.items():
        if key.startswith(LM_PREFIX):
            lm[key[len(LM_PREFIX):]] = value
        elif key.startswith(PREDICTOR_PREFIX):
            predictor[key[len(PREDICTOR_PREFIX):]] = value
        else:
            raise ExportError(f"unexpected parameter {key!r}: neither the LM ({LM_PREFIX}) nor the predictor")
    return lm, predictor


# ------------------------------------------------------------------------------------ writing


def export_tokenizer(info: CheckpointInfo, tokenizer_dir: Optional[str]):
    """The training tokenizer (checked against the checkpoint's hash) with its [PRED] tokens."""
    path = tokenizer_dir or info.config.data.tokenizer
    tokenizer = load_tokenizer(path)
    if tokenizer_hash(tokenizer) != info.meta["tokenizer_hash"]:
        raise ExportError(
            f"{path}: not the tokenizer {info.tag_dir} was trained with (hash {tokenizer_hash(tokenizer)[:12]}, "
            f"meta.json has {info.meta['tokenizer_hash'][:12]}); pass --tokenizer with the right one"
        )
    jepa = info.config.jepa
    k = jepa.k if uses_pred_tokens(jepa.predictor, jepa.k) else 0
    add_pred_tokens(tokenizer, k)
    tokenizer.chat_template = chat_template(tokenizer)
    if len(tokenizer) != info.meta["vocab_size"]:
        raise ExportError(f"{path}: {len(tokenizer)} tokens with [PRED], the checkpoint has {info.meta['vocab_size']}")
    return tokenizer, pred_token_ids(tokenizer, k)


def _save_lm(lm_state: dict, info: CheckpointInfo, tokenizer, dtype: torch.dtype, out: str) -> None:
    from transformers import AutoModelForCausalLM, GenerationConfig

    from megajepa.model.build import load_architecture

    config = load_architecture(info.config.model, len(tokenizer), tokenizer.pad_token_id)
    config.vocab_size = max(config.vocab_size, len(tokenizer))  # build_model grows, never shrinks
    config.use_cache = True
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    with torch.device("meta"):  # no second copy of the weights: the consolidated tensors are assigned
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=info.config.model.trust_remote_code)
    if info.config.model.lora.rank > 0:  # adapters into the plain weights
        lm_state = merge_lora_weights(lm_state, model, info.config.model.lora)
    try:
        model.load_state_dict({k: v.to(dtype) for k, v in lm_state.items()}, strict=True, assign=True)
    except RuntimeError as err:
        raise ExportError(f"{info.tag_dir}: the weights do not fit a {config.model_type} model: {err}") from None
    model.tie_weights()
    model.config.dtype = dtype
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    model.save_pretrained(out, safe_serialization=True)


def export(
    checkpoint: str,
    out: str,
    weights: str = "online",
    dtype: Optional[str] = None,
    tokenizer_dir: Optional[str] = None,
    overwrite: bool = False,
) -> str:
    """Write the HF directory `out` for `checkpoint`; returns `out`. dtype: fp32 | bf16 | fp16,
    default the training precision."""
    from safetensors.torch import save_file

    info = read_checkpoint(checkpoint)
    dtype = dtype or info.meta.get("precision", "fp32")
    if dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    tokenizer, pred_ids = export_tokenizer(info, tokenizer_dir)
    lm_state, predictor_state = split_state_dict(consolidate(info, weights))
    with staged_directory(out, overwrite=overwrite) as staging:
        _save_lm(lm_state, info, tokenizer, DTYPES[dtype], staging)
        tokenizer.save_pretrained(staging)
        if predictor_state:
            save_file({k: v.to(DTYPES[dtype]).contiguous() for k, v in predictor_state.items()},
                      os.path.join(staging, PREDICTOR_FILE))
        with open(os.path.join(staging, JEPA_FILE), "w") as f:
            json.dump(
                {
                    "jepa": to_dict(info.config)["jepa"],
                    "pred_token_ids": pred_ids,
                    "predictor_file": PREDICTOR_FILE if predictor_state else None,
                    "weights": weights,
                    "checkpoint": info.tag_dir,
                    "step": info.meta.get("step"),
                },
                f,
                indent=2,
                sort_keys=True,
            )
        for name in os.listdir(staging):  # readable by all, as plain files are: some writers make them 0600
            os.chmod(os.path.join(staging, name), EXPORT_MODE)
    return out
