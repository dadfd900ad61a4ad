"""The training-mode benchmark as every rank runs it.

Every rank draws the same number of micro-batches of raw view pairs once. Each mode packs them with
its layout and builds a fresh engine from the same seed (the same model), then runs `warmup`
untimed and `steps` timed optimizer steps: mode after mode (one engine alive at a time), or a step
of each mode in turn (--order alternate, the default on CPU). Modes (megajepa.bench.modes) differ only in the layout
and the JEPA target: all run megajepa.train.trainer's engine and the one objective.

A step is megajepa.train.step's, the one `megajepa train` runs (its agreement collective
included), timed from a device synchronisation before it to one after the EMA update; per step
the slowest rank's time counts. The teacher's forward and the EMA update are timed inside it
between synchronisations of their own, which training does not have. Packing is not timed: the loader benchmark
measures what the loader delivers.
"""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import statistics
import subprocess
import time

import torch
from deepspeed.accelerator import get_accelerator
from tqdm import tqdm

from megajepa import dist
from megajepa.bench.flops import FlopModel, batch_flops, peak_flops
from megajepa.bench.memory import PeakMemory, model_state_bytes
from megajepa.bench.modes import BenchSettings, mode_config, validate
from megajepa.config import Config, precision
from megajepa.bench.reference_layouts import REFERENCE_LAYOUTS, pack_reference
from megajepa.data.layout import SEG_PAD, Layout
from megajepa.bench.loader import loader_throughput
from megajepa.train.setup import RunStart, build_engine, start_run, train_loader
from megajepa.train.deepspeed_json import online_config
from megajepa.train.step import train_step


def pack(mode: str, records: list[dict], layout: Layout, max_length: int) -> dict:
    if mode in REFERENCE_LAYOUTS:
        return pack_reference(
            records, layout.data, layout.jepa, layout.pred_token_ids, layout.pad_token_id, mode, max_length
        )
    return layout(records)


def draw_pairs(cfg: Config, layout: Layout, tokenizer, count: int) -> list[list[dict]]:
    """`count` micro-batches of raw pairs for this rank, read once and shared by every mode."""
    loader = train_loader(cfg.data, layout, tokenizer)
    batches: list[list[dict]] = []
    current: list[dict] = []
    while len(batches) < count:
        for sample in loader.dataset:  # this rank's share of one epoch
            current.append(sample)
            if len(current) == cfg.data.pairs_per_batch:
                batches.append(current)
                current = []
                if len(batches) == count:
                    break
    return batches


def _batch_counts(batch: dict, flop_model: FlopModel) -> list[float]:
    """pairs, useful tokens, computed slots, segment (non-padding) tokens, trained and teacher FLOPs."""
    segments = int((batch["segment"] != SEG_PAD).sum())
    if "teacher_segment" in batch:
        segments += int((batch["teacher_segment"] != SEG_PAD).sum())
    flops = batch_flops(batch, flop_model)
    return [
        int(batch["num_pairs"]),
        int(batch["useful_tokens"]),
        int(batch["computed_tokens"]),
        segments,
        flops["trained"],
        flops["teacher"],
    ]


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "all": values}


