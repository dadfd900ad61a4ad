"""Across-seed statistics for `megajepa compare`: mean, sample std and a one-sided paired t-test.

Student's t distribution comes from the regularized incomplete beta function, evaluated by its
continued fraction (modified Lentz), so nothing beyond `math` is needed:

    P(T > t) = I_x(dof / 2, 1 / 2) / 2   with x = dof / (dof + t^2), for t >= 0
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

_TINY = 1e-300


def _beta_continued_fraction(a: float, b: float, x: float, max_terms: int = 300, tol: float = 1e-15) -> float:
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    fraction = d
    for m in range(1, max_terms + 1):
        # the even and the odd term of the fraction, one after the other
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + numerator / c
            c = c if abs(c) > _TINY else _TINY
            fraction *= d * c
        if abs(d * c - 1.0) < tol:
            return fraction
    raise ArithmeticError(f"incomplete beta: no convergence for a={a}, b={b}, x={x}")


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), for a, b > 0 and 0 <= x <= 1."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc: x must be in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    # the fraction converges fast on this side of the mean; use the symmetry I_x(a,b) = 1 - I_{1-x}(b,a) otherwise
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_sf(t: float, dof: int) -> float:
    """P(T > t) for Student's t with `dof` degrees of freedom."""
    if dof <= 0:
        raise ValueError(f"t distribution: dof must be positive, got {dof}")
    tail = 0.5 * betainc(dof / 2.0, 0.5, dof / (dof + t * t))
    return tail if t >= 0 else 1.0 - tail


def mean_std(values: Sequence[float]) -> tuple[float, Optional[float]]:
    """Mean and sample standard deviation (None for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def paired_t_test(treatment: Sequence[float], control: Sequence[float], higher_is_better: bool) -> Optional[float]:
    """One-sided p-value of the paired t-test for "treatment is better than control" (pairs are
    seeds). None when it is undefined: fewer than two pairs, or differences without variance."""
    if len(treatment) != len(control):
        raise ValueError(f"paired t-test: {len(treatment)} treatment values, {len(control)} control values")
    sign = 1.0 if higher_is_better else -1.0
    gains = [sign * (t - c) for t, c in zip(treatment, control)]
    mean, std = mean_std(gains)
    if std is None or std == 0.0:
        return None
    return t_sf(mean / (std / math.sqrt(len(gains))), len(gains) - 1)
