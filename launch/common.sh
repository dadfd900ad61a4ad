# shellcheck shell=bash
# Helpers shared by the launch scripts (sourced, not run). The sourcing script sets SCRIPT_NAME.

die() {
    echo "$SCRIPT_NAME: $*" >&2
    exit 2
}

# GPUs this process may use: those nvidia-smi lists, capped by CUDA_VISIBLE_DEVICES when set
# (set but empty means none).
visible_gpus() {
    local count=0 ids
    if command -v nvidia-smi >/dev/null 2>&1; then
        count=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    fi
    if [[ -v CUDA_VISIBLE_DEVICES ]]; then
        IFS=',' read -r -a ids <<<"$CUDA_VISIBLE_DEVICES"
        count=$((${#ids[@]} < count ? ${#ids[@]} : count))
    fi
    echo "$count"
}

is_positive_int() {
    [[ "$1" =~ ^[1-9][0-9]*$ ]]
}

# Checks the CONFIG argument and that megajepa is installed; sets `config` and `megajepa` for the caller.
# shellcheck disable=SC2034
check_config_and_megajepa() {
    [[ $# -ge 1 ]] || die "usage: $SCRIPT_NAME CONFIG [key=value ...]"
    config=$1
    [[ -f "$config" && -r "$config" ]] || die "config file not found or unreadable: $config"
    megajepa=$(command -v megajepa) ||
        die "megajepa is not on PATH: activate its environment (source .venv/bin/activate) or pip install -e ."
    # the config, its overrides and the data it reads, once, before any rank starts (it says what is wrong)
    "$megajepa" config --check "$@" || exit 2
}

# The environment of every rank and launcher, each variable unless already set (exported here, and
# written into DeepSpeed's env file for the other nodes by run_env_lines).
# TORCH_ELASTIC_SHUTDOWN_TIMEOUT: after Ctrl-C or SIGTERM torchrun waits this long for the ranks,
#   which checkpoint the current step first, before it sends SIGKILL (its own default, 30 s, is
#   shorter than a large model's save).
# TORCH_NCCL_DUMP_ON_TIMEOUT, TORCH_NCCL_TRACE_BUFFER_SIZE: NCCL's flight recorder keeps each rank's
#   last collectives (torchtitan's 20000) and dumps them when a collective times out (train.timeout),
#   to /tmp/nccl_trace_rank_N (TORCH_FR_DUMP_TEMP_FILE); torch's `torchfrtrace` says which rank
#   stopped where.
# PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True: packed rows of varying length fragment the
#   caching allocator's fixed segments; expandable ones grow in place (left alone when the newer
#   PYTORCH_ALLOC_CONF is set).
run_env_lines() {
    echo "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-900}"
    echo "TORCH_NCCL_DUMP_ON_TIMEOUT=${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}"
    echo "TORCH_NCCL_TRACE_BUFFER_SIZE=${TORCH_NCCL_TRACE_BUFFER_SIZE:-20000}"
    if [[ -z "${PYTORCH_ALLOC_CONF:-}" ]]; then
        echo "PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
    fi
}

export_run_env() {
    local line
    while IFS= read -r line; do
        export "${line?}"
    done < <(run_env_lines)
}

# The prefix of every rank's command: the rank gets SIGTERM when the process that started it (its
# agent: torchrun, DeepSpeed's per-node launcher, orted) dies, even by SIGKILL, and stops as on any
# SIGTERM (a checkpoint at the end of the step, or at once before training starts). Sets
# `orphan_guard` for the caller.
# shellcheck disable=SC2034
set_orphan_guard() {
    command -v setpriv >/dev/null ||
        die "setpriv is not on PATH (util-linux): it ends the ranks when their launcher dies"
    orphan_guard=(setpriv --pdeathsig TERM --)
}
