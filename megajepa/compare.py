"""`megajepa compare`: does the latent term help? The same config trained with and without it.

    megajepa compare configs/demo.yaml --seeds 3 [--arms next-token,jepa,stp] [--jobs 2] [--out DIR] [key=value ...]

For each seed s (train.seed = data.seed = s) one single-process run of `megajepa train` per arm
(--arms, default next-token,jepa):

    next-token   next-token only (jepa.lambda_=0)
    jepa         LLM-JEPA (jepa.objective=llm_jepa) with the config's jepa.lambda_
    stp          Semantic Tube Prediction (jepa.objective=stp, the config's jepa.stp.*) with
                 jepa.lambda_=--stp-lambda (default 0.02, the weight the reference's run_stp.py uses)
    jepa-sigreg  jepa with jepa.regularizer=sigreg (LeJEPA's SIGReg against collapse, the config's
                 jepa.regularizer_weight)

All runs are evaluated the same way (megajepa.eval on --data, default the config's
data.eval_shards) and the table gives, per metric, mean ± std over seeds for every arm and, for
each arm after the first (the baseline), the difference (arm - baseline) and the one-sided paired
t-test p-value for "the arm is better" (seeds are the pairs), and under it in words in how many
seeds each arm's embeddings collapsed. The latent rows (JEPA loss, cosines, retrieval, collapse) are
each model's own objective: LLM-JEPA's views for next-token and jepa, STP's spans
for stp; read the generation and CE rows across all arms.

Written under --out (default runs/compare): one directory per run (its train.output_dir, train.log,
eval.json), compare.md (the table), compare.json (everything) and curves.png (training CE and JEPA
loss). A run directory whose run.json records the same resolved config is reused, not retrained.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Optional

from tqdm import tqdm

from megajepa.arguments import at_least_one, evaluation_parent, seeds_parent
from megajepa.config import ConfigError, load_config, to_dict
from megajepa.files import atomic_path, write_text
from megajepa.eval.stats import mean_std, paired_t_test

ARMS = ("next-token", "jepa", "stp", "jepa-sigreg")
DEFAULT_ARMS = ("next-token", "jepa")
NAMES = {"next-token": "next-token", "jepa": "JEPA", "stp": "STP", "jepa-sigreg": "JEPA+SIGReg"}
HEADERS = {"next-token": "next-token only", "jepa": "+ JEPA", "stp": "+ STP", "jepa-sigreg": "+ JEPA + SIGReg"}
STP_LAMBDA = 0.02  # the weight the STP reference's driver (run_stp.py) uses


@dataclass
class Run:
    arm: str
    seed: int
    output_dir: str
    overrides: list[str]  # the user's, then this run's

    @property
    def name(self) -> str:
        return f"{self.arm}-seed{self.seed}"


def arm_overrides(arm: str, jepa_lambda: float, stp_lambda: float) -> list[str]:
    """What an arm sets on top of the user's config."""
    if arm == "next-token":
        return ["jepa.lambda_=0.0"]
    if arm == "jepa":
        return ["jepa.objective=llm_jepa", f"jepa.lambda_={jepa_lambda}"]
    if arm == "stp":
        return ["jepa.objective=stp", f"jepa.lambda_={stp_lambda}"]
    if arm == "jepa-sigreg":
        return ["jepa.objective=llm_jepa", f"jepa.lambda_={jepa_lambda}", "jepa.regularizer=sigreg"]
    raise ValueError(f"unknown arm {arm!r} (one of {', '.join(ARMS)})")


def plan_runs(
    config: str, overrides: list[str], seeds: int, out: str, arms=DEFAULT_ARMS, stp_lambda: float = STP_LAMBDA
) -> list[Run]:
    """The arms x seeds runs; refuses a JEPA arm whose weight is 0 (nothing to compare). Every
    run's config is resolved here, so that one an arm cannot run fails before any training."""
    cfg = load_config(config, overrides)
    if {"jepa", "jepa-sigreg"} & set(arms) and cfg.jepa.lambda_ <= 0:
        raise ConfigError(f"{config}: jepa.lambda_ is {cfg.jepa.lambda_}; the JEPA arm needs a positive weight")
    if "stp" in arms and stp_lambda <= 0:
        raise ConfigError(f"--stp-lambda is {stp_lambda}; the STP arm needs a positive weight")
    runs = []
    for seed in range(seeds):
        for arm in arms:
            output_dir = os.path.join(out, f"{arm}-seed{seed}")
            extra = [
                *arm_overrides(arm, cfg.jepa.lambda_, stp_lambda),
                f"train.seed={seed}",
                f"data.seed={seed}",
                f"train.output_dir={output_dir}",
                "logging.progress=false",  # the run's output goes to its train.log
            ]
            runs.append(Run(arm, seed, output_dir, [*overrides, *extra]))
    for run in runs[: len(arms)]:
        load_config(config, run.overrides)
    return runs


