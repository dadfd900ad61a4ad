#!/usr/bin/env bash
# Validate a GPU machine in under 8 minutes, on that machine's own torch, triton and transformers:
#   1. gpu-tests: the GPU-only tests (pytest -m gpu): the Triton kernels against their torch
#      references, FlexAttention forward and backward against SDPA, the bf16 packed pass against
#      the fp32 oracle, Liger's fused CE under ZeRO-3 (which path ran), sync_debug; the packed pass
#      against every sequence alone with FlexAttention's gradients;
#   2. train-1b: one GPU, ZeRO-3, the Llama-3.2-1B shape at Llama 3's 128,256-row vocabulary
#      (model.vocab_size), with eval and a save, then a resume for two more steps; each step after
#      the first under torch.cuda.set_sync_debug_mode("warn") (train.sync_debug), TORCH_LOGS=recompiles;
#      the log's host synchronisations, recompiles and LM-head path are counted in summary.md;
#   3. bench-1b: `megajepa bench` ce / jepa / jepa-ema (tokens/s, MFU, peak memory), beside
#      `megajepa plan`'s predicted peak for the same micro-batch;
#   4. kernel-bench: GB/s of the fused kernels against the device's HBM peak and a measured copy.
#
#   scripts/gpu_check.sh                                       (or: make gpu-check)
#   OUT=DIR PY=python3 scripts/gpu_check.sh
#   scripts/gpu_check.sh --data-only                           (or: make gpu-check-data; no GPU needed)
#   STEPS="train bench" scripts/gpu_check.sh                   (some of: gpu-tests train bench kernels)
#
# Data: data/gpu-check (the embedded demo data, 4,000 pairs), built when missing. On a machine with
# no package registry (the accelerator the `device` tool lends), run `make gpu-wheels gpu-check-data`
# here and carry .gpu-wheels and data/gpu-check: the wheels are installed with --no-deps --target
# and put first on PYTHONPATH; the machine's torch, triton, transformers and numpy serve.
#
# Every step runs even when an earlier one failed; the exit status is non-zero if any did. Without
# a CUDA GPU it stops at once with a message saying why.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-runs/gpu-check}
DATA=${DATA:-data/gpu-check}
STEPS=" ${STEPS:-gpu-tests train bench kernels} "

die() {
    echo "gpu_check: FAILED: $*" >&2
    exit 2
}

BUILD_DATA=("$PY" -c "from megajepa.data.embedded import ensure_embedded; ensure_embedded('$DATA', n_train=4000, n_eval=200)")
if [ "${1:-}" = --data-only ]; then
    exec "${BUILD_DATA[@]}"
fi

command -v "$PY" >/dev/null 2>&1 || [ -x "$PY" ] || die "no Python at $PY (run \`make venv\` first, or set PY=...)"
if ! command -v nvidia-smi >/dev/null 2>&1; then
    die "no nvidia-smi on PATH: this machine has no NVIDIA driver, so no GPU to validate"
fi
nvidia-smi -L || die "nvidia-smi lists no GPU (driver problem, or none visible in this container)"
"$PY" - <<'PY' || die "torch sees no CUDA device (CUDA_VISIBLE_DEVICES='${CUDA_VISIBLE_DEVICES:-}'; a CPU-only torch build?)"
import sys
import torch
if not torch.cuda.is_available():
    sys.exit(1)
count = torch.cuda.device_count()
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}: {count} GPU(s), {torch.cuda.get_device_name(0)}, "
      f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'NO'}")
PY

mkdir -p "$OUT"
if [ -d .gpu-wheels ] && ! "$PY" -c "import deepspeed, streaming, omegaconf" 2>/dev/null; then
    site=$(mktemp -d)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" .gpu-wheels/*.whl \
        || die "could not install .gpu-wheels/ into $site"
    export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    echo "gpu_check: .gpu-wheels/ installed into $site"
elif ! "$PY" -c "import megajepa" 2>/dev/null; then
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c "import deepspeed, streaming, transformers, triton, torch; print('gpu_check: torch', torch.__version__, \
'triton', triton.__version__, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__, \
'streaming', streaming.__version__)" || die "megajepa's dependencies do not import (make gpu-wheels, or make venv)"
MEGAJEPA=("$PY" -m megajepa.cli)
unset TRITON_INTERPRET

wanted() { [[ "$STEPS" == *" $1 "* ]]; }
failed=()
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    echo
    echo "== $name (at most ${limit}s; log: $OUT/$name.log)"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 15 "$OUT/$name.log"
    if [ "$rc" -eq 0 ]; then
        echo "== $name: passed in $((SECONDS - start))s"
    else
        [ "$rc" -eq 124 ] && echo "== $name: TIMED OUT after ${limit}s" || echo "== $name: FAILED (exit $rc)"
        failed+=("$name")
    fi
}

if [ ! -f "$DATA/shards/eval/index.json" ]; then
    step gpu-check-data 120 "${BUILD_DATA[@]}"
fi

if wanted gpu-tests; then
    step gpu-tests 120 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests
    # the packed pass against every sequence alone, with FlexAttention's gradients (CUDA only)
    step flex-equivalence 60 "$PY" -m pytest -q -p no:cacheprovider tests/test_equivalence.py -k flex_attention
fi

# The 1B shape at Llama 3's vocabulary, on the demo data: rows of one width (row_multiple=0), so
# FlexAttention compiles for one shape.
ONE_B=(configs/llama-1b.yaml
    "data.shards=$DATA/shards/train" "data.eval_shards=$DATA/shards/eval" "data.tokenizer=$DATA/tokenizer"
    model.vocab_size=128256 data.row_length=2048 data.max_length=160 data.row_multiple=0
    data.pairs_per_batch=512 data.tokens_per_batch=null jepa.readout=content_end optim.warmup_steps=2)
TRAIN=("${ONE_B[@]}" "train.output_dir=$OUT/train-1b" train.eval_every=3 train.eval_batches=2
    train.save_every=0 logging.log_every=1 train.sync_debug=warn)
if wanted train; then
    export TORCH_LOGS=recompiles MEGAJEPA_LOG_LEVEL=INFO
    step train-1b 170 "${MEGAJEPA[@]}" train "${TRAIN[@]}" train.steps=3
    step resume-1b 90 "${MEGAJEPA[@]}" train "${TRAIN[@]}" train.steps=5 train.resume=auto train.keep_schedule=true
    unset TORCH_LOGS MEGAJEPA_LOG_LEVEL
    rm -rf "$OUT/train-1b/checkpoints"  # 17 GB of optimizer state per save
fi

wanted bench && step bench-1b 240 "${MEGAJEPA[@]}" bench "${ONE_B[@]}" \
    --modes ce,jepa,jepa-ema --steps 3 --warmup 2 --scaling none --loader-batches 0 --out "$OUT/bench-1b"

wanted kernels && step kernel-bench 60 "${MEGAJEPA[@]}" bench kernels --json "$OUT/kernels.json"

"$PY" scripts/gpu_check_summary.py "$OUT" "${ONE_B[@]}" > "$OUT/summary.md" 2>&1
cat "$OUT/summary.md"

echo
if [ ${#failed[@]} -gt 0 ]; then
    echo "gpu_check: FAILED: ${failed[*]} (logs under $OUT/)" >&2
    exit 1
fi
echo "gpu_check: all passed. Summary: $OUT/summary.md; tables: $OUT/bench-1b/bench.md, $OUT/kernel-bench.log"
