"""launch/: each script checks its inputs before starting anything, and hands the config and the
overrides to `megajepa train` untouched.

The tools the scripts start (torchrun, deepspeed, pdsh, srun, scontrol, nvidia-smi, megajepa) are
stand-ins on PATH that record how they were called, so nothing real starts; except in the last
tests, where the real torchrun and DeepSpeed launchers start stand-in ranks and are killed.
Runtime: about 20 seconds. The real Slurm is in tests/test_slurm.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _train_utils import free_port

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/demo.yaml"
OVERRIDES = ["train.steps=5", "train.output_dir=/tmp/a dir with spaces", "jepa.lambda_=2"]

# Records its arguments (NUL-separated), its environment and DeepSpeed's DS_ENV_FILE, then exits.
RECORDER = """#!/usr/bin/env bash
log="$SHIM_LOG/$(basename "$0")"
printf '%s\\0' "$@" >"$log.args"
env -0 >"$log.env"
if [[ -n "${DS_ENV_FILE:-}" && -f "$DS_ENV_FILE" ]]; then cp "$DS_ENV_FILE" "$log.ds_env"; fi
"""
# megajepa: `config --check` (the launchers' one validation) answers FAKE_CHECK_STATUS unrecorded
MEGAJEPA = """#!/usr/bin/env bash
if [[ "$1 $2" == "config --check" ]]; then
    [[ "${FAKE_CHECK_STATUS:-0}" == 0 ]] || echo "megajepa: config error: data.shards: no such directory: x" >&2
    exit "${FAKE_CHECK_STATUS:-0}"
fi
""" + RECORDER.split("\n", 1)[1]
NVIDIA_SMI = """#!/usr/bin/env bash
for ((i = 0; i < ${FAKE_GPUS:-0}; i++)); do echo "GPU $i: Fake GPU (UUID: GPU-$i)"; done
"""
# srun: records, then runs like a job step until SIGTERM ends it (from the batch
# script through scancel, or Slurm itself); the ranks it stands for exit with FAKE_RANK_STATUS.
SRUN = RECORDER + """sleep "${FAKE_SRUN_SECONDS:-0}" &
sleeper=$!
trap 'echo TERM >"$SHIM_LOG/srun.signal"; kill $sleeper; exit "${FAKE_RANK_STATUS:-0}"' TERM
echo $$ >"$SHIM_LOG/srun.pid.tmp" && mv "$SHIM_LOG/srun.pid.tmp" "$SHIM_LOG/srun.pid"  # ready for signals
wait $sleeper
"""
SCONTROL = """#!/usr/bin/env bash
case "$1 $2" in
    "show hostnames") printf '%s\\n' $FAKE_HOSTS ;;
    "requeue "*) echo "$2" >"$SHIM_LOG/requeued" ;;
