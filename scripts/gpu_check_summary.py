"""The GPU check's summary (scripts/gpu_check.sh): what its logs and outputs say, as markdown.

    python scripts/gpu_check_summary.py OUT CONFIG [OVERRIDES...]     (OUT: the check's folder)

Host synchronisations inside the training steps (torch's sync-debug warnings, one per Python line),
TorchDynamo recompiles, which LM-head CE path ran, the 1B run's losses across its resume, and each
bench mode's throughput and peak memory beside `megajepa plan`'s prediction for the same
micro-batch. Missing inputs are said, not guessed.
"""

from __future__ import annotations

import collections
import json
import re
import sys
from pathlib import Path

SYNC = re.compile(r"^(\S+?):(\d+): UserWarning: called a synchronizing CUDA operation")
RECOMPILE = re.compile(r"Recompiling function (\S+)")


def log_lines(out: Path, *names: str) -> list[str]:
    lines = []
    for name in names:
        path = out / f"{name}.log"
        if path.is_file():
            lines += path.read_text(errors="replace").splitlines()
    return lines


def sync_table(lines: list[str]) -> list[str]:
    places = collections.Counter(f"{m[1]}:{m[2]}" for m in map(SYNC.match, lines) if m)
    if not places:
        return ["No host synchronisation reported inside a training step (train.sync_debug=warn)."]
    rows = ["| where (one warning per Python line) | reports |", "|---|---|"]
    rows += [f"| `{place}` | {count} |" for place, count in places.most_common()]
    return rows


def losses(out: Path) -> list[str]:
    path = out / "train-1b" / "metrics.jsonl"
    if not path.is_file():
        return ["No metrics.jsonl from the 1B run."]
    rows = ["| step | loss | ce | jepa | lr |", "|---|---|---|---|---|"]
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        if "loss" in entry:
            rows.append(f"| {entry.get('step')} | {entry['loss']:.4f} | {entry.get('ce', float('nan')):.4f} | "
                        f"{entry.get('jepa', float('nan')):.4f} | {entry.get('lr', float('nan')):.2e} |")
    return rows


def bench_table(out: Path, config: str, overrides: list[str]) -> list[str]:
    path = out / "bench-1b" / "bench.json"
    if not path.is_file():
        return ["No bench.json from bench-1b."]
    report = json.loads(path.read_text())
    predicted = {}
    try:
        from megajepa.config import load_config
        from megajepa.plan import make_plan

        import torch

        gpu_gb = torch.cuda.get_device_properties(0).total_memory / 1e9 if torch.cuda.is_available() else 80.0
        cfg = load_config(config, overrides)
        plan = make_plan(cfg, config, 1, gpu_gb)
        for name, mode in report["modes"].items():
            tokens = int(mode["computed_tokens_per_step"])  # one micro-batch per step in the bench
            predicted[name] = plan.peak_bytes(tokens, plan.checkpointing, chunked=True)
    except Exception as err:  # the table still shows what was measured
        predicted = {}
        print(f"plan prediction unavailable: {type(err).__name__}: {err}", file=sys.stderr)
    rows = [
        "| mode | tokens/s (computed) | pairs/s | time/pair vs ce | MFU | peak GiB | plan's peak GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, mode in report["modes"].items():
        mfu = f"{mode['mfu']:.1%}" if mode.get("mfu") is not None else "n/a"
        plan_peak = f"{predicted[name] / 2**30:.1f}" if name in predicted else "n/a"
        rows.append(
            f"| {name} | {mode['computed_tokens_per_s']:,.0f} | {mode['pairs_per_s']:,.1f} | "
            f"{mode.get('time_per_pair_vs_ce', float('nan')):.2f}x | {mfu} | "
            f"{mode['peak_memory_bytes'] / 2**30:.1f} | {plan_peak} |"
        )
    return rows


def main(argv: list[str]) -> int:
    out, config, overrides = Path(argv[0]), argv[1], argv[2:]
    train_lines = log_lines(out, "train-1b", "resume-1b")
    recompiles = collections.Counter(m[1] for m in map(RECOMPILE.search, train_lines) if m)
    from megajepa.model.head import PATH_NOTES  # the log line of each CE path

    heads = {path: sum(path in line for line in train_lines) for path in PATH_NOTES.values()}
    sections = [
        "# GPU check summary", "",
        "## Host synchronisations inside a training step (1B run, steps 2+)", "", *sync_table(train_lines), "",
        "## Recompiles (TORCH_LOGS=recompiles, 1B run and its resume)", "",
        f"{sum(recompiles.values())} recompiles" + (": " + ", ".join(f"{k} x{v}" for k, v in recompiles.items()) if recompiles else ""), "",
        "## LM-head cross-entropy path (log lines)", "",
        *[f"- {path}: {count}" for path, count in heads.items()], "",
        "## 1B run, 128,256-row vocabulary: losses (steps 4-5 after the resume)", "", *losses(out), "",
        "## Bench (1 GPU)", "", *bench_table(out, config, overrides), "",
    ]
    print("\n".join(sections))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