def held_out_data(config: str, overrides: list[str], data):
    """The evaluation pairs (--data, else data.eval_shards), checked before any training; the
    embedded data is built first when the config uses it."""
    cfg = load_config(config, overrides)
    if cfg.data.embedded is not None:
        from megajepa.data.embedded import ensure_embedded

        ensure_embedded(cfg.data.embedded, max_length=cfg.data.max_length)
    data = data or cfg.data.eval_shards
    if data is None:
        raise ConfigError(f"{config}: no data.eval_shards; pass --data")
    if not os.path.exists(data):
        raise FileNotFoundError(f"held-out data {data}: no such shard directory or JSONL file")
    return data


def _resolved(config: str, run: Run) -> dict:
    return to_dict(load_config(config, run.overrides))


def _is_done(config: str, run: Run) -> bool:
    """True for a finished run of the same config; raises for a directory holding anything else."""
    marker = os.path.join(run.output_dir, "run.json")
    if os.path.isfile(marker):
        with open(marker) as f:
            if json.load(f)["config"] == _resolved(config, run):
                return True
        raise FileExistsError(f"{run.output_dir}: a run of another config; remove it or choose another --out")
    if os.path.exists(run.output_dir):
        raise FileExistsError(f"{run.output_dir}: an unfinished run; remove it to retrain")
    return False


def train_run(config: str, run: Run) -> float:
    """`megajepa train` in its own process (one rank, one thread); returns its wall time."""
    os.makedirs(run.output_dir)
    tmpdir = os.path.join(run.output_dir, "tmp")  # StreamingDataset's locks, private to the run
    os.makedirs(tmpdir)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(TMPDIR=tmpdir, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "megajepa.cli", "train", config, *run.overrides]
    log_path = os.path.join(run.output_dir, "train.log")
    start = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("+ " + " ".join(command) + "\n")
        log.flush()
        result = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise RuntimeError(f"{run.name}: `megajepa train` failed (exit {result.returncode}); see {log_path}")
    shutil.rmtree(tmpdir)
    seconds = time.perf_counter() - start
    marker = {"config": _resolved(config, run), "seconds": seconds}
    write_text(os.path.join(run.output_dir, "run.json"), json.dumps(marker))
    return seconds


def train_all(config: str, runs: list[Run], jobs: int) -> None:
    todo = [run for run in runs if not _is_done(config, run)]
    if len(todo) < len(runs):
        print(f"reusing {len(runs) - len(todo)} finished run(s)", flush=True)
    with ThreadPoolExecutor(max_workers=jobs) as pool, tqdm(total=len(todo), desc="train", unit="run") as bar:
        futures = {pool.submit(train_run, config, run): run for run in todo}
        for future in as_completed(futures):
            bar.write(f"trained {futures[future].name} in {future.result():.0f} s")
            bar.update()


def _evaluated(run: Run, request: dict) -> Optional[dict]:
    """The metrics of an evaluation of this run's final checkpoint made with the same request
    (data, limit, batch pairs, generation cap), or None."""
    path = os.path.join(run.output_dir, "eval.json")
    if not os.path.isfile(path) or os.path.getmtime(path) < os.path.getmtime(os.path.join(run.output_dir, "run.json")):
        return None
    with open(path) as f:
        report = json.load(f)
    return report["metrics"] if report.get("request") == request else None


def evaluate_all(runs: list[Run], data: str, limit, batch_pairs: int, max_new_tokens) -> dict[str, dict]:
    """Each run's final checkpoint through megajepa.eval, on the same pairs; an evaluation already
    made with the same request is reused (a rerun of the same comparison only draws its table)."""
    import torch

    from megajepa.eval.data import load_eval_pairs
    from megajepa.eval.run import evaluate, load_model

    request = {"data": data, "limit": limit, "batch_pairs": batch_pairs, "max_new_tokens": max_new_tokens}
    results = {run.name: _evaluated(run, request) for run in runs}
    todo = [run for run in runs if results[run.name] is None]
    if len(todo) < len(runs):
        print(f"reusing {len(runs) - len(todo)} evaluation(s) made with the same settings", flush=True)
    pairs = None
    for run in tqdm(todo, desc="eval", unit="run"):
        loaded = load_model(run.output_dir, torch.device("cpu"))
        pairs = pairs or load_eval_pairs(data, loaded.tokenizer, limit)
        result = evaluate(loaded, pairs, batch_pairs=batch_pairs, max_new_tokens=max_new_tokens, progress=False)
        report = {"metrics": result["metrics"], "settings": result["settings"], "data": data, "request": request}
        write_text(os.path.join(run.output_dir, "eval.json"), json.dumps(report, indent=2))
        results[run.name] = result["metrics"]
    return results


