"""The benchmark's outputs: a Markdown table, a JSON file with every figure, a PNG bar chart.

    report = build_report(result, scaling, config, command)    # result: megajepa.bench.run.run's
    write_outputs(report, out_dir)                             # bench.md, bench.json, time_per_pair.png
"""

from __future__ import annotations

import copy
import json
import os
from typing import Optional

from megajepa.bench import flops
from megajepa.files import atomic_path, write_text

MIB = 1024**2
STATE_KINDS = ("parameters", "persistent", "optimizer", "ema", "teacher")


def build_report(result: dict, scaling: dict[int, dict], config: dict, command: list[str]) -> dict:
    """The run's results plus what is derived from them: each mode's time per pair over ce's and
    jepa's, the ideal jepa/ce token ratio, the loader's headroom and the model-state scaling table."""
    report = {"command": command, "config": config, **copy.deepcopy(result), "flops_formula": flops.__doc__.strip()}
    modes = report["modes"]
    if "ce" in modes:
        for entry in modes.values():
            entry["time_per_pair_vs_ce"] = entry["seconds_per_pair"] / modes["ce"]["seconds_per_pair"]
            if entry["cpu_seconds"] is not None:
                entry["cpu_time_per_pair_vs_ce"] = _cpu_per_pair(entry) / _cpu_per_pair(modes["ce"])
        if "jepa" in modes:
            # the tokens jepa computes per record (conversation + its two views) over ce's, padding aside
            ideal = modes["jepa"]["segment_tokens_per_step"] / modes["ce"]["segment_tokens_per_step"]
            report["jepa_vs_ce"] = {
                "ideal_token_ratio": ideal,
                "measured_time_ratio": modes["jepa"]["time_per_pair_vs_ce"],
                "measured_over_ideal": modes["jepa"]["time_per_pair_vs_ce"] / ideal,
                "measured_cpu_time_ratio": modes["jepa"].get("cpu_time_per_pair_vs_ce"),
            }
    if "jepa" in modes:
        report["vs_jepa"] = {
            name: entry["seconds_per_pair"] / modes["jepa"]["seconds_per_pair"]
            for name, entry in modes.items()
            if name != "jepa"
        }
    if result.get("loader"):
        consumed = {name: entry["pairs_per_s_per_rank"] for name, entry in modes.items()}
        report["loader"] = {**result["loader"], "step_consumes_pairs_per_s_per_rank": consumed}
    base = scaling.get(min(scaling)) if scaling else None
    report["scaling"] = {
        str(world): {
            **state,
            "total_times_world": state["total"] * world,
            "total_vs_smallest_world": state["total"] / base["total"] if base else None,
        }
        for world, state in sorted(scaling.items())
    }
    return report


def _cpu_per_pair(mode: dict) -> float:
    return mode["cpu_seconds"]["median"] / mode["pairs_per_step"]


