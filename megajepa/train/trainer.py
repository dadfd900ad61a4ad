"""`megajepa train`: the LLM-JEPA objective trained by a DeepSpeed ZeRO-3 engine.

Works as a single process, under torchrun and under the `deepspeed` launcher. Reads top to bottom:
distributed set-up -> data and tokenizer -> model -> engine -> (teacher) -> resume -> loop -> eval.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Optional

import torch

from megajepa import dist
from megajepa.config import Config, precision, to_dict
from megajepa.data.fingerprint import tokenizer_hash
from megajepa.data.layout import Layout
from megajepa.data.mixture import source_step_values
from megajepa.files import write_text
from megajepa.jepa import collapse
from megajepa.model.attention import compiled_graphs
from megajepa.model.build import architecture_spec
from megajepa.train import checkpoint, elastic, ema_checkpoint, resume_policy, run_lock
from megajepa.train.deepspeed_json import online_config
from megajepa.train.divergence import DivergenceGuard
from megajepa.train.metrics import MetricsLogger
from megajepa.train.setup import build_engine, config_loader, init_distributed, load_tokenizer, prepare_embedded
from megajepa.train.step import sync_debug, to_device, train_step


class TrainingDiverged(RuntimeError):
    pass


class StopSignal:
    """SIGTERM / SIGUSR1 (preemption, a Slurm requeue) and SIGINT (Ctrl-C) ask for a checkpoint
    and a clean exit at the end of the current step; ranks agree on it so that they all save
    together. A second Ctrl-C aborts at once (the default SIGINT action), except within
    SIGINT_ECHO_SECONDS of the first: Ctrl-C reaches every process of the terminal's process group,
    torchrun included, and torchrun passes the SIGINT it got on to the ranks, a copy of the same
    Ctrl-C that must not abort the save."""

    SIGINT_ECHO_SECONDS = 2.0

    def __init__(self):
        self.received: Optional[int] = None
        self._first_sigint: Optional[float] = None
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self._first_sigint is not None and now - self._first_sigint > self.SIGINT_ECHO_SECONDS:
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C: abort now
                return
            self._first_sigint = self._first_sigint or now
        self.received = self.received or signum


def record_step(directory: str, rank: int, step: int, loader, loss: float) -> None:
    """Debug record (data.record_ids_dir): the sample ids this rank consumed in `step` and this
    rank's own loss (metrics.jsonl logs the mean over the ranks)."""
    os.makedirs(directory, exist_ok=True)
    ids = [i for batch_ids in loader.recorded_ids for i in batch_ids]
    loader.recorded_ids.clear()
    line = {"step": step, "sample_ids": ids, "loss": loss}
    with open(os.path.join(directory, f"rank{rank}.jsonl"), "a") as f:
        f.write(json.dumps(line) + "\n")


@torch.no_grad()
def evaluate(engine, teacher, loader, batches: int, device) -> dict:
    """Held-out CE and JEPA loss, averaged over `batches` batches per rank and across ranks, and
    the collapse figures (eval_z_a_std, ...) of all those batches' pairs together."""
    engine.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # ce, jepa, batches: read once
    stats = 0.0
    for i, batch in enumerate(loader.iter_epoch()):
        if i >= batches:
            break
        batch = to_device(batch, device)
        target = teacher.encode(batch) if teacher is not None else None
        out = engine(batch, step=10**9, target_embeddings=target)
        totals += torch.stack([out.ce, out.jepa, torch.ones_like(out.ce)]).double()
        stats = stats + collapse.statistics(out.z_a, out.z_b)
    if not torch.is_tensor(stats):  # no batch on this rank: zero pairs of the others' width
        stats = torch.zeros(4 * engine.module.lm.config.hidden_size + 2, dtype=torch.float64, device=device)
    reduced = dist.all_reduce(torch.cat([totals, stats])).tolist()
    ce, jepa, count = reduced[:3]
    engine.train()
    n = max(count, 1.0)
    figures = {f"eval_{k}": v for k, v in collapse.figures(reduced[3:]).items() if v is not None}
    return {"eval_ce": ce / n, "eval_jepa": jepa / n, "eval_batches": int(count), **figures}


