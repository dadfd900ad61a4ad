"""Objective options beyond the equivalence test: distances, heads, warm-up, dropout."""

import pytest
import torch
import torch.nn.functional as F

from _records import layout, make_records
from megajepa.jepa.objective import JepaModel, lambda_at
from test_equivalence import tiny_lm

# The distances as the reference writes them (finetune.py): 1 - mean cos, the mean squared
# difference over every element, the mean L2 norm of the differences.
FORMULAS = {
    "cosine": lambda a, b: 1 - F.cosine_similarity(a, b, dim=-1).mean(),
    "mse": lambda a, b: ((a - b) ** 2).mean(),
    "l2": lambda a, b: torch.linalg.norm(a - b, dim=-1).mean(),
}


@pytest.mark.parametrize("distance", ["cosine", "mse", "l2"])
@pytest.mark.parametrize("predictor", ["mlp", "linear", "identity"])
def test_heads_and_distances(distance, predictor):
    lay, _ = layout(k=0, predictor=predictor, distance=distance, lambda_=2.0)
    model = JepaModel(tiny_lm("sdpa"), lay.jepa)
    out = model(lay(make_records(4, seed=5)))
    assert out.z_a.shape == out.z_b.shape == (4, 64)
    expected = FORMULAS[distance](out.z_a.detach().double(), out.z_b.detach().double())
    torch.testing.assert_close(out.jepa.double(), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.loss.detach(), out.ce + 2.0 * out.jepa)
    out.loss.backward()
    if predictor != "identity":
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.predictor.parameters())


def test_lambda_warmup():
    lay, _ = layout(lambda_=2.0, lambda_warmup_steps=10)
    assert [lambda_at(lay.jepa, s) for s in (0, 5, 10, 50)] == [0.0, 1.0, 2.0, 2.0]
    out = JepaModel(tiny_lm("sdpa"), lay.jepa)(lay(make_records(3, seed=6)), step=5)
    torch.testing.assert_close(out.loss.detach(), out.ce + 1.0 * out.jepa)


def test_dropped_pairs_have_no_latent_term():
    lay, _ = layout(dropout=0.5)
    batch = lay(make_records(40, seed=7))
    kept = batch["jepa_pairs"].tolist()
    assert 5 < len(kept) < 35
    model = JepaModel(tiny_lm("sdpa"), lay.jepa)
    assert model(batch).z_a.shape[0] == len(kept)
    off, _ = layout(lambda_=0.0)
    out = model(off(make_records(1, seed=7)))
    assert out.jepa.item() == 0.0 and out.z_a.shape[0] == 0
    out.loss.backward()  # still a valid graph through the predictor on zero pairs


def test_mean_pooling_accumulates_in_fp32():
    """bf16 hidden states, a view of 300 tokens (a bf16 count stops at 256) around a large common
    value (a bf16 sum drops each token's low bits): the plain fp32 mean, rounded once to bf16."""
    lay, _ = layout(pooling="mean")
    model = JepaModel(tiny_lm("sdpa"), lay.jepa)
    g = torch.Generator().manual_seed(0)
    hidden = (8.0 + torch.randn(1, 400, 64, generator=g)).to(torch.bfloat16)
    views = [torch.arange(0, 300), torch.arange(300, 307)]
    batch = {
        "jepa_pairs": torch.arange(len(views)),
        "zb_pool_index": torch.cat(views),
        "zb_pool_owner": torch.cat([torch.full((len(v),), i) for i, v in enumerate(views)]),
    }
    pooled = model.objective.read_embeddings(hidden, batch, "zb")
    expected = torch.stack([hidden[0, v].float().mean(0) for v in views])
    assert pooled.dtype == torch.bfloat16
    torch.testing.assert_close(pooled.float(), expected, rtol=2**-8, atol=0)  # one bf16 rounding
