"""`megajepa bench CONFIG [key=value ...] [options]`: the training modes side by side.

Two ways to run it:

  - as a plain command (no RANK in the environment), it launches itself: one torchrun job of
    --nproc ranks (2 on CPU, one per GPU) runs every mode, then one short job per other world size in --scaling (and
    at --nproc too when jepa-ema is not among the modes) measures the model state per rank; the
    report then goes to --out. On CPU the ranks are gloo processes on this machine.
  - under a launcher (torchrun, deepspeed, slurm: RANK is set), it runs the modes at that world
    size and rank 0 writes the report; the scaling table then has that world size only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from megajepa.arguments import nproc_parent
from megajepa.bench.modes import DEFAULT_MODES, MODES, ORDERS, BenchSettings, validate
from megajepa.config import ConfigError, load_config, to_dict
from megajepa.files import write_text

RESULT_FILE = "result.json"


class BenchError(RuntimeError):
    """A job that failed or a request the machine cannot run; the message says which."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    defaults = BenchSettings()
    parser = argparse.ArgumentParser(
        prog="megajepa bench",
        description="Time per pair, tokens/s, FLOPs/MFU and memory of the training modes, side by side. "
        "`megajepa bench kernels --help` / `megajepa bench head --help`: the kernel or LM-head benchmark instead.",
        parents=[nproc_parent(None, "for the modes when launching itself; default: 2 on CPU, one per GPU")],
    )
    parser.add_argument("config", help="YAML config, e.g. configs/demo.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.pairs_per_batch=16")
    parser.add_argument(
        "--modes", default=",".join(DEFAULT_MODES), help=f"comma-separated, from {','.join(MODES)}"
    )
    parser.add_argument("--steps", type=int, default=defaults.steps, help="timed optimizer steps per mode")
    parser.add_argument("--warmup", type=int, default=defaults.warmup, help="untimed steps before them")
    parser.add_argument(
        "--order", choices=ORDERS, default=defaults.order,
        help="sequence: one mode after another; alternate: a step of each mode in turn (all engines alive); "
        "auto: sequence on GPU, alternate on CPU",
    )  # fmt: skip
    parser.add_argument("--out", default="runs/bench", help="directory for bench.md, bench.json, time_per_pair.png")
    parser.add_argument(
        "--scaling", default="1,2,4",
        help="world sizes for the model-state table when launching itself ('none': skip; on GPU up to one per GPU)",
    )
    parser.add_argument(
        "--max-length", type=int, default=defaults.max_length, help="ref3/ref2: length every sequence is padded to"
    )
    parser.add_argument(
        "--loader-batches", type=int, default=defaults.loader_batches, help="batches for the loader benchmark (0: skip)"
    )
    # Set by the self-launch for its jobs: write only the raw result, the parent reports.
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_intermixed_args(argv)
    args.modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    try:
        args.scaling = () if args.scaling == "none" else tuple(sorted({int(w) for w in args.scaling.split(",")}))
    except ValueError:
        parser.error(f"--scaling: expected world sizes like 1,2,4 or 'none', got {args.scaling!r}")
    if any(w < 1 for w in args.scaling):
        parser.error("--scaling needs world sizes >= 1")
    return args


def _settings(args):
    return BenchSettings(
        modes=args.modes,
        steps=args.steps,
        warmup=args.warmup,
        max_length=args.max_length,
        loader_batches=args.loader_batches,
        order=args.order,
    )


def _report(result: dict, scaling: dict[int, dict], cfg, args, argv: list[str]) -> None:
    from megajepa.bench.report import build_report, markdown, write_outputs

    report = build_report(result, scaling, to_dict(cfg), ["megajepa", "bench", *argv])
    paths = write_outputs(report, args.out)
    print("\n" + markdown(report))
    print(f"\nwritten: {', '.join(paths.values())}", flush=True)


def _state_of(result: dict) -> dict | None:
    mode = result["modes"].get("jepa-ema")
    return mode["model_state_bytes"] if mode else None


def run_ranks(cfg, args, argv: list[str]) -> int:
    """Under a launcher: this process is one rank."""
    from megajepa.bench.run import run

    result = run(cfg, _settings(args))
    if result is None:
        return 0
    if args.worker:
        os.makedirs(args.out, exist_ok=True)
        write_text(os.path.join(args.out, RESULT_FILE), json.dumps(result, indent=2))
        return 0
    state = _state_of(result)
    _report(result, {result["world_size"]: state} if state else {}, cfg, args, argv)
    return 0


