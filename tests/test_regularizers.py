"""jepa.regularizer: SIGReg and VICReg against plain implementations of their published formulas
(values and gradients), over the global batch of 2 real ranks (gloo) as in one process, and in the
objective."""

import pytest
import torch
import torch.nn.functional as F

from _ranks import run_worker
from _regularizer_worker import PROJECTIONS, STEP, records
from megajepa.jepa.collapse import collapse_report
from megajepa.jepa.regularizers import regularizer, sigreg_directions


def epps_pulley(x: torch.Tensor) -> torch.Tensor:
    """LeJEPA's statistic of 1-D samples x against N(0, 1): N times the integral over t in [-3, 3]
    of |mean_n exp(i t x_n) - exp(-t^2/2)|^2 exp(-t^2/2), by the trapezoid rule (33 knots)."""
    t = torch.linspace(-3.0, 3.0, 33, dtype=torch.float64)
    ecf = torch.exp(1j * t[:, None] * x.double()[None, :]).mean(dim=1)
    gauss = torch.exp(-t.square() / 2)
    return x.shape[0] * torch.trapezoid((ecf - gauss).abs().square() * gauss, t)


def sigreg_oracle(z: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    return torch.stack([epps_pulley(z.double() @ directions[:, m].double()) for m in range(directions.shape[1])]).mean()


def vicreg_oracle(z: torch.Tensor) -> torch.Tensor:
    """Bardes et al. 2022 (Algorithm 1): mean relu(1 - sqrt(var + 1e-4)) + 1/25 of the squared
    off-diagonal covariances summed over d (the paper's 25:1 variance:covariance weights)."""
    z = z.double()
    n, d = z.shape
    std = torch.sqrt(z.var(dim=0) + 1e-4)
    centred = z - z.mean(dim=0)
    cov = centred.T @ centred / (n - 1)
    off = cov - torch.diag(cov.diagonal())
    return F.relu(1 - std).mean() + off.square().sum() / d / 25


ORACLES = {
    "sigreg": lambda z: sigreg_oracle(z, sigreg_directions(z.shape[1], PROJECTIONS, STEP, z.device)),
    "vicreg": vicreg_oracle,
}


def _both(fn, z_a, z_b):
    """-> (value, gradient wrt z_a, gradient wrt z_b)."""
    z_a, z_b = z_a.clone().requires_grad_(), z_b.clone().requires_grad_()
    value = fn(z_a, z_b)
    value.backward()
    return value.item(), z_a.grad, z_b.grad


@pytest.mark.parametrize("name", ["sigreg", "vicreg"])
def test_value_and_gradients_match_the_published_formula(name):
    g = torch.Generator().manual_seed(1)
    z_a, z_b = torch.randn(24, 6, generator=g) * 0.7 + 0.3, torch.randn(24, 6, generator=g) * 1.5
    got = _both(lambda a, b: regularizer(name, a, b, STEP, PROJECTIONS), z_a, z_b)
    want = _both(lambda a, b: (ORACLES[name](a) + ORACLES[name](b)) / 2, z_a, z_b)
    assert got[0] == pytest.approx(want[0], rel=1e-5)
    for mine, theirs in zip(got[1:], want[1:]):
        torch.testing.assert_close(mine.double(), theirs.double(), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", ["sigreg", "vicreg"])
def test_small_for_standard_normal_large_for_one_point(name):
    g = torch.Generator().manual_seed(2)
    normal = torch.randn(512, 6, generator=g)
    point = torch.randn(1, 6, generator=g) + 1e-3 * torch.randn(512, 6, generator=g)
    spread, collapsed = (regularizer(name, z, z, STEP, PROJECTIONS).item() for z in (normal, point))
    assert collapsed > 20 * spread


def test_directions_are_unit_and_drawn_from_the_step():
    a, b, c = (sigreg_directions(6, 4, step, "cpu") for step in (3, 3, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.testing.assert_close(a.norm(dim=0), torch.ones(4))


@pytest.mark.parametrize("name", ["sigreg", "vicreg"])
def test_no_pairs_give_zero_and_a_graph(name):
    z = torch.zeros(0, 6, requires_grad=True)
    value = regularizer(name, z, z, STEP, PROJECTIONS)
    value.backward()
    assert value.item() == 0.0 and z.grad.shape == (0, 6)


@pytest.mark.parametrize("split", ["5,9", "14,0"])
def test_two_ranks_equal_one_process_on_the_same_records(split, tmp_path):
    """Value, data-parallel gradient and collapse figures over 2 gloo ranks, each with its own
    rows (one with none), against one process with all of them; the same collectives on both."""
    run_worker("_regularizer_worker.py", tmp_path, 2, "--split", split, timeout=120.0)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    x_a, x_b, encoder = records()
    for name in ("sigreg", "vicreg"):
        encoder.zero_grad()
        value = regularizer(name, encoder(x_a), encoder(x_b), STEP, PROJECTIONS)
        value.backward()
        grad = torch.cat([encoder.weight.grad.flatten(), encoder.bias.grad])
        for record in ranks:
            assert record[name]["value"] == pytest.approx(value.item(), rel=1e-5)
            torch.testing.assert_close(record[name]["grad"], grad, rtol=1e-4, atol=1e-6)
        assert ranks[0][name]["collectives"] == ranks[1][name]["collectives"]
        assert [c[0] for c in ranks[0][name]["collectives"]] == ["ALLREDUCE"]  # forward only
    with torch.no_grad():
        single = collapse_report(encoder(x_a), encoder(x_b))
    for record in ranks:
        assert record["collapse"]["verdict"] == single["verdict"]
        for key in ("z_a_std", "z_b_std", "cos_matched", "cos_mismatched"):
            assert record["collapse"][key] == pytest.approx(single[key], rel=1e-6)  # float32 encoder rows


@pytest.mark.parametrize("name", ["sigreg", "vicreg"])
def test_the_objective_adds_the_weighted_term_in_training_forwards_only(name):
    from _records import layout, make_records
    from megajepa.jepa.objective import JepaModel
    from test_equivalence import tiny_lm

    lay, _ = layout(regularizer=name, regularizer_weight=0.5, sigreg_projections=PROJECTIONS)
    model = JepaModel(tiny_lm("sdpa"), lay.jepa)
    batch = lay(make_records(6, seed=3))
    out = model(batch, step=STEP)
    expected = regularizer(name, out.z_a.detach(), out.z_b.detach(), STEP, PROJECTIONS)
    torch.testing.assert_close(out.regularizer, expected)
    torch.testing.assert_close(out.loss.detach(), out.ce + out.jepa + 0.5 * expected)
    model.eval()
    evaluated = model(batch, step=STEP)
    assert evaluated.regularizer is None
    torch.testing.assert_close(evaluated.loss.detach(), evaluated.ce + evaluated.jepa)


@pytest.mark.parametrize("name", ["sigreg", "vicreg"])
def test_no_host_read(name, monkeypatch):
    """The term runs inside every training forward: no .item(), bool() or .tolist() (on a GPU each
    would stall the host until the device catches up; the count of pairs stays a tensor)."""
    reads = []
    for method in ("item", "tolist", "__bool__", "__float__"):
        original = getattr(torch.Tensor, method)

        def counting(self, *args, _name=method, _original=original):
            reads.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, method, counting)
    z = torch.randn(8, 6, requires_grad=True)
    regularizer(name, z, z * 2, STEP, PROJECTIONS).backward()
    assert reads == []
