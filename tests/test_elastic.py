"""Resuming at another world size: 2 ranks -> 1 rank -> 2 ranks against an uninterrupted 2-rank run.

The oracle is the uninterrupted run: the same global batches (sample ids) at every step, losses
close to its own (not bit-identical: another split of a global batch packs other rows and reduces
in another order, see megajepa.train.elastic), and an EMA teacher that, held still (momentum 1),
consolidates to exactly the weights it had at the world size that saved it.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
import torch

from _train_utils import demo_overrides, metrics, run_train
from megajepa.config import Config
from megajepa.export import consolidate, read_checkpoint
from megajepa.train import elastic, trainer
from megajepa.train.checkpoint import CheckpointMismatch

COMMON = {
    "optim.warmup_steps": 2,
    "train.save_every": 4,
    "train.keep_schedule": "true",  # the parts run 8 and 12 steps on the 12-step schedule
    "jepa.target": "ema",
    "jepa.ema.schedule": "constant",
    "jepa.ema.momentum_start": 1.0,
    "jepa.ema.momentum_end": 1.0,
}
GLOBAL_BATCH = 16
# Losses after a world-size change stay this close to the uninterrupted run's (relative).
LOSS_RTOL = 2e-2


def _ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


def _global_batches(record_dir: Path) -> dict[int, list[int]]:
    """{step: sorted sample ids of every rank}, from data.record_ids_dir."""
    batches: dict[int, list[int]] = {}
    for path in record_dir.glob("rank*.jsonl"):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            batches.setdefault(row["step"], []).extend(row["sample_ids"])
    return {step: sorted(ids) for step, ids in batches.items()}


def _relative_gap(rows: list[dict], reference: dict[int, dict]) -> float:
    return max(abs(r["loss"] - reference[r["step"]]["loss"]) / abs(reference[r["step"]]["loss"]) for r in rows)


@pytest.mark.slow
def test_two_ranks_then_one_then_two(demo_data, tmp_path):
    ref, run = tmp_path / "reference", tmp_path / "run"
    overrides = lambda out, records, **extra: demo_overrides(  # noqa: E731
        demo_data, out, **{**COMMON, "data.record_ids_dir": str(records), **extra}
    )
    _ok(run_train(overrides(ref, tmp_path / "ids-ref", **{"train.steps": 12, "data.pairs_per_batch": 8}),
                  tmp_path, nproc=2, timeout=900))

    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(ref / "checkpoints" / "step00000004", run / "checkpoints" / "step00000004")
    # 1 rank: the same global batch needs data.pairs_per_batch=16; 8 is refused, naming the fix
    refused = run_train(overrides(run, tmp_path / "ids-1", **{"train.steps": 8, "train.resume": "auto",
                                                              "data.pairs_per_batch": 8}), tmp_path)
    assert refused.returncode == 2 and "set data.pairs_per_batch=16" in refused.stderr, refused.stderr[-3000:]
    one = run_train(overrides(run, tmp_path / "ids-1", **{"train.steps": 8, "train.resume": "auto",
                                                          "data.pairs_per_batch": GLOBAL_BATCH}), tmp_path, timeout=900)
    _ok(one)
    assert "at step 4 (world size 2 -> 1)" in one.stdout
    two = run_train(overrides(run, tmp_path / "ids-2", **{"train.steps": 12, "train.resume": "auto",
                                                          "data.pairs_per_batch": 8}), tmp_path, nproc=2, timeout=900)
    _ok(two)
    assert "at step 8 (world size 1 -> 2)" in two.stdout

    # the loader: every step sees the uninterrupted run's global batch, and no sample twice
    reference_batches = _global_batches(tmp_path / "ids-ref")
    resumed_batches = {**_global_batches(tmp_path / "ids-1"), **_global_batches(tmp_path / "ids-2")}
    assert sorted(resumed_batches) == list(range(5, 13))
    for step, ids in resumed_batches.items():
        assert ids == reference_batches[step], step
    seen = [i for step in range(1, 13) for i in (reference_batches[step] if step <= 4 else resumed_batches[step])]
    assert len(seen) == len(set(seen)) == 12 * GLOBAL_BATCH

    # the losses: close to the uninterrupted run's
    reference_rows = {r["step"]: r for r in metrics(ref)}
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(5, 13))
    gap = _relative_gap(rows, reference_rows)
    print(f"largest relative loss gap to the uninterrupted run over steps 5-12: {gap:.2e}")
    assert gap < LOSS_RTOL

    # the EMA teacher, held still, is the same whole model at world sizes 2, 1 and 2
    ema = {step: consolidate(read_checkpoint(str(run / "checkpoints" / f"step{step:08d}")), "ema") for step in (4, 8, 12)}
    assert json.loads((run / "checkpoints" / "step00000008" / "meta.json").read_text())["world_size"] == 1
    for step in (8, 12):
        assert ema[step].keys() == ema[4].keys()
        for name, tensor in ema[4].items():
            assert torch.equal(ema[step][name], tensor), (step, name)


def _saved_at_world_size(output_dir: Path, world: int) -> Path:
    """A checkpoint directory that resume accepts as complete, written by `world` ranks (no
    DeepSpeed files: these tests stop at the conversion)."""
    tag_dir = output_dir / "checkpoints" / "step00000004"
    tag_dir.mkdir(parents=True)
    (tag_dir / "meta.json").write_text(json.dumps({"world_size": world, "step": 4}))
    marker = {"step": 4, "world_size": world, "files": {"meta.json": (tag_dir / "meta.json").stat().st_size}}
    (tag_dir / "complete.json").write_text(json.dumps(marker))
    return tag_dir


class _Converted(Exception):
    pass


def test_a_resume_at_another_world_size_converts_before_any_process_group(tmp_path, monkeypatch):
    """An 8B conversion outlasts any collective's timeout: it must run before one exists."""
    tag_dir = _saved_at_world_size(tmp_path, world=2)
    calls = []

    def convert(source, target, workers):
        calls.append((source, torch.distributed.is_available() and torch.distributed.is_initialized(), workers))
        raise _Converted

    monkeypatch.setattr(elastic, "_convert", convert)
    for name in ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_RANK"):
        monkeypatch.delenv(name, raising=False)
    cfg = Config()
    cfg.train.output_dir, cfg.train.resume = str(tmp_path), "auto"
    with pytest.raises(CheckpointMismatch, match="universal conversion failed"):
        trainer.train(cfg)  # one process resuming a 2-rank checkpoint; the failure is a refusal
    assert calls == [(str(tag_dir), False, elastic.conversion_workers())]


def test_other_ranks_wait_for_the_conversion_on_the_file_system(tmp_path, monkeypatch):
    tag_dir = _saved_at_world_size(tmp_path, world=4)
    monkeypatch.setattr(elastic, "_convert", lambda *args: pytest.fail("only rank 0 converts"))
    cfg = Config()
    cfg.train.output_dir, cfg.train.resume = str(tmp_path), "auto"
    waiter = threading.Thread(target=elastic.convert_before_start, args=(cfg, 1, 2), daemon=True)
    waiter.start()
    waiter.join(timeout=3.0)
    assert waiter.is_alive()  # no universal folder yet: rank 1 waits
    (tag_dir / elastic.UNIVERSAL_SUBDIR).mkdir()  # rank 0's rename of the finished conversion
    waiter.join(timeout=5.0)
    assert not waiter.is_alive()
    (tag_dir / elastic.UNIVERSAL_SUBDIR).rmdir()
    elastic.convert_before_start(cfg, 1, 4)  # the world size that saved it: nothing to convert or wait for
