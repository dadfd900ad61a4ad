"""The memory-plan figures quoted outside megajepa/plan.py, written from `megajepa plan` itself so that
they cannot go stale: README's table of the Llama run configs (between its plan-table markers) and
each configs/llama*.yaml's "Token budget" comment block.

    python scripts/plan_figures.py            rewrite them
    python scripts/plan_figures.py --check    exit 1, naming the file, where one differs (tests/test_plan.py)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from megajepa.config import load_config  # noqa: E402
from megajepa.plan import _gib, make_plan  # noqa: E402

CONFIGS = ["llama-1b", "llama-1b-ema", "llama-8b", "llama-8b-ema"]
GPUS, GPU_MEMORY, VOCAB = 8, 80, 128256  # one node of 8 x 80 GB; the Llama 3 tokenizer's size
BEGIN, END = "<!-- plan-table: scripts/plan_figures.py writes it -->", "<!-- plan-table end -->"


def plan_of(name: str):
    cfg = load_config(str(REPO / "configs" / f"{name}.yaml"), need_tokenizer=False)
    return cfg, make_plan(cfg, f"configs/{name}.yaml", GPUS, GPU_MEMORY, vocab_size=VOCAB)


def _model_name(cfg) -> str:
    with open(REPO / cfg.model.config) as f:
        spec = json.load(f)
    base = Path(cfg.model.config).stem  # llama-3.2-1b
    return "Llama" + base[len("llama"):].upper() if spec["model_type"] == "llama" else base


def readme_table(plans) -> str:
    lines = [
        BEGIN,
        "| config | model | target | `data.tokens_per_batch` | planned budget (full logits) | planned peak |",
        "|---|---|---|---:|---:|---:|",
    ]
    for name, (cfg, plan) in plans.items():
        tokens = plan.config_tokens[1]
        budget = plan.max_tokens(plan.checkpointing, chunked=False)
        peak = plan.peak_bytes(tokens, plan.checkpointing, False)
        target = "EMA" if cfg.jepa.target == "ema" else "online"
        lines.append(
            f"| `configs/{name}.yaml` | {_model_name(cfg)} | {target} | {tokens:,} | {budget:,} | {_gib(peak)} GiB |"
        )
    return "\n".join(lines + [END])


def header_block(plan) -> list[str]:
    """The config's "Token budget" comment lines."""
    state, d = plan.state, plan.dims
    ema = state.get("ema", 0.0)
    extra = f" (EMA {_gib(ema)} fp32 + teacher {_gib(state['teacher'])} included)" if ema else ""
    tokens = plan.config_tokens[1]
    budget = plan.max_tokens(plan.checkpointing, chunked=False)
    logits = plan.labelled_fraction * 12 * d.vocab / 2**20
    return [
        f"# Token budget, from `megajepa plan CONFIG --gpus {GPUS} --gpu-memory {GPU_MEMORY} --vocab-size {VOCAB}`",
        "# (expected figures from formulas, no GPU run behind them; scripts/plan_figures.py writes this block):",
        f"#   per rank: model state {_gib(plan.state_bytes())} GiB{extra},",
        f"#   ZeRO buffers {_gib(sum(plan.buffers.values()))} GiB, fp32 gradient at the step {_gib(plan.step_transient)} GiB, "
        f"activations {d.activation_bytes_per_token(True) / 2**20:.2f} MiB/token",
        f"#   with checkpointing ({d.activation_bytes_per_token(False) / 2**20:.2f} without), full fp32 logits "
        f"{logits:.2f} MiB/token (labelled fraction {plan.labelled_fraction:g}),",
        f"#   {_gib(plan.headroom)} GiB headroom.",
        f"#   Largest budget with today's full-logit CE: {budget:,} tokens per micro-batch per rank; "
        "data.tokens_per_batch",
        f"#   {tokens:,} ({100 * tokens // budget}% of it; it counts every sequence of a record, an upper bound "
        "on the online rows).",
    ]


def with_header(text: str, block: list[str]) -> str:
    """The config text with its comment block that starts at "# Token budget" replaced."""
    lines = text.split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("# Token budget"))
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("#"))
    return "\n".join(lines[:start] + block + lines[end:])


def with_table(text: str, table: str) -> str:
    start, end = text.index(BEGIN), text.index(END) + len(END)
    return text[:start] + table + text[end:]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 where a file differs")
    args = parser.parse_args(argv)
    plans = {name: plan_of(name) for name in CONFIGS}
    wanted = {REPO / "README.md": with_table((REPO / "README.md").read_text(), readme_table(plans))}
    for name, (_, plan) in plans.items():
        path = REPO / "configs" / f"{name}.yaml"
        wanted[path] = with_header(path.read_text(), header_block(plan))
    stale = [path for path, text in wanted.items() if path.read_text() != text]
    for path in stale:
        if args.check:
            print(f"{path.relative_to(REPO)}: its plan figures differ from `megajepa plan`'s "
                  "(run python scripts/plan_figures.py)", file=sys.stderr)
        else:
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            tmp.write_text(wanted[path])
            os.replace(tmp, path)
            print(f"wrote {path.relative_to(REPO)}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
