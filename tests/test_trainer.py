"""The DeepSpeed ZeRO-3 trainer end to end, in real processes (gloo on CPU)."""

import json
import shutil
import signal
import time

import pytest
import torch

from _train_utils import demo_overrides, metrics, remark_complete, run_train, start_train


def _ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


SINGLE = {"train.steps": 30, "optim.warmup_steps": 3, "data.pairs_per_batch": 16, "train.eval_every": 15}


@pytest.fixture(scope="module")
def single_run(demo_data, tmp_path_factory):
    """One 1-rank run of 30 steps, shared by the tests that only read its outputs."""
    out = tmp_path_factory.mktemp("single")
    result = run_train(demo_overrides(demo_data, out, **SINGLE), tmpdir=tmp_path_factory.mktemp("tmp"))
    _ok(result)
    return out


def test_losses_fall_on_demo_data(single_run):
    rows = metrics(single_run)
    assert [r["step"] for r in rows] == list(range(1, 31))
    first, last = rows[:5], rows[-5:]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    assert mean(last, "ce") < mean(first, "ce") - 1.0  # CE still falls: generation is not harmed
    assert mean(last, "jepa") < mean(first, "jepa")  # and the latent term falls with it
    summary = json.loads((single_run / "summary.json").read_text())
    assert summary["eval_ce"] < summary["start_eval_ce"]
    periodic = [json.loads(line) for line in (single_run / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in periodic] == [15, 30]
    assert periodic[-1]["eval_ce"] == summary["eval_ce"]  # the same batches, the same weights
    assert summary["checkpoint"].endswith("step00000030")
    assert (single_run / "checkpoints" / "latest").read_text().strip() == "step00000030"


def test_resume_refuses_changes_naming_the_keys(single_run, demo_data, tmp_path):
    """Identity, schedule and data keys that differ are refused before any training, each named
    with both values, without a traceback; an extra key the model never reads does not count."""
    spec = json.loads(open("configs/models/tiny-llama.json").read())
    other_model, harmless_model = tmp_path / "other.json", tmp_path / "harmless.json"
    other_model.write_text(json.dumps({**spec, "num_hidden_layers": 2, "an_extra_key": 1}))
    harmless_model.write_text(json.dumps({**spec, "an_extra_key": 1, "initializer_range": 0.5, "use_cache": False}))
    cases = [
        ({"jepa.k": 2, "optim.lr": 0.01}, ["k: 1 -> 2", "optim.lr: 0.001 -> 0.01"]),
        ({"model.config": str(other_model)}, ["the model architecture differs (num_hidden_layers: 4 -> 2)"]),
        ({"train.steps": 40}, ["train.steps: 30 -> 40 (the lr and EMA schedules would change; train.keep_schedule=true"]),
        ({"data.pairs_per_batch": 8}, ["data.pairs_per_batch: 16 -> 8 (the loader could no longer resume exactly"]),
        ({"optim.beta2": 0.9}, ["optim.beta2: 0.95 -> 0.9 (DeepSpeed restores it from the optimizer state"]),
    ]
    for change, fragments in cases:
        overrides = demo_overrides(demo_data, single_run, **{**SINGLE, "train.resume": "auto", **change})
        result = run_train(overrides, tmpdir=tmp_path)
        assert result.returncode == 2, result.stderr[-3000:]
        assert "Traceback" not in result.stderr and "ResumeRefused: " in result.stderr
        for fragment in fragments:
            assert fragment in result.stderr, (fragment, result.stderr[-2000:])
    overrides = demo_overrides(demo_data, single_run, **{**SINGLE, "train.resume": "auto", "model.config": str(harmless_model)})
    result = run_train(overrides, tmpdir=tmp_path)
    _ok(result)
    assert "at step 30" in result.stdout


def test_nan_guard_stops_with_step_and_last_checkpoint(single_run, demo_data, tmp_path):
    """Weights that turned NaN (here: a poisoned fp32 master in a copy of a checkpoint) make the
    next loss NaN; the run stops before updating, naming the step and the last good checkpoint."""
    out = tmp_path / "run"
    shutil.copytree(single_run / "checkpoints", out / "checkpoints")
    optim_file = out / "checkpoints" / "step00000030" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    state = torch.load(optim_file, weights_only=False)
    with torch.no_grad():
        state["optimizer_state_dict"]["fp32_flat_groups"][0].fill_(float("nan"))
    torch.save(state, optim_file)
    remark_complete(optim_file.parent)
    overrides = demo_overrides(demo_data, out, **{**SINGLE, "train.steps": 31, "train.resume": "auto", "train.keep_schedule": "true"})
    result = run_train(overrides, tmpdir=tmp_path)
    assert result.returncode != 0
    assert result.returncode == 3 and "Traceback" not in result.stderr
    assert "TrainingDiverged: step 31: loss is nan" in result.stderr
    assert f"Last good checkpoint: {out / 'checkpoints' / 'step00000030'}" in result.stderr
    assert not (out / "checkpoints" / "step00000031").exists()


def test_two_ranks_resume_exactly(demo_data, tmp_path):
    """Losses of one 2-rank run of 8 steps == 4 steps, then a resumed run of 4 more."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    _ok(run_train(demo_overrides(demo_data, full, **{"train.steps": 8, "train.save_every": 4}), tmp_path, nproc=2))
    # the full run's step-4 checkpoint is exactly "a run of 4 steps"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step00000004", resumed / "checkpoints" / "step00000004")
    (resumed / "checkpoints" / "latest").write_text("step00000004")
    result = run_train(demo_overrides(demo_data, resumed, **{"train.steps": 8, "train.resume": "auto"}), tmp_path, nproc=2)
    _ok(result)
    assert "resumed from" in result.stdout and "at step 4" in result.stdout
    full_rows = {r["step"]: r for r in metrics(full)}
    resumed_rows = metrics(resumed)
    assert [r["step"] for r in resumed_rows] == [5, 6, 7, 8]
    for row in resumed_rows:
        for key in ("loss", "ce", "jepa", "pairs", "useful_tokens"):
            assert row[key] == full_rows[row["step"]][key], (row["step"], key)


def test_ema_target_trains_checkpoints_and_resumes(demo_data, tmp_path):
    out = tmp_path / "ema"
    common = {"jepa.target": "ema", "deepspeed.precision": "bf16", "train.save_every": 2}
    _ok(run_train(demo_overrides(demo_data, out, **{"train.steps": 2, **common}), tmp_path))
    assert (out / "checkpoints" / "step00000002" / "ema_rank0.pt").is_file()
    resumed = {"train.steps": 3, "train.resume": "auto", "train.keep_schedule": "true", **common}  # one step more
    result = run_train(demo_overrides(demo_data, out, **resumed), tmp_path)
    _ok(result)
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["ema_seconds"] > 0 for r in rows)
    assert all(0 < r["jepa"] < 2 for r in rows)  # 1 - cos between the online prediction and the teacher


def test_sigterm_checkpoints_and_exits_cleanly(demo_data, tmp_path):
    """Preemption: SIGTERM mid-run saves the current step; train.resume=auto continues after it."""
    out = tmp_path / "run"
    overrides = demo_overrides(demo_data, out, **{"train.steps": 500})
    proc = start_train(overrides, tmp_path)
    try:
        deadline = time.time() + 240
        while not (out / "metrics.jsonl").exists() or len(metrics(out)) < 2:
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "train.err").read_text()[-3000:]
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        proc.kill()
    stdout, stderr = (tmp_path / "train.out").read_text(), (tmp_path / "train.err").read_text()
    assert proc.returncode == 0, stderr[-3000:]
    assert "stop requested (signal 15)" in stdout
    stopped_at = metrics(out)[-1]["step"]
    assert 2 <= stopped_at < 500
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step{stopped_at:08d}"
    resumed = {"train.steps": stopped_at + 1, "train.resume": "auto", "train.keep_schedule": "true"}
    result = run_train(demo_overrides(demo_data, out, **resumed), tmp_path)
    _ok(result)
    assert metrics(out)[-1]["step"] == stopped_at + 1
