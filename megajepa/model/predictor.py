"""The predictor heads pred(z_a). With `tokens` the LLM itself predicts through its [PRED] tokens
(the packed layout appends them after view A), so no head is needed; `mlp` and `linear` are heads
g_phi on z_a; `identity` compares z_a with z_b directly. STP's optional head is the reference's
LinearPredictor. Which one a run trains is its objective's choice (megajepa.jepa.objective)."""

from __future__ import annotations

from torch import nn


def build_predictor(kind: str, hidden_size: int) -> nn.Module:
    """The LLM-JEPA predictor of kind `kind` (jepa.predictor)."""
    if kind in ("tokens", "identity"):
        return nn.Identity()
    if kind == "linear":
        return nn.Linear(hidden_size, hidden_size)
    if kind == "mlp":
        return nn.Sequential(
            nn.Linear(hidden_size, 4 * hidden_size), nn.GELU(), nn.Linear(4 * hidden_size, hidden_size)
        )
    raise ValueError(f"jepa.predictor: unknown predictor {kind!r}")


class LinearPredictor(nn.Linear):
    """STP's predictor (galilai-group/llm-jepa, stp.py, LinearPredictor): d x d, no bias,
    Xavier-uniform. The initialisation lives in reset_parameters, which nn.Linear runs inside its
    own constructor."""

    def __init__(self, hidden_size: int):
        super().__init__(hidden_size, hidden_size, bias=False)

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.weight, gain=1.0)


def uses_pred_tokens(kind: str, k: int) -> bool:
    """Whether the layout appends k [PRED] tokens after view A."""
    return kind == "tokens" and k > 0
