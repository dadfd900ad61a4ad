"""`megajepa train`: the LLM-JEPA objective trained by a DeepSpeed ZeRO-3 engine.

Works as a single process, under torchrun and under the `deepspeed` launcher. Set-up (_set_up):
distributed start, tokenizer and data (megajepa.train.setup) -> resume choice
(megajepa.train.resume) -> engine and teacher -> their state restored. Then the loop (_loop):
step, log, eval, save, stop; and the run's summary.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch

from megajepa import dist
from megajepa.config import Config, precision
from megajepa.data.layout import Layout
from megajepa.data.mixture import source_step_values
from megajepa.files import write_text
from megajepa.model.attention import compiled_graphs
from megajepa.train import elastic, run_lock
from megajepa.train.checkpointer import Checkpointer
from megajepa.train.deepspeed_json import online_config
from megajepa.train.divergence import DivergenceGuard
from megajepa.train.held_out import evaluate
from megajepa.train.metrics import MetricsLogger
from megajepa.train.record_ids import record_step
from megajepa.train.resume import choose_resume, run_meta
from megajepa.train.setup import build_engine, eval_loader, start_run, train_loader
from megajepa.train.step import sync_debug, train_step
from megajepa.train.stop_signal import StopSignal


@dataclass
class Run:
    """The pieces the loop works with."""

    cfg: Config
    rank: int
    world: int
    engine: object
    teacher: object  # the EMA teacher (megajepa.jepa.ema_target) or None
    loader: object
    eval_loader: object  # None without data.eval_shards
    checkpointer: Checkpointer
    start_step: int


def train(cfg: Config) -> dict:
    """Rank 0 holds train.output_dir's run lock (megajepa.train.run_lock) from before any rank
    does work to the end: a second run into the same directory refuses at start."""
    with run_lock.held(cfg.train.output_dir, enabled=elastic.launch_rank_world()[0] == 0):
        run = _set_up(cfg)
        summary = {}
        if run.eval_loader is not None and run.start_step == 0:
            start = evaluate(run.engine, run.teacher, run.eval_loader, cfg.train.eval_batches)
            summary.update({f"start_{k}": v for k, v in start.items() if k != "eval_batches"})
        return _loop(run, summary)


def _set_up(cfg: Config) -> Run:
    elastic.convert_before_start(cfg, *elastic.launch_rank_world())  # no process group yet: no timeout
    start = start_run(cfg, cfg.train.timeout_start)
    os.makedirs(cfg.train.output_dir, exist_ok=True)
    layout = Layout(cfg.data, cfg.jepa, start.pred_ids, start.pad_id)
    loader = train_loader(cfg.data, layout, start.prepared, record_ids=cfg.data.record_ids_dir is not None)
    meta = run_meta(cfg, start.prepared, start.tokenizer, start.world)
    resume = choose_resume(cfg, meta, start.rank, start.world)
    meta["schedule_steps"] = resume.schedule_steps
    ds_config = resume.engine_config(online_config(cfg, start.world, cfg.train.output_dir), start.rank)
    engine, teacher = build_engine(cfg, start.tokenizer, ds_config, resume.schedule_steps)
    start_step = resume.restore(engine, loader, teacher, start.rank)
    resumed_from = resume.point.tag_dir if resume.point is not None else None
    checkpointer = Checkpointer(cfg.train, engine, loader, teacher, meta, start.rank, resumed_from, start_step)
    held_out = eval_loader(cfg.data, layout, start.prepared) if cfg.data.eval_shards else None
    return Run(cfg, start.rank, start.world, engine, teacher, loader, held_out, checkpointer, start_step)


def _loop(run: Run, summary: dict) -> dict:
    cfg, engine, teacher, loader, checkpointer = run.cfg, run.engine, run.teacher, run.loader, run.checkpointer
    logger = MetricsLogger(engine, cfg.train.output_dir, cfg.train.steps, run.start_step, cfg.logging)
    batches, stop = iter(loader), StopSignal()
    guard = DivergenceGuard(cfg.train.max_skipped_steps, precision(cfg))
    stop_requested = False  # agreed across ranks, unlike stop.received
    step = run.start_step
    try:
        while step < cfg.train.steps:
            step_start = time.perf_counter()
            micro_batches = [next(batches) for _ in range(cfg.optim.grad_accum)]
            lr = engine.get_lr()[0]  # this step's: the scheduler moves on to the next one in the step
            with sync_debug(cfg.train.sync_debug if step > run.start_step else "off"):
                result = train_step(
                    # read when the ranks agree, after the step's backward: a signal during it stops after this step
                    engine, teacher, micro_batches, step, flags={"stop": lambda: stop.received is not None},
                    accumulate=cfg.optim.accumulate,
                )
            if step == run.start_step:  # the first step is done: from here on a hung rank is found sooner
                dist.set_timeout(cfg.train.timeout, "train.timeout")
            step += 1
            guard.check_step(step, result, engine, checkpointer.last_good)
            stop_requested = result.flags["stop"]
            values = _step_values(result, engine, loader, lr, time.perf_counter() - step_start)
            logger.step(step, values, always=step == cfg.train.steps, collapse_statistics=result.collapse)
            if cfg.data.record_ids_dir is not None:  # debug only: reads this rank's loss every step
                record_step(cfg.data.record_ids_dir, run.rank, step, loader, result.loss.item())
            if run.eval_loader is not None and cfg.train.eval_every and step % cfg.train.eval_every == 0:
                logger.write_eval(step, evaluate(engine, teacher, run.eval_loader, cfg.train.eval_batches))
            if checkpointer.due(step):
                checkpointer.save(step, guard.healthy)
            if stop_requested:
                stop.announce(step, run.rank)
                break
        checkpointer.finish(step, guard.healthy)
    finally:
        logger.close()
    # the signal number where it arrived here, "another rank" where it arrived elsewhere
    stopped_by = (stop.received or "another rank") if stop_requested else None
    return _summary(run, summary, step, logger.history, stopped_by)


def _step_values(result, engine, loader, lr: float, seconds: float) -> dict:
    """The step's metrics: device values stay on the device until the logger reduces them."""
    grad_norm = engine.get_global_grad_norm()
    values = {
        "computed_tokens": result.counts["computed_tokens"],
        "useful_tokens": result.counts["useful_tokens"],
        "pairs": result.counts["num_pairs"],
        "lr": lr,
        "lambda": result.lambda_,
        # host time: on a GPU the device may still be busy with this step when it is read
        "compute_seconds": seconds,
        "loss": result.loss,
        "ce": result.ce,
        "jepa": result.jepa,
        **result.device_metrics,
        "grad_norm": grad_norm if torch.is_tensor(grad_norm) else float(grad_norm or 0.0),
    }
    if loader.num_sources > 1:
        values.update(source_step_values(loader.source_names, result.source_counts, result.source_ce))
    return values


def _summary(run: Run, summary: dict, step: int, history: list[dict], stopped_by: Optional[object]) -> dict:
    """summary.json: the run's end, its first and last logged rows, the held-out figures."""
    cfg = run.cfg
    logs = os.path.join(cfg.train.output_dir, "logs")
    summary.update(steps=step, world_size=run.world, checkpoint=run.checkpointer.last_good, logs=logs)
    # FlexAttention's kernels: a handful per run; more means shapes recompiling (TORCH_LOGS=recompiles)
    summary["compiled_graphs"] = compiled_graphs()
    if history:
        summary["first"] = history[0]
        summary["last"] = history[-1]
    summary["stopped_by_signal"] = stopped_by
    if run.eval_loader is not None and stopped_by is None:  # the agreed flag: every rank evaluates, or none
        summary.update(evaluate(run.engine, run.teacher, run.eval_loader, cfg.train.eval_batches))
    if run.rank == 0:
        write_text(os.path.join(cfg.train.output_dir, "summary.json"), json.dumps(summary, indent=2, sort_keys=True))
    return summary