def _arms(runs: list[Run]) -> list[str]:
    """The arms of `runs`, in their order (the first is the baseline)."""
    return list(dict.fromkeys(run.arm for run in runs))


def summarize(runs: list[Run], results: dict[str, dict]) -> dict[str, dict]:
    """Per metric: every arm's values by seed, mean and std; for each arm after the baseline its
    difference from the baseline and the p-value of "this arm is better"."""
    from megajepa.eval.run import METRICS  # imports torch: here, so that `compare --help` is instant

    seeds = sorted({run.seed for run in runs})
    arms = _arms(runs)
    baseline = arms[0]
    rows = {}
    for name, (_, higher_is_better) in METRICS.items():
        values = {arm: [results[f"{arm}-seed{s}"][name] for s in seeds] for arm in arms}
        if any(v is None for arm in arms for v in values[arm]):
            continue  # e.g. no task checker for this data
        row = {"higher_is_better": higher_is_better, "baseline": baseline}
        for arm in arms:
            row[arm] = {"values": values[arm], "mean": mean_std(values[arm])[0], "std": mean_std(values[arm])[1]}
        for arm in arms[1:]:
            row[arm]["difference"] = row[arm]["mean"] - row[baseline]["mean"]
            row[arm]["p_value"] = paired_t_test(values[arm], values[baseline], higher_is_better)
        rows[name] = row
    return rows


def collapse_line(runs: list[Run], results: dict[str, dict]) -> str:
    """Per arm, in words: in how many seeds the held-out embeddings collapsed (megajepa.jepa.collapse)."""
    parts = []
    for arm in _arms(runs):
        verdicts = [results[run.name].get("collapsed") for run in runs if run.arm == arm]
        judged = [v for v in verdicts if v is not None]
        parts.append(f"{NAMES[arm]} collapsed in {int(sum(judged))} of {len(judged)} seeds")
    return "collapse (held-out z_a, z_b; megajepa.jepa.collapse): " + "; ".join(parts)


