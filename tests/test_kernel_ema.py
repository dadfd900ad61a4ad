"""The fused EMA kernel against its plain-torch reference.

Without CUDA the kernel runs under TRITON_INTERPRET=1 (set by conftest) on CPU tensors.
"""

import pytest
import torch

import megajepa.kernels.ema as ema_module
from megajepa.kernels.ema import EMA_BLOCK_SIZE, ema_update, ema_update_reference, ema_update_triton

# Triton on CPU tensors: the interpreter (conftest); the gpu tests below run the compiled kernel.
pytestmark = pytest.mark.interpreter

SIZES = [1, 1023, 4097, 3 * EMA_BLOCK_SIZE + 5]
MOMENTA = [0.0, 0.5, 0.996, 1.0]
TEACHER_DTYPES = [torch.bfloat16, torch.float16]


def _states(n, teacher_dtype, device="cpu", seed=0):
    generator = torch.Generator().manual_seed(seed)
    master = torch.randn(n, generator=generator).to(device)
    ema = torch.randn(n, generator=generator).to(device)
    teacher = torch.full((n,), float("nan"), dtype=teacher_dtype, device=device) if teacher_dtype else None
    return master, ema, teacher


def _assert_within_one_ulp(actual: torch.Tensor, expected: torch.Tensor):
    """16-bit floats of one sign are ordered like their bit patterns: adjacent values differ by 1."""
    assert actual.dtype == expected.dtype and actual.element_size() == 2
    distance = (actual.view(torch.int16).int() - expected.view(torch.int16).int()).abs()
    assert distance.max().item() <= 1, f"{(distance > 1).sum().item()} values more than 1 ulp apart"


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("momentum", MOMENTA)
def test_fp32_ema_matches_reference_exactly(n, momentum):
    master, ema, _ = _states(n, None)
    ema_kernel, ema_ref = ema.clone(), ema.clone()

    ema_update_triton(master, ema_kernel, None, momentum)
    ema_update_reference(master, ema_ref, None, momentum)

    assert torch.equal(ema_kernel, ema_ref)
    if momentum == 1.0:
        assert torch.equal(ema_kernel, ema)
    if momentum == 0.0:
        assert torch.equal(ema_kernel, master)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("teacher_dtype", TEACHER_DTYPES)
def test_low_precision_teacher_within_one_ulp(n, teacher_dtype):
    master, ema, teacher = _states(n, teacher_dtype)
    ema_kernel, teacher_kernel = ema.clone(), teacher.clone()
    ema_ref, teacher_ref = ema.clone(), teacher.clone()

    ema_update_triton(master, ema_kernel, teacher_kernel, 0.99)
    ema_update_reference(master, ema_ref, teacher_ref, 0.99)

    assert torch.equal(ema_kernel, ema_ref)
    # The interpreter truncates on bf16 stores where the GPU and torch round to nearest.
    _assert_within_one_ulp(teacher_kernel, teacher_ref)
    assert not teacher_kernel.isnan().any(), "every teacher element is written"


def test_fp32_teacher_is_a_copy_of_the_ema():
    master, ema, _ = _states(4097, None)
    teacher = torch.zeros(4097)
    ema_update_triton(master, ema, teacher, 0.9)
    assert torch.equal(teacher, ema)


def test_successive_updates_track_the_reference():
    master, ema, teacher = _states(2 * EMA_BLOCK_SIZE + 3, torch.bfloat16)
    ema_kernel, teacher_kernel = ema.clone(), teacher.clone()
    ema_ref, teacher_ref = ema.clone(), teacher.clone()
    generator = torch.Generator().manual_seed(1)
    for momentum in (0.9, 0.95, 0.99, 0.996, 0.999):
        master += 0.1 * torch.randn(master.shape, generator=generator)  # the optimizer moves the weights
        ema_update_triton(master, ema_kernel, teacher_kernel, momentum)
        ema_update_reference(master, ema_ref, teacher_ref, momentum)
    assert torch.equal(ema_kernel, ema_ref)
    _assert_within_one_ulp(teacher_kernel, teacher_ref)
    assert not torch.equal(ema_ref, ema), "the updates moved the EMA"


def test_only_the_given_elements_are_touched():
    """The tail block is masked: a view into a larger buffer leaves its neighbours alone."""
    buffer = torch.zeros(EMA_BLOCK_SIZE + 10)
    master = torch.ones(EMA_BLOCK_SIZE + 3)
    ema_view = buffer[: EMA_BLOCK_SIZE + 3]
    ema_update_triton(master, ema_view, None, 0.5)
    assert torch.equal(buffer[: EMA_BLOCK_SIZE + 3], torch.full((EMA_BLOCK_SIZE + 3,), 0.5))
    assert torch.equal(buffer[EMA_BLOCK_SIZE + 3 :], torch.zeros(7))


@pytest.mark.parametrize("update", [ema_update_triton, ema_update_reference], ids=["triton", "reference"])
@pytest.mark.parametrize(
    "case, error, match",
    [
        ("numel", ValueError, "ema has 7 elements, master has 8"),
        ("master_dtype", TypeError, "master must be float32"),
        ("ema_dtype", TypeError, "ema must be float32"),
        ("teacher_dtype", TypeError, "teacher dtype must be one of"),
        ("strided", ValueError, "must be contiguous"),
        ("momentum_high", ValueError, "momentum must be a number in"),
        ("momentum_nan", ValueError, "momentum must be a number in"),
    ],
)
def test_bad_inputs_are_rejected(update, case, error, match):
    master, ema, teacher = torch.zeros(8), torch.zeros(8), torch.zeros(8, dtype=torch.bfloat16)
    momentum = 0.5
    if case == "numel":
        ema = torch.zeros(7)
    elif case == "master_dtype":
        master = master.bfloat16()
    elif case == "ema_dtype":
        ema = ema.half()
    elif case == "teacher_dtype":
        teacher = torch.zeros(8, dtype=torch.int32)
    elif case == "strided":
        ema = torch.zeros(16)[::2]
    elif case == "momentum_high":
        momentum = 1.5
    elif case == "momentum_nan":
        momentum = float("nan")
    with pytest.raises(error, match=match):
        update(master, ema, teacher, momentum)


def test_dispatch_uses_the_reference_on_cpu(monkeypatch):
    def refuse(*args):
        raise AssertionError("the Triton launcher was called for CPU tensors")

    monkeypatch.setattr(ema_module, "ema_update_triton", refuse)
    master, ema, teacher = _states(100, torch.bfloat16)
    expected_ema, expected_teacher = ema.clone(), teacher.clone()
    ema_update_reference(master, expected_ema, expected_teacher, 0.9)
    ema_update(master, ema, teacher, 0.9)
    assert torch.equal(ema, expected_ema) and torch.equal(teacher, expected_teacher)


@pytest.mark.gpu
@pytest.mark.parametrize("teacher_dtype", [None, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 4097, (1 << 24) + 7])
def test_compiled_kernel_matches_reference_on_gpu(n, teacher_dtype):
    master, ema, teacher = _states(n, teacher_dtype, device="cuda")
    ema_ref, teacher_ref = ema.clone(), None if teacher is None else teacher.clone()
    ema_update(master, ema, teacher, 0.996)  # dispatches to the kernel on CUDA
    ema_update_reference(master, ema_ref, teacher_ref, 0.996)
    # The compiler may fuse the multiply-add, which moves the result by an ulp or so.
    torch.testing.assert_close(ema, ema_ref, rtol=3e-7, atol=1e-7)
    if teacher is not None:
        _assert_within_one_ulp(teacher, teacher_ref)
