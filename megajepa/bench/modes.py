"""What a benchmark mode is: the config it trains with and the layout it packs (megajepa.bench.run).

    ce           next-token only: the same records packed the same way, no JEPA views
    jepa         the packed single pass of the reference's views (jepa.views=reference), online target
    jepa-shared  the cheaper shared-prefix deviation (jepa.views=shared_prefix), online target
    jepa-ema     the packed pass, the assistant view in teacher rows through the EMA teacher
    ref3         the reference's three padded sequences per record (megajepa.bench.reference_layouts)
    ref2         its additive-mask layout, two padded sequences per record
    stp          Semantic Tube Prediction (jepa.objective=stp, the config's jepa.stp.*): the ce rows
                 themselves, the latent term read from their hidden states (ideal cost: ce's)
    jepa-sigreg  jepa with jepa.regularizer=sigreg (its cost: the projections, one all-reduce of
                 2 x 2 x projections x 17 sums per micro-batch); not among the default modes
    jepa-vicreg  jepa with jepa.regularizer=vicreg (d x d outer products in float64, all-reduced);
                 not among the default modes

Light on imports, so that the command line parses without loading torch.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from megajepa.config import Config

DEFAULT_MODES = ("ce", "jepa", "jepa-shared", "jepa-ema", "ref3", "ref2", "stp")
MODES = (*DEFAULT_MODES, "jepa-sigreg", "jepa-vicreg")
ORDERS = ("auto", "sequence", "alternate")


@dataclass
class BenchSettings:
    modes: tuple[str, ...] = DEFAULT_MODES
    steps: int = 5
    warmup: int = 2
    max_length: int = 512  # the reference layouts' padded sequence length
    loader_batches: int = 20  # 0: no loader benchmark
    # sequence: one engine alive at a time (per-mode peak memory); alternate: a step of each mode
    # in turn, all engines alive (fair under a changing machine load; peaks include the others');
    # auto: sequence on GPU, alternate on CPU, where other processes share the cores
    order: str = "auto"


def mode_config(cfg: Config, mode: str, total_steps: int) -> Config:
    """`cfg` for one mode: only the JEPA target (or no JEPA term, for ce) changes."""
    if mode not in MODES:
        raise ValueError(f"bench: unknown mode {mode!r} (one of {', '.join(MODES)})")
    cfg = copy.deepcopy(cfg)
    if mode == "ce":
        cfg.jepa.lambda_ = 0.0
    elif mode == "stp":
        cfg.jepa.objective, cfg.jepa.target = "stp", "online"
    else:
        cfg.jepa.target = "ema" if mode == "jepa-ema" else "online"
        cfg.jepa.views = "shared_prefix" if mode == "jepa-shared" else "reference"
        if mode in ("jepa-sigreg", "jepa-vicreg"):
            cfg.jepa.regularizer = mode.split("-")[1]
    cfg.train.steps = total_steps
    cfg.logging.tensorboard = cfg.logging.csv = False
    return cfg


def validate(cfg: Config, settings: BenchSettings) -> None:
    if settings.steps < 1 or settings.warmup < 0:
        raise ValueError(f"--steps must be >= 1 and --warmup >= 0, got {settings.steps} and {settings.warmup}")
    unknown = [m for m in settings.modes if m not in MODES]
    if unknown or not settings.modes:
        raise ValueError(f"--modes: unknown or no mode(s) {', '.join(unknown)} (choose from {', '.join(MODES)})")
    if cfg.jepa.lambda_ == 0 and any(m != "ce" for m in settings.modes):
        raise ValueError("jepa.lambda_: the JEPA modes need a latent term, the config sets 0")
    if settings.order not in ORDERS:
        raise ValueError(f"--order must be one of {', '.join(ORDERS)}, got {settings.order!r}")
    if settings.max_length < 1:
        raise ValueError(f"--max-length must be >= 1, got {settings.max_length}")
