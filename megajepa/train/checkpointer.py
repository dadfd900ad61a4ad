"""When a run saves (train.save_every, the end) and what: the engine, the loader's position and the
EMA teacher, into train.output_dir (megajepa.train.checkpoint writes them)."""

from __future__ import annotations

from typing import Optional

from megajepa.config import TrainConfig
from megajepa.train import checkpoint, ema_checkpoint


class Checkpointer:
    def __init__(self, train: TrainConfig, engine, loader, teacher, meta: dict, rank: int,
                 resumed_from: Optional[str], start_step: int):
        self.output_dir, self.save_every, self.steps = train.output_dir, train.save_every, train.steps
        self.engine, self.loader, self.teacher, self.meta, self.rank = engine, loader, teacher, meta, rank
        self.last_good = resumed_from  # the newest checkpoint saved while training was healthy
        self.saved_step = start_step if resumed_from is not None else -1

    def due(self, step: int) -> bool:
        """A periodic save after `step` (the last step saves in finish)."""
        return bool(self.save_every) and step % self.save_every == 0 and step < self.steps

    def save(self, step: int, healthy: bool) -> None:
        """Save after `step`; healthy: no optimizer step has been skipped since the last good one."""
        self.saved_step = step
        client_state = {"step": step, "loader": self.loader.state_dict()}
        teacher, rank = self.teacher, self.rank
        extra = (lambda tag_dir, written: ema_checkpoint.save(teacher, tag_dir, rank, written.torch_save)) if teacher is not None else None
        saved = checkpoint.save(self.engine, self.output_dir, step, self.meta, client_state, rank, extra)
        self.last_good = saved if healthy else self.last_good

    def finish(self, step: int, healthy: bool) -> None:
        """The run's last save, unless `step` was just saved."""
        if self.saved_step != step:
            self.save(step, healthy)
