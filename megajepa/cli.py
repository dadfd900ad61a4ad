"""The `megajepa` command.

    megajepa config  CONFIG [key=value ...]        print the resolved config
    megajepa prepare INPUT... --out DIR [...]      JSONL / HF dataset -> MDS shards
    megajepa prepare-text INPUT... --out DIR       plain text (pretraining) -> CE-only shards, in parallel
    megajepa train   CONFIG [key=value ...]        train (single process, torchrun or deepspeed)
    megajepa demo    CONFIG [--nproc N] [...]      embedded data -> N CPU ranks -> summary table
    megajepa bench   CONFIG --modes ... [...]      throughput of ce/jepa/jepa-ema/ref3/ref2, FLOPs, memory
    megajepa bench   kernels [...]                 kernel benchmark (Triton vs torch reference)
    megajepa bench   head [--steps N]              the LM head's CE: logits kept vs recomputed
    megajepa plan    CONFIG --gpus N --gpu-memory GB   expected memory per rank, largest token budget
    megajepa export  CHECKPOINT --out HF_DIR       ZeRO-3 checkpoint -> Hugging Face model directory
    megajepa universal CHECKPOINT [--workers N]    before a launch at another world size: DeepSpeed's
                                                   universal form, converted outside any collective
    megajepa eval    CHECKPOINT_OR_HF_DIR --data   generation accuracy, held-out CE, JEPA metrics
    megajepa compare CONFIG --seeds N [...]        next-token vs JEPA over seeds, paired t-test
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys

from megajepa.arguments import evaluation_parent, nproc_parent
from megajepa.config import ConfigError, check_run_data, load_config, to_yaml
from megajepa.eval.checkers import CHOICES as CHECKER_CHOICES


def _load(args, run: bool = False) -> object:
    """The validated config; an architecture the packed pass cannot run exactly is refused here,
    by name, before any work starts, and with `run` (train, `config --check`) missing shards too."""
    from megajepa.model.build import check_architecture
    from megajepa.model.families import UnsupportedArchitecture

    try:
        cfg = load_config(args.config, args.overrides)
        check_architecture(cfg.model)
        if run:
            check_run_data(cfg)
        return cfg
    except (ConfigError, UnsupportedArchitecture) as err:
        print(f"megajepa: config error: {err}", file=sys.stderr)
        sys.exit(2)


def cmd_config(args) -> int:
    cfg = _load(args, run=args.check)
    if not args.check:
        print(to_yaml(cfg), end="")
    return 0


def cmd_train(args) -> int:
    cfg = _load(args, run=True)
    from megajepa.data.fingerprint import FingerprintMismatch
    from megajepa.data.shard_hashes import CorruptShard
    from megajepa.train.checkpoint import CheckpointMismatch, NoSpaceLeft
    from megajepa.train.resume_policy import ResumeRefused
    from megajepa.train.run_lock import RunLocked
    from megajepa.train.divergence import TrainingDiverged
    from megajepa.train.trainer import train

    try:
        summary = train(cfg)
        if int(os.environ.get("RANK", "0")) == 0:
            print("\n" + summary_table(summary), flush=True)
    # a refusal, before any training (data the config checks could not see: a remote's, or shards
    # prepared with another tokenizer): no traceback
    except (CheckpointMismatch, ResumeRefused, RunLocked, ConfigError, FingerprintMismatch) as err:
        print(f"megajepa train: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    except CorruptShard as err:  # on the rank that opened it (from a DataLoader worker: reduced to its line)
        print(f"megajepa train: CorruptShard: {err.one_line()}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"megajepa train: {type(err).__name__}: {err}", file=sys.stderr)
        return 3
    except NoSpaceLeft as err:
        print(f"megajepa train: {err}", file=sys.stderr, flush=True)
        return 2
    except (OSError, RuntimeError) as err:
        from megajepa import dist
        from megajepa.files import no_space

        if no_space(err):  # outside a checkpoint: the metrics, the logs
            print(f"megajepa train: no space left on device: {getattr(err, 'filename', None) or cfg.train.output_dir}",
                  file=sys.stderr)
        elif dist.timed_out(err):
            print(f"megajepa train: {dist.timeout_message()} ({str(err).splitlines()[0][:200]})", file=sys.stderr)
        elif dist.peer_lost(err):  # the rank that failed says why
            print(f"megajepa train: rank {dist.rank()}: stopped: another rank ended (see its message)", file=sys.stderr)
        else:
            raise
        return 2
    return 0


def summary_table(summary: dict) -> str:
    """The closing table of every `megajepa train` (and demo): losses at the start and the end,
    the collapse figures and verdict, throughput, where things are."""
    from megajepa.jepa import collapse

    first, last = summary.get("first", {}), summary.get("last", {})
    rows = [
        ("train loss (total)", first.get("loss"), last.get("loss")),
        ("train CE", first.get("ce"), last.get("ce")),
        ("train JEPA", first.get("jepa"), last.get("jepa")),
        ("held-out CE", summary.get("start_eval_ce"), summary.get("eval_ce")),
        ("held-out JEPA", summary.get("start_eval_jepa"), summary.get("eval_jepa")),
    ]
    if "router_aux" in last:  # a mixture-of-experts model: its router's load-balancing loss (unweighted)
        rows.insert(3, ("train router aux (MoE)", first.get("router_aux"), last.get("router_aux")))
    # the collapse figures (megajepa.jepa.collapse): held-out where there is held-out data, else
    # the first and last logged training batches
    held_out = "eval_z_a_std" in summary
    start, end = ({k[len("start_eval_") :]: v for k, v in summary.items() if k.startswith("start_eval_")}, {
        k[len("eval_") :]: v for k, v in summary.items() if k.startswith("eval_")
    }) if held_out else (first, last)
    where = "held-out" if held_out else "train"
    judged = "z_a_std" in end  # no figures without pairs (jepa.lambda_=0)
    for key, label in (
        ("z_a_std", f"{where} z_a std x sqrt(d) (collapsed < {collapse.STD_MIN})"),
        ("z_b_std", f"{where} z_b std x sqrt(d) (collapsed < {collapse.STD_MIN})"),
        ("cos_matched", f"{where} cos(pred(z_a), z_b) matched"),
        ("cos_mismatched", f"{where} cos(pred(z_a), z_b) mismatched (collapsed > matched - {collapse.GAP_MIN})"),
    ):
        if judged:
            rows.append((label, start.get(key), end.get(key)))
    lines = ["| metric | start | end |", "|---|---:|---:|"]
    for name, start_value, end_value in rows:
        fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
        lines.append(f"| {name} | {fmt(start_value)} | {fmt(end_value)} |")
    lines.append("")
    if judged:
        lines.append(f"collapse ({where}, end): {collapse.verdict(end)}")
    lines.append(f"steps: {summary.get('steps')} on {summary.get('world_size')} rank(s)")
    if last:
        lines.append(
            f"throughput: {last.get('computed_tokens_per_s', 0):,.0f} computed tokens/s, "
            f"{last.get('useful_tokens_per_s', 0):,.0f} useful tokens/s, {last.get('pairs_per_s', 0):,.1f} pairs/s, "
            f"{1.0 / max(last.get('step_seconds', 1e-9), 1e-9):.2f} steps/s"
        )
    lines.append(f"checkpoint: {summary.get('checkpoint')}")
    lines.append(f"tensorboard / csv logs: {summary.get('logs')}")
    return "\n".join(lines)


def cmd_demo(args) -> int:
    cfg = _load(args)
    if cfg.data.embedded is not None:
        from megajepa.data.embedded import ensure_embedded

        ensure_embedded(cfg.data.embedded, max_length=cfg.data.max_length)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    overrides = list(args.overrides)
    if not any(o.startswith("train.resume=") for o in overrides):
        overrides.append("train.resume=restart")  # a demo run again starts over (the last one is moved aside)
    command = [
        torchrun,
        "--standalone",
        f"--nproc_per_node={args.nproc}",
        "-m",
        "megajepa.cli",
        "train",
        args.config,
        *overrides,
    ]
    print("+ " + " ".join(command), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return subprocess.run(command, env=env).returncode  # rank 0's train prints the summary table


def cmd_export(args) -> int:
    from megajepa.export import ExportError, export

    try:
        export(args.checkpoint, args.out, args.weights, args.dtype, args.tokenizer, args.overwrite)
    except (ExportError, FileExistsError, FileNotFoundError) as err:
        print(f"megajepa export: {err}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} ({args.weights} weights) to {args.out}")
    return 0


def cmd_universal(args) -> int:
    from megajepa.train import checkpoint, elastic, pickle_guard

    tag_dir = os.path.abspath(args.checkpoint.rstrip("/"))
    reason = checkpoint.incomplete_reason(tag_dir) if os.path.isdir(tag_dir) else "no such directory"
    if reason is None:
        try:  # DeepSpeed's converter unpickles the checkpoint's files with weights_only=False
            pickle_guard.refuse_unsafe(pickle_guard.torch_files(tag_dir))
        except pickle_guard.UnsafeCheckpointFile as err:
            reason = str(err)
    if reason is not None:
        print(f"megajepa universal: {args.checkpoint}: not a complete checkpoint: {reason}", file=sys.stderr)
        return 2
    print(f"universal checkpoint: {elastic.convert(tag_dir, args.workers)}")
    return 0


def cmd_eval(args) -> int:
    from megajepa.data.shard_hashes import CorruptShard
    from megajepa.eval.run import main as eval_main

    try:
        return eval_main(args)
    except CorruptShard as err:
        print(f"megajepa eval: CorruptShard: {err.one_line()}", file=sys.stderr)
        return 2


def _log_level_from_env() -> None:
    """MEGAJEPA_LOG_LEVEL=INFO shows megajepa's once-per-run notes (the attention kernel chosen,
    which LM-head CE path ran) on stderr; by default only warnings."""
    import logging

    level = os.environ.get("MEGAJEPA_LOG_LEVEL")
    if level:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        logger = logging.getLogger("megajepa")
        logger.addHandler(handler)
        logger.setLevel(level.upper())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _log_level_from_env()
    parser = argparse.ArgumentParser(prog="megajepa", description="LLM-JEPA pretraining on DeepSpeed ZeRO-3")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(name: str, help: str, parents=()):
        p = sub.add_parser(name, help=help, parents=list(parents))
        p.add_argument("config", help="YAML config, e.g. configs/demo.yaml")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=50 jepa.k=2")
        return p

    config = with_config("config", "print the fully resolved config")
    config.add_argument("--check", action="store_true", help="print nothing; also check the data a run reads")
    config.set_defaults(func=cmd_config)
    with_config("train", "train a model").set_defaults(func=cmd_train)
    demo = with_config("demo", "embedded data, training on N CPU ranks, summary", [nproc_parent(2, "CPU, default 2")])
    demo.set_defaults(func=cmd_demo)
    # Commands that parse their own arguments (all of them, `--help` included: see OWN_PARSER).
    sub.add_parser("prepare", help="JSONL / HF dataset -> MDS shards", add_help=False)
    sub.add_parser("plan", help="expected GPU memory per rank and the largest token budget", add_help=False)
    sub.add_parser("prepare-text", help="plain text -> CE-only MDS shards, in parallel", add_help=False)
    sub.add_parser("bench", help="benchmarks: the training modes side by side, or the kernels", add_help=False)
    sub.add_parser("compare", help="train with and without the JEPA term over seeds, evaluate, t-test", add_help=False)
    export = sub.add_parser("export", help="ZeRO checkpoint -> Hugging Face model directory")
    export.add_argument("checkpoint", help="checkpoint dir (.../checkpoints/stepNNNNNNNN) or a run's output_dir")
    export.add_argument("--out", required=True, help="the Hugging Face directory to write")
    export.add_argument("--weights", choices=("online", "ema"), default="online")
    export.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None, help="default: training precision")
    export.add_argument("--tokenizer", default=None, help="the tokenizer dir, if it moved since training")
    export.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    export.set_defaults(func=cmd_export)
    universal = sub.add_parser(
        "universal", help="convert a checkpoint to DeepSpeed's universal form, before resuming at another world size"
    )
    universal.add_argument("checkpoint", help="checkpoint dir (.../checkpoints/stepNNNNNNNN)")
    universal.add_argument("--workers", type=int, default=None, help="extract/merge processes (default: cores, <= 16)")
    universal.set_defaults(func=cmd_universal)
    evaluate = sub.add_parser("eval", help="held-out generation, CE and JEPA metrics", parents=[evaluation_parent()])
    evaluate.add_argument("model", help="a checkpoint (or a run's output_dir) or an exported HF directory")
    evaluate.add_argument("--data", required=True, help="MDS shard directory or chat JSONL of held-out pairs")
    evaluate.add_argument("--weights", choices=("online", "ema"), default=None, help="of a checkpoint; default online")
    evaluate.add_argument(
        "--checker", choices=CHECKER_CHOICES, default="auto", help="task checker (auto: recognised from the data)"
    )
    evaluate.add_argument("--json", default=None, help="write the metrics and settings here")
    evaluate.add_argument("--generations", default=None, help="write one JSON line per pair here")
    evaluate.add_argument("--no-progress", dest="progress", action="store_false")
    evaluate.set_defaults(func=cmd_eval)

    if argv and argv[0] in OWN_PARSER:
        extra = {"default_tokenizer": _embedded_tokenizer} if argv[0] == "prepare" else {}
        return importlib.import_module(OWN_PARSER[argv[0]]).main(argv[1:], **extra)
    if argv and argv[0] in sub.choices:
        # Intermixed: options anywhere among the positional overrides (one parse_args pass stops
        # at the first option after them).
        args = sub.choices[argv[0]].parse_intermixed_args(argv[1:])
    else:
        args = parser.parse_args(argv)  # --help, or an unknown command
    return args.func(args)


# Subcommands whose module defines and parses their arguments; each imports torch only after
# parsing them, so that `megajepa X --help` and argument errors are instant.
OWN_PARSER = {
    "prepare": "megajepa.data.prepare",
    "plan": "megajepa.plan",
    "prepare-text": "megajepa.data.prepare_text",
    "bench": "megajepa.bench.command",
    "compare": "megajepa.compare",
}


def _embedded_tokenizer() -> str:
    """prepare's tokenizer without --tokenizer (passed in: megajepa.data.prepare cannot import
    megajepa.data.embedded, which imports it)."""
    from megajepa.data.embedded import ensure_tokenizer  # builds the demo data first if missing

    return ensure_tokenizer()

if __name__ == "__main__":
    sys.exit(main())
