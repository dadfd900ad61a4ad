"""Regularisers against collapse (jepa.regularizer), added to the loss times jepa.regularizer_weight:

    none    the reference's: no term
    sigreg  LeJEPA's SIGReg (Balestriero & LeCun, arXiv 2511.08544): the Epps-Pulley statistic of
            M random 1-D projections of the embeddings (jepa.sigreg_projections unit directions,
            drawn from the step number, so the same on every rank) against N(0, 1),
                T = N * integral |phi_N(t) - exp(-t^2/2)|^2 exp(-t^2/2) dt,
            phi_N the projections' empirical characteristic function over the N pairs, the
            integral by the trapezoid rule on [-3, 3] (17 knots on [0, 3], the integrand even), as
            the paper's code; the mean over the M projections
    vicreg  VICReg's variance and covariance terms (Bardes et al., ICLR 2022): the mean over the d
            dimensions of max(0, 1 - sqrt(var + 1e-4)) plus 1/25 (the paper's 1:25 weights) of
            the sum of the squared off-diagonal covariances over d

each the mean over the two views' embeddings, pred(z_a) and z_b (a z_b without gradient, the EMA
or stop-gradient target, only adds its value).

Over the global batch: each term is a function of sums over the pairs (SIGReg: the sums of
cos(t x) and sin(t x) per projection and knot, and the count; VICReg: the sum, the sum of outer
products, in float64 against the cancellation of the covariance, and the count), summed over the
ranks by one megajepa.dist.global_sum per forward, the same on every rank whatever its pairs
(none included). The value is the single-process value on the same records and the ranks'
averaged gradient the single-process gradient. Training forwards only: an evaluation's ranks may
run different numbers of batches.
"""

from __future__ import annotations

import torch

from megajepa import dist

REGULARIZERS = ("none", "sigreg", "vicreg")
T_MAX, KNOTS = 3.0, 17  # SIGReg's quadrature, the paper's
VICREG_GAMMA, VICREG_EPS, VICREG_COVARIANCE = 1.0, 1e-4, 1.0 / 25.0
_SEED = 0x5163  # the directions' generator: this + the step


def sigreg_directions(d: int, projections: int, step: int, device) -> torch.Tensor:
    """[d, projections] unit columns, the same for the same step on every rank."""
    generator = torch.Generator(device=device).manual_seed(_SEED + step)
    directions = torch.randn(d, projections, generator=generator, device=device)
    return directions / directions.norm(dim=0, keepdim=True)


def _knots(device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(t, exp(-t^2/2), the quadrature weights times the window exp(-t^2/2)) on [0, T_MAX]; the
    weights count each t > 0 twice, for -t."""
    t = torch.linspace(0.0, T_MAX, KNOTS, device=device)
    step = T_MAX / (KNOTS - 1)
    ends = (t == 0) | (torch.arange(KNOTS, device=device) == KNOTS - 1)  # made on the device: no copy
    weights = torch.where(ends, step, 2 * step)
    window = torch.exp(-t.square() / 2)
    return t, window, weights * window


def sigreg_sums(z: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """[2 * M * KNOTS + 1]: the sums over the pairs of cos(t x) and sin(t x) per projection x and
    knot t, then the count."""
    t, _, _ = _knots(z.device)
    xt = (z.float() @ directions)[..., None] * t  # [n, M, KNOTS]
    count = torch.full((1,), z.shape[0], dtype=torch.float32, device=z.device)
    return torch.cat([xt.cos().sum(0).flatten(), xt.sin().sum(0).flatten(), count])


def sigreg_value(sums: torch.Tensor, projections: int) -> torch.Tensor:
    """The Epps-Pulley statistic, averaged over the projections, from `sigreg_sums` (0 for 0 pairs)."""
    _, window, weights = _knots(sums.device)
    size = projections * KNOTS
    cos_sum, sin_sum, n = sums[:size].view(projections, KNOTS), sums[size : 2 * size].view(projections, KNOTS), sums[-1]
    mean = 1.0 / n.clamp_min(1.0)
    error = (cos_sum * mean - window).square() + (sin_sum * mean).square()
    return ((error @ weights) * n).mean()


def vicreg_sums(z: torch.Tensor) -> torch.Tensor:
    """[d + d^2 + 1] float64: the sum over the pairs, the sum of their outer products, the count."""
    z = z.double()
    count = torch.full((1,), z.shape[0], dtype=torch.float64, device=z.device)
    return torch.cat([z.sum(0), (z.T @ z).flatten(), count])


def vicreg_value(sums: torch.Tensor, d: int) -> torch.Tensor:
    """VICReg's variance hinge plus 1/25 of its covariance term, from `vicreg_sums` (0 below 2 pairs)."""
    total, outer, n = sums[:d], sums[d : d + d * d].view(d, d), sums[-1]
    mean = total / n.clamp_min(1.0)
    covariance = (outer - n * torch.outer(mean, mean)) / (n - 1).clamp_min(1.0)
    variance = covariance.diagonal()
    hinge = torch.relu(VICREG_GAMMA - torch.sqrt(variance.clamp_min(0.0) + VICREG_EPS)).mean()
    off_diagonal = covariance - torch.diag(variance)
    value = hinge + VICREG_COVARIANCE * off_diagonal.square().sum() / d
    return (value * (n > 1)).float()  # branch-free: no read of the count


def regularizer(name: str, z_a: torch.Tensor, z_b: torch.Tensor, step: int, projections: int) -> torch.Tensor:
    """jepa.regularizer `name` (sigreg or vicreg) over the global batch: the mean of its value for
    z_a and for z_b; every rank calls it, with its own pairs (maybe none)."""
    d = z_a.shape[-1]
    if name == "sigreg":
        directions = sigreg_directions(d, projections, step, z_a.device)
        sums, value = [sigreg_sums(z, directions) for z in (z_a, z_b)], lambda s: sigreg_value(s, projections)
    elif name == "vicreg":
        sums, value = [vicreg_sums(z) for z in (z_a, z_b)], lambda s: vicreg_value(s, d)
    else:
        raise ValueError(f"jepa.regularizer: unknown regulariser {name!r} (one of {', '.join(REGULARIZERS)})")
    global_a, global_b = dist.global_sum(torch.cat(sums)).split(sums[0].numel())
    return (value(global_a) + value(global_b)) / 2
