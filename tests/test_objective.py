"""Objective options beyond the equivalence test: pooling, distances, heads, warm-up, dropout."""

import pytest
import torch
import torch.nn.functional as F

from kernels.latent_loss import latent_loss_reference
from megajepa.config import JepaConfig
from megajepa.data.layout import LayoutConfig, pack_pairs
from megajepa.jepa.objective import JepaModel, collapse_std, lambda_at
from test_equivalence import PRED_IDS, random_pairs, tiny_lm


def packed(pairs, **layout):
    cfg = LayoutConfig(**{"row_length": 128, "pred_token_ids": PRED_IDS, **layout})
    return pack_pairs([a for a, _ in pairs], [b for _, b in pairs], list(range(len(pairs))), cfg)


def test_mean_pooling_averages_each_view():
    pairs = random_pairs(5, seed=4)
    model = JepaModel(tiny_lm("sdpa"), JepaConfig(k=2, pooling="mean"))
    out = model(packed(pairs))
    base = model.lm.base_model
    with torch.no_grad():
        z_b = torch.stack([base(input_ids=b[None], use_cache=False).last_hidden_state[0].mean(0) for _, b in pairs])
        # z_a: mean over the [PRED] tokens, each seeing view A
        z_a = torch.stack([
            base(input_ids=torch.cat([a, torch.tensor(PRED_IDS)])[None], use_cache=False).last_hidden_state[0, len(a):].mean(0)
            for a, _ in pairs
        ])
    torch.testing.assert_close(out.z_b, z_b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.z_a, z_a, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("distance", ["cosine", "mse", "l2"])
@pytest.mark.parametrize("predictor", ["mlp", "linear", "identity"])
def test_heads_and_distances(distance, predictor):
    pairs = random_pairs(4, seed=5)
    model = JepaModel(tiny_lm("sdpa"), JepaConfig(k=0, predictor=predictor, distance=distance, lambda_=2.0))
    batch = packed(pairs, pred_token_ids=())
    out = model(batch)
    assert out.z_a.shape == out.z_b.shape == (4, 64)
    expected = latent_loss_reference(out.z_a.detach(), out.z_b.detach(), distance)
    torch.testing.assert_close(out.jepa, expected)
    torch.testing.assert_close(out.loss.detach(), out.ce + 2.0 * out.jepa)
    out.loss.backward()
    if predictor != "identity":
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.predictor.parameters())


def test_lambda_warmup_and_zero_lambda():
    cfg = JepaConfig(lambda_=2.0, lambda_warmup_steps=10)
    assert [lambda_at(cfg, s) for s in (0, 5, 10, 50)] == [0.0, 1.0, 2.0, 2.0]
    pairs = random_pairs(3, seed=6)
    model = JepaModel(tiny_lm("sdpa"), cfg)
    out = model(packed(pairs), step=5)
    torch.testing.assert_close(out.loss.detach(), out.ce + 1.0 * out.jepa)


def test_dropped_pairs_have_no_latent_term():
    pairs = random_pairs(40, seed=7)
    batch = packed(pairs, dropout=0.5, seed=3)
    kept = batch["jepa_pairs"].tolist()
    assert 5 < len(kept) < 35
    model = JepaModel(tiny_lm("sdpa"), JepaConfig(k=2))
    out = model(batch)
    assert out.z_a.shape[0] == len(kept)
    all_dropped = packed(pairs[:1], target="none")
    out = model(all_dropped)
    assert out.jepa.item() == 0.0 and out.z_a.shape[0] == 0
    out.loss.backward()  # still a valid graph through the predictor on zero pairs


def test_collapse_monitor():
    spread = F.normalize(torch.randn(256, 64), dim=-1)
    collapsed = spread[:1].repeat(256, 1) + 1e-4 * torch.randn(256, 64)
    assert collapse_std(collapsed) < 0.01 < collapse_std(spread)
    assert abs(collapse_std(spread).item() - 64 ** -0.5) < 0.02
