"""The optimizer update a step makes: optim.accumulate (DeepSpeed's mean or the reference's sum of
the micro-batch gradients) and the learning-rate schedule (optim.warmup_steps 0 is no warm-up), on a
real DeepSpeed ZeRO-3 engine against the plain formulas."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from _train_utils import REPO, free_port
from megajepa.config import OptimConfig
from megajepa.train.lr_schedule import lr_ratio


def run_worker(tmp_path, *overrides):
    out = tmp_path / "update.json"
    env = dict(os.environ, PORT=str(free_port()), OMP_NUM_THREADS="1", TMPDIR=str(tmp_path))
    result = subprocess.run([sys.executable, "tests/_update_worker.py", str(out), "data.pairs_per_batch=3", *overrides],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(out.read_text())


def dense_gradient(weight, micro_batches, accumulate):
    """The update's gradient in plain torch: each micro-batch's mean loss, summed or averaged."""
    weight = torch.tensor(weight, requires_grad=True)
    total = sum(((torch.tensor(x) @ weight.T - torch.tensor(y)) ** 2).mean() for x, y in micro_batches)
    (total / (len(micro_batches) if accumulate == "mean" else 1)).backward()
    return weight.grad


@pytest.mark.parametrize("accumulate", ["mean", "sum"])
def test_the_update_reads_the_mean_or_the_sum_of_the_micro_batch_gradients(tmp_path, accumulate):
    """DeepSpeed's global grad norm (before clipping at 1.0) is that of the dense mean or sum."""
    run = run_worker(tmp_path, "optim.grad_accum=4", f"optim.accumulate={accumulate}", "optim.grad_clip=1.0")
    expected = dense_gradient(run["weight0"], run["inputs"][0], accumulate).norm().item()
    assert run["grad_norms"][0] == pytest.approx(expected, rel=1e-5)
    other = dense_gradient(run["weight0"], run["inputs"][0], {"mean": "sum", "sum": "mean"}[accumulate]).norm().item()
    assert other == pytest.approx(expected * (4 if accumulate == "mean" else 0.25), rel=1e-5)


def test_no_warm_up_is_the_full_lr_from_the_first_update(tmp_path):
    """optim.warmup_steps=0: update 1 runs at the full lr (AdamW's first update moves every weight by
    lr x sign of its gradient), then the cosine to optim.min_lr_ratio over the 4 updates."""
    lr, low = 0.01, 0.1
    run = run_worker(tmp_path, "optim.warmup_steps=0", f"optim.lr={lr}", f"optim.min_lr_ratio={low}", "optim.grad_clip=0")
    cosine = [low + (1 - low) * (1 + math.cos(math.pi * s / 4)) / 2 for s in range(4)]
    assert run["lrs"] == pytest.approx([lr * c for c in cosine], rel=1e-9)
    gradient = dense_gradient(run["weight0"], run["inputs"][0], "mean")
    moved = torch.tensor(run["weight1"]) - torch.tensor(run["weight0"])
    torch.testing.assert_close(moved, -lr * gradient.sign(), rtol=1e-4, atol=1e-7)


def test_warm_up_rises_linearly_to_the_lr_at_update_w():
    optim = OptimConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.0)
    assert [lr_ratio(optim, 10, s) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_ratio(optim, 10, 9) == pytest.approx((1 + math.cos(math.pi * 5 / 6)) / 2)
    assert lr_ratio(optim, 10, 50) == 0.0  # past the schedule's end (a longer resumed run): its minimum
