"""The DeepSpeed ZeRO-3 trainer end to end, in real processes (gloo on CPU)."""

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from _train_utils import demo_overrides, metrics, remark_complete, run_train, start_train
from megajepa.config import load_config
from megajepa.jepa.collapse import verdict
from megajepa.train.lr_schedule import lr_ratio


def _ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


SINGLE = {"train.steps": 30, "optim.warmup_steps": 3, "data.pairs_per_batch": 16, "train.eval_every": 15}


@pytest.fixture(scope="module")
def single_run(demo_data, tmp_path_factory):
    """One 1-rank run of 30 steps, shared by the tests that only read its outputs."""
    out = tmp_path_factory.mktemp("single")
    result = run_train(demo_overrides(demo_data, out, **SINGLE), tmpdir=tmp_path_factory.mktemp("tmp"))
    _ok(result)
    (out / "train.stdout").write_text(result.stdout)
    return out


def test_train_ends_with_the_summary_table(single_run):
    """Every `megajepa train` closes with the demo's table: losses, throughput, checkpoint, collapse."""
    stdout = (single_run / "train.stdout").read_text()
    summary = json.loads((single_run / "summary.json").read_text())
    assert f"| held-out CE | {summary['start_eval_ce']:.4f} | {summary['eval_ce']:.4f} |" in stdout
    z_a_std = (summary["start_eval_z_a_std"], summary["eval_z_a_std"])
    assert f"| held-out z_a std x sqrt(d) (collapsed < 0.1) | {z_a_std[0]:.4f} | {z_a_std[1]:.4f} |" in stdout
    # the verdict in words, from the held-out figures (the demo's embeddings collapse within 30 steps)
    assert f"collapse (held-out, end): {verdict({k[5:]: v for k, v in summary.items() if k.startswith('eval_')})}" in stdout
    assert summary["eval_collapsed"] == 1.0 and "collapse (held-out, end): collapsed" in stdout
    rows = metrics(single_run)  # every logged row: the global batch's figures
    assert all(0.0 <= r["z_a_std"] and r["collapsed"] in (0.0, 1.0) for r in rows)
    assert "computed tokens/s" in stdout and f"checkpoint: {summary['checkpoint']}" in stdout


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


def test_the_logged_lr_is_the_one_its_step_ran_at(single_run):
    """metrics.jsonl's lr at step n is update n's (0-based n - 1) of the warm-up + cosine schedule."""
    optim = load_config("configs/demo.yaml", [f"optim.warmup_steps={SINGLE['optim.warmup_steps']}"]).optim
    logged = [r["lr"] for r in metrics(single_run)]
    assert logged == pytest.approx([optim.lr * lr_ratio(optim, SINGLE["train.steps"], s) for s in range(30)], rel=1e-6)


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
    assert "is deprecated" not in result.stderr  # DeepSpeed's use of old collective names stays quiet
    full_rows = {r["step"]: r for r in metrics(full)}
    resumed_rows = metrics(resumed)
    assert [r["step"] for r in resumed_rows] == [5, 6, 7, 8]
    for row in resumed_rows:
        for key in ("loss", "ce", "jepa", "pairs", "useful_tokens"):
            assert row[key] == full_rows[row["step"]][key], (row["step"], key)


def test_mixture_reports_each_source_and_resumes_exactly(demo_data, tmp_path):
    """data.sources: the demo pairs ("chat") and plain text ("web", CE only) on 2 ranks. Each step
    logs per-source records, pairs, tokens and CE summed over both ranks; a run resumed at step 2
    logs what the uninterrupted run logged for steps 3 and 4."""
    from megajepa.data.prepare_text import prepare_text

    rng = torch.Generator().manual_seed(0)
    words = ["alpha", "beta", "gamma", "delta", "match", "letters", "lines", "with", "the", "word"]
    lines = [" ".join(words[i] for i in torch.randint(0, len(words), (int(n),), generator=rng))
             for n in torch.randint(3, 40, (120,), generator=rng)]
    (tmp_path / "web.txt").write_text("\n".join(lines) + "\n")
    web = tmp_path / "web"
    prepare_text([str(tmp_path / "web.txt")], str(web), demo_data["tokenizer"], max_tokens=48, progress=False)
    sources = f"[{{shards: {demo_data['train_shards']}, name: chat}}, {{shards: {web}, name: web}}]"
    common = {"data.shards": "null", "data.sources": sources, "train.steps": 4, "data.eval_shards": "null"}
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    _ok(run_train(demo_overrides(demo_data, full, **{**common, "train.save_every": 2}), tmp_path, nproc=2))
    rows = metrics(full)
    for row in rows:
        # 8 records per rank and micro-batch, from either source; texts carry no pair
        assert row["source/chat/records"] + row["source/web/records"] == 2 * 8
        assert row["source/chat/pairs"] == row["source/chat/records"] == row["pairs"]
        assert row["source/web/pairs"] == 0
        for name in ("chat", "web"):
            if row[f"source/{name}/records"]:
                assert row[f"source/{name}/ce_tokens"] > 0 and row[f"source/{name}/tokens"] > 0
                assert row[f"source/{name}/ce"] == row[f"source/{name}/ce_sum"] / row[f"source/{name}/ce_tokens"]
    assert sum(r["source/web/records"] for r in rows) > 0 and sum(r["source/chat/records"] for r in rows) > 0
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step00000002", resumed / "checkpoints" / "step00000002")
    (resumed / "checkpoints" / "latest").write_text("step00000002")
    _ok(run_train(demo_overrides(demo_data, resumed, **{**common, "train.resume": "auto"}), tmp_path, nproc=2))
    resumed_rows = metrics(resumed)
    assert [r["step"] for r in resumed_rows] == [3, 4]
    for row, want in zip(resumed_rows, rows[2:]):
        for key in [k for k in want if k.startswith("source/")] + ["loss", "ce", "jepa"]:
            assert row[key] == want[key] or (row[key] != row[key] and want[key] != want[key]), (row["step"], key)


