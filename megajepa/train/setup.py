"""A run's pieces from the typed config, shared by `megajepa train` and `megajepa bench`:

    run = start_run(cfg)                               # process group, embedded data, tokenizers, pad id
    layout = Layout(cfg.data, cfg.jepa, run.pred_ids, run.pad_id)
    loader = train_loader(cfg.data, layout, run.prepared)   # data.sources / data.shards
    engine, teacher = build_engine(cfg, run.tokenizer, ds_config)
"""

from __future__ import annotations

import copy
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NamedTuple, Optional

import deepspeed
import torch
from transformers import AutoTokenizer

from megajepa import dist
from megajepa.config import Config, DataConfig, precision
from megajepa.data.layout import Layout
from megajepa.data.loader import PairLoader, build_loader, set_stream_env
from megajepa.data.mixture import sources_from_config
from megajepa.data.tokenizer import add_pred_tokens, pad_token_id, pred_token_ids
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


class RunTokenizers(NamedTuple):
    prepared: Any  # the tokenizer as the shards were prepared with it (the loader checks their fingerprint)
    tokenizer: Any  # a copy with the [PRED] tokens added: the model's vocabulary
    pred_ids: list[int]  # their ids


def run_tokenizers(cfg: Config) -> RunTokenizers:
    """data.tokenizer as prepared, and with jepa.k [PRED] tokens when the predictor uses them."""
    if not os.path.isdir(cfg.data.tokenizer):
        raise FileNotFoundError(f"data.tokenizer: no such directory: {cfg.data.tokenizer}")
    prepared = AutoTokenizer.from_pretrained(cfg.data.tokenizer)
    tokenizer = copy.deepcopy(prepared)
    k = cfg.jepa.k if uses_pred_tokens(cfg.jepa.predictor, cfg.jepa.k) else 0
    add_pred_tokens(tokenizer, k)
    return RunTokenizers(prepared, tokenizer, pred_token_ids(tokenizer, k))


@dataclass
class RunStart:
    """What a command that builds engines starts from (start_run)."""

    rank: int
    world: int
    local_rank: int
    prepared: Any  # RunTokenizers' three
    tokenizer: Any
    pred_ids: list[int]
    pad_id: int  # megajepa.data.tokenizer.pad_token_id of the tokenizer


def start_run(cfg: Config, timeout_start: Optional[float] = None) -> RunStart:
    """The process group (timeout_start: train.timeout_start, its collectives' timeout until the
    first step; None: DeepSpeed's default), the embedded data once per node, the tokenizers."""
    dist.quiet_deprecated_collectives()
    rank, world, local_rank = init_distributed(timeout_start)
    if timeout_start is not None:
        dist.set_timeout(timeout_start, "train.timeout_start")
    prepare_embedded(cfg, rank)
    prepared, tokenizer, pred_ids = run_tokenizers(cfg)
    return RunStart(rank, world, local_rank, prepared, tokenizer, pred_ids, pad_token_id(tokenizer))


def _loader_settings(data: DataConfig, layout: Layout, tokenizer) -> dict:
    return dict(
        batch_pairs=data.pairs_per_batch,
        layout=layout,
        tokenizer=tokenizer,
        seed=data.seed,
        pin_memory=torch.cuda.is_available(),  # the step's host-to-device copies then do not block
    )


def train_loader(data: DataConfig, layout: Layout, tokenizer, *, record_ids: bool = False) -> PairLoader:
    """The training data: data.sources (or the data.shards shorthand), mixed by data.mixing, cut by
    data.pairs_per_batch or data.tokens_per_batch, shuffled as data.shuffle says. record_ids: the
    loader keeps each batch's sample ids (data.record_ids_dir)."""
    return build_loader(
        **_loader_settings(data, layout, tokenizer),
        sources=sources_from_config(data),
        mixing=data.mixing,
        tokens_per_batch=data.tokens_per_batch,
        shuffle=data.shuffle,
        num_workers=data.num_workers,
        record_ids=record_ids,
    )


def eval_loader(data: DataConfig, layout: Layout, tokenizer) -> PairLoader:
    """The held-out data: data.eval_shards (a local directory) in order, data.pairs_per_batch records
    a batch, read in the training process."""
    return build_loader(data.eval_shards, **_loader_settings(data, layout, tokenizer), shuffle=False, num_workers=0)


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