def choose_resume(cfg: Config, meta: dict, rank: int, world: int) -> tuple[Optional[checkpoint.ResumePoint], int, int]:
    """(the checkpoint to resume from or None, the lr/EMA schedule length, the world size that
    wrote it), after every check that needs no engine; refusals raise on every rank
    (CheckpointMismatch, ResumeRefused)."""
    if cfg.train.resume == "restart":
        if rank == 0:
            moved = checkpoint.start_over(cfg.train.output_dir)
            if moved:
                print(f"train.resume=restart: moved the previous run's outputs to {moved}", flush=True)
        dist.barrier()
    error: Optional[Exception] = None
    point, schedule_steps, saved_world = None, cfg.train.steps, world
    try:
        point, notes = checkpoint.resolve_resume(cfg.train.resume, cfg.train.output_dir)
        if rank == 0:
            for note in notes:
                print(f"train.resume={cfg.train.resume}: {note}", flush=True)
        if point is not None:
            saved = checkpoint.read_meta(point)
            schedule_steps = resume_policy.check(saved, meta, cfg, point.tag_dir)
            saved_world = int(saved["world_size"])
            checkpoint.check_files(point, rank, saved_world, ema=cfg.jepa.target == "ema" and cfg.jepa.lambda_ > 0)
    except (checkpoint.CheckpointMismatch, resume_policy.ResumeRefused) as err:
        error = err
    # a refusal on any rank (its own files) stops every rank before the engine's collectives
    if dist.agree({"refused": error is not None})["refused"]:
        raise error or checkpoint.CheckpointMismatch(f"{point.tag_dir if point else 'resume'}: refused by another rank")
    return point, schedule_steps, saved_world


def train(cfg: Config) -> dict:
    """Rank 0 holds train.output_dir's run lock (megajepa.train.run_lock) from before any rank
    does work to the end: a second run into the same directory refuses at start."""
    with run_lock.held(cfg.train.output_dir, enabled=elastic.launch_rank_world()[0] == 0):
        return _train(cfg)