def _cell(mean: float, std) -> str:
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def format_table(rows: dict[str, dict], seeds: int, arms=DEFAULT_ARMS) -> str:
    from megajepa.eval.run import METRICS

    baseline, others = arms[0], arms[1:]
    header = [f"metric ({seeds} seeds)", *(HEADERS[arm] for arm in arms)]
    for arm in others:
        header += [f"{NAMES[arm]} - {NAMES[baseline]}", f"p ({NAMES[arm]} better)"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for name, row in rows.items():
        label, higher = METRICS[name]
        cells = [f"{label} ({'↑' if higher else '↓'})", *(_cell(row[arm]["mean"], row[arm]["std"]) for arm in arms)]
        for arm in others:
            p = row[arm]["p_value"]
            cells += [f"{row[arm]['difference']:+.4f}", "n/a" if p is None else f"{p:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _read_metrics(output_dir: str) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def curve_bands(runs: list[Run], key: str, baseline: Optional[str] = None) -> dict[str, tuple[list, list, list]]:
    """Per arm: (steps, mean, sample std over seeds) of the logged `key`, at the steps every seed
    logged; with `baseline`, of the arm's value minus the baseline's, seed by seed (paired, as the
    table's t-test). Arms that never log `key` (next-token's latent loss) are left out."""
    curves = {}  # arm -> seed -> {step: value}
    for run in runs:
        rows = [r for r in _read_metrics(run.output_dir) if r.get(key) is not None]
        if rows:
            curves.setdefault(run.arm, {})[run.seed] = {r["step"]: r[key] for r in rows}
    bands = {}
    for arm, seeds in curves.items():
        if arm == baseline:
            continue
        if baseline is not None:
            seeds = {s: {t: v - curves[baseline][s][t] for t, v in c.items() if t in curves[baseline].get(s, {})}
                     for s, c in seeds.items()}  # fmt: skip
        steps = sorted(set.intersection(*(set(c) for c in seeds.values())))
        stats = [mean_std([seeds[s][t] for s in sorted(seeds)]) for t in steps]
        bands[arm] = (steps, [m for m, _ in stats], [0.0 if sd is None else sd for _, sd in stats])
    return bands


def plot_curves(runs: list[Run], path: str) -> None:
    """Mean over seeds with a +-1 std band: training CE of every arm, its difference from the
    baseline (the first arm; seed by seed, so what the seeds share cancels), and the latent loss
    of the arms that have one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"next-token": "tab:blue", "jepa": "tab:orange", "stp": "tab:green", "jepa-sigreg": "tab:red"}
    baseline = _arms(runs)[0]
    seeds = len({run.seed for run in runs})
    panels = [
        (curve_bands(runs, "ce"), "training CE (view B)", "CE", "linear"),
        (curve_bands(runs, "ce", baseline), f"training CE minus {NAMES[baseline]}'s, same seed", "CE difference", "linear"),
        ({a: b for a, b in curve_bands(runs, "jepa").items() if a != "next-token"},  # it has no latent term
         "training latent loss (each arm's own)", "D(pred(z_a), z_b)", "log"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    for ax, (bands, title, ylabel, yscale) in zip(axes, panels):
        for arm, (steps, mean, std) in bands.items():
            low = [m - s for m, s in zip(mean, std)]
            high = [m + s for m, s in zip(mean, std)]
            marker = "o" if len(steps) < 20 else None  # a handful of logged steps: show the points
            ax.plot(steps, mean, color=colors[arm], lw=1.5, marker=marker, label=f"{NAMES[arm]} (mean of {seeds})")
            ax.fill_between(steps, low, high, color=colors[arm], alpha=0.2, lw=0)
        if "difference" in ylabel:
            ax.axhline(0.0, color=colors[baseline], lw=1, ls="--", label=NAMES[baseline])
        ax.set(title=title, xlabel="step", ylabel=ylabel, yscale=yscale)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("mean over seeds, band: +-1 standard deviation", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="megajepa compare", description=__doc__.split("\n\n")[0], parents=[seeds_parent(), evaluation_parent()]
    )
    parser.add_argument("config", help="YAML config, e.g. configs/demo.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides for every arm, e.g. train.steps=500")
    parser.add_argument(
        "--arms", default=",".join(DEFAULT_ARMS),
        help=f"comma-separated, from {','.join(ARMS)}; the first is the baseline the others are tested against",
    )
    parser.add_argument("--stp-lambda", type=float, default=STP_LAMBDA, help="jepa.lambda_ of the stp arm")
    parser.add_argument("--out", default=os.path.join("runs", "compare"))
    parser.add_argument("--jobs", type=at_least_one, default=1, help="training runs at a time (one CPU thread each)")
    parser.add_argument("--data", default=None, help="held-out pairs (default: the config's data.eval_shards)")
    args = parser.parse_intermixed_args(argv)
    args.arms = tuple(a.strip() for a in args.arms.split(","))
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown or len(set(args.arms)) != len(args.arms) or len(args.arms) < 2:
        parser.error(f"--arms: two or more distinct arms from {', '.join(ARMS)}, got {','.join(args.arms)}")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    start, load_before = time.perf_counter(), os.getloadavg()
    try:
        runs = plan_runs(args.config, args.overrides, args.seeds, args.out, args.arms, args.stp_lambda)
        data = held_out_data(args.config, args.overrides, args.data)
        train_all(args.config, runs, args.jobs)
    except (ConfigError, FileExistsError, FileNotFoundError) as err:
        print(f"megajepa compare: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # a training run failed; its log says why
        print(f"megajepa compare: {err}", file=sys.stderr)
        return 1
    import torch

    torch.set_num_threads(1)  # tiny models: on a shared CPU more threads only wait on each other
    results = evaluate_all(runs, data, args.limit, args.batch_pairs, args.max_new_tokens)
    rows = summarize(runs, results)
    table = format_table(rows, args.seeds, args.arms)
    wall = time.perf_counter() - start
    load_after = os.getloadavg()
    command = "megajepa compare " + " ".join(argv)
    footer = (
        f"\n\n{collapse_line(runs, results)}\n"
        f"{args.seeds} seeds x {len(args.arms)} arms, wall time {wall / 60:.1f} min (--jobs {args.jobs}); "
        f"load average {load_before[0]:.2f} at the start, {load_after[0]:.2f} at the end ({os.cpu_count()} CPUs)\n"
        f"command: {command}\n"
    )
    write_text(os.path.join(args.out, "compare.md"), table + footer)
    report = {
        "command": command,
        "seeds": args.seeds,
        "arms": list(args.arms),
        "data": data,
        "wall_seconds": wall,
        "load_average": {"start": load_before, "end": load_after},
        "cpus": os.cpu_count(),
        "runs": results,
        "summary": rows,
    }
    write_text(os.path.join(args.out, "compare.json"), json.dumps(report, indent=2))
    plot_curves(runs, os.path.join(args.out, "curves.png"))
    print("\n" + table + footer + f"written: {args.out}/compare.md, compare.json, curves.png")
    return 0
