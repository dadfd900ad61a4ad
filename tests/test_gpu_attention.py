"""On a CUDA device: FlexAttention against SDPA on the packed rows (forward and backward), and the
bf16 packed pass against the fp32 oracle (every sequence alone), within bf16 tolerance.

Skipped without CUDA (FlexAttention has no backward on CPU; bf16 on CPU says nothing of the GPU).
"""

import pytest
import torch
import torch.nn.functional as F
from _records import layout, make_records
from test_equivalence import alone, tiny_lm

from megajepa.jepa.objective import JepaModel

pytestmark = pytest.mark.gpu
# Relative to the largest entry. bf16 keeps 8 bits of mantissa (2**-8 = 0.4% per rounding); two
# layers, a softmax and a backward round many times.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}


def _packed(seed: int):
    lay, _ = layout(lambda_=1.5)
    records = make_records(9, seed=seed, shared=True)
    batch = lay(records)
    return lay, records, {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}


def _run(attn: str, dtype: torch.dtype, lay, batch: dict, state: dict):
    """Forward and backward of the packed pass on the GPU; (outputs, gradients) as fp32 on the CPU."""
    lm = tiny_lm(attn)
    lm.load_state_dict(state)
    model = JepaModel(lm.to("cuda", dtype), lay.jepa)
    out = model(batch)
    out.loss.backward()
    outputs = {name: getattr(out, name).detach().float().cpu() for name in ("loss", "ce", "jepa", "z_a", "z_b")}
    grads = {name: p.grad.float().cpu() for name, p in model.lm.named_parameters()}
    return outputs, grads


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str) -> None:
    atol = rtol * max(expected.abs().max().item(), 1e-6)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_flex_attention_matches_sdpa_forward_and_backward(dtype):
    """Same weights, same packed rows: FlexAttention's BlockMask against SDPA's dense boolean mask."""
    lay, _, batch = _packed(seed=1)
    state = tiny_lm("sdpa").state_dict()
    flex, flex_grads = _run("flex_attention", dtype, lay, batch, state)
    sdpa, sdpa_grads = _run("sdpa", dtype, lay, batch, state)
    for name in flex:
        _close(flex[name], sdpa[name], TOLERANCE[dtype], name)
    for name in flex_grads:
        _close(flex_grads[name], sdpa_grads[name], TOLERANCE[dtype], f"grad {name}")


def test_bf16_packed_pass_within_bf16_tolerance_of_the_fp32_oracle():
    """The packed single pass in bf16 with FlexAttention (the GPU training path) against every
    sequence run alone in fp32 on the CPU: CE, JEPA loss, embeddings."""
    lay, records, batch = _packed(seed=4)
    ref_lm = tiny_lm("sdpa")
    packed, _ = _run("flex_attention", torch.bfloat16, lay, batch, ref_lm.state_dict())
    with torch.no_grad():
        ce, z_a, z_b = alone(ref_lm, records, lay)
    jepa = (1 - F.cosine_similarity(z_a, z_b, dim=-1)).mean()
    _close(packed["ce"], ce, 2e-2, "ce")
    assert abs(packed["jepa"].item() - jepa.item()) < 3e-2
    for name, ref in (("z_a", z_a), ("z_b", z_b)):
        cosine = F.cosine_similarity(packed[name], ref, dim=-1)
        assert cosine.min().item() > 0.999, f"{name}: bf16 embeddings point elsewhere ({cosine.min().item():.5f})"
