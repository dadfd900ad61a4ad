"""The fused latent-loss kernel against its plain-torch reference (the formula, in float64):
loss and both gradients.

Without CUDA the kernel runs under TRITON_INTERPRET=1 (set by conftest) on CPU tensors.
"""

import pytest
import torch

import megajepa.kernels.latent_loss as latent_loss_module
from megajepa.kernels.latent_loss import DISTANCES, EPS, latent_loss, latent_loss_reference, latent_loss_triton

# Triton on CPU tensors: the interpreter (conftest); the gpu tests below run the compiled kernel.
pytestmark = pytest.mark.interpreter

SHAPES = [(41, 1271), (1, 4096), (257, 96)]  # several column blocks, one row, d not a power of two
# Relative tolerances. The loss is always computed in fp32; gradients come back in the input dtype,
# where rounding one value the other way is an ulp: 2**-8 for bf16, 2**-11 for fp16.
TOLERANCES = {
    torch.float32: {"loss": 1e-5, "grad": 1e-5},
    torch.bfloat16: {"loss": 1e-5, "grad": 1e-2},
    torch.float16: {"loss": 1e-5, "grad": 1e-3},
}


def _inputs(shape, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    pred = torch.randn(shape, generator=generator).to(dtype)
    target = (0.5 * pred.float() + torch.randn(shape, generator=generator)).to(dtype)  # correlated, like z_a, z_b
    return pred, target


def _loss_and_grads(loss_fn, pred, target, distance, target_grad=True, loss_scale=1.0, view=None):
    """Runs loss_fn on fresh leaves cloned from the inputs (passed through `view`, which maps the two
    leaves to the loss inputs); returns (loss, pred leaf's grad, target leaf's grad)."""
    pred = pred.detach().clone().requires_grad_(True)
    target = target.detach().clone().requires_grad_(target_grad)
    loss = loss_fn(*(view(pred, target) if view else (pred, target)), distance)
    (loss if loss_scale == 1.0 else loss * loss_scale).backward()
    return loss.detach(), pred.grad, target.grad


def _assert_close(actual, expected, rtol):
    """Relative to the tensor's largest entry, so that near-zero entries don't demand exactness."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    # ... and at least one step of the dtype's subnormal range (fp16 gradients of ~1e-6 live there)
    finfo = torch.finfo(expected.dtype)
    atol = max(rtol * expected.float().abs().max().item(), finfo.smallest_normal * finfo.eps)
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol)


def _assert_matches_reference(pred, target, distance, target_grad=True, loss_scale=1.0, view=None):
    tolerance = TOLERANCES[pred.dtype]
    loss, grad_pred, grad_target = _loss_and_grads(
        latent_loss_triton, pred, target, distance, target_grad, loss_scale, view
    )
    ref_loss, ref_grad_pred, ref_grad_target = _loss_and_grads(
        latent_loss_reference, pred, target, distance, target_grad, loss_scale, view
    )
    assert loss.dtype == torch.float32 and loss.dim() == 0
    _assert_close(loss, ref_loss, tolerance["loss"])
    assert torch.isfinite(grad_pred).all()
    _assert_close(grad_pred, ref_grad_pred, tolerance["grad"])
    if target_grad:
        _assert_close(grad_target, ref_grad_target, tolerance["grad"])
    else:
        assert grad_target is None and ref_grad_target is None


# Each dtype changes the loads and stores, not the row loop: bf16 skips the 257-row shape, the slowest
# under the interpreter (one Python-level program per row).
CASES = [(shape, torch.float32) for shape in SHAPES] + [(shape, torch.bfloat16) for shape in SHAPES[:2]]


@pytest.mark.parametrize(
    "shape, dtype", CASES, ids=["x".join(map(str, shape)) + "-" + str(dtype)[6:] for shape, dtype in CASES]
)
@pytest.mark.parametrize("distance", DISTANCES)
def test_matches_reference_with_online_target_and_scaled_loss(distance, shape, dtype):
    pred, target = _inputs(shape, dtype)
    _assert_matches_reference(pred, target, distance, target_grad=True, loss_scale=2.0)


@pytest.mark.parametrize("distance", DISTANCES)
def test_stop_gradient_target_gets_no_gradient(distance):
    pred, target = _inputs((41, 1271), torch.float32)
    _assert_matches_reference(pred, target, distance, target_grad=False, loss_scale=1.0)


@pytest.mark.parametrize("distance", DISTANCES)
def test_fp16_inputs(distance):
    pred, target = _inputs((33, 517), torch.float16)
    _assert_matches_reference(pred, target, distance, loss_scale=0.75)


@pytest.mark.parametrize("distance", DISTANCES)
def test_strided_rows_and_columns(distance):
    """pred: rows sliced out of a wider tensor (row stride != d); target: transposed (column stride
    != 1). The gradients land in the slice of the wide tensor and nowhere else."""
    wide_pred, _ = _inputs((37, 300), torch.float32, seed=1)
    transposed_target, _ = _inputs((211, 37), torch.float32, seed=2)

    def view(wide, transposed):
        pred, target = wide[:, 40:251], transposed.t()
        assert pred.stride() == (300, 1) and target.stride() == (1, 37)
        return pred, target

    _assert_matches_reference(wide_pred, transposed_target, distance, loss_scale=2.0, view=view)


def _unit_rows(n_rows, n_cols, seed):
    rows = torch.randn(n_rows, n_cols, generator=torch.Generator().manual_seed(seed))
    return rows / rows.norm(dim=-1, keepdim=True)


SCALE_CASES = {
    # name: (pred, target) from two sets of 3 unit rows of 1000 columns, fp32
    "zero_pred_row": lambda p, t: (torch.cat([torch.zeros(1, 1000), p[1:]]), t),
    "zero_target_row": lambda p, t: (p, torch.cat([torch.zeros(1, 1000), t[1:]])),
    "norms_1e20": lambda p, t: (1e20 * p, 1e20 * t),
    "norms_1e-20": lambda p, t: (1e-20 * p, 1e-20 * t),
    "norm_1e20_vs_1e-20": lambda p, t: (1e20 * p, 1e-20 * t),
}
DIFFERENCE_CASES = {
    "pred_equals_target": lambda p, t: (p, p.clone()),
    "difference_below_eps": lambda p, t: (p, p + 1e-11 * t),
}


def _assert_extreme_rows_agree(pred, target, distance):
    """Kernel and reference (the plain formula in float64): equal losses, finite and equal gradients."""
    loss, grad_pred, grad_target = _loss_and_grads(latent_loss_triton, pred, target, distance)
    ref_loss, ref_grad_pred, ref_grad_target = _loss_and_grads(latent_loss_reference, pred, target, distance)

    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for grad, ref_grad in ((grad_pred, ref_grad_pred), (grad_target, ref_grad_target)):
        assert torch.isfinite(grad).all() and torch.isfinite(ref_grad).all()
        _assert_close(grad, ref_grad, rtol=1e-5)
    return grad_pred, grad_target


@pytest.mark.parametrize("case", SCALE_CASES)
@pytest.mark.parametrize("distance", DISTANCES)
def test_zero_huge_and_tiny_norms(distance, case):
    _assert_extreme_rows_agree(*SCALE_CASES[case](_unit_rows(3, 1000, seed=3), _unit_rows(3, 1000, seed=4)), distance)


@pytest.mark.parametrize("case", DIFFERENCE_CASES)
@pytest.mark.parametrize("distance", ["mse", "l2"])
def test_zero_and_tiny_differences(distance, case):
    pred, target = DIFFERENCE_CASES[case](_unit_rows(3, 1000, seed=3), _unit_rows(3, 1000, seed=4))
    grad_pred, grad_target = _assert_extreme_rows_agree(pred, target, distance)
    if case == "pred_equals_target":
        assert not grad_pred.any() and not grad_target.any(), "a zero difference has a zero gradient"


def test_cosine_gradient_vanishes_when_pred_equals_target():
    pred = _unit_rows(3, 1000, seed=3)
    loss, grad_pred, grad_target = _loss_and_grads(latent_loss_triton, pred, pred, "cosine")
    assert abs(loss.item()) < 1e-6
    # Exactly zero in exact arithmetic; what remains is rounding, against entries of about 1/sqrt(1000)/3.
    assert grad_pred.abs().max() < 1e-6 and grad_target.abs().max() < 1e-6


@pytest.mark.parametrize("distance", ["mse", "l2"])  # a 1-d cosine is constant: its gradient is rounding
def test_single_column(distance):
    pred, target = _inputs((7, 1), torch.float32)
    _assert_matches_reference(pred, target, distance, loss_scale=2.0)


def test_l2_gradient_below_eps_is_difference_over_eps():
    pred = torch.zeros(1, 64)
    target = torch.full((1, 64), 1e-12)  # ||p - t|| = 8e-12 < eps
    _, grad_pred, grad_target = _loss_and_grads(latent_loss_triton, pred, target, "l2")
    torch.testing.assert_close(grad_pred, (pred - target) / EPS)
    torch.testing.assert_close(grad_target, (target - pred) / EPS)


@pytest.mark.parametrize("loss_fn", [latent_loss_triton, latent_loss_reference], ids=["triton", "reference"])
@pytest.mark.parametrize(
    "pred, target, distance, error, match",
    [
        (torch.zeros(2, 8), torch.zeros(2, 8), "dot", ValueError, "distance must be one of"),
        (torch.zeros(2, 8), torch.zeros(2, 9), "mse", ValueError, r"must both be \[N, d\]"),
        (torch.zeros(8), torch.zeros(8), "mse", ValueError, r"must both be \[N, d\]"),
        (torch.zeros(0, 8), torch.zeros(0, 8), "mse", ValueError, "at least one row"),
        (torch.zeros(2, 8), torch.zeros(2, 8, dtype=torch.bfloat16), "mse", TypeError, "share one dtype"),
        (torch.zeros(2, 8, dtype=torch.float64), torch.zeros(2, 8, dtype=torch.float64), "l2", TypeError, "dtype"),
    ],
)
def test_bad_inputs_are_rejected(loss_fn, pred, target, distance, error, match):
    with pytest.raises(error, match=match):
        loss_fn(pred, target, distance)


def test_dispatch_uses_the_reference_on_cpu(monkeypatch):
    def refuse(*args):
        raise AssertionError("the Triton path was called for CPU tensors")

    monkeypatch.setattr(latent_loss_module, "latent_loss_triton", refuse)
    pred, target = _inputs((5, 33), torch.float32)
    assert torch.equal(latent_loss(pred, target, "cosine"), latent_loss_reference(pred, target, "cosine"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("target_grad", [False, True], ids=["stop_grad", "online"])
@pytest.mark.parametrize("distance", DISTANCES)
def test_compiled_kernel_matches_reference_on_gpu(distance, target_grad, dtype):
    pred, target = _inputs((1027, 4096), dtype)
    tolerance = TOLERANCES[dtype]
    pred, target = pred.cuda(), target.cuda()
    loss, grad_pred, grad_target = _loss_and_grads(latent_loss, pred, target, distance, target_grad, 2.0)
    ref_loss, ref_grad_pred, ref_grad_target = _loss_and_grads(
        latent_loss_reference, pred, target, distance, target_grad, 2.0
    )
    _assert_close(loss, ref_loss, tolerance["loss"])
    _assert_close(grad_pred, ref_grad_pred, tolerance["grad"])
    if target_grad:
        _assert_close(grad_target, ref_grad_target, tolerance["grad"])
