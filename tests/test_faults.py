"""Fault injection: what the cluster does to a run, and what the run must do about it.

Marked `faults`: `pytest -m "faults and (slow or not slow)" tests/test_faults.py` runs them all.
The cheap cases (files only, one short 1-rank run and refusals that stop before the engine is
built) run in `make test`; the 2-rank ones with real kills and signals, and the longer 1-rank
runs, are also `slow`. Every case asserts its outcome against an independent oracle: the
uninterrupted run's losses, the files on disk, a payload's side effect.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from _train_utils import demo_overrides, metrics, rank_pids, remark_complete, run_train, start_train
from megajepa.train import checkpoint, pickle_guard, run_lock
from megajepa.train.divergence import DivergenceGuard
from megajepa.train.resume_policy import architecture_differences

pytestmark = pytest.mark.faults

INJECTOR = Path(__file__).resolve().parent / "fault_injection"
RUN = {"train.steps": 6, "train.save_every": 2, "optim.warmup_steps": 2, "data.pairs_per_batch": 8}


def _ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


def _refused(result, fragment: str):
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-4000:]
    assert "Traceback" not in result.stderr
    assert fragment in result.stderr, result.stderr[-3000:]


def _same_losses(rows: list[dict], reference: list[dict]):
    by_step = {r["step"]: r for r in reference}
    for row in rows:
        for key in ("loss", "ce", "jepa", "pairs"):
            assert row[key] == by_step[row["step"]][key], (row["step"], key, row[key], by_step[row["step"]][key])


# how pickle names the builtin `open` (io.open before Python 3.12, _io.open since)
OPEN = re.escape(f"{open.__module__}.open")


class Payload:
    """Unpickling this creates `path`: the visible side effect of code planted in a checkpoint."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


# ------------------------------------------------------------------------------------ files only


def _fake_checkpoint(tag_dir: Path, files: dict[str, bytes]) -> None:
    tag_dir.mkdir(parents=True)
    for name, data in files.items():
        (tag_dir / name).write_bytes(data)
    sha256 = {n: hashlib.sha256(d).hexdigest() for n, d in files.items()}
    (tag_dir / "complete.json").write_text(json.dumps({"files": {n: len(d) for n, d in files.items()}, "sha256": sha256}))


def test_completeness_and_newest_complete_choice(tmp_path):
    load_dir = tmp_path / "checkpoints"
    files = {"meta.json": b"{}", "rng_rank0.pt": b"x" * 10, "rng_rank1.pt": b"y" * 10}
    for step in (2, 4, 6, 8):
        _fake_checkpoint(load_dir / f"step{step:08d}", files)
    (load_dir / "step00000008" / "complete.json").unlink()  # killed before the marker
    (load_dir / "step00000006" / "rng_rank1.pt").write_bytes(b"y" * 4)  # cut short
    (load_dir / "step00000004" / "rng_rank0.pt").unlink()  # deleted
    (load_dir / "step00000010").mkdir()  # only begun
    tag, skipped = checkpoint.newest_complete(str(load_dir))
    assert tag == "step00000002"
    assert skipped == [
        "skipped step00000010: no complete.json (the save did not finish on every rank)",
        "skipped step00000008: no complete.json (the save did not finish on every rank)",
        "skipped step00000006: rng_rank1.pt has 4 bytes, 10 when it was saved",
        "skipped step00000004: rng_rank0.pt is missing",
    ]
    point, notes = checkpoint.resolve_resume("auto", str(tmp_path))
    assert point.tag == "step00000002" and notes == [f"{line}" for line in skipped]
    with pytest.raises(checkpoint.CheckpointMismatch, match=r"train.resume=none: .* holds checkpoints \(step00000002\)"):
        checkpoint.resolve_resume("none", str(tmp_path))
    with pytest.raises(checkpoint.CheckpointMismatch, match="not a complete checkpoint: rng_rank1.pt has 4 bytes"):
        checkpoint.resolve_resume(str(load_dir / "step00000006"), str(tmp_path))
    (load_dir / "step00000002" / "complete.json").write_text("{trunc")
    point, notes = checkpoint.resolve_resume("auto", str(tmp_path))
    assert point is None and "complete.json is unreadable" in notes[-2] and "starting from step 0" in notes[-1]


