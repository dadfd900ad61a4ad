"""The predictor pred(z_a). With `tokens` the LLM itself predicts through its [PRED] tokens (the
packed layout appends them after view A), so no head is needed; `mlp` and `linear` are heads g_phi
on z_a; `identity` compares z_a with z_b directly."""

from __future__ import annotations

from torch import nn


def build_predictor(kind: str, hidden_size: int) -> nn.Module:
    if kind in ("tokens", "identity"):
        return nn.Identity()
    if kind == "linear":
        return nn.Linear(hidden_size, hidden_size)
    if kind == "mlp":
        return nn.Sequential(
            nn.Linear(hidden_size, 4 * hidden_size), nn.GELU(), nn.Linear(4 * hidden_size, hidden_size)
        )
    raise ValueError(f"jepa.predictor: unknown predictor {kind!r}")


def uses_pred_tokens(kind: str, k: int) -> bool:
    """Whether the layout appends k [PRED] tokens after view A."""
    return kind == "tokens" and k > 0
