"""Resuming a run: what a checkpoint records about its run (run_meta), which checkpoint to resume
and whether it may be (choose_resume), and its state put back into the engine, loader and teacher
(Resume.restore). The checks themselves: megajepa.train.resume_policy, megajepa.train.checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megajepa import dist
from megajepa.config import Config, precision, to_dict
from megajepa.data.fingerprint import tokenizer_hash
from megajepa.model.build import architecture_spec
from megajepa.train import checkpoint, elastic, ema_checkpoint, resume_policy


def run_meta(cfg: Config, prepared_tokenizer, tokenizer, world: int) -> dict:
    """What each checkpoint records of its run, checked on resume (megajepa.train.resume_policy);
    call after building the training loader (the data's identity is read where it found it)."""
    return {
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


@dataclass
class Resume:
    point: Optional[checkpoint.ResumePoint]  # None: a fresh run
    schedule_steps: int  # the lr and EMA schedules' length
    saved_world: int  # the world size that wrote `point`
    world: int
    universal: Optional[checkpoint.ResumePoint] = None  # its universal form, when resharding

    @property
    def resharding(self) -> bool:
        return self.point is not None and self.saved_world != self.world

    def engine_config(self, ds_config: dict, rank: int) -> dict:
        """`ds_config`, loading DeepSpeed's universal checkpoint when the world size changed
        (megajepa.train.elastic); every rank calls it."""
        if self.resharding:
            self.universal = elastic.universal_point(self.point, rank)
            ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
        return ds_config

    def restore(self, engine, loader, teacher, rank: int) -> int:
        """Load the checkpoint into the engine, the loader (before it is iterated) and the EMA
        teacher; return the step to start from (0 for a fresh run)."""
        if self.point is None:
            return 0
        client_state = checkpoint.load(engine, self.point, rank=rank, deepspeed_point=self.universal)
        start_step = int(client_state["step"])
        loader.load_state_dict(client_state["loader"])
        if teacher is not None and self.resharding:
            ema_checkpoint.reshard(teacher, self.point, self.saved_world, start_step)
        elif teacher is not None:
            ema_checkpoint.load(teacher, self.point.tag_dir, rank)
        if rank == 0:
            change = f" (world size {self.saved_world} -> {self.world})" if self.resharding else ""
            print(f"resumed from {self.point.tag_dir} at step {start_step}{change}", flush=True)
        return start_step


def choose_resume(cfg: Config, meta: dict, rank: int, world: int) -> Resume:
    """The checkpoint to resume from (or none), after every check that needs no engine; refusals
    raise on every rank (CheckpointMismatch, ResumeRefused)."""
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
    return Resume(point, schedule_steps, saved_world, world)