def test_restart_moves_the_previous_outputs_aside(tmp_path):
    _fake_checkpoint(tmp_path / "checkpoints" / "step00000002", {"meta.json": b"{}"})
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "unrelated.txt").write_text("kept")
    moved = Path(checkpoint.start_over(str(tmp_path)))
    assert sorted(p.name for p in moved.iterdir()) == ["checkpoints", "metrics.jsonl"]
    assert (moved / "checkpoints" / "step00000002" / "meta.json").is_file()
    assert checkpoint.resolve_resume("none", str(tmp_path)) == (None, [])
    assert (tmp_path / "unrelated.txt").read_text() == "kept"


def test_planted_pickle_is_refused_without_running(tmp_path):
    side_effect = tmp_path / "pwned"
    ours, theirs = tmp_path / "rng_rank0.pt", tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"torch": torch.get_rng_state(), "extra": Payload(str(side_effect))}, ours)
    torch.save({"optimizer_state_dict": {"x": torch.zeros(2)}, "hook": Payload(str(side_effect))}, theirs)
    with pytest.raises(pickle_guard.UnsafeCheckpointFile, match="rng_rank0.pt: refused, holds more than plain tensors"):
        pickle_guard.load_plain(str(ours))
    with pytest.raises(pickle_guard.UnsafeCheckpointFile, match=rf"optim_states.pt: refused, its pickle would call {OPEN}\b"):
        pickle_guard.refuse_unsafe([str(theirs)])
    assert not side_effect.exists()
    # what DeepSpeed itself writes passes, and so does our RNG state
    torch.save(checkpoint.rng_state(), ours)
    state = pickle_guard.load_plain(str(ours))
    checkpoint.set_rng_state(state)
    expected = torch.rand(3)
    checkpoint.set_rng_state(state)
    assert torch.equal(torch.rand(3), expected)


def test_divergence_guard_counts_consecutive_bad_steps():
    guard = DivergenceGuard(max_skipped_steps=2, precision="fp32")
    assert [guard.check(False, float("inf")) for _ in range(2)] == [None, None]
    assert guard.check(True, 1.0) is None and guard.healthy  # a good step resets the count
    assert guard.check(False, float("inf")) is None and guard.check(True, float("nan")) is None
    reason = guard.check(False, float("inf"))
    assert reason.startswith("3 optimizer steps in a row skipped by DeepSpeed") and "max_skipped_steps=2" in reason
    fp16 = DivergenceGuard(max_skipped_steps=0, precision="fp16")
    assert fp16.check(False, float("inf")) is None  # the loss scaler's own skip


def test_architecture_differences_ignore_what_the_model_never_reads():
    spec = json.loads(open("configs/models/tiny-llama.json").read())
    assert architecture_differences(spec, {**spec, "an_extra_key": 3, "initializer_range": 1.0}) == []
    assert architecture_differences(spec, {**spec, "attention_bias": False}) == []  # its default, spelled out
    assert architecture_differences(spec, {**spec, "num_hidden_layers": 2, "rope_theta": 5.0}) == [
        "num_hidden_layers: 4 -> 2",
        "rope_parameters: {'rope_theta': 10000.0, 'rope_type': 'default'} -> {'rope_theta': 5.0, 'rope_type': 'default'}",
    ]  # transformers 5 reads rope_theta inside rope_parameters


# ------------------------------------------------------------------------------------------ data


def _demo_data_copy(demo_data: dict, to: Path) -> dict:
    """The demo data copied (each test damages its own), with its shards only in .zstd form."""
    shutil.copytree(demo_data["root"], to)
    for raw in to.glob("shards/*/shard.*.mds"):
        raw.unlink()  # streaming's decompressed copies, left by earlier readers
    return {name: str(to / Path(path).relative_to(demo_data["root"])) for name, path in demo_data.items()}


