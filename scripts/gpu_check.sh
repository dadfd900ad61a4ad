#!/usr/bin/env bash
# Validate a GPU machine (one GPU or a node) in under 10 minutes:
#   1. the GPU-only tests (pytest -m gpu): the Triton kernels compiled and run against their torch
#      references, FlexAttention forward and backward against SDPA, the bf16 packed pass against
#      the fp32 oracle within bf16 tolerance, the packed pass's FlexAttention gradients;
#   2. a few training steps of the Llama-3.2-1B shape with `megajepa bench` (tokens/s, MFU, peak
#      memory), one rank per GPU, on the embedded demo data (its small vocabulary, not Llama 3's);
#   3. the kernel bench (`megajepa bench kernels`: GB/s against the device's peak bandwidth).
#
#   scripts/gpu_check.sh            (or: make gpu-check)
#   OUT=DIR PY=path/to/python scripts/gpu_check.sh
#
# Every step runs even when an earlier one failed; the exit status is non-zero if any did. Without
# a CUDA GPU it stops at once with a message saying why.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/gpu-check}
MEGAJEPA="$(dirname "$PY")/megajepa"

die() {
    echo "gpu_check: FAILED: $*" >&2
    exit 2
}

[ -x "$PY" ] || die "no Python at $PY (run \`make venv\` first, or set PY=...)"
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
unset TRITON_INTERPRET
failed=()
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    echo
    echo "== $name (at most ${limit}s; log: $OUT/$name.log)"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 0 ]; then
        echo "== $name: passed in $((SECONDS - start))s"
    else
        [ "$rc" -eq 124 ] && echo "== $name: TIMED OUT after ${limit}s" || echo "== $name: FAILED (exit $rc)"
        failed+=("$name")
    fi
}

step gpu-tests 240 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests
# The packed pass against every sequence alone, with FlexAttention's backward (CUDA only).
step flex-equivalence 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_equivalence.py -k flex_attention

# The 1B model (configs/llama-1b.yaml: bf16, FlexAttention, checkpointing, ZeRO-3) on the demo data:
# rows of one width (row_multiple=0) so that FlexAttention compiles once per mode.
step bench-1b 360 "$MEGAJEPA" bench configs/llama-1b.yaml \
    data.embedded=data/demo data.shards=data/demo/shards/train data.eval_shards=data/demo/shards/eval \
    data.tokenizer=data/demo/tokenizer data.row_length=512 data.max_length=160 data.row_multiple=0 jepa.readout=content_end \
    data.pairs_per_batch=128 data.tokens_per_batch=null \
    --modes ce,jepa,jepa-ema --steps 5 --warmup 2 --scaling none --loader-batches 0 --out "$OUT/bench-1b"

step kernel-bench 120 "$MEGAJEPA" bench kernels --json "$OUT/kernels.json"

echo
if [ ${#failed[@]} -gt 0 ]; then
    echo "gpu_check: FAILED: ${failed[*]} (logs under $OUT/)" >&2
    exit 1
fi
echo "gpu_check: all passed. Tables: $OUT/bench-1b/bench.md (tokens/s, MFU, peak memory), $OUT/kernel-bench.log (GB/s)"