def _train(cfg: Config) -> dict:
    dist.quiet_deprecated_collectives()
    elastic.convert_before_start(cfg, *elastic.launch_rank_world())  # no process group yet: no timeout
    rank, world, _ = init_distributed(cfg.train.timeout_start)
    dist.set_timeout(cfg.train.timeout_start, "train.timeout_start")
    output_dir = cfg.train.output_dir
    os.makedirs(output_dir, exist_ok=True)
    prepare_embedded(cfg, rank)

    prepared_tokenizer, tokenizer, pred_ids = load_tokenizer(cfg)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
    layout = Layout(cfg.data, cfg.jepa, pred_ids, pad_id)
    loader = config_loader(
        cfg, cfg.data.shards, layout, prepared_tokenizer, record_ids=cfg.data.record_ids_dir is not None
    )

    meta = {
        "architecture": architecture_spec(cfg.model),
        "tokenizer_hash": tokenizer_hash(prepared_tokenizer),
        "vocab_size": len(tokenizer),
        "world_size": world,
        "predictor": cfg.jepa.predictor,
        "k": cfg.jepa.k,
        "target": cfg.jepa.target,
        "precision": precision(cfg),
        "data": resume_policy.data_identity(cfg),
        "config": to_dict(cfg),
    }
    resume, schedule_steps, saved_world = choose_resume(cfg, meta, rank, world)
    meta["schedule_steps"] = schedule_steps
    resharding = resume is not None and saved_world != world

    ds_config = online_config(cfg, world, output_dir)
    universal = None
    if resharding:  # another world size: DeepSpeed's universal checkpoint (megajepa.train.elastic)
        universal = elastic.universal_point(resume, rank)
        ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    engine, teacher = build_engine(cfg, tokenizer, ds_config, schedule_steps)
    device = engine.device

    start_step, last_good = 0, None
    if resume is not None:
        client_state = checkpoint.load(engine, resume, rank=rank, deepspeed_point=universal)
        last_good = resume.tag_dir
        start_step = int(client_state["step"])
        loader.load_state_dict(client_state["loader"])
        if teacher is not None and resharding:
            ema_checkpoint.reshard(teacher, resume, saved_world, start_step)
        elif teacher is not None:
            ema_checkpoint.load(teacher, last_good, rank)
        if rank == 0:
            change = f" (world size {saved_world} -> {world})" if resharding else ""
            print(f"resumed from {last_good} at step {start_step}{change}", flush=True)

    saved_step = start_step if resume is not None else -1

    def save(step: int) -> str:
        nonlocal saved_step
        saved_step = step
        client_state = {"step": step, "loader": loader.state_dict()}
        extra = (lambda tag_dir, written: ema_checkpoint.save(teacher, tag_dir, rank, written.torch_save)) if teacher is not None else None
        return checkpoint.save(engine, output_dir, step, meta, client_state, rank, extra)

    eval_loader = None
    summary: dict = {}
    if cfg.data.eval_shards:
        eval_loader = config_loader(
            cfg, cfg.data.eval_shards, layout, prepared_tokenizer, remote=None, shuffle=False, num_workers=0
        )
        if start_step == 0:
            start = evaluate(engine, teacher, eval_loader, cfg.train.eval_batches, device)
            summary.update({f"start_{k}": v for k, v in start.items() if k != "eval_batches"})

    logger = MetricsLogger(engine, output_dir, cfg.train.steps, start_step, cfg.logging.log_every, cfg.logging.progress)
    batches = iter(loader)
    stop = StopSignal()
    guard = DivergenceGuard(cfg.train.max_skipped_steps, precision(cfg))
    stop_requested = False  # agreed across ranks, unlike stop.received
    step = start_step
    try:
        while step < cfg.train.steps:
            step_start = time.perf_counter()
            micro_batches = [next(batches) for _ in range(cfg.optim.grad_accum)]
            lr = engine.get_lr()[0]  # this step's: the scheduler moves on to the next one in the step
            with sync_debug(cfg.train.sync_debug if step > start_step else "off"):
                result = train_step(
                    # read when the ranks agree, after the step's backward: a signal during it stops after this step
                    engine, teacher, micro_batches, step, flags={"stop": lambda: stop.received is not None},
                    accumulate=cfg.optim.accumulate,
                )
            if not result.updated:
                loss, ce, jepa = (value.item() for value in (result.loss, result.ce, result.jepa))
                raise TrainingDiverged(
                    f"step {step + 1}: loss is {loss} (ce {ce}, jepa {jepa}); "
                    f"stopped before the update. Last good checkpoint: {last_good or 'none saved yet'}"
                )
            stop_requested = result.flags["stop"]
            if step == start_step:  # the first step is done: from here on a hung rank is found sooner
                dist.set_timeout(cfg.train.timeout, "train.timeout")
            step += 1
            device_values = {"loss": result.loss, "ce": result.ce, "jepa": result.jepa, **result.device_metrics}
            grad_norm = engine.get_global_grad_norm()
            # DeepSpeed skips steps on non-finite gradients; the guard reads whether it did (a host read)
            trouble = guard.check(engine.was_step_applied(), None if grad_norm is None else float(grad_norm))
            if trouble is not None:
                raise TrainingDiverged(f"step {step}: {trouble}. Last good checkpoint: {last_good or 'none saved yet'}")
            device_values["grad_norm"] = grad_norm if torch.is_tensor(grad_norm) else float(grad_norm or 0.0)
            values = {
                "computed_tokens": result.counts["computed_tokens"],
                "useful_tokens": result.counts["useful_tokens"],
                "pairs": result.counts["num_pairs"],
                "lr": lr,
                "lambda": result.lambda_,
                # host time: on a GPU the device may still be busy with this step when it is read
                "compute_seconds": time.perf_counter() - step_start,
                **device_values,
            }
            if loader.num_sources > 1:
                values.update(source_step_values(loader.source_names, result.source_counts, result.source_ce))
            logger.step(step, values, always=step == cfg.train.steps, collapse_statistics=result.collapse)
            if cfg.data.record_ids_dir is not None:  # debug only: reads this rank's loss every step
                record_step(cfg.data.record_ids_dir, rank, step, loader, result.loss.item())
            if eval_loader is not None and cfg.train.eval_every and step % cfg.train.eval_every == 0:
                logger.write_eval(step, evaluate(engine, teacher, eval_loader, cfg.train.eval_batches, device))
            if cfg.train.save_every and step % cfg.train.save_every == 0 and step < cfg.train.steps:
                saved = save(step)
                last_good = saved if guard.healthy else last_good
            if stop_requested:
                if rank == 0:
                    who = f"signal {stop.received}" if stop.received is not None else "a signal to another rank"
                    print(f"stop requested ({who}): checkpointing step {step} and exiting", flush=True)
                break
        if saved_step != step:
            saved = save(step)
            last_good = saved if guard.healthy else last_good
    finally:
        logger.close()

    summary.update(steps=step, world_size=world, checkpoint=last_good, logs=os.path.join(output_dir, "logs"))
    # FlexAttention's kernels: a handful per run; more means shapes recompiling (TORCH_LOGS=recompiles)
    summary["compiled_graphs"] = compiled_graphs()
    if logger.history:
        summary["first"] = logger.history[0]
        summary["last"] = logger.history[-1]
    # the signal number where it arrived here, "another rank" where it arrived elsewhere
    summary["stopped_by_signal"] = (stop.received or "another rank") if stop_requested else None
    if eval_loader is not None and not stop_requested:  # the agreed flag: every rank evaluates, or none
        summary.update(evaluate(engine, teacher, eval_loader, cfg.train.eval_batches, device))
    if rank == 0:
        write_text(os.path.join(output_dir, "summary.json"), json.dumps(summary, indent=2, sort_keys=True))
    return summary
