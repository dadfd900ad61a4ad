"""The DeepSpeed JSON of the online engine and of the EMA teacher, and the parameter groups,
from the typed config: the one place megajepa speaks DeepSpeed's configuration language.

    online = online_config(cfg, world_size, output_dir)    # deepspeed.initialize(config=online)
    teacher = teacher_config(online)                       # the EMA teacher's engine
    groups = param_groups(model, cfg.optim.weight_decay)

With `deepspeed.config_file` the user's JSON is the base; only the batch sizes, the monitors and
the scheduler are filled in where it has none. The derived ZeRO settings depend on the device:
on CUDA communication overlaps compute (`overlap_comm`, buckets sized from the model's width, as
Hugging Face's DeepSpeed integration sizes them); on the CPU accelerator (gloo, the tests) it
does not, as there are no side streams to overlap on.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any, Optional

import torch

from megajepa.config import Config, ConfigError, precision
from megajepa.model.build import architecture_spec

# Sections that make no sense for an engine that never steps.
TRAINING_ONLY_SECTIONS = ("optimizer", "scheduler", "tensorboard", "csv_monitor", "wandb", "comet")


def _user_config(path: str) -> dict:
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON: {err}") from None


def _hidden_size(cfg: Config) -> Optional[int]:
    spec = architecture_spec(cfg.model)
    size = spec.get("hidden_size", spec.get("text_config", {}).get("hidden_size"))
    return int(size) if size else None


def zero_config(cfg: Config, cuda: bool, hidden_size: Optional[int]) -> dict[str, Any]:
    """zero_optimization for the online engine."""
    zero: dict[str, Any] = {
        "stage": cfg.deepspeed.zero_stage,
        "contiguous_gradients": True,
        "overlap_comm": cuda if cfg.deepspeed.overlap_comm is None else cfg.deepspeed.overlap_comm,
    }
    if cuda and hidden_size:
        zero["reduce_bucket_size"] = hidden_size * hidden_size
        if cfg.deepspeed.zero_stage == 3:
            zero["stage3_prefetch_bucket_size"] = int(0.9 * hidden_size * hidden_size)
    if cfg.deepspeed.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = cfg.deepspeed.param_persistence_threshold
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    if cfg.deepspeed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if cfg.deepspeed.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return zero


def _derived_config(cfg: Config, world_size: int, cuda: bool) -> dict[str, Any]:
    prec = precision(cfg)
    return {
        "train_micro_batch_size_per_gpu": cfg.data.pairs_per_batch,
        "gradient_accumulation_steps": cfg.optim.grad_accum,
        "train_batch_size": cfg.data.pairs_per_batch * cfg.optim.grad_accum * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": cfg.optim.lr,
                "betas": [cfg.optim.beta1, cfg.optim.beta2],
                "eps": cfg.optim.eps,
                "weight_decay": cfg.optim.weight_decay,
                # torch's AdamW, fused on CUDA: DeepSpeed's FusedAdam and CPU Adam JIT-compile a
                # C++/CUDA op at the first engine build (nvcc, a matching CUDA major, the arch list
                # parsed: it fails on torch's '9.0a'), where torch's kernels ship built.
                "torch_adam": True,
                **({"fused": True} if cuda else {}),
            },
        },
        "bf16": {"enabled": prec == "bf16"},
        "fp16": {"enabled": prec == "fp16"},
        "zero_optimization": zero_config(cfg, cuda, _hidden_size(cfg)),
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def online_config(
    cfg: Config,
    world_size: int,
    output_dir: Optional[str] = None,
    cuda: Optional[bool] = None,
    schedule_steps: Optional[int] = None,
) -> dict[str, Any]:
    """The online engine's JSON: the user's file or derived (the batch unit is one view pair:
    micro-batch = data.pairs_per_batch), with our monitors under output_dir/logs and our
    warm-up + cosine schedule over `schedule_steps` (default train.steps) where it sets none."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if cfg.deepspeed.config_file is not None:
        ds = _user_config(cfg.deepspeed.config_file)
        ds.setdefault("train_micro_batch_size_per_gpu", cfg.data.pairs_per_batch)
        ds.setdefault("gradient_accumulation_steps", cfg.optim.grad_accum)
    else:
        ds = _derived_config(cfg, world_size, cuda)
    logs = os.path.join(output_dir or cfg.train.output_dir, "logs")
    ds.setdefault("tensorboard", {"enabled": cfg.logging.tensorboard, "output_path": logs, "job_name": "tb"})
    ds.setdefault("csv_monitor", {"enabled": cfg.logging.csv, "output_path": logs, "job_name": "csv"})
    ds.setdefault(
        "scheduler",
        {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": schedule_steps or cfg.train.steps,
                "warmup_num_steps": max(1, cfg.optim.warmup_steps),
                "warmup_type": "linear",
                "cos_min_ratio": cfg.optim.min_lr_ratio,
            },
        },
    )
    return ds


def teacher_config(online: dict) -> dict:
    """The online JSON made fit for the EMA teacher (megajepa.jepa.ema_target):

    - no optimizer, scheduler or monitors: it never steps;
    - no persistent parameters: a persistent parameter keeps a full copy that only an optimizer
      step refreshes, so the teacher would go on reading stale weights;
    - overlap_comm off: DeepSpeed then all-gathers on the compute stream, the stream the EMA
      update writes the teacher's partitions on, so every forward reads the latest update without
      a host synchronisation (with overlap_comm it gathers on a side stream that does not wait);
    - no hpZ (zero_hpz_partition_size 1), for the same reason as persistence: its secondary
      copies of each partition are refreshed by an optimizer step only;
    - below ZeRO-3 it runs replicated (stages 1 and 2 shard optimizer state, which it has none of).
    """
    ds = copy.deepcopy(online)
    for section in TRAINING_ONLY_SECTIONS:
        ds.pop(section, None)
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage", 0) == 3:
        zero.pop("param_persistence_threshold", None)  # the same field as the stage3_ alias
        zero["stage3_param_persistence_threshold"] = 0
        zero.pop("offload_optimizer", None)
        zero["overlap_comm"] = False
        zero["zero_hpz_partition_size"] = 1  # hpZ's secondary copies, too, only an optimizer step refreshes
    else:
        ds["zero_optimization"] = {"stage": 0}
    return ds


def _ndim(param: torch.nn.Parameter) -> int:
    """Dimensions of the full parameter (ZeRO-3 leaves an empty local tensor and ds_shape)."""
    return len(getattr(param, "ds_shape", param.shape))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """The optimizer's groups: no weight decay on norms, biases and other 1-D parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if _ndim(p) >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if _ndim(p) < 2], "weight_decay": 0.0},
    ]