def _torchrun(args, nproc: int, out: str, modes: tuple[str, ...], steps: int, warmup: int, loader: int) -> dict:
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    command = [
        torchrun, "--standalone", f"--nproc_per_node={nproc}", "-m", "megajepa.cli", "bench",
        args.config, *args.overrides,
        "--modes", ",".join(modes), "--steps", str(steps), "--warmup", str(warmup),
        "--max-length", str(args.max_length), "--loader-batches", str(loader), "--order", args.order,
        "--out", out, "--worker",
    ]  # fmt: skip
    print("+ " + " ".join(command), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    if subprocess.run(command, env=env).returncode != 0:
        raise BenchError(f"the {nproc}-rank job failed (its output is above)")
    with open(os.path.join(out, RESULT_FILE)) as f:
        return json.load(f)


def _world_sizes(args) -> tuple[int, tuple[int, ...]]:
    """(ranks for the modes, world sizes for the scaling table): on GPU at most one rank per GPU."""
    import torch

    gpus = torch.cuda.device_count()
    if not gpus:
        return args.nproc or 2, args.scaling
    nproc = args.nproc or gpus
    if nproc > gpus:
        raise BenchError(f"--nproc {nproc}: this machine has {gpus} GPU(s), one rank each")
    skipped = [w for w in args.scaling if w > gpus]
    if skipped:
        print(f"megajepa bench: scaling table without world size(s) {skipped}: {gpus} GPU(s) here", flush=True)
    return nproc, tuple(w for w in args.scaling if w <= gpus)


def launch(cfg, args, argv: list[str]) -> int:
    """Without a launcher: torchrun jobs for the modes and the scaling table, then the report."""
    nproc, worlds = _world_sizes(args)
    if cfg.data.embedded is not None:
        from megajepa.data.embedded import ensure_embedded

        ensure_embedded(cfg.data.embedded, max_length=cfg.data.max_length)
    main = _torchrun(
        args, nproc, os.path.join(args.out, f"world{nproc}"),
        args.modes, args.steps, args.warmup, args.loader_batches,
    )  # fmt: skip
    scaling = {}
    for world in worlds:
        state = _state_of(main) if world == nproc else None
        if state is None:  # one optimizer step of jepa-ema, so that the Adam moments exist
            job = _torchrun(args, world, os.path.join(args.out, f"state-world{world}"), ("jepa-ema",), 1, 0, 0)
            state = _state_of(job)
        scaling[world] = state
    _report(main, scaling, cfg, args, argv)
    return 0


def kernels_main(argv: list[str]) -> int:
    """`megajepa bench kernels`: the fused kernels against their torch references."""
    parser = argparse.ArgumentParser(
        prog="megajepa bench kernels", description="Time the fused Triton kernels against their torch references."
    )
    parser.add_argument("--sizes", type=int, nargs="+", help="elements per case (default: by device)")
    parser.add_argument("--json", dest="json_path", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    from megajepa.kernels.bench import run  # imports torch: after the arguments

    run(args.sizes, args.json_path)
    return 0


def head_main(argv: list[str]) -> int:
    """`megajepa bench head`: the LM head's CE with its logits kept against recomputed."""
    parser = argparse.ArgumentParser(
        prog="megajepa bench head",
        description="Time the LM head + CE when the labels fit one chunk: logits kept vs recomputed.",
    )
    parser.add_argument("--steps", type=int, default=15, help="timed rounds per shape (after 3 warm-up rounds)")
    args = parser.parse_args(argv)
    from megajepa.bench.head import run  # imports torch: after the arguments

    run(args.steps)
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["kernels"]:
        return kernels_main(argv[1:])
    if argv[:1] == ["head"]:
        return head_main(argv[1:])
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        validate(cfg, _settings(args))
    except (ConfigError, ValueError) as err:
        print(f"megajepa bench: {err}", file=sys.stderr)
        return 2
    try:
        return run_ranks(cfg, args, argv) if "RANK" in os.environ else launch(cfg, args, argv)
    except (BenchError, FileNotFoundError) as err:
        print(f"megajepa bench: {err}", file=sys.stderr)
        return 1