esac
"""
# scancel --signal=SIG JOB: Slurm signals the job step's tasks (the srun stand-in here).
SCANCEL = RECORDER + """kill -"${1#--signal=}" "$(cat "$SHIM_LOG/srun.pid")"
"""


@pytest.fixture
def shims(tmp_path):
    """A directory of stand-in tools, and where they record their calls."""
    bin_dir, log_dir = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log_dir.mkdir()
    scripts = {name: RECORDER for name in ("torchrun", "deepspeed", "pdsh", "mpirun")}
    scripts["megajepa"] = MEGAJEPA
    scripts.update({"nvidia-smi": NVIDIA_SMI, "srun": SRUN, "scontrol": SCONTROL, "scancel": SCANCEL})
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir, log_dir


def run(script: str, args: list[str], shims, tmp_path, timeout: float = 20, **env: str) -> subprocess.CompletedProcess:
    bin_dir, log_dir = shims
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    base = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(home), "TMPDIR": str(tmp_path), "SHIM_LOG": str(log_dir)}
    return subprocess.run(
        ["bash", f"launch/{script}", *args],
        cwd=REPO,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def started(shims) -> list[str]:
    return sorted(p.name.split(".")[0] for p in shims[1].glob("*.args") if p.name.split(".")[0] != "nvidia-smi")


def call(shims, tool: str) -> tuple[list[str], dict[str, str]]:
    log = shims[1] / tool
    args = (log.parent / f"{tool}.args").read_text().split("\0")[:-1]
    env = dict(item.split("=", 1) for item in (log.parent / f"{tool}.env").read_text().split("\0") if "=" in item)
    return args, env


def megajepa_arguments(args: list[str], shims) -> list[str]:
    """What the launcher would run: everything from the megajepa executable on."""
    start = args.index(str(shims[0] / "megajepa"))
    return args[start + 1 :]


def assert_refused(result: subprocess.CompletedProcess, message: str, shims) -> None:
    assert result.returncode != 0, result.stderr
    assert message in result.stderr
    assert started(shims) == [], "a launcher started although the input was refused"


# --- refused before anything starts ----------------------------------------------------------


@pytest.mark.parametrize("script", ["torchrun.sh", "deepspeed.sh"])
def test_missing_config(script, shims, tmp_path):
    result = run(script, ["configs/no-such.yaml", *OVERRIDES], shims, tmp_path)
    assert_refused(result, "config file not found or unreadable: configs/no-such.yaml", shims)


@pytest.mark.parametrize("script", ["torchrun.sh", "deepspeed.sh"])
def test_a_config_that_fails_its_check_starts_nothing(script, shims, tmp_path):
    result = run(script, [CONFIG, "data.shards=x"], shims, tmp_path, FAKE_CHECK_STATUS="2", FAKE_GPUS="1")
    assert_refused(result, "data.shards: no such directory: x", shims)


@pytest.mark.parametrize("script", ["torchrun.sh", "deepspeed.sh"])
def test_no_arguments(script, shims, tmp_path):
    assert_refused(run(script, [], shims, tmp_path), "usage:", shims)


@pytest.mark.parametrize("script", ["torchrun.sh", "deepspeed.sh"])
def test_megajepa_not_on_path(script, shims, tmp_path):
    (shims[0] / "megajepa").unlink()
    assert_refused(run(script, [CONFIG], shims, tmp_path), "megajepa is not on PATH", shims)


@pytest.mark.parametrize("script", ["torchrun.sh", "deepspeed.sh"])
@pytest.mark.parametrize("gpu_env", [{"FAKE_GPUS": "0"}, {"FAKE_GPUS": "4", "CUDA_VISIBLE_DEVICES": ""}])
def test_gpus_required_but_absent(script, gpu_env, shims, tmp_path):
    result = run(script, [CONFIG], shims, tmp_path, REQUIRE_GPU="1", **gpu_env)
    assert_refused(result, "REQUIRE_GPU=1 but no GPU is visible", shims)


@pytest.mark.parametrize("script", ["torchrun.sh", "deepspeed.sh"])
def test_more_ranks_than_gpus(script, shims, tmp_path):
    result = run(script, [CONFIG], shims, tmp_path, FAKE_GPUS="2", NPROC_PER_NODE="4")
    assert_refused(result, "NPROC_PER_NODE=4 but only 2 GPU(s) are visible", shims)


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_torchrun_bad_rank_count(value, shims, tmp_path):
    result = run("torchrun.sh", [CONFIG], shims, tmp_path, NPROC_PER_NODE=value)
    assert_refused(result, f"NPROC_PER_NODE must be a positive integer, got '{value}'", shims)


def test_torchrun_many_nodes_need_master_addr(shims, tmp_path):
    assert_refused(run("torchrun.sh", [CONFIG], shims, tmp_path, NNODES="2"), "NNODES=2 needs MASTER_ADDR", shims)


def test_deepspeed_missing_hostfile(shims, tmp_path):
    missing = tmp_path / "no-such-hostfile"
    result = run("deepspeed.sh", [CONFIG], shims, tmp_path, HOSTFILE=str(missing))
    assert_refused(result, f"HOSTFILE not found or unreadable: {missing}", shims)


@pytest.mark.parametrize(
    "text, message",
    [
        ("# nodes\nnode-0 slots=2\nnode-1 two slots\n", "{hostfile}:3: expected 'host slots=N', got 'node-1 two slots'"),
        ("node-0 slots=2\nnode-0 slots=2\n", "{hostfile}:2: host node-0 is listed twice"),
        ("node-0 slots=8\nnode-1 slots=4\n", "every host needs the same slots"),
        ("# only comments\n\n", "{hostfile}: no 'host slots=N' line"),
        ("node-0 slots=0\n", "{hostfile}:1: node-0 has slots=0"),
    ],
)
def test_deepspeed_bad_hostfile_named_by_line(text, message, shims, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(text)
    result = run("deepspeed.sh", [CONFIG], shims, tmp_path, HOSTFILE=str(hostfile))
    assert_refused(result, message.format(hostfile=hostfile), shims)


def test_deepspeed_launcher_backend_missing(shims, tmp_path):
    (shims[0] / "pdsh").unlink()
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-0 slots=2\nnode-1 slots=2\n")
    result = run("deepspeed.sh", [CONFIG], shims, tmp_path, HOSTFILE=str(hostfile))
    assert_refused(result, "LAUNCHER=pdsh but pdsh is not installed", shims)


def test_slurm_outside_a_job(shims, tmp_path):
    assert_refused(run("slurm.sbatch", [CONFIG], shims, tmp_path), "not inside a Slurm job", shims)


def slurm_env(**extra: str) -> dict[str, str]:
    env = {"SLURM_JOB_ID": "4242", "SLURM_SUBMIT_DIR": str(REPO), "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_CPUS_ON_NODE": "16"}
    env["FAKE_HOSTS"] = "gpu07 gpu08"
    return {**env, **extra}


def test_slurm_missing_config(shims, tmp_path):
    result = run("slurm.sbatch", ["configs/no-such.yaml"], shims, tmp_path, **slurm_env())
    assert_refused(result, "config file not found or unreadable: configs/no-such.yaml", shims)


def test_slurm_gpus_required_but_absent(shims, tmp_path):
    result = run("slurm.sbatch", [CONFIG], shims, tmp_path, REQUIRE_GPU="1", **slurm_env())
    assert_refused(result, "REQUIRE_GPU=1 but the job has no GPUs", shims)


# --- what starts when the input is good ------------------------------------------------------


def test_torchrun_one_node_defaults(shims, tmp_path):
    result = run("torchrun.sh", [CONFIG, *OVERRIDES], shims, tmp_path, FAKE_GPUS="3")
    assert result.returncode == 0, result.stderr
    args, _ = call(shims, "torchrun")
    assert args[: args.index("--no-python")] == ["--standalone", "--nnodes", "1", "--nproc-per-node", "3"]
    assert megajepa_arguments(args, shims) == ["train", CONFIG, *OVERRIDES]


def test_torchrun_one_rank_without_gpus(shims, tmp_path):
    assert run("torchrun.sh", [CONFIG], shims, tmp_path).returncode == 0
    args, _ = call(shims, "torchrun")
    assert args[args.index("--nproc-per-node") + 1] == "1"


def test_torchrun_visible_devices_cap_the_ranks(shims, tmp_path):
    assert run("torchrun.sh", [CONFIG], shims, tmp_path, FAKE_GPUS="8", CUDA_VISIBLE_DEVICES="2,5").returncode == 0
    args, _ = call(shims, "torchrun")
    assert args[args.index("--nproc-per-node") + 1] == "2"


@pytest.mark.parametrize("node_rank, is_host", [("0", "true"), ("1", "false")])
def test_torchrun_node_of_many(node_rank, is_host, shims, tmp_path):
    env = dict(NNODES="2", NODE_RANK=node_rank, MASTER_ADDR="10.0.0.7", MASTER_PORT="29555", RDZV_ID="run7")
    result = run("torchrun.sh", [CONFIG, *OVERRIDES], shims, tmp_path, NPROC_PER_NODE="1", **env)
    assert result.returncode == 0, result.stderr
    args, _ = call(shims, "torchrun")
    options = args[: args.index("--no-python")]
    assert options == [
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "10.0.0.7:29555", "--rdzv-id", "run7",
        "--rdzv-conf", f"is_host={is_host}", "--nnodes", "2", "--nproc-per-node", "1",
    ]  # fmt: skip
    assert megajepa_arguments(args, shims) == ["train", CONFIG, *OVERRIDES]


def test_deepspeed_one_node_on_cpu(shims, tmp_path):
    result = run("deepspeed.sh", [CONFIG, *OVERRIDES], shims, tmp_path, NPROC_PER_NODE="2", MASTER_PORT="29600")
    assert result.returncode == 0, result.stderr
    args, env = call(shims, "deepspeed")
    options = args[: args.index("--no_python")]
    assert options == ["--hostfile", "/dev/null", "--num_gpus", "2", "--master_port", "29600"]
    assert args[args.index("--no_python") + 1] == "--no_local_rank"
    assert megajepa_arguments(args, shims) == ["train", CONFIG, *OVERRIDES]
    assert env["LOCAL_WORLD_SIZE"] == "2"


def test_deepspeed_one_node_keeps_visible_devices(shims, tmp_path):
    # DeepSpeed honours CUDA_VISIBLE_DEVICES only without --num_gpus.
    result = run("deepspeed.sh", [CONFIG], shims, tmp_path, FAKE_GPUS="8", CUDA_VISIBLE_DEVICES="4,5")
    assert result.returncode == 0, result.stderr
    args, env = call(shims, "deepspeed")
    assert "--num_gpus" not in args
    assert env["LOCAL_WORLD_SIZE"] == "2"


def test_deepspeed_hostfile(shims, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\nnode-0 slots=4\n\nnode-1   slots=4  # a comment\n")
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / ".deepspeed_env").write_text("NCCL_SOCKET_IFNAME=ib0\n\n")
    result = run("deepspeed.sh", [CONFIG, *OVERRIDES], shims, tmp_path, HOSTFILE=str(hostfile))
    assert result.returncode == 0, result.stderr
    args, env = call(shims, "deepspeed")
    options = args[: args.index("--no_python")]
    assert options == [
        "--hostfile", str(hostfile), "--launcher", "pdsh", "--launcher_args", "",
        "--master_addr", "node-0", "--master_port", "29500",
    ]  # fmt: skip
    assert megajepa_arguments(args, shims) == ["train", CONFIG, *OVERRIDES]
    exported = (shims[1] / "deepspeed.ds_env").read_text().splitlines()
    run_env = [f"{k}={v}" for k, v in RUN_ENV.items()]
    assert exported == ["NCCL_SOCKET_IFNAME=ib0", *run_env, "LOCAL_WORLD_SIZE=4", "MASTER_ADDR=node-0", "MASTER_PORT=29500"]
    assert not os.path.exists(env["DS_ENV_FILE"]), "the generated env file outlived the launch"


def test_deepspeed_hostfile_fewer_ranks_than_slots(shims, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-0 slots=8\nnode-1 slots=8\n")
    result = run("deepspeed.sh", [CONFIG], shims, tmp_path, HOSTFILE=str(hostfile), NPROC_PER_NODE="2")
    assert result.returncode == 0, result.stderr
    args, _ = call(shims, "deepspeed")
    assert args[args.index("--num_gpus") + 1] == "2"
    assert "LOCAL_WORLD_SIZE=2" in (shims[1] / "deepspeed.ds_env").read_text().splitlines()


def test_deepspeed_openmpi_ranks_get_the_rank_variables(shims, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-0 slots=2\nnode-1 slots=2\n")
    result = run("deepspeed.sh", [CONFIG, *OVERRIDES], shims, tmp_path, HOSTFILE=str(hostfile), LAUNCHER="openmpi")
    assert result.returncode == 0, result.stderr
    args, _ = call(shims, "deepspeed")
    assert args[args.index("--launcher") + 1] == "openmpi"
    rank_program = args[args.index("--no_local_rank") + 1 :]
    # What mpirun would start for the fourth rank, second on its node:
    ompi = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4"}
    ompi.update(OMPI_COMM_WORLD_LOCAL_RANK="1", OMPI_COMM_WORLD_LOCAL_SIZE="2")
    env = {"PATH": f"{shims[0]}:/usr/bin:/bin", "SHIM_LOG": str(shims[1]), **ompi}
    subprocess.run(rank_program, env=env, timeout=10, check=True)
    args, env = call(shims, "megajepa")
    assert args == ["train", CONFIG, *OVERRIDES]
    assert [env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")] == ["3", "4", "1", "2"]


def test_slurm_header_leaves_resources_to_the_user():
    directives = [line.split()[1] for line in (REPO / "launch/slurm.sbatch").read_text().splitlines() if line.startswith("#SBATCH")]
    resources = ("--nodes", "--ntasks", "--gpus", "--gres", "--exclusive", "--cpus", "--mem", "--time", "--partition")
    assert directives and not [d for d in directives if d.startswith(resources)], directives


def test_slurm_runs_one_task_per_rank(shims, tmp_path):
    result = run("slurm.sbatch", [CONFIG, *OVERRIDES], shims, tmp_path, SLURM_GPUS_ON_NODE="4", **slurm_env())
    assert result.returncode == 0, result.stderr
    assert "job 4242 finished" in result.stderr
    args, env = call(shims, "srun")
    program = args.index("bash")
    assert args[:program] == ["--nodes=2", "--ntasks=8", "--ntasks-per-node=4", "--cpus-per-task=4", "--kill-on-bad-exit=1"]
    assert (env["MASTER_ADDR"], env["MASTER_PORT"], env["LOCAL_WORLD_SIZE"]) == ("gpu07", str(20000 + 4242 % 20000), "4")
    assert env["OMP_NUM_THREADS"] == "4"
    # What srun would start as the sixth task, the second on the second node:
    task = {**env, "SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}
    subprocess.run(args[program:], env=task, timeout=10, check=True)
    rank_args, rank_env = call(shims, "megajepa")
    assert rank_args == ["train", CONFIG, *OVERRIDES, "train.resume=auto"]
    assert [rank_env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")] == ["5", "8", "1", "4"]


@pytest.mark.parametrize(
    "job, ranks",
    [
        ({"SLURM_GPUS_PER_NODE": "a100:8"}, "8"),
        ({"SLURM_GPUS_PER_NODE": "h100:4,a100:4"}, "8"),
        ({}, "1"),
        ({"SLURM_NTASKS_PER_NODE": "2"}, "2"),
        ({"SLURM_NTASKS_PER_NODE": "2", "NPROC_PER_NODE": "3"}, "3"),
    ],
)
def test_slurm_ranks_per_node(job, ranks, shims, tmp_path):
    result = run("slurm.sbatch", [CONFIG], shims, tmp_path, **slurm_env(**job))
    assert result.returncode == 0, result.stderr
    args, env = call(shims, "srun")
    assert f"--ntasks-per-node={ranks}" in args and env["LOCAL_WORLD_SIZE"] == ranks
    assert f"--cpus-per-task={16 // int(ranks)}" in args


@pytest.mark.parametrize(
    "job, message",
    [
        ({"SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_ON_NODE": "1"}, "8 ranks per node (from GPUs per node) but the job has 1 CPU(s) on this node: submit with --ntasks-per-node=8"),
        ({"SLURM_GPUS_ON_NODE": "2", "NPROC_PER_NODE": "4"}, "4 ranks per node (from NPROC_PER_NODE) but the job has 2 GPU(s) per node: one rank per GPU"),
        ({"NPROC_PER_NODE": "two"}, "ranks per node must be a positive integer, got 'two' (from NPROC_PER_NODE)"),
    ],
)
def test_slurm_refuses_a_job_that_cannot_hold_its_ranks(job, message, shims, tmp_path):
    assert_refused(run("slurm.sbatch", [CONFIG], shims, tmp_path, **slurm_env(**job)), message, shims)


def start_batch_job(shims, tmp_path, **extra: str) -> subprocess.Popen:
    bin_dir, log_dir = shims
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "SHIM_LOG": str(log_dir)}
    env.update(slurm_env(FAKE_SRUN_SECONDS="30", **extra))
    job = subprocess.Popen(["bash", "launch/slurm.sbatch", CONFIG], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 15
    while not (log_dir / "srun.pid").exists():
        assert time.monotonic() < deadline and job.poll() is None, "srun never started"
        time.sleep(0.05)
    return job


def test_slurm_time_limit_warning_stops_the_ranks_then_requeues(shims, tmp_path):
    job = start_batch_job(shims, tmp_path)
    try:
        job.send_signal(signal.SIGUSR1)  # Slurm's --signal=B:USR1@120
        stderr = job.communicate(timeout=15)[1]
    finally:
        if job.poll() is None:
            job.kill()
    assert call(shims, "scancel")[0] == ["--signal=TERM", "4242"]
    assert (shims[1] / "srun.signal").read_text().strip() == "TERM", "the ranks were not told to stop"
    assert (shims[1] / "requeued").read_text().strip() == "4242"
    assert "job 4242 requeued: the ranks checkpointed and stopped cleanly" in stderr
    assert job.returncode == 0


def test_slurm_requeue_after_a_failed_stop_says_so(shims, tmp_path):
    job = start_batch_job(shims, tmp_path, FAKE_RANK_STATUS="1")
    try:
        job.send_signal(signal.SIGUSR1)
        stderr = job.communicate(timeout=15)[1]
    finally:
        if job.poll() is None:
            job.kill()
    assert (shims[1] / "requeued").read_text().strip() == "4242"
    assert "job 4242 requeued: the ranks stopped with status 1; it resumes from the last complete checkpoint" in stderr


def test_slurm_stopped_by_slurm(shims, tmp_path):
    job = start_batch_job(shims, tmp_path)
    try:
        # scancel: Slurm sends SIGTERM to the batch script and to the job step's tasks.
        job.send_signal(signal.SIGTERM)
        os.kill(int((shims[1] / "srun.pid").read_text()), signal.SIGTERM)
        stderr = job.communicate(timeout=15)[1]
    finally:
        if job.poll() is None:
            job.kill()
    assert not (shims[1] / "requeued").exists()
    assert "job 4242 stopped by Slurm (scancel, preemption or time limit): the ranks exited with status 0" in stderr
    assert job.returncode == 0


# --- the ranks do not outlive their agent (real torchrun and DeepSpeed launchers) -------------

# A rank that records its pid and waits, as a training rank would.
SLEEPING_RANK = """#!/usr/bin/env bash
[[ "$1 $2" == "config --check" ]] && exit 0
echo $$ >"$SHIM_LOG/rank${RANK:-x}.pid"
exec sleep 300
"""


def alive(pid: int) -> bool:
    """Running, and not a zombie waiting for a parent that will not reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def parent(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.1)


