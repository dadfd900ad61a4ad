"""launch/slurm.sbatch under a real Slurm: a one-node cluster on this machine (tests/_slurm_cluster.py),
two CPU ranks training configs/demo.yaml on a small data set.

- a plain job trains STEPS steps and finishes: its per-step losses are the oracle;
- a job that gets the time-limit warning mid-run (the signal the script's --signal=B:USR1 has Slurm
  send to the batch shell, sent here with `scancel --batch`: a time limit cut short raced the clock,
  the job could finish first or be killed at the limit while saving) checkpoints, requeues itself
  and resumes from that checkpoint: steps 1..STEPS each once, losses equal to the oracle's;
- `scancel` mid-run leaves a complete checkpoint: a new job resumes from it and ends with the
  oracle's losses.

Installs Debian's slurm-wlm and munge when missing. Marked `slurm` (and skipped unless selected:
`make test-all`, or `pytest -m slurm tests/test_slurm.py`). Runtime on 2 cores: 18 minutes at a
load average of 15-20 (other test runs), 7.5 minutes at 4-10, most of it the ranks' start-up; the
install, when needed, adds a minute or two.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path

import pytest

from _slurm_cluster import SlurmCluster, SlurmUnavailable, ensure_installed
from megajepa.train.checkpoint import tag_for

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
STEPS = 100
PAIRS_PER_BATCH = 16
RANKS = 2
JOB_TIMEOUT_S = 900
FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    try:
        ensure_installed()
    except SlurmUnavailable as reason:
        pytest.skip(f"Slurm cannot run here: {reason}")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm-logs"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    from megajepa.data.embedded import ensure_embedded

    pairs = STEPS * RANKS * PAIRS_PER_BATCH  # one epoch: nothing padded, nothing dropped
    return ensure_embedded(str(tmp_path_factory.mktemp("slurm-data")), n_train=pairs, n_eval=32, progress=False)


def job_env() -> dict[str, str]:
    """megajepa's environment, as a user would have it active when calling sbatch."""
    bin_dir = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    return env


def submit(cluster: SlurmCluster, work: Path, data: dict, output_dir: Path, *sbatch_args: str) -> str:
    """sbatch launch/slurm.sbatch with two ranks on the one node; the job id."""
    from _train_utils import free_port

    overrides = [
        "data.embedded=null",
        f"data.shards={data['train_shards']}",
        f"data.eval_shards={data['eval_shards']}",
        f"data.tokenizer={data['tokenizer']}",
        f"data.pairs_per_batch={PAIRS_PER_BATCH}",
        f"train.steps={STEPS}",
        "train.save_every=0",  # the only checkpoints: the one a stop writes, and the last
        "train.eval_batches=1",
        f"train.output_dir={output_dir}",
        "logging.progress=false",
        "logging.log_every=1",
        "logging.tensorboard=false",
    ]
    env = job_env()
    env.update(TMPDIR=str(work / "tmp"), MASTER_PORT=str(free_port()))
    (work / "tmp").mkdir(parents=True, exist_ok=True)
    args = ["--nodes=1", f"--ntasks-per-node={RANKS}", f"--output={work}/slurm-%j.out", *sbatch_args]
    return cluster.sbatch([*args, "launch/slurm.sbatch", "configs/demo.yaml", *overrides], REPO, env)


def job_log(work: Path, job_id: str) -> str:
    path = work / f"slurm-{job_id}.out"
    return path.read_text() if path.exists() else "(no log)"


def wait_finished(cluster: SlurmCluster, work: Path, job_id: str) -> dict[str, str]:
    try:
        return cluster.wait_job(job_id, lambda r: r["JobState"] in FINISHED, JOB_TIMEOUT_S, "the job to end")
    except AssertionError as err:
        raise AssertionError(f"{err}\n{job_log(work, job_id)[-4000:]}") from None


def losses(output_dir: Path) -> dict[int, float]:
    """step -> loss from metrics.jsonl; each step must appear once."""
    seen: dict[int, float] = {}
    path = output_dir / "metrics.jsonl"
    if not path.exists():
        return seen
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if "loss" not in row or "step" not in row:
            continue
        assert row["step"] not in seen, f"step {row['step']} was trained twice"
        seen[row["step"]] = row["loss"]
    return seen


def wait_for_step(cluster: SlurmCluster, work: Path, job_id: str, output_dir: Path, step: int) -> None:
    """Until the job has logged `step` (its ranks are past start-up, inside the training loop)."""
    cluster.wait_job(
        job_id,
        lambda r: r["JobState"] in FINISHED or max(losses(output_dir), default=0) >= step,
        JOB_TIMEOUT_S,
        f"step {step}",
    )
    assert max(losses(output_dir), default=0) >= step, f"the job ended before step {step}:\n{job_log(work, job_id)[-4000:]}"