def test_ema_target_resumes_exactly(demo_data, tmp_path):
    """target: ema, bf16: a run of 4 steps and a run of 2 resumed for 2 more give the same losses
    and, at step 4, the same EMA (so the same teacher weights, which are the EMA rounded)."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    common = {"jepa.target": "ema", "deepspeed.precision": "bf16", "train.steps": 4}
    _ok(run_train(demo_overrides(demo_data, full, **{**common, "train.save_every": 2}), tmp_path))
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step00000002", resumed / "checkpoints" / "step00000002")
    (resumed / "checkpoints" / "latest").write_text("step00000002")
    _ok(run_train(demo_overrides(demo_data, resumed, **{**common, "train.resume": "auto"}), tmp_path))
    full_rows = {r["step"]: r for r in metrics(full)}
    resumed_rows = metrics(resumed)
    assert [r["step"] for r in resumed_rows] == [3, 4]
    for row in resumed_rows:
        for key in ("loss", "ce", "jepa"):
            assert row[key] == full_rows[row["step"]][key], (row["step"], key)
    ema = [torch.load(run / "checkpoints" / "step00000004" / "ema_rank0.pt") for run in (full, resumed)]
    assert ema[0]["step"] == ema[1]["step"] == 4
    assert all(torch.equal(a, b) for a, b in zip(ema[0]["ema"], ema[1]["ema"]))
    # not vacuous: the EMA moved between the two checkpoints
    at_two = torch.load(full / "checkpoints" / "step00000002" / "ema_rank0.pt")
    assert not all(torch.equal(a, b) for a, b in zip(at_two["ema"], ema[0]["ema"]))


def test_activation_checkpointing_with_the_ema_teacher_on_two_ranks(demo_data, tmp_path):
    """model.gradient_checkpointing under ZeRO-3 beside the EMA teacher, a second ZeRO-3 engine whose
    parameters are all frozen (DeepSpeed 0.19.x has had recompute trouble with frozen parameters):
    the recomputed backward gives the losses and grad norms of the run without checkpointing."""
    runs = {}
    for checkpointing in ("true", "false"):
        out = tmp_path / f"checkpointing-{checkpointing}"
        extra = {"jepa.target": "ema", "train.steps": 3, "model.gradient_checkpointing": checkpointing}
        _ok(run_train(demo_overrides(demo_data, out, **extra), tmp_path, nproc=2))
        runs[checkpointing] = metrics(out)
    assert [r["step"] for r in runs["true"]] == [1, 2, 3]
    for with_, without in zip(runs["true"], runs["false"]):
        for key in ("loss", "ce", "jepa", "grad_norm"):
            assert with_[key] == pytest.approx(without[key], rel=1e-5), (with_["step"], key)
    assert runs["true"][0]["loss"] != runs["true"][-1]["loss"]  # it trained


def test_second_ctrl_c_aborts_but_its_echo_does_not():
    """The first SIGINT asks for a stop; one within StopSignal.SIGINT_ECHO_SECONDS (torchrun passing
    the same Ctrl-C on) changes nothing; a later one ends the process by SIGINT at once."""
    code = (
        "import os, signal, time\n"
        "from megajepa.train.stop_signal import StopSignal\n"
        "stop = StopSignal()\n"
        "os.kill(os.getpid(), signal.SIGINT); os.kill(os.getpid(), signal.SIGINT)\n"
        "print('received', stop.received, flush=True)\n"
        "time.sleep(StopSignal.SIGINT_ECHO_SECONDS + 0.5)\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "time.sleep(30)\n"
        "print('still running', flush=True)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert f"received {int(signal.SIGINT)}" in result.stdout, result.stderr[-2000:]
    assert result.returncode == -signal.SIGINT and "still running" not in result.stdout


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
