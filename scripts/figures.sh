#!/usr/bin/env bash
# Regenerate the generated figures and tables of README.md and docs/, on this machine's CPU, so that
# none goes stale by hand:
#   plan     README's table of the Llama run configs and their "Token budget" comments
#            (scripts/plan_figures.py; seconds)
#   bench    docs/bench-time-per-pair.png and docs/bench-cpu.md: `megajepa bench` of the five modes
#            on configs/demo.yaml (2 gloo ranks; about 4 min on 2 cores)
#   compare  docs/compare.png and .md: next-token, LLM-JEPA, LLM-JEPA + SIGReg and STP over 5 seeds,
#            1000 steps each (README "Does it help?"; about 2 h on 2 cores, --jobs 2; rerunning
#            it reuses finished runs and evaluations)
#   families README's model-family sweep (scripts/families_table.py; long, not in the default set)
#
#   scripts/figures.sh                   plan bench compare
#   scripts/figures.sh plan bench        some of them
#   PY=python3 scripts/figures.sh        another interpreter (default: .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WHAT=" ${*:-plan bench compare} "
OUT=${OUT:-runs/figures}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

wanted() { [[ $WHAT == *" $1 "* ]]; }

if wanted plan; then
    "$PY" scripts/plan_figures.py
fi
if wanted bench; then
    rm -rf "$OUT/bench"
    "$PY" -m megajepa.cli bench configs/demo.yaml --modes ce,jepa,jepa-ema,ref3,ref2 --out "$OUT/bench"
    cp "$OUT/bench/time_per_pair.png" docs/bench-time-per-pair.png
    cp "$OUT/bench/bench.md" docs/bench-cpu.md
fi
if wanted compare; then
    "$PY" -m megajepa.cli compare configs/demo.yaml --arms next-token,jepa,jepa-sigreg,stp --seeds 5 --jobs 2 \
        --out "$OUT/compare" --limit 300 train.steps=1000 train.save_every=0
    cp "$OUT/compare/curves.png" docs/compare.png
    cp "$OUT/compare/compare.md" docs/compare.md
fi
if wanted families; then
    "$PY" scripts/families_table.py "$OUT/families.md"
    echo "the sweep table: $OUT/families.md (README's \"Model families\" section)"
fi
