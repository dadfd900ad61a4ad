#!/usr/bin/env bash
# make gpu-wheels: the wheels a GPU machine with its own torch, triton, transformers and numpy
# needs beyond them (the accelerator image lent here: Python 3.12, torch 2.11, transformers 5.17,
# no package registry), at requirements/cpu.lock's versions, into .gpu-wheels/ (git-ignored).
#
#   scripts/gpu_wheels.sh            (or: make gpu-wheels)
#
# DeepSpeed has no wheel on PyPI: one is built from its sdist with no ops compiled (py3-none-any;
# DeepSpeed JIT-builds an op on first use, and the GPU configs use none). scripts/gpu_check.sh
# installs the folder with `pip install --no-deps --target` and puts it first on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.gpu-wheels}
LOCK=requirements/cpu.lock
PY=${PY:-python3.12}
LIMIT_MIB=48  # the device tool carries 64 MiB per call, the working tree included

# What the image lacks: DeepSpeed and its pydantic, streaming and its codecs, OmegaConf, Liger.
PACKAGES=(
    deepspeed hjson py-cpuinfo pydantic pydantic-core annotated-types typing-inspection
    streaming-community catalogue brotli cramjam python-snappy zstd
    omegaconf liger-kernel
)

pinned() {  # pinned NAME: NAME==VERSION from the lock (names compared as pip normalises them)
    local want
    want=$(echo "$1" | tr 'A-Z_' 'a-z-')
    grep -v '^#' "$LOCK" | while IFS= read -r line; do
        name=${line%%==*}
        [ "$(echo "$name" | tr 'A-Z_.' 'a-z--')" = "$want" ] && { echo "$line"; break; }
    done
}

rm -rf "$OUT.partial" && mkdir -p "$OUT.partial"
binary=()
for package in "${PACKAGES[@]}"; do
    spec=$(pinned "$package")
    [ -n "$spec" ] || { echo "gpu-wheels: $package is not in $LOCK" >&2; exit 2; }
    if [ "$package" = deepspeed ]; then
        DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --no-deps "$spec" -w "$OUT.partial"
    else
        binary+=("$spec")
    fi
done
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_14_x86_64 \
    --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -d "$OUT.partial" "${binary[@]}"

count=$(ls "$OUT.partial"/*.whl | wc -l)
[ "$count" -eq "${#PACKAGES[@]}" ] || { echo "gpu-wheels: $count wheels for ${#PACKAGES[@]} packages" >&2; exit 1; }
size=$(du -sm "$OUT.partial" | cut -f1)
[ "$size" -le "$LIMIT_MIB" ] || { echo "gpu-wheels: $size MiB, over the ${LIMIT_MIB} MiB left for them" >&2; exit 1; }
rm -rf "$OUT" && mv "$OUT.partial" "$OUT"
echo "gpu-wheels: $count wheels, $size MiB in $OUT/"
