#!/usr/bin/env bash
# Run `megajepa train` under the DeepSpeed launcher: on this node alone, or on the hosts of a
# hostfile, started over ssh (pdsh) or by mpirun (openmpi).
#
# Usage:
#   launch/deepspeed.sh CONFIG [key=value ...]
#
# CONFIG and the dotted overrides are passed to `megajepa train` untouched. Run the script once,
# on the first host of the hostfile (or on the single node).
#
# Environment (default in brackets):
#   HOSTFILE        MPI-style hostfile, one "host slots=N" per line (launch/hostfile.example)
#                   [unset: this node only, no ssh]
#   NPROC_PER_NODE  ranks per node [the hostfile's slots; without a hostfile: the visible GPUs,
#                   1 on CPU, where DeepSpeed's --num_gpus simply counts CPU ranks]
#   MASTER_ADDR     address of rank 0, reachable from every host [the first host of the hostfile]
#   MASTER_PORT     [29500]
#   LAUNCHER        pdsh | openmpi, with a hostfile [pdsh]
#   LAUNCHER_ARGS   flags for pdsh or mpirun, e.g. "--mca btl_tcp_if_include ib0" []
#   REQUIRE_GPU     1: refuse to start unless this node has GPUs [0]
#   DEEPSPEED_ARGS  extra launcher flags, e.g. "--ssh_port 2222" or "--bind_cores_to_rank" []
#
# With a hostfile, every host needs passwordless ssh (pdsh), the repository at the same absolute
# path and the same Python environment: the launcher runs `cd $PWD; <this python> -m
# deepspeed.launcher.launch ...` there. Every host must have the same slots, because
# StreamingDataset assumes the same number of ranks on every node. The launcher sets LOCAL_SIZE
# but not LOCAL_WORLD_SIZE, which StreamingDataset reads: this script sets LOCAL_WORLD_SIZE in
# the environment of every rank (and MASTER_ADDR/MASTER_PORT, which mpirun does not set).
# The ranks do not outlive the process that started them (DeepSpeed's per-node launcher, or
# mpirun's daemon): each gets SIGTERM when it dies (setpriv --pdeathsig).
#
# Examples:
#   launch/deepspeed.sh configs/demo.yaml train.steps=50                    # this node, all GPUs
#   NPROC_PER_NODE=2 launch/deepspeed.sh configs/demo.yaml                  # two CPU ranks
#   HOSTFILE=launch/hostfile.example launch/deepspeed.sh configs/demo.yaml train.resume=auto
set -euo pipefail