def _ratio(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _teacher_cell(m: dict) -> str:
    if m["ema_update_seconds"] is None:
        return "-"
    return f"{1e3 * m['teacher_forward_seconds']:.1f} / {1e3 * m['ema_update_seconds']:.1f}"


def _mfu_cell(m: dict) -> str:
    return "n/a" if m["mfu"] is None else f"{100 * m['mfu']:.1f}%"


def _spread_cell(spread: dict) -> str:
    return f"{spread['median']:.3f} ({spread['min']:.3f}-{spread['max']:.3f})"


# (header, cell) per column; the CPU-time columns appear on CPU runs only
MODE_COLUMNS = [
    ("step time s, median (min-max)", lambda m: _spread_cell(m["step_seconds"])),
    ("ms per pair", lambda m: f"{1e3 * m['seconds_per_pair']:.2f}"),
    ("vs ce", lambda m: _ratio(m.get("time_per_pair_vs_ce"))),
    ("CPU s per step, median (min-max)", lambda m: _spread_cell(m["cpu_seconds"])),
    ("vs ce, CPU time", lambda m: _ratio(m.get("cpu_time_per_pair_vs_ce"))),
    ("computed tok/s", lambda m: f"{m['computed_tokens_per_s']:,.0f}"),
    ("useful tok/s", lambda m: f"{m['useful_tokens_per_s']:,.0f}"),
    ("pairs/s", lambda m: f"{m['pairs_per_s']:,.1f}"),
    ("padding", lambda m: f"{100 * m['padding_fraction']:.1f}%"),
    ("peak memory MiB", lambda m: f"{m['peak_memory_bytes'] / MIB:,.0f}"),
    ("teacher fwd / EMA update ms", _teacher_cell),
    ("TFLOP/s per rank", lambda m: f"{m['tflops_per_rank']:.4f}"),
    ("MFU", _mfu_cell),
]


def _mode_table(report: dict) -> list[str]:
    modes = report["modes"]
    on_cpu = all(m["cpu_seconds"] is not None for m in modes.values())
    columns = [(h, cell) for h, cell in MODE_COLUMNS if on_cpu or not h.startswith(("CPU", "vs ce, CPU"))]
    lines = [
        "| mode | " + " | ".join(h for h, _ in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for name, m in modes.items():
        lines.append(f"| {name} | " + " | ".join(cell(m) for _, cell in columns) + " |")
    return lines


def _scaling_table(report: dict) -> list[str]:
    lines = [
        "| world size | parameters | persistent copies | optimizer | EMA | teacher | total per rank "
        "| total x world size | per rank vs smallest world |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for world, s in report["scaling"].items():
        cells = " | ".join(f"{s[k] / MIB:.2f}" for k in STATE_KINDS)
        lines.append(
            f"| {world} | {cells} | {s['total'] / MIB:.2f} | {s['total_times_world'] / MIB:.2f} "
            f"| {_ratio(s['total_vs_smallest_world'])} |"
        )
    return lines


def markdown(report: dict) -> str:
    first = next(iter(report["modes"].values()))
    pairs = first["pairs_per_step"]
    lines = [
        f"Training modes on {report['world_size']} rank(s), {report['device']}, {report['precision']}: "
        f"{report['steps']} timed steps after {report['warmup']} warm-up ({report['order']}), "
        f"{pairs:.0f} pairs per step ({report['pairs_per_batch']} per rank x {report['grad_accum']} "
        f"micro-batches); reference rows padded to {report['max_length']}.",
        "",
        *_mode_table(report),
        "",
        "Rates use the median step time (per step, the slowest rank's). Useful tokens: the conversations' "
        "tokens (no padding, no views). Peak memory: " + report["peak_memory_kind"] + ", "
        "max over ranks. FLOPs per segment (megajepa/bench/flops.py); MFU only on a GPU with a known bf16 peak.",
    ]
    if "jepa_vs_ce" in report:
        r = report["jepa_vs_ce"]
        lines.append(
            f"jepa / ce time per pair: {r['measured_time_ratio']:.2f}x measured, "
            f"{r['ideal_token_ratio']:.2f}x ideal token ratio (conversation + views) / conversation: "
            f"{r['measured_over_ideal']:.2f} of ideal"
            + ("." if r["measured_cpu_time_ratio"] is None else f"; by CPU time {r['measured_cpu_time_ratio']:.2f}x.")
        )
    if report.get("vs_jepa"):
        ratios = ", ".join(f"{name} {ratio:.2f}x" for name, ratio in report["vs_jepa"].items())
        lines.append(f"Time per pair over jepa's: {ratios}.")
    loader = report.get("loader")
    if loader:
        consumed = loader["step_consumes_pairs_per_s_per_rank"]
        steps = ", ".join(f"{name} {value:,.1f}" for name, value in consumed.items())
        lines.append(
            f"Loader from local shards ({loader['num_workers']} workers): "
            f"{min(loader['pairs_per_s_per_rank']):,.0f} pairs/s per rank (slowest rank); "
            f"the training step consumes per rank: {steps} pairs/s."
        )
    if report["scaling"]:
        title = "Model state per rank, MiB (jepa-ema: the online engine and its teacher, optimizer state allocated):"
        lines += ["", title, "", *_scaling_table(report)]
    load = report["load_average"]
    lines += ["", f"Load average (1 min) before / after: {load['before'][0]:.2f} / {load['after'][0]:.2f}."]
    return "\n".join(lines)


def bar_chart(report: dict, path: str) -> None:
    """Time per pair by mode (median step), with the min-max step range as the error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["modes"])
    modes = [report["modes"][n] for n in names]
    per_pair = [1e3 * m["seconds_per_pair"] for m in modes]
    low = [1e3 * (m["step_seconds"]["median"] - m["step_seconds"]["min"]) / m["pairs_per_step"] for m in modes]
    high = [1e3 * (m["step_seconds"]["max"] - m["step_seconds"]["median"]) / m["pairs_per_step"] for m in modes]
    fig, ax = plt.subplots(figsize=(7, 4))
    bars = ax.bar(names, per_pair, yerr=[low, high], capsize=4, color="#4c72b0")
    tops = [p + h for p, h in zip(per_pair, high)]
    ax.set_ylim(0, 1.12 * max(tops))  # room for the labels
    for bar, m, top in zip(bars, modes, tops):
        ratio = m.get("time_per_pair_vs_ce")
        if ratio is not None:  # above the error bar
            label = (bar.get_x() + bar.get_width() / 2, top)
            ax.annotate(f"{ratio:.2f}x", label, ha="center", va="bottom", xytext=(0, 3), textcoords="offset points")
    ax.set_ylabel("ms per pair (median step)")
    ax.set_title(f"Time per pair by mode: {report['world_size']} rank(s), {report['device']}", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def write_outputs(report: dict, out_dir: str) -> dict[str, str]:
    """bench.md, bench.json and time_per_pair.png under out_dir, each written whole then renamed."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {name: os.path.join(out_dir, name) for name in ("bench.md", "bench.json", "time_per_pair.png")}
    write_text(paths["bench.md"], markdown(report) + "\n")
    write_text(paths["bench.json"], json.dumps(report, indent=2) + "\n")
    bar_chart(report, paths["time_per_pair.png"])
    return paths