@pytest.mark.parametrize("script", ["torchrun.sh", "deepspeed.sh"])
def test_ranks_die_with_their_agent(script, shims, tmp_path):
    bin_dir, log_dir = shims
    for tool in ("torchrun", "deepspeed"):  # the real launchers, from the venv
        (bin_dir / tool).unlink()
    (bin_dir / "megajepa").write_text(SLEEPING_RANK)
    venv_bin = Path(sys.executable).parent
    env = {"PATH": f"{bin_dir}:{venv_bin}:/usr/bin:/bin", "HOME": str(tmp_path), "TMPDIR": str(tmp_path), "SHIM_LOG": str(log_dir)}
    env.update(NPROC_PER_NODE="2", MASTER_PORT=str(free_port()), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    launcher = subprocess.Popen(["bash", f"launch/{script}", CONFIG], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    ranks: list[int] = []
    try:
        pid_files = [log_dir / f"rank{r}.pid" for r in (0, 1)]
        wait_until(lambda: all(p.exists() and p.read_text().strip() for p in pid_files) or launcher.poll() is not None, 60, "both ranks")
        assert launcher.poll() is None, launcher.communicate()[1][-2000:]
        ranks = [int(p.read_text()) for p in pid_files]
        # The agent: torchrun itself; DeepSpeed's per-node launcher (launch.py) under its runner.
        agent = parent(ranks[0])
        assert parent(ranks[1]) == agent and agent != os.getpid()
        os.kill(agent, signal.SIGKILL)
        wait_until(lambda: not any(alive(pid) for pid in ranks), 15, "the ranks to die with their agent")
    finally:
        for pid in ranks:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()


RUN_ENV = {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "900", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
           "TORCH_NCCL_TRACE_BUFFER_SIZE": "20000", "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}


@pytest.mark.parametrize("script", ["torchrun.sh", "deepspeed.sh"])
def test_launchers_set_the_run_environment_unless_set(script, shims, tmp_path):
    """Each variable of launch/common.sh's run_env_lines reaches the launcher (and the DeepSpeed env
    file of other nodes) with its default, and a value the user set is kept."""
    tool = script.split(".")[0]
    assert run(script, [CONFIG], shims, tmp_path).returncode == 0
    _, env = call(shims, tool)
    assert {k: env.get(k) for k in RUN_ENV} == RUN_ENV
    own = {k: f"{v}-own" for k, v in RUN_ENV.items()}
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\n")
    assert run(script, [CONFIG], shims, tmp_path, HOSTFILE=str(hostfile), **own).returncode == 0
    _, env = call(shims, tool)
    assert {k: env.get(k) for k in RUN_ENV} == own
    if tool == "deepspeed":
        ds_env = dict(line.split("=", 1) for line in (shims[1] / "deepspeed.ds_env").read_text().splitlines())
        assert {k: ds_env.get(k) for k in RUN_ENV} == own