SCRIPT_NAME=launch/deepspeed.sh
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# Reads HOSTFILE into `hosts` and `slots`, naming the line of any entry DeepSpeed would refuse.
read_hostfile() {
    local line lineno=0 host count seen i
    hosts=()
    slots=()
    while IFS= read -r line || [[ -n "$line" ]]; do
        lineno=$((lineno + 1))
        line="${line#"${line%%[![:space:]]*}"}"
        [[ -z "$line" || "$line" == \#* ]] && continue
        [[ "$line" =~ ^([^[:space:]]+)[[:space:]]+slots=([0-9]+) ]] ||
            die "$HOSTFILE:$lineno: expected 'host slots=N', got '$line'"
        host=${BASH_REMATCH[1]}
        count=${BASH_REMATCH[2]}
        for seen in "${hosts[@]}"; do
            [[ "$seen" != "$host" ]] || die "$HOSTFILE:$lineno: host $host is listed twice"
        done
        is_positive_int "$count" || die "$HOSTFILE:$lineno: $host has slots=$count"
        hosts+=("$host")
        slots+=("$count")
    done <"$HOSTFILE"
    [[ ${#hosts[@]} -gt 0 ]] || die "$HOSTFILE: no 'host slots=N' line"
    for i in "${!hosts[@]}"; do
        [[ "${slots[i]}" == "${slots[0]}" ]] ||
            die "$HOSTFILE: every host needs the same slots (StreamingDataset assumes the same number of ranks per node): ${hosts[0]} has ${slots[0]}, ${hosts[$i]} has ${slots[$i]}"
    done
}

# The variables every rank gets through DeepSpeed's DS_ENV_FILE, after the user's own
# .deepspeed_env lines (DS_ENV_FILE replaces the file DeepSpeed would otherwise read).
write_env_file() {
    local own
    for own in "$HOME/.deepspeed_env" ./.deepspeed_env ${DS_ENV_FILE:+"$DS_ENV_FILE"}; do
        if [[ -f "$own" ]]; then
            grep -v '^[[:space:]]*$' "$own" || true
        fi
    done
    run_env_lines
    echo "LOCAL_WORLD_SIZE=$1"
    echo "MASTER_ADDR=$MASTER_ADDR"
    echo "MASTER_PORT=$port"
}

check_config_and_megajepa "$@"
set_orphan_guard
export_run_env
deepspeed=$(command -v deepspeed) || die "deepspeed is not on PATH (pip install deepspeed)"

gpus=$(visible_gpus)
if [[ "${REQUIRE_GPU:-0}" == 1 && "$gpus" -eq 0 ]]; then
    die "REQUIRE_GPU=1 but no GPU is visible (CUDA_VISIBLE_DEVICES='${CUDA_VISIBLE_DEVICES-<unset>}', nvidia-smi: $(command -v nvidia-smi || echo 'not found'))"
fi
port=${MASTER_PORT:-29500}
is_positive_int "$port" || die "MASTER_PORT must be a port number, got '$port'"
read -r -a extra <<<"${DEEPSPEED_ARGS:-}"

if [[ -z "${HOSTFILE:-}" ]]; then
    nproc=${NPROC_PER_NODE:-$((gpus > 0 ? gpus : 1))}
    is_positive_int "$nproc" || die "NPROC_PER_NODE must be a positive integer, got '$nproc'"
    ((gpus == 0 || nproc <= gpus)) || die "NPROC_PER_NODE=$nproc but only $gpus GPU(s) are visible: one rank per GPU"
    if ((gpus > 0)) && [[ -v CUDA_VISIBLE_DEVICES ]]; then
        # DeepSpeed keeps to CUDA_VISIBLE_DEVICES only when no --num_gpus is given.
        ((nproc == gpus)) || die "CUDA_VISIBLE_DEVICES is set: list the $nproc GPU(s) to use there, not in NPROC_PER_NODE"
        placement=()
    else
        placement=(--num_gpus "$nproc")
    fi
    export LOCAL_WORLD_SIZE=$nproc
    # /dev/null: DeepSpeed's default hostfile (/job/hostfile) must not turn this into a multi-node run.
    command=("$deepspeed" --hostfile /dev/null "${placement[@]}" --master_port "$port" "${extra[@]}"
        --no_python --no_local_rank "${orphan_guard[@]}" "$megajepa" train "$@")
    echo "+ ${command[*]}" >&2
    exec "${command[@]}"
fi

[[ -f "$HOSTFILE" && -r "$HOSTFILE" ]] || die "HOSTFILE not found or unreadable: $HOSTFILE"
read_hostfile
nproc=${NPROC_PER_NODE:-${slots[0]}}
is_positive_int "$nproc" || die "NPROC_PER_NODE must be a positive integer, got '$nproc'"
((nproc <= slots[0])) || die "NPROC_PER_NODE=$nproc but $HOSTFILE offers slots=${slots[0]} per host"
launcher=${LAUNCHER:-pdsh}
program=("${orphan_guard[@]}" "$megajepa")
case "$launcher" in
    pdsh)
        command -v pdsh >/dev/null || die "LAUNCHER=pdsh but pdsh is not installed (apt-get install pdsh)"
        placement=()
        ((nproc == slots[0])) || placement=(--num_gpus "$nproc")
        ;;
    openmpi)
        command -v mpirun >/dev/null || die "LAUNCHER=openmpi but mpirun is not on PATH"
        ((nproc == slots[0])) || die "LAUNCHER=openmpi cannot run fewer ranks than slots: edit $HOSTFILE instead of NPROC_PER_NODE"
        placement=()
        # mpirun starts the ranks itself and names them only in OMPI_COMM_WORLD_*: give them the
        # variables torch.distributed and StreamingDataset read.
        # shellcheck disable=SC2016  # expanded by each rank's shell
        program=(bash -c 'export RANK=$OMPI_COMM_WORLD_RANK WORLD_SIZE=$OMPI_COMM_WORLD_SIZE \
LOCAL_RANK=$OMPI_COMM_WORLD_LOCAL_RANK LOCAL_WORLD_SIZE=$OMPI_COMM_WORLD_LOCAL_SIZE; exec "$0" "$@"' "${orphan_guard[@]}" "$megajepa")
        ;;
    *) die "LAUNCHER must be pdsh or openmpi, got '$launcher'" ;;
esac
MASTER_ADDR=${MASTER_ADDR:-${hosts[0]}}

env_file=$(mktemp "${TMPDIR:-/tmp}/megajepa-deepspeed-env.XXXXXX")
trap 'rm -f "$env_file"' EXIT
write_env_file "$nproc" >"$env_file"
command=("$deepspeed" --hostfile "$HOSTFILE" --launcher "$launcher" --launcher_args "${LAUNCHER_ARGS:-}"
    "${placement[@]}" --master_addr "$MASTER_ADDR" --master_port "$port" "${extra[@]}"
    --no_python --no_local_rank "${program[@]}" train "$@")
echo "+ ${command[*]}" >&2
DS_ENV_FILE=$env_file "${command[@]}"
