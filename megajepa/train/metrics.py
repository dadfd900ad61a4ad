"""Per-step metrics: reduced across ranks, written through DeepSpeed's monitor (tensorboard, csv),
to metrics.jsonl (for summaries and tests) and onto a tqdm bar on rank 0.

A value is a Python number or a 0-d device tensor (a loss): device values are summed on the device
and, with the host values, reduced across ranks in one collective and read once per logging step,
so a step that does not log never waits for the device. The collapse figures (megajepa.jepa.collapse)
are those of the logged step's global batch: its statistics ride in the same collective."""

from __future__ import annotations

import json
import os
import time
from typing import Optional

import torch
from tqdm import tqdm

from megajepa import dist
from megajepa.config import LoggingConfig
from megajepa.data.mixture import SOURCE_PREFIX, with_source_ce
from megajepa.jepa import collapse

# summed across ranks (so are the per-source figures, source/...); the rest are averaged
SUMMED = ("computed_tokens", "useful_tokens", "pairs")


def summed(key: str) -> bool:
    return key in SUMMED or key.startswith(SOURCE_PREFIX)


class MetricsLogger:
    def __init__(self, engine, output_dir: str, total_steps: int, start_step: int, logging: LoggingConfig):
        """logging: its log_every and progress (tensorboard and csv are the engine's monitors)."""
        self.engine = engine
        self.rank = dist.rank()
        self.world = dist.world_size()
        self.log_every = logging.log_every
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.history: list[dict] = []
        self.bar: Optional[tqdm] = None
        if self.rank == 0:
            os.makedirs(output_dir, exist_ok=True)
            if logging.progress:
                self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        self.device = engine.device
        self._window_start = time.perf_counter()
        self._window: dict[str, float | torch.Tensor] = {}
        self._window_steps = 0
        self._collapse: Optional[torch.Tensor] = None  # the latest step's collapse statistics
        self._collapsed = False  # the last logged verdict, to say so when it changes

    def step(
        self, step: int, values: dict[str, float | torch.Tensor], always: bool = False,
        collapse_statistics: Optional[torch.Tensor] = None,
    ) -> Optional[dict]:
        """Accumulate one optimizer step; every log_every steps reduce, write and return the row.
        collapse_statistics: this step's megajepa.jepa.collapse.statistics on this rank."""
        if collapse_statistics is not None:
            self._collapse = collapse_statistics
        for key, value in values.items():
            value = value.detach().to(torch.float64) if torch.is_tensor(value) else float(value)
            self._window[key] = self._window.get(key, 0.0) + value
        self._window_steps += 1
        if self.bar is not None:
            self.bar.update(1)
        if not always and step % self.log_every != 0:
            return None
        return self.flush(step)

    def flush(self, step: int) -> Optional[dict]:
        if self._window_steps == 0:
            return None
        on_device = sorted(k for k, v in self._window.items() if torch.is_tensor(v))
        on_host = sorted(k for k in self._window if k not in on_device)
        keys = on_device + on_host
        # one copy to the device, one collective, one read back
        host = torch.tensor([self._window[k] for k in on_host], dtype=torch.float64).to(self.device)
        local = torch.cat([torch.stack([self._window[k] for k in on_device]).to(self.device), host]) if on_device else host
        stats = self._collapse
        if stats is not None:
            local = torch.cat([local, stats.to(self.device, torch.float64)])
        totals = dist.all_reduce(local).tolist()
        if stats is not None:
            totals, stats = totals[: len(keys)], totals[len(keys) :]
        elapsed = time.perf_counter() - self._window_start
        row = {"step": step}
        for key, total in zip(keys, totals):
            row[key] = total / self._window_steps if summed(key) else total / (self._window_steps * self.world)
        row = with_source_ce(row)
        if stats is not None:
            row.update({k: v for k, v in collapse.figures(stats).items() if v is not None})
        for key in SUMMED:
            if key in row:
                row[f"{key}_per_s"] = row[key] * self._window_steps / elapsed
        row["step_seconds"] = elapsed / self._window_steps
        self._window, self._window_steps, self._collapse = {}, 0, None
        self._window_start = time.perf_counter()
        if self.rank == 0:
            self._say_collapse(row)
            self.history.append(row)
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
            monitor = getattr(self.engine, "monitor", None)
            if monitor is not None and monitor.enabled:
                monitor.write_events([(f"train/{k}", v, step) for k, v in row.items() if k != "step"])
            if self.bar is not None:
                self.bar.set_postfix(
                    loss=f"{row.get('loss', 0):.3f}",
                    ce=f"{row.get('ce', 0):.3f}",
                    jepa=f"{row.get('jepa', 0):.3f}",
                    tok_s=f"{row.get('computed_tokens_per_s', 0):.0f}",
                )
        return row

    def _say_collapse(self, row: dict) -> None:
        """A line in the log when the embeddings collapse, and when they recover."""
        if "collapsed" not in row or bool(row["collapsed"]) == self._collapsed:
            return
        self._collapsed = bool(row["collapsed"])
        line = f"step {row['step']}: z_a / z_b {collapse.verdict(row)}"
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def write_eval(self, step: int, results: dict) -> None:
        """Held-out figures (already reduced across ranks) to eval.jsonl and the monitor."""
        if self.rank != 0:
            return
        with open(os.path.join(os.path.dirname(self.path), "eval.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, **results}) + "\n")
        monitor = getattr(self.engine, "monitor", None)
        if monitor is not None and monitor.enabled:
            monitor.write_events([(f"eval/{k}", v, step) for k, v in results.items()])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