def latest_step(output_dir: Path) -> int:
    """The step of the checkpoint DeepSpeed's `latest` names."""
    tag = (output_dir / "checkpoints" / "latest").read_text().strip()
    match = re.fullmatch(r"step(\d+)", tag)
    assert match, f"unexpected checkpoint tag {tag!r}"
    return int(match.group(1))


def assert_complete_checkpoint(output_dir: Path, step: int) -> None:
    """Every rank's files of the checkpoint for `step` are there (resuming from it is the real proof)."""
    tag_dir = output_dir / "checkpoints" / tag_for(step)
    names = {p.name for p in tag_dir.iterdir()}
    expected = {"meta.json"}
    for rank in range(RANKS):
        expected |= {f"rng_rank{rank}.pt", f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt", f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"}
    assert expected <= names, f"{tag_dir}: missing {sorted(expected - names)}"
    assert all((tag_dir / name).stat().st_size > 0 for name in expected)


def assert_clean_log(log: str) -> None:
    assert "Traceback" not in log, log[-4000:]
    assert "srun: error" not in log, log[-4000:]


@pytest.fixture(scope="module")
def uninterrupted(cluster, data, tmp_path_factory) -> dict[int, float]:
    """The oracle: one job, never interrupted, trains STEPS steps and finishes."""
    work = tmp_path_factory.mktemp("slurm-uninterrupted")
    job_id = submit(cluster, work, data, work / "run")
    record = wait_finished(cluster, work, job_id)
    log = job_log(work, job_id)
    assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), log[-4000:]
    assert f"job {job_id} finished" in log
    assert f"1 node(s) x {RANKS} rank(s)" in log
    assert_clean_log(log)
    trained = losses(work / "run")
    assert sorted(trained) == list(range(1, STEPS + 1))
    return trained


def test_job_trains_two_ranks_and_finishes(uninterrupted):
    assert all(math.isfinite(loss) for loss in uninterrupted.values())
    assert uninterrupted[STEPS] < uninterrupted[1], "the demo model did not learn"


def test_time_limit_requeues_and_resumes_from_the_signal_checkpoint(cluster, data, uninterrupted, tmp_path):
    output_dir = tmp_path / "run"
    job_id = submit(cluster, tmp_path, data, output_dir, "--time=30")
    wait_for_step(cluster, tmp_path, job_id, output_dir, 2)
    # The time-limit warning, as --signal=B:USR1@120 has Slurm send it: SIGUSR1 to the batch shell
    # only. No clock involved: the job is far from its last step, and far from its limit.
    cluster.run("scancel", "--batch", "--signal=USR1", job_id)

    pending = cluster.wait_job(
        job_id,
        lambda r: r["JobState"] in FINISHED or (r["JobState"] == "PENDING" and int(r.get("Restarts", 0)) >= 1),
        JOB_TIMEOUT_S,
        "the requeue",
    )
    assert pending["JobState"] == "PENDING", f"not requeued: {pending['JobState']}\n{job_log(tmp_path, job_id)[-4000:]}"
    first_run = losses(output_dir)
    stopped_at = latest_step(output_dir)
    assert sorted(first_run) == list(range(1, stopped_at + 1)), "the checkpoint is not the last step trained"
    assert 2 <= stopped_at < STEPS
    assert_complete_checkpoint(output_dir, stopped_at)
    # Skip the delay Slurm puts on a requeued job's start (BeginTime, about two minutes).
    cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")

    record = wait_finished(cluster, tmp_path, job_id)
    log = job_log(tmp_path, job_id)
    assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), log[-4000:]
    assert f"job {job_id} requeued: the ranks checkpointed and stopped cleanly" in log
    assert f"job {job_id} (restart 1)" in log and f"job {job_id} finished" in log
    assert_clean_log(log)
    resumed = losses(output_dir)
    assert min(set(resumed) - set(first_run)) == stopped_at + 1
    assert resumed == uninterrupted, "the requeued run's losses differ from the uninterrupted run's"


def test_scancel_mid_run_leaves_a_complete_checkpoint(cluster, data, uninterrupted, tmp_path):
    output_dir = tmp_path / "run"
    job_id = submit(cluster, tmp_path, data, output_dir)
    wait_for_step(cluster, tmp_path, job_id, output_dir, 3)
    cluster.run("scancel", job_id)
    record = wait_finished(cluster, tmp_path, job_id)
    log = job_log(tmp_path, job_id)
    assert record["JobState"] == "CANCELLED", log[-4000:]
    assert f"job {job_id} stopped by Slurm (scancel, preemption or time limit): the ranks exited with status 0" in log
    assert "Traceback" not in log, log[-4000:]
    first_run = losses(output_dir)
    stopped_at = latest_step(output_dir)
    assert sorted(first_run) == list(range(1, stopped_at + 1)) and 3 <= stopped_at < STEPS
    assert_complete_checkpoint(output_dir, stopped_at)

    again = submit(cluster, tmp_path, data, output_dir)
    record = wait_finished(cluster, tmp_path, again)
    assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), job_log(tmp_path, again)[-4000:]
    assert losses(output_dir) == uninterrupted
