"""What the reference-oracle tests (test_reference_objective.py, test_stp.py) run on: the embedded
tokenizer, a tiny random Llama (configs/models/tiny-llama.json), a few short regex conversations,
and the comparison of the oracle's gradients with megajepa's."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from megajepa.data.embedded import ensure_tokenizer
from megajepa.data.tokenizer import load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(REPO, "configs", "demo.yaml")
SYSTEM = "Translate the description into a regular expression."
RECORDS = [
    ("lines containing the word 'dog'", ".*dog.*"),
    ("lines that start with a vowel", "[AEIOUaeiou].*"),
    ("lines ending in 'cloud' or 'rain'", ".*(cloud|rain)"),
    ("lines with a number followed by a letter, anywhere in the line", ".*[0-9][A-Za-z].*"),
    ("the word 'tree' two times", ".*tree.*tree.*"),
    ("lines having a capital letter before the word 'sun'", ".*[A-Z].*sun.*"),
    ("lines with 'x'", ".*x.*"),
]


@pytest.fixture(scope="module")
def tokenizer():
    """The embedded tokenizer, as loaded (a fixture of each module that imports it)."""
    return load_tokenizer(ensure_tokenizer())


def regex_conversations(system: bool) -> list[list[dict]]:
    """One [system?, user, assistant] conversation per record."""
    head = [{"role": "system", "content": SYSTEM}] if system else []
    return [head + [{"role": "user", "content": u}, {"role": "assistant", "content": a}] for u, a in RECORDS]


def tiny_llama(vocab_size: int):
    """The tiny Llama with random weights (seed 0), fp32, in eval mode: no dropout anywhere."""
    with open(os.path.join(REPO, "configs", "models", "tiny-llama.json")) as f:
        spec = json.load(f)
    model_type = spec.pop("model_type")
    spec.update(vocab_size=vocab_size, attention_dropout=0.0)
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **spec), attn_implementation="sdpa")
    return lm.float().eval()


def gradients(model, loss) -> dict[str, torch.Tensor]:
    """Every parameter's gradient of `loss` alone (earlier gradients cleared)."""
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_gradients_close(expected: dict, actual: dict) -> None:
    """Equal to fp32 rounding, parameter by parameter: the largest difference under 1e-4 of the
    expected gradient's largest element."""
    for name, g in expected.items():
        scale = g.abs().max().item() + 1e-12
        assert (actual[name] - g).abs().max().item() / scale < 1e-4, name
