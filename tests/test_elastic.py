"""Resuming at another world size: 2 ranks -> 1 rank -> 2 ranks against an uninterrupted 2-rank run.

The oracle is the uninterrupted run: the same global batches (sample ids) at every step, losses
close to its own (not bit-identical: another split of a global batch packs other rows and reduces
in another order, see megajepa.train.elastic), and an EMA teacher that, held still (momentum 1),
consolidates to exactly the weights it had at the world size that saved it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from _train_utils import demo_overrides, metrics, run_train
from megajepa.export import consolidate, read_checkpoint

pytestmark = pytest.mark.slow

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
