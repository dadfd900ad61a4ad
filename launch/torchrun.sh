#!/usr/bin/env bash
# Run `megajepa train` under torchrun, on one node or many (c10d rendezvous).
#
# Usage:
#   launch/torchrun.sh CONFIG [key=value ...]
#
# CONFIG and the dotted overrides are passed to `megajepa train` untouched. Run the script once on
# every node of the job; each node starts NPROC_PER_NODE ranks.
#
# Environment (default in brackets):
#   NNODES          nodes in the job [1]
#   NPROC_PER_NODE  ranks on this node [number of visible GPUs; 1 without GPUs]
#   MASTER_ADDR     host of the rendezvous, reachable from every node [required when NNODES > 1;
#                   unset with NNODES=1: a standalone rendezvous on a free local port]
#   MASTER_PORT     port of the rendezvous [29500]
#   RDZV_ID         job id, the same on every node of one job [megajepa]
#   NODE_RANK       optional: node 0 hosts the rendezvous store, the others connect to it. Without
#                   it the node whose hostname or address is MASTER_ADDR hosts it. c10d numbers
#                   the nodes itself, in the order they join.
#   REQUIRE_GPU     1: refuse to start unless NPROC_PER_NODE GPUs are visible [0]
#   TORCHRUN_ARGS   extra torchrun flags, e.g. "--max-restarts 3" []
#
# Each node becomes one StreamingDataset node: torchrun sets LOCAL_WORLD_SIZE=NPROC_PER_NODE.
# The ranks do not outlive the torchrun agent: each gets SIGTERM when it dies (setpriv --pdeathsig).
#
# Examples:
#   launch/torchrun.sh configs/demo.yaml train.steps=50            # this node, all its GPUs
#   NPROC_PER_NODE=2 launch/torchrun.sh configs/demo.yaml          # two CPU ranks
#   # two nodes; on each of them:
#   NNODES=2 MASTER_ADDR=node0 RDZV_ID=run7 launch/torchrun.sh configs/demo.yaml train.resume=auto
set -euo pipefail

SCRIPT_NAME=launch/torchrun.sh
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

check_config_and_megajepa "$@"
set_orphan_guard
export_run_env
torchrun=$(command -v torchrun) || die "torchrun is not on PATH (it comes with torch)"

nnodes=${NNODES:-1}
is_positive_int "$nnodes" || die "NNODES must be a positive integer, got '$nnodes'"

gpus=$(visible_gpus)
nproc=${NPROC_PER_NODE:-$((gpus > 0 ? gpus : 1))}
is_positive_int "$nproc" || die "NPROC_PER_NODE must be a positive integer, got '$nproc'"
if [[ "${REQUIRE_GPU:-0}" == 1 && "$gpus" -eq 0 ]]; then
    die "REQUIRE_GPU=1 but no GPU is visible (CUDA_VISIBLE_DEVICES='${CUDA_VISIBLE_DEVICES-<unset>}', nvidia-smi: $(command -v nvidia-smi || echo 'not found'))"
fi
if ((gpus > 0 && nproc > gpus)); then
    die "NPROC_PER_NODE=$nproc but only $gpus GPU(s) are visible: one rank per GPU"
fi

if [[ $nnodes -eq 1 && -z "${MASTER_ADDR:-}" ]]; then
    rendezvous=(--standalone)
else
    [[ -n "${MASTER_ADDR:-}" ]] || die "NNODES=$nnodes needs MASTER_ADDR (the host every node can reach)"
    port=${MASTER_PORT:-29500}
    is_positive_int "$port" || die "MASTER_PORT must be a port number, got '$port'"
    rendezvous=(--rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$port" --rdzv-id "${RDZV_ID:-megajepa}")
    if [[ -n "${NODE_RANK:-}" ]]; then
        [[ "$NODE_RANK" =~ ^[0-9]+$ ]] || die "NODE_RANK must be a non-negative integer, got '$NODE_RANK'"
        # On one machine every node matches MASTER_ADDR: say explicitly which one hosts the store.
        rendezvous+=(--rdzv-conf "is_host=$([[ $NODE_RANK -eq 0 ]] && echo true || echo false)")
    fi
fi

read -r -a extra <<<"${TORCHRUN_ARGS:-}"
command=("$torchrun" "${rendezvous[@]}" --nnodes "$nnodes" --nproc-per-node "$nproc" "${extra[@]}"
    --no-python "${orphan_guard[@]}" "$megajepa" train "$@")
echo "+ ${command[*]}" >&2
exec "${command[@]}"