@pytest.mark.slow
def test_a_corrupt_shard_stops_every_rank_with_one_line(demo_data, tmp_path):
    data = _demo_data_copy(demo_data, tmp_path / "data")
    zstd = Path(data["train_shards"]) / "shard.00000.mds.zstd"
    damaged = bytearray(zstd.read_bytes())
    damaged[len(damaged) // 2] ^= 0x10
    zstd.write_bytes(bytes(damaged))
    result = run_train(demo_overrides(data, tmp_path / "run", **RUN), tmp_path, nproc=2)
    line = f"megajepa train: CorruptShard: {zstd}: corrupt shard of the dataset {data['train_shards']}"
    assert result.stderr.count(line) == 2, result.stderr[-3000:]  # each rank names it, in one line
    assert "exitcode  : 2" in result.stderr  # torchrun's report of the first rank to stop (torchrun exits 1)
    tracebacks = result.stderr.split("Traceback (most recent call last):")[1:]
    assert all("torch/distributed/run.py" in t.split("ChildFailedError")[0] for t in tracebacks)  # torchrun's only
    assert not (zstd.parent / "shard.00000.mds").exists()  # never decoded


def test_one_run_per_output_dir(demo_data, tmp_path):
    """A process holding output_dir's run lock (as a run's rank 0 does) makes a second
    `megajepa train` refuse at start, naming its host and pid; SIGKILL of the holder frees it."""
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom megajepa.train import run_lock\n"
         f"with run_lock.held({str(out)!r}):\n    print('held', flush=True)\n    time.sleep(600)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        expected = f"another run is writing here (host {socket.gethostname()}, pid {holder.pid}, since "
        with pytest.raises(run_lock.RunLocked, match=re.escape(expected)):
            with run_lock.held(str(out)):
                pass
        _refused(run_train(demo_overrides(demo_data, out, **RUN), tmp_path), expected)
        assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    with run_lock.held(str(out)):  # released by the holder's death
        assert json.loads((out / run_lock.LOCK_FILE).read_text())["pid"] == os.getpid()


@pytest.mark.parametrize("blocked", ["file", "parent"])
def test_output_dir_that_cannot_be_written_is_refused_before_any_rank_starts(demo_data, tmp_path, blocked):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a directory should be")
    out = blocker if blocked == "file" else blocker / "run"
    result = run_train(demo_overrides(demo_data, out, **RUN), tmp_path)
    expected = f"{out} is a file" if blocked == "file" else f"{out} cannot be created: {blocker} is a file"
    _refused(result, f"train.output_dir: {expected}, not a directory")
    assert "megajepa: config error:" in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 16 MiB tmpfs (a demo checkpoint is about 11 MiB): the second save runs out of space."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_during_a_save_says_so_and_keeps_the_previous_checkpoint(demo_data, tmp_path, small_tmpfs):
    out = small_tmpfs / "run"
    result = run_train(demo_overrides(demo_data, out, **RUN), tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "iostream error" not in result.stderr, result.stderr[-3000:]
    line = f"megajepa train: no space left on device: {out / 'checkpoints' / 'step00000004'} (rank 0)"
    assert line in result.stderr, result.stderr[-3000:]
    assert f"the last complete one is {out / 'checkpoints' / 'step00000002'}" in result.stderr
    assert checkpoint.newest_complete(str(out / "checkpoints"), verify=True) == (
        "step00000002", ["skipped step00000004: no complete.json (the save did not finish on every rank)"])


# ------------------------------------------------------------------------- one short 1-rank run


@pytest.fixture(scope="module")
def six_steps(demo_data, tmp_path_factory):
    """6 steps on 1 rank, checkpoints at 2, 4 and 6: the uninterrupted run."""
    out = tmp_path_factory.mktemp("six")
    _ok(run_train(demo_overrides(demo_data, out, **RUN), tmp_path_factory.mktemp("tmp")))
    assert checkpoint.newest_complete(str(out / "checkpoints")) == ("step00000006", [])
    return out


def _copy_run(six_steps: Path, to: Path, upto: int) -> Path:
    """A run directory holding the uninterrupted run's checkpoints up to step `upto`."""
    for step in range(2, upto + 1, 2):
        shutil.copytree(six_steps / "checkpoints" / f"step{step:08d}", to / "checkpoints" / f"step{step:08d}")
    return to


def test_truncated_rank_file_falls_back_to_the_previous_checkpoint(six_steps, demo_data, tmp_path):
    run = _copy_run(six_steps, tmp_path / "run", 6)
    optim = run / "checkpoints" / "step00000006" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    size = optim.stat().st_size
    with open(optim, "r+b") as f:
        f.truncate(size // 3)
    explicit = demo_overrides(demo_data, run, **{**RUN, "train.resume": str(optim.parent)})
    _refused(run_train(explicit, tmp_path), f"optim_states.pt has {size // 3} bytes, {size} when it was saved")
    result = run_train(demo_overrides(demo_data, run, **{**RUN, "train.resume": "auto"}), tmp_path)
    _ok(result)
    assert "skipped step00000006: zero_pp_rank_0_mp_rank_00_optim_states.pt has" in result.stdout
    assert "resumed from" in result.stdout and "step00000004 at step 4" in result.stdout
    rows = metrics(run)
    assert [r["step"] for r in rows] == [5, 6]
    _same_losses(rows, metrics(six_steps))


def test_flipped_bit_falls_back_to_the_previous_checkpoint(six_steps, demo_data, tmp_path):
    """One bit flipped in an optimizer partition keeps its size: the sha256 recorded in
    complete.json (hashed while writing; checked here against hashlib over the file) catches it."""
    run = _copy_run(six_steps, tmp_path / "run", 6)
    tag_dir = run / "checkpoints" / "step00000006"
    marker = json.loads((tag_dir / "complete.json").read_text())
    assert marker["sha256"] == {n: hashlib.sha256((tag_dir / n).read_bytes()).hexdigest() for n in marker["files"]}
    optim = tag_dir / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = bytearray(optim.read_bytes())
    data[len(data) // 2] ^= 0x10
    optim.write_bytes(bytes(data))
    explicit = demo_overrides(demo_data, run, **{**RUN, "train.resume": str(tag_dir)})
    _refused(run_train(explicit, tmp_path), "zero_pp_rank_0_mp_rank_00_optim_states.pt does not match its sha256")
    result = run_train(demo_overrides(demo_data, run, **{**RUN, "train.resume": "auto"}), tmp_path)
    _ok(result)
    assert "skipped step00000006: zero_pp_rank_0_mp_rank_00_optim_states.pt does not match its sha256" in result.stdout
    assert "step00000004 at step 4" in result.stdout
    _same_losses(metrics(run), metrics(six_steps))


def test_resume_onto_other_shards_is_refused_unless_allowed(six_steps, demo_data, tmp_path):
    run = _copy_run(six_steps, tmp_path / "run", 4)
    shards = shutil.copytree(demo_data["eval_shards"], tmp_path / "other")  # not the eval loader's directory
    other = {**RUN, "train.resume": "auto", "data.shards": shards}
    _refused(run_train(demo_overrides(demo_data, run, **other), tmp_path),
             "data.shards: the training data differs from the checkpoint's (shards sha256: ")
    result = run_train(demo_overrides(demo_data, run, **other, **{"train.resume_allow": "[data.shards]"}), tmp_path)
    _ok(result)
    assert "step00000004 at step 4" in result.stdout and [r["step"] for r in metrics(run)] == [5, 6]


def test_checkpoint_without_digests_still_loads(six_steps, demo_data, tmp_path):
    """A checkpoint saved before digests were recorded: sizes only, and the log says so."""
    run = _copy_run(six_steps, tmp_path / "run", 4)
    marker_path = run / "checkpoints" / "step00000004" / "complete.json"
    marker = json.loads(marker_path.read_text())
    del marker["sha256"]
    marker_path.write_text(json.dumps(marker))
    result = run_train(demo_overrides(demo_data, run, **{**RUN, "train.resume": "auto"}), tmp_path)
    _ok(result)
    assert "step00000004: saved without sha256 digests" in result.stdout and "at step 4" in result.stdout
    _same_losses(metrics(run), metrics(six_steps))


@pytest.mark.slow
def test_missing_rank_file_and_deleted_latest(six_steps, demo_data, tmp_path):
    """`latest` is not needed (the newest complete checkpoint is found without it), a missing RNG
    file makes its checkpoint incomplete, and train.resume=none refuses to start over them."""
    run = _copy_run(six_steps, tmp_path / "run", 4)
    (run / "checkpoints" / "step00000004" / "rng_rank0.pt").unlink()
    assert not (run / "checkpoints" / "latest").exists()
    _refused(run_train(demo_overrides(demo_data, run, **RUN), tmp_path), "holds checkpoints (step00000002)")
    result = run_train(demo_overrides(demo_data, run, **{**RUN, "train.resume": "auto"}), tmp_path)
    _ok(result)
    assert "skipped step00000004: rng_rank0.pt is missing" in result.stdout and "at step 2" in result.stdout
    _same_losses(metrics(run), metrics(six_steps))
    assert (run / "checkpoints" / "latest").read_text() == "step00000006"


def test_planted_pickle_in_a_checkpoint_is_refused_on_resume(six_steps, demo_data, tmp_path):
    side_effect = tmp_path / "pwned"
    for name in ("rng_rank0.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        run = _copy_run(six_steps, tmp_path / name, 2)
        tag_dir = run / "checkpoints" / "step00000002"
        state = torch.load(tag_dir / name, weights_only=False)
        state["planted"] = Payload(str(side_effect))
        torch.save(state, tag_dir / name)
        remark_complete(tag_dir)  # a consistent marker: only the payload is wrong
        result = run_train(demo_overrides(demo_data, run, **{**RUN, "train.resume": "auto"}), tmp_path)
        _refused(result, f"{name}: refused, its pickle would call {open.__module__}.open ")
        assert not side_effect.exists()


@pytest.mark.slow
def test_exploding_lr_stops_as_diverged(six_steps, demo_data, tmp_path):
    """lr=1e6 in fp32: DeepSpeed skips steps with non-finite gradients while the loss stays
    finite; the run stops with exit code 3, the step, the reason and the last good checkpoint
    (the last one saved before the bad steps began)."""
    run = _copy_run(six_steps, tmp_path / "run", 2)
    overrides = demo_overrides(
        demo_data, run, **{**RUN, "train.steps": 40, "train.resume": "auto", "train.keep_schedule": "true",
                           "train.resume_allow": "[optim.lr]", "optim.lr": 1e6, "train.max_skipped_steps": 2}
    )
    result = run_train(overrides, tmp_path)
    print(result.stderr[-1500:])
    assert result.returncode == 3 and "Traceback" not in result.stderr, result.stderr[-4000:]
    match = re.search(r"TrainingDiverged: step (\d+): 3 optimizer steps in a row skipped by DeepSpeed", result.stderr)
    assert match, result.stderr[-3000:]
    stopped = int(match.group(1))
    rows = {r["step"]: r for r in metrics(run)}
    assert [rows[s]["grad_norm"] for s in range(stopped - 2, stopped)] == [math.inf, math.inf]  # logged as skipped
    assert all(math.isfinite(rows[s]["grad_norm"]) for s in range(3, stopped - 2))
    last_good = max(s for s in range(2, stopped - 2, 2))
    assert f"Last good checkpoint: {run / 'checkpoints' / f'step{last_good:08d}'}" in result.stderr
    assert not (run / "checkpoints" / f"step{stopped:08d}").exists()


# ------------------------------------------------------------------ 2 ranks, real kills, signals


@pytest.fixture(scope="module")
def two_rank_reference(demo_data, tmp_path_factory):
    """The uninterrupted 2-rank run of 12 steps, checkpoint every 2."""
    out = tmp_path_factory.mktemp("reference")
    overrides = demo_overrides(demo_data, out, **{**RUN, "train.steps": 12})
    _ok(run_train(overrides, tmp_path_factory.mktemp("tmp"), nproc=2, timeout=600))
    return out


def _wait_for_step(proc, out: Path, step: int, err: Path, timeout: float = 400):
    deadline = time.time() + timeout
    while not (out / "metrics.jsonl").exists() or len(metrics(out)) < step:
        assert proc.poll() is None, err.read_text()[-3000:]
        assert time.time() < deadline, "no progress"
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_to_one_rank_stops_both_at_the_same_step(two_rank_reference, demo_data, tmp_path, signum):
    out = tmp_path / "run"
    marker = f"signal-{tmp_path.name}"
    overrides = demo_overrides(demo_data, out, **{**RUN, "train.steps": 12, "train.save_every": 0})
    proc = start_train(overrides, tmp_path, nproc=2, env_extra={"FAULT_RUN": marker})
    try:
        _wait_for_step(proc, out, 2, tmp_path / "train.err")
        os.kill(rank_pids(marker)[1], signum)  # rank 1 only
        proc.wait(timeout=300)
    finally:
        proc.kill()
    stdout = (tmp_path / "train.out").read_text()
    assert proc.returncode == 0, (tmp_path / "train.err").read_text()[-3000:]
    assert "stop requested (a signal to another rank)" in stdout  # rank 0 speaks for both
    stopped = metrics(out)[-1]["step"]
    assert 2 <= stopped < 12 and checkpoint.newest_complete(str(out / "checkpoints")) == (f"step{stopped:08d}", [])
    assert json.loads((out / "checkpoints" / f"step{stopped:08d}" / "complete.json").read_text())["world_size"] == 2
    result = run_train(demo_overrides(demo_data, out, **{**RUN, "train.steps": 12, "train.save_every": 0,
                                                         "train.resume": "auto"}), tmp_path, nproc=2, timeout=600)
    _ok(result)
    _same_losses(metrics(out), metrics(two_rank_reference))
    assert metrics(out)[-1]["step"] == 12


@pytest.mark.slow
def test_ctrl_c_to_the_process_group_stops_both_ranks_at_the_same_step(two_rank_reference, demo_data, tmp_path):
    """Ctrl-C: SIGINT to every process of the job (torchrun and both ranks; torchrun passes its
    own on to the ranks as well). Both ranks checkpoint the same step and exit 0; the resumed run
    is the uninterrupted one."""
    out = tmp_path / "run"
    overrides = demo_overrides(demo_data, out, **{**RUN, "train.steps": 12, "train.save_every": 0})
    proc = start_train(overrides, tmp_path, nproc=2, env_extra={"FAULT_RUN": f"int-{tmp_path.name}"},
                       new_session=True)
    try:
        _wait_for_step(proc, out, 2, tmp_path / "train.err")
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=300)
    finally:
        proc.kill()
    stdout, stderr = (tmp_path / "train.out").read_text(), (tmp_path / "train.err").read_text()
    assert "stop requested (signal 2)" in stdout, stderr[-3000:]
    assert not re.search(r"exitcode\s*:\s*-?[1-9]", stderr), stderr[-3000:]  # no rank failed
    stopped = metrics(out)[-1]["step"]
    assert 2 <= stopped < 12 and checkpoint.newest_complete(str(out / "checkpoints")) == (f"step{stopped:08d}", [])
    result = run_train(demo_overrides(demo_data, out, **{**RUN, "train.steps": 12, "train.save_every": 0,
                                                         "train.resume": "auto"}), tmp_path, nproc=2, timeout=600)
    _ok(result)
    _same_losses(metrics(out), metrics(two_rank_reference))


@pytest.mark.slow
def test_a_stopped_rank_fails_the_other_within_train_timeout(demo_data, tmp_path):
    """SIGSTOP of rank 1 after the first steps: rank 0 stops waiting train.timeout (10 s) later,
    with one line naming rank 1, not DeepSpeed's 30 minutes."""
    out = tmp_path / "run"
    marker = f"stop-{tmp_path.name}"
    overrides = demo_overrides(demo_data, out, **{**RUN, "train.steps": 500, "train.save_every": 0, "train.timeout": 10})
    proc = start_train(overrides, tmp_path, nproc=2, env_extra={"FAULT_RUN": marker, "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "5"})
    stopped = None
    try:
        _wait_for_step(proc, out, 2, tmp_path / "train.err")
        stopped = rank_pids(marker)[1]
        os.kill(stopped, signal.SIGSTOP)
        since = time.time()
        err = tmp_path / "train.err"
        while "a collective timed out" not in err.read_text() and time.time() - since < 120:
            time.sleep(0.5)
        waited = time.time() - since
        proc.wait(timeout=120)
    finally:
        if stopped is not None and stopped in rank_pids(marker).values():  # torchrun may have killed it
            os.kill(stopped, signal.SIGKILL)
        proc.kill()
    stderr = (tmp_path / "train.err").read_text()
    assert "megajepa train: rank 0: a collective timed out after 10 s (train.timeout): rank(s) 1 did not arrive" in stderr, stderr[-3000:]
    assert waited < 10 + 15 + 30, waited  # the timeout, the roll call's grace, a loaded machine
    assert proc.returncode != 0


@pytest.mark.slow
def test_kill_9_of_a_rank_mid_step_then_resume_is_exact(two_rank_reference, demo_data, tmp_path):
    out = tmp_path / "run"
    marker = f"kill-{tmp_path.name}"
    overrides = demo_overrides(demo_data, out, **{**RUN, "train.steps": 12})
    proc = start_train(overrides, tmp_path, nproc=2, env_extra={"FAULT_RUN": marker})
    try:
        _wait_for_step(proc, out, 5, tmp_path / "train.err")
        os.kill(rank_pids(marker)[1], signal.SIGKILL)
        proc.wait(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode != 0
    tag, _ = checkpoint.newest_complete(str(out / "checkpoints"))
    assert tag is not None and int(tag[4:]) >= 4
    result = run_train(demo_overrides(demo_data, out, **{**RUN, "train.steps": 12, "train.resume": "auto"}),
                       tmp_path, nproc=2, timeout=600)
    _ok(result)
    assert f"at step {int(tag[4:])}" in result.stdout
    _same_losses(metrics(out), metrics(two_rank_reference))


@pytest.mark.slow
def test_kill_9_of_a_rank_mid_save_leaves_the_checkpoint_incomplete(two_rank_reference, demo_data, tmp_path):
    """Rank 1 writes half of its optimizer file of the second save (step 4) and dies by SIGKILL;
    rank 0 had finished its own files. The checkpoint never becomes complete, `latest` still
    names step 2, and train.resume=auto resumes from step 2, exactly."""
    out = tmp_path / "run"
    env = {"PYTHONPATH": f"{INJECTOR}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "FAULT_KILL_RANK": "1", "FAULT_KILL_SAVE": "2"}
    result = run_train(demo_overrides(demo_data, out, **{**RUN, "train.steps": 12}), tmp_path, nproc=2,
                       timeout=600, env_extra=env)
    assert result.returncode != 0
    broken = out / "checkpoints" / "step00000004"
    assert (broken / "zero_pp_rank_0_mp_rank_00_optim_states.pt").is_file()
    assert not (broken / "complete.json").exists()
    assert (out / "checkpoints" / "latest").read_text() == "step00000002"
    result = run_train(demo_overrides(demo_data, out, **{**RUN, "train.steps": 12, "train.resume": "auto"}),
                       tmp_path, nproc=2, timeout=600)
    _ok(result)
    assert "skipped step00000004: no complete.json" in result.stdout and "at step 2" in result.stdout
    _same_losses(metrics(out), metrics(two_rank_reference))
    assert checkpoint.incomplete_reason(str(broken)) is None  # saved again, completely, this time
