"""A run's pieces from the typed config, shared by `megajepa train` and `megajepa bench`:

    rank, world, local_rank = init_distributed()      # under any launcher, or a 1-process group
    prepare_embedded(cfg, rank)                       # the embedded default data, built once
    prepared, tokenizer, pred_ids = load_tokenizer(cfg)
    loader = config_loader(cfg, None, layout, prepared)   # data.sources / data.shards
    engine, teacher = build_engine(cfg, tokenizer, ds_config)
"""

from __future__ import annotations

import copy
import os
import socket
from datetime import timedelta
from typing import Optional

import deepspeed
import torch
from transformers import AutoTokenizer

from megajepa import dist
from megajepa.config import Config, precision
from megajepa.data.layout import Layout
from megajepa.data.loader import PairLoader, build_loader, set_stream_env
from megajepa.data.mixture import sources_from_config
from megajepa.data.tokenizer import add_pred_tokens, pred_token_ids
from megajepa.jepa.objective import JepaModel
from megajepa.model.build import build_model
from megajepa.model.predictor import uses_pred_tokens
from megajepa.train.deepspeed_json import param_groups, teacher_config
from megajepa.train.lr_schedule import lr_scheduler

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout: Optional[float] = None) -> tuple[int, int, int]:
    """(rank, world size, local rank), starting a 1-process group when no launcher did; `timeout`:
    its collectives' timeout in seconds (train.timeout_start; None: DeepSpeed's default)."""
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" in os.environ:  # plain mpirun
        os.environ.update(
            RANK=os.environ["OMPI_COMM_WORLD_RANK"],
            WORLD_SIZE=os.environ["OMPI_COMM_WORLD_SIZE"],
            LOCAL_RANK=os.environ["OMPI_COMM_WORLD_LOCAL_RANK"],
            LOCAL_WORLD_SIZE=os.environ["OMPI_COMM_WORLD_LOCAL_SIZE"],
        )
        if "MASTER_ADDR" not in os.environ:
            raise RuntimeError("under mpirun set MASTER_ADDR and MASTER_PORT (or use launch/deepspeed.sh)")
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    set_stream_env()
    if not dist.is_initialized():
        options = {} if timeout is None else {"timeout": timedelta(seconds=timeout)}
        deepspeed.init_distributed(verbose=False, **options)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    return dist.rank(), dist.world_size(), local_rank


def prepare_embedded(cfg: Config, rank: int) -> None:
    """Generate and prepare the embedded default data once per node: each node's first rank builds
    it (a node's own disk, e.g. a container's, has none of the others'), the others wait. Nodes
    that share the directory take turns on its file lock and find it built."""
    if cfg.data.embedded is None:
        return
    if int(os.environ.get("LOCAL_RANK", rank)) == 0:
        from megajepa.data.embedded import ensure_embedded

        ensure_embedded(cfg.data.embedded, max_length=cfg.data.max_length)
    dist.barrier()


def load_tokenizer(cfg: Config):
    """(the tokenizer as the shards were prepared with it, a copy with the [PRED] tokens added,
    their ids). The loader checks the shards' fingerprint against the first."""
    if not os.path.isdir(cfg.data.tokenizer):
        raise FileNotFoundError(f"data.tokenizer: no such directory: {cfg.data.tokenizer}")
    prepared = AutoTokenizer.from_pretrained(cfg.data.tokenizer)
    tokenizer = copy.deepcopy(prepared)
    k = cfg.jepa.k if uses_pred_tokens(cfg.jepa.predictor, cfg.jepa.k) else 0
    add_pred_tokens(tokenizer, k)
    return prepared, tokenizer, pred_token_ids(tokenizer, k)


def config_loader(cfg: Config, shards: str, layout: Layout, tokenizer, **options) -> PairLoader:
    """build_loader with this config's data settings; `options` override them (eval: in order).

    shards None or data.shards: the training data (data.sources or the data.shards shorthand, with
    data.mixing and data.tokens_per_batch); another directory (eval) is read on its own, by count."""
    settings = dict(
        batch_pairs=cfg.data.pairs_per_batch,
        layout=layout,
        tokenizer=tokenizer,
        shuffle=cfg.data.shuffle,
        seed=cfg.data.seed,
        num_workers=cfg.data.num_workers,
        pin_memory=torch.cuda.is_available(),  # the step's host-to-device copies then do not block
    )
    if shards in (None, cfg.data.shards):
        settings.update(
            sources=sources_from_config(cfg.data), mixing=cfg.data.mixing, tokens_per_batch=cfg.data.tokens_per_batch
        )
    else:
        settings.update(shards=shards, remote=cfg.data.remote)
    return build_loader(**{**settings, **options})


def build_engine(cfg: Config, tokenizer, ds_config: dict, schedule_steps: Optional[int] = None):
    """(the online DeepSpeed engine, its EMA teacher or None): the teacher exists with target: ema
    and lambda > 0. Both are built from the same seed, so every call gives the same model.
    `schedule_steps` is the learning-rate and EMA momentum schedules' length (default train.steps)."""
    dtype = DTYPES[precision(cfg)]
    torch.manual_seed(cfg.train.seed)
    model = JepaModel(build_model(cfg.model, tokenizer, dtype=dtype, ds_config=ds_config, seed=cfg.train.seed), cfg.jepa)
    groups = param_groups(model, cfg.optim.weight_decay)
    # megajepa's schedule unless the user's DeepSpeed JSON sets one (DeepSpeed prefers a client's)
    schedule = None if "scheduler" in ds_config else lr_scheduler(cfg.optim, schedule_steps or cfg.train.steps)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config, lr_scheduler=schedule)
    teacher = None
    if cfg.jepa.target == "ema" and cfg.jepa.lambda_ > 0:
        from megajepa.jepa.ema_target import EmaTeacher

        twin = JepaModel(build_model(cfg.model, tokenizer, dtype=dtype, ds_config=ds_config, seed=cfg.train.seed), cfg.jepa)
        teacher = EmaTeacher(engine, twin, cfg.jepa.ema, schedule_steps or cfg.train.steps, teacher_config(ds_config))
    return engine, teacher