class ModeRun:
    """One mode on this rank: its packed batches, a fresh engine (and teacher), its measurements."""

    def __init__(self, mode: str, cfg: Config, settings: BenchSettings, start: RunStart, pairs):
        self.mode, self.cfg, self.settings = mode, cfg, settings
        mcfg = mode_config(cfg, mode, settings.warmup + settings.steps)
        layout = Layout(mcfg.data, mcfg.jepa, start.pred_ids, start.pad_id)
        self.batches = [pack(mode, p, layout, settings.max_length) for p in pairs]
        self.engine, self.teacher = build_engine(mcfg, start.tokenizer, online_config(mcfg, start.world))
        self.device = self.engine.device
        self.flop_model = FlopModel.of(self.engine.module)
        self.done = 0  # optimizer steps taken
        self.step_seconds: list[float] = []
        self.cpu_seconds: list[float] = []  # this process's CPU time per step: steadier on a shared CPU
        self.teacher_seconds: list[float] = []  # teacher forwards, per step
        self.ema_seconds: list[float] = []
        self.first_step = [0.0, 0.0]  # CE and JEPA loss of the first step (mean over its micro-batches)
        self.peak_bytes = 0

    def step(self, peak: PeakMemory) -> None:
        """One optimizer step of megajepa.train.step, timed from a device synchronisation before
        it to one after it (the EMA update included)."""
        accelerator, accum, step = get_accelerator(), self.cfg.optim.grad_accum, self.done
        sections = {"teacher": 0.0, "ema": 0.0}

        @contextlib.contextmanager
        def section(name: str):
            accelerator.synchronize()
            start = time.perf_counter()
            yield
            accelerator.synchronize()
            sections[name] += time.perf_counter() - start

        peak.reset()
        accelerator.synchronize()
        start, cpu_start = time.perf_counter(), time.process_time()
        result = train_step(
            self.engine, self.teacher, self.batches[step * accum : (step + 1) * accum], step, section=section,
            accumulate=self.cfg.optim.accumulate,
        )
        accelerator.synchronize()
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        if not result.updated:
            raise RuntimeError(f"bench {self.mode}: step {step + 1}: the loss is not finite")
        self.peak_bytes = max(self.peak_bytes, peak.peak())
        if step == 0:
            self.first_step = [result.ce.item(), result.jepa.item()]
        if step >= self.settings.warmup:
            self.step_seconds.append(elapsed)
            self.cpu_seconds.append(cpu)
            self.teacher_seconds.append(sections["teacher"])
            self.ema_seconds.append(sections["ema"])
        self.done += 1

    def close(self) -> dict:
        """Tear the engines down; every figure reduced over the ranks."""
        state = model_state_bytes(self.engine, self.teacher)
        self.engine.destroy()
        if self.teacher is not None:
            self.teacher.engine.destroy()
        self.engine = self.teacher = None
        gc.collect()
        get_accelerator().empty_cache()

        device, world = self.device, dist.world_size()
        timed = self.batches[self.settings.warmup * self.cfg.optim.grad_accum :]
        counts = [sum(column) for column in zip(*(_batch_counts(b, self.flop_model) for b in timed))]
        pairs, useful, computed, segments, trained, teacher_flops = dist.reduce_values(counts, "sum")
        step_seconds = dist.reduce_values(self.step_seconds, "max")
        cpu_seconds = dist.reduce_values(self.cpu_seconds, "max")
        teacher_seconds = dist.reduce_values(self.teacher_seconds, "max")
        ema_seconds = dist.reduce_values(self.ema_seconds, "max")
        state_keys = sorted(state)
        state_max = dist.reduce_values([state[k] for k in state_keys] + [self.peak_bytes], "max")
        first_step = [v / world for v in dist.reduce_values(self.first_step, "sum")]

        median = statistics.median(step_seconds)
        steps = len(step_seconds)
        pairs_per_step = pairs / steps
        tflops = (trained + teacher_flops) / steps / median / world / 1e12
        peak_device = peak_flops(_device_name(device), precision(self.cfg))
        with_teacher = self.mode == "jepa-ema"
        return {
            "step_seconds": _spread(step_seconds),
            "cpu_seconds": None if device.type == "cuda" else _spread(cpu_seconds),
            "pairs_per_step": pairs_per_step,
            "useful_tokens_per_step": useful / steps,
            "computed_tokens_per_step": computed / steps,
            "segment_tokens_per_step": segments / steps,
            "padding_fraction": 1.0 - segments / computed,
            "seconds_per_pair": median / pairs_per_step,
            "pairs_per_s": pairs_per_step / median,
            "pairs_per_s_per_rank": pairs_per_step / median / world,
            "computed_tokens_per_s": computed / steps / median,
            "useful_tokens_per_s": useful / steps / median,
            "teacher_forward_seconds": statistics.median(teacher_seconds) if with_teacher else None,
            "ema_update_seconds": statistics.median(ema_seconds) if with_teacher else None,
            "flops_per_step": {"trained": trained / steps, "teacher": teacher_flops / steps},
            "tflops_per_rank": tflops,
            "mfu": tflops * 1e12 / peak_device if peak_device else None,
            "peak_memory_bytes": int(state_max[-1]),
            "model_state_bytes": {k: int(v) for k, v in zip(state_keys, state_max)},
            "first_step": {"ce": first_step[0], "jepa": first_step[1]},
        }


