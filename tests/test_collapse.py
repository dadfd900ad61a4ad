"""megajepa.jepa.collapse on embeddings built to be collapsed and not, against the figures computed
directly (torch.std, the full cosine matrix)."""

import math

import pytest
import torch
import torch.nn.functional as F

from megajepa.jepa.collapse import GAP_MIN, STD_MIN, collapse_report, figures, statistics, verdict


def _direct(z_a, z_b):
    """The figures from their definitions, on the whole batch at once."""
    a, b = F.normalize(z_a.double(), dim=-1), F.normalize(z_b.double(), dim=-1)
    cos = a @ b.T
    n, d = a.shape
    return {
        "z_a_std": a.std(dim=0).mean().item() * math.sqrt(d),
        "z_b_std": b.std(dim=0).mean().item() * math.sqrt(d),
        "cos_matched": cos.diagonal().mean().item(),
        "cos_mismatched": ((cos.sum() - cos.diagonal().sum()) / (n * (n - 1))).item(),
    }


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_figures_of_summed_micro_batches_are_the_whole_batch_s():
    g = _gen()
    z_a, z_b = torch.randn(40, 16, generator=g) + 0.5, torch.randn(40, 16, generator=g)
    parts = sum(statistics(a, b) for a, b in zip(z_a.split([7, 0, 20, 13]), z_b.split([7, 0, 20, 13])))
    got = figures(parts)
    for key, value in _direct(z_a, z_b).items():
        assert got[key] == pytest.approx(value, abs=1e-9), key


def test_spread_and_matched_is_not_collapsed():
    g = _gen(1)
    z_a = torch.randn(512, 64, generator=g)
    report = collapse_report(z_a, z_a + 0.3 * torch.randn(512, 64, generator=g))
    assert report["z_a_std"] == pytest.approx(1.0, abs=0.05)  # std 1/sqrt(d) per dimension on the sphere
    assert report["cos_matched"] > 0.9 and abs(report["cos_mismatched"]) < 0.01
    assert report["collapsed"] == 0.0 and report["verdict"].startswith("not collapsed")


def test_one_point_plus_tiny_noise_is_collapsed():
    g = _gen(2)
    point = torch.randn(1, 64, generator=g)
    z_a = point + 1e-3 * torch.randn(256, 64, generator=g)
    z_b = point + 1e-3 * torch.randn(256, 64, generator=g)
    report = collapse_report(z_a, z_b)
    assert report["z_a_std"] < STD_MIN and report["cos_mismatched"] > 0.99
    assert report["collapsed"] == 1.0 and report["verdict"].startswith("collapsed: one point")


def test_spread_but_matched_equal_to_mismatched_is_collapsed():
    """Every cosine 0: z_a and z_b spread, in orthogonal halves of the space, so pred(z_a) says
    nothing about which z_b is its own."""
    g = _gen(3)
    z_a = torch.cat([torch.randn(128, 32, generator=g), torch.zeros(128, 32)], dim=1)
    z_b = torch.cat([torch.zeros(128, 32), torch.randn(128, 32, generator=g)], dim=1)
    report = collapse_report(z_a, z_b)
    assert min(report["z_a_std"], report["z_b_std"]) > 5 * STD_MIN
    assert report["cos_matched"] == pytest.approx(report["cos_mismatched"], abs=1e-12)
    assert report["collapsed"] == 1.0 and report["verdict"].startswith("collapsed: pred(z_a) does not pick")


def test_fewer_than_two_pairs_have_no_figures():
    report = collapse_report(torch.randn(1, 8), torch.randn(1, 8))
    assert report["collapsed"] is None and report["verdict"].startswith("n/a")
    assert figures(statistics(torch.zeros(0, 8), torch.zeros(0, 8)))["z_a_std"] is None


def test_verdict_thresholds():
    spread = {"z_a_std": 0.8, "z_b_std": 0.9, "cos_matched": 0.5, "cos_mismatched": 0.1}
    assert verdict(spread).startswith("not collapsed")
    assert verdict({**spread, "z_b_std": STD_MIN * 0.9}).startswith("collapsed")
    assert verdict({**spread, "cos_matched": 0.1 + GAP_MIN * 0.9}).startswith("collapsed")