def resolved_order(settings: BenchSettings, device: torch.device) -> str:
    if settings.order != "auto":
        return settings.order
    return "sequence" if device.type == "cuda" else "alternate"


def run_modes(cfg: Config, settings: BenchSettings, start: RunStart, pairs, peak, bar) -> dict[str, dict]:
    """Every mode, in sequence (one engine alive at a time) or alternating step by step (all
    engines alive, so that a change in the machine's load falls on every mode alike)."""
    total = settings.warmup + settings.steps

    def begin(mode: str) -> ModeRun:
        bar.set_description(f"bench: building {mode}")
        return ModeRun(mode, cfg, settings, start, pairs)

    def step(run: ModeRun) -> None:
        bar.set_description(f"bench {run.mode}")
        run.step(peak)
        bar.update()

    results = {}
    if resolved_order(settings, peak.device) == "sequence":
        for mode in settings.modes:
            run = begin(mode)
            for _ in range(total):
                step(run)
            results[mode] = run.close()
        return results
    runs = [begin(mode) for mode in settings.modes]
    for _ in range(total):
        for run in runs:
            step(run)
    return {run.mode: run.close() for run in runs}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores: {platform.processor() or platform.machine()})"


def _versions() -> dict:
    import deepspeed
    import numpy
    import streaming
    import transformers
    import triton

    import megajepa

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=os.path.dirname(os.path.abspath(megajepa.__file__)),
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "transformers": transformers.__version__,
        "triton": triton.__version__,
        "mosaicml-streaming": streaming.__version__,
        "numpy": numpy.__version__,
        "megajepa": getattr(megajepa, "__version__", None),
        "git_commit": commit,
    }


def _loader_benchmark(cfg: Config, layout: Layout, tokenizer, batches: int) -> dict:
    stats = loader_throughput(train_loader(cfg.data, layout, tokenizer), batches=batches)
    per_rank = [0.0] * dist.world_size()
    per_rank[dist.rank()] = stats["pairs_per_s"]
    per_rank = dist.reduce_values(per_rank, "sum")
    return {
        "batches": stats["batches"],
        "num_workers": cfg.data.num_workers,
        "pairs_per_s_per_rank": per_rank,
        "padding_fraction": stats["padding_fraction"],
    }


def run(cfg: Config, settings: BenchSettings) -> dict | None:
    """The benchmark on this rank; the results on rank 0, None elsewhere."""
    validate(cfg, settings)
    start = start_run(cfg)
    rank, world = start.rank, start.world
    device = torch.device("cuda", start.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    jepa_config = mode_config(cfg, "jepa", 1)
    jepa_layout = Layout(jepa_config.data, jepa_config.jepa, start.pred_ids, start.pad_id)

    load_before = os.getloadavg()
    loader = None
    if settings.loader_batches > 0:
        loader = _loader_benchmark(cfg, jepa_layout, start.prepared, settings.loader_batches)
    pairs = draw_pairs(cfg, jepa_layout, start.prepared, (settings.warmup + settings.steps) * cfg.optim.grad_accum)
    peak = PeakMemory(device)
    total = len(settings.modes) * (settings.warmup + settings.steps)
    with tqdm(total=total, desc="bench", unit="step", disable=rank != 0, dynamic_ncols=True) as bar:
        modes = run_modes(cfg, settings, start, pairs, peak, bar)
    if rank != 0:
        return None
    return {
        "world_size": world,
        "device": _device_name(device),
        "precision": precision(cfg),
        "order": resolved_order(settings, device),
        "peak_memory_kind": peak.kind,
        "pairs_per_batch": cfg.data.pairs_per_batch,
        "grad_accum": cfg.optim.grad_accum,
        "steps": settings.steps,
        "warmup": settings.warmup,
        "max_length": settings.max_length,
        "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
        "versions": _versions(),
        "loader": loader,
        "modes": modes,
    }
