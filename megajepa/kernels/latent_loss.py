"""Fused latent-prediction loss D(pred, target) with its gradient, computed in one kernel launch.

    latent_loss(pred[N, d], target[N, d], distance) = mean over rows of D(pred_i, target_i)

    cosine  1 - <p, t> / (max(||p||, eps) * max(||t||, eps))
    mse     mean over d of (p - t)^2
    l2      ||p - t||, with gradient (p - t) / max(||p - t||, eps): zero, not NaN, at p == t

One program per row reads the row up to three times: its largest magnitude (cosine, l2), the sums,
and the gradient, which the forward writes so that the backward is a multiply by grad_output.
Sums of squares are taken over scaled entries, so that they stay inside
fp32's range for rows with norms near 1e20 or 1e-20: by a power of two from the largest magnitude
(exact, and the distance does not change) for cosine and l2, by 1/sqrt(d) for mse (the squares then
sum to the mean itself). The reference is the plain formula in float64, with no such tricks: it is
what the kernel is tested against, extreme rows included.

The gradients are kept in fp32 and cast to the inputs' dtype once, at the end of the backward,
after the scaling by grad_output (usually lambda, not 1): one rounding, as torch's autograd does for
the reference. They cost N * d * 4 bytes, small for the (pairs x hidden) tensors this loss sees.

`latent_loss` runs the Triton kernel on CUDA tensors and the plain-torch reference elsewhere;
`latent_loss_triton` runs the kernel on any device (CPU under TRITON_INTERPRET=1).
"""

import torch
import triton
import triton.language as tl

DISTANCES = ("cosine", "mse", "l2")
INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
EPS = 1e-8

# Columns per block; longer rows loop over blocks. 1024 keeps 8 fp32 values per thread at 4 warps.
MAX_BLOCK_SIZE = 1024
NUM_WARPS = 4


def _check_inputs(pred: torch.Tensor, target: torch.Tensor, distance: str) -> None:
    if distance not in DISTANCES:
        raise ValueError(f"latent_loss: distance must be one of {DISTANCES}, got {distance!r}")
    if pred.dim() != 2 or pred.shape != target.shape:
        raise ValueError(
            f"latent_loss: pred and target must both be [N, d], got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    if pred.shape[0] == 0 or pred.shape[1] == 0:
        raise ValueError(f"latent_loss: needs at least one row and one column, got {tuple(pred.shape)}")
    if pred.dtype not in INPUT_DTYPES or target.dtype != pred.dtype:
        raise TypeError(
            f"latent_loss: pred and target must share one dtype of {INPUT_DTYPES}, got {pred.dtype} and {target.dtype}"
        )
    if pred.device != target.device:
        raise ValueError(f"latent_loss: pred is on {pred.device}, target on {target.device}")


# ----------------------------------------------------------------------------------------------
# Reference (plain torch; autograd provides the gradient)
# ----------------------------------------------------------------------------------------------


class _NormWithSafeGradient(torch.autograd.Function):
    """||x|| over the last dim, with gradient x / max(||x||, eps): zero, not NaN, at x == 0."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        norm = torch.linalg.vector_norm(x, dim=-1)
        ctx.save_for_backward(x, norm.clamp_min(EPS))
        return norm

    @staticmethod
    def backward(ctx, grad_norm: torch.Tensor):
        x, clamped_norm = ctx.saved_tensors
        return x * (grad_norm / clamped_norm).unsqueeze(-1)


def latent_loss_reference(pred: torch.Tensor, target: torch.Tensor, distance: str) -> torch.Tensor:
    """The formulas above written out plainly, with torch's autograd for the gradient.

    Computed in float64, where the squares of norms from 1e-20 to 1e20 are representable, so it
    needs none of the kernel's rescaling; the loss comes back in fp32 and the gradients, through
    autograd, in the inputs' dtype."""
    _check_inputs(pred, target, distance)
    p, t = pred.double(), target.double()
    if distance == "cosine":
        norms = torch.linalg.vector_norm(p, dim=-1).clamp_min(EPS) * torch.linalg.vector_norm(t, dim=-1).clamp_min(EPS)
        rows = 1.0 - (p * t).sum(dim=-1) / norms
    elif distance == "mse":
        rows = (p - t).square().mean(dim=-1)
    else:
        rows = _NormWithSafeGradient.apply(p - t)
    return rows.mean().float()


# ----------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------


@triton.jit
def _pow2_inverse_scale_of(row_max):
    """The kernel's twin of `_pow2_inverse_scale`, read off the fp32 exponent bits of row_max >= 0."""
    biased_exponent = (row_max.to(tl.int32, bitcast=True) >> 23) & 0xFF
    exponent = tl.minimum(tl.maximum(biased_exponent - 126, -125), 126)
    return ((127 - exponent) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _load_fp32(row_ptr, cols, n_cols):
    return tl.load(row_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)


@triton.jit
def _load_difference(pred_ptr, target_ptr, cols, n_cols):
    return _load_fp32(pred_ptr, cols, n_cols) - _load_fp32(target_ptr, cols, n_cols)


@triton.jit
def _cosine_row(
    pred_ptr, target_ptr, grad_pred_ptr, grad_target_ptr, loss_ptr,
    n_cols, eps, grad_scale,
    TARGET_GRAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):  # fmt: skip
    offsets = tl.arange(0, BLOCK_SIZE)

    pred_max = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    target_max = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_SIZE):
        pred_max = tl.maximum(pred_max, tl.abs(_load_fp32(pred_ptr, start + offsets, n_cols)))
        target_max = tl.maximum(target_max, tl.abs(_load_fp32(target_ptr, start + offsets, n_cols)))
    pred_scale = _pow2_inverse_scale_of(tl.max(pred_max, axis=0))
    target_scale = _pow2_inverse_scale_of(tl.max(target_max, axis=0))

    # a = p * pred_scale and b = t * target_scale: the row's entries are at most 1 in magnitude.
    sum_aa = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    sum_bb = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    sum_ab = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_SIZE):
        a = _load_fp32(pred_ptr, start + offsets, n_cols) * pred_scale
        b = _load_fp32(target_ptr, start + offsets, n_cols) * target_scale
        sum_aa += a * a
        sum_bb += b * b
        sum_ab += a * b
    norm_a = tl.sqrt(tl.sum(sum_aa, axis=0))
    norm_b = tl.sqrt(tl.sum(sum_bb, axis=0))
    clamped_a = tl.maximum(norm_a, eps * pred_scale)
    clamped_b = tl.maximum(norm_b, eps * target_scale)
    cosine = tl.sum(sum_ab, axis=0) / clamped_a / clamped_b
    tl.store(loss_ptr, 1.0 - cosine)

    # With u = p / max(||p||, eps) and v likewise: dL/dp = (cos * u - v) / max(||p||, eps), where the
    # cos * u term comes from differentiating the norm and vanishes where the eps clamp is active.
    pred_unit = pred_scale / clamped_a  # p * pred_unit == u, and 1 / max(||p||, eps)
    target_unit = target_scale / clamped_b
    pred_cosine = tl.where(norm_a >= eps * pred_scale, cosine, 0.0)
    target_cosine = tl.where(norm_b >= eps * target_scale, cosine, 0.0)
    for start in range(0, n_cols, BLOCK_SIZE):
        cols = start + offsets
        u = _load_fp32(pred_ptr, cols, n_cols) * pred_unit
        v = _load_fp32(target_ptr, cols, n_cols) * target_unit
        tl.store(grad_pred_ptr + cols, (grad_scale * pred_unit) * (pred_cosine * u - v), mask=cols < n_cols)
        if TARGET_GRAD:
            tl.store(grad_target_ptr + cols, (grad_scale * target_unit) * (target_cosine * v - u), mask=cols < n_cols)


@triton.jit
def _difference_row(
    pred_ptr, target_ptr, grad_pred_ptr, grad_target_ptr, loss_ptr,
    n_cols, eps, grad_scale,
    DISTANCE: tl.constexpr, TARGET_GRAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):  # fmt: skip
    offsets = tl.arange(0, BLOCK_SIZE)

    if DISTANCE == "l2":
        diff_max = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_SIZE):
            diff_max = tl.maximum(diff_max, tl.abs(_load_difference(pred_ptr, target_ptr, start + offsets, n_cols)))
        scale = _pow2_inverse_scale_of(tl.max(diff_max, axis=0))
    else:  # mse: scaled by 1/sqrt(d), the squares sum to the mean (tl.full: n_cols may be a constexpr 1)
        scale = 1.0 / tl.sqrt(tl.full([], n_cols, tl.float32))

    sum_squares = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_SIZE):
        scaled = _load_difference(pred_ptr, target_ptr, start + offsets, n_cols) * scale
        sum_squares += scaled * scaled
    sum_squares = tl.sum(sum_squares, axis=0)
    if DISTANCE == "mse":
        tl.store(loss_ptr, sum_squares)
        diff_coef = grad_scale * 2.0 / n_cols
    else:  # l2: d / max(||d||, eps) == (d * scale) / max(||d * scale||, eps * scale)
        norm = tl.sqrt(sum_squares)
        tl.store(loss_ptr, norm / scale)
        diff_coef = grad_scale * scale / tl.maximum(norm, eps * scale)

    for start in range(0, n_cols, BLOCK_SIZE):
        cols = start + offsets
        grad = diff_coef * _load_difference(pred_ptr, target_ptr, cols, n_cols)
        tl.store(grad_pred_ptr + cols, grad, mask=cols < n_cols)
        if TARGET_GRAD:
            tl.store(grad_target_ptr + cols, -grad, mask=cols < n_cols)


@triton.jit
def _latent_loss_kernel(
    pred_ptr,
    pred_row_stride,
    target_ptr,
    target_row_stride,
    grad_pred_ptr,
    grad_target_ptr,
    loss_ptr,
    n_cols,
    eps,
    grad_scale,
    DISTANCE: tl.constexpr,
    TARGET_GRAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """One program per row: writes the row's loss and its gradients (fp32, rows of n_cols), already
    multiplied by grad_scale = 1 / N, the derivative of the mean over rows."""
    row = tl.program_id(0).to(tl.int64)
    pred_ptr += row * pred_row_stride
    target_ptr += row * target_row_stride
    grad_pred_ptr += row * n_cols
    grad_target_ptr += row * n_cols
    loss_ptr += row

    if DISTANCE == "cosine":
        _cosine_row(
            pred_ptr, target_ptr, grad_pred_ptr, grad_target_ptr, loss_ptr,
            n_cols, eps, grad_scale, TARGET_GRAD, BLOCK_SIZE,
        )  # fmt: skip
    else:
        _difference_row(
            pred_ptr, target_ptr, grad_pred_ptr, grad_target_ptr, loss_ptr,
            n_cols, eps, grad_scale, DISTANCE, TARGET_GRAD, BLOCK_SIZE,
        )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Host functions and autograd
# ----------------------------------------------------------------------------------------------


def latent_loss_forward(pred: torch.Tensor, target: torch.Tensor, distance: str, target_grad: bool):
    """Returns (loss: 0-d fp32, grad_pred: fp32 [N, d], grad_target: fp32 [N, d] or None)."""
    _check_inputs(pred, target, distance)
    # Rows may be strided (a slice of a wider tensor); columns must be dense.
    pred = pred if pred.stride(1) == 1 else pred.contiguous()
    target = target if target.stride(1) == 1 else target.contiguous()
    n_rows, n_cols = pred.shape

    loss_rows = torch.empty(n_rows, dtype=torch.float32, device=pred.device)
    grad_pred = torch.empty(n_rows, n_cols, dtype=torch.float32, device=pred.device)
    grad_target = torch.empty_like(grad_pred) if target_grad else None
    _latent_loss_kernel[(n_rows,)](
        pred,
        pred.stride(0),
        target,
        target.stride(0),
        grad_pred,
        grad_target if target_grad else grad_pred,  # placeholder pointer, never written
        loss_rows,
        n_cols,
        EPS,
        1.0 / n_rows,
        DISTANCE=distance,
        TARGET_GRAD=target_grad,
        BLOCK_SIZE=min(MAX_BLOCK_SIZE, triton.next_power_of_2(n_cols)),
        num_warps=NUM_WARPS,
    )
    return loss_rows.mean(), grad_pred, grad_target


def latent_loss_backward(grad_output: torch.Tensor, grad: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The saved fp32 gradient times grad_output, in `dtype`. Always multiplied: skipping it when
    grad_output is 1 would need the host to read grad_output (a device synchronisation)."""
    return (grad * grad_output).to(dtype)


class LatentLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred: torch.Tensor, target: torch.Tensor, distance: str) -> torch.Tensor:
        loss, grad_pred, grad_target = latent_loss_forward(pred, target, distance, target_grad=target.requires_grad)
        ctx.save_for_backward(grad_pred, grad_target)
        ctx.dtypes = (pred.dtype, target.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_pred, grad_target = ctx.saved_tensors
        pred_dtype, target_dtype = ctx.dtypes
        return (
            latent_loss_backward(grad_output, grad_pred, pred_dtype),
            None if grad_target is None else latent_loss_backward(grad_output, grad_target, target_dtype),
            None,
        )


def latent_loss_triton(pred: torch.Tensor, target: torch.Tensor, distance: str) -> torch.Tensor:
    """The fused kernel as a differentiable function; the target gets a gradient only if it requires one."""
    return LatentLossFunction.apply(pred, target, distance)


def latent_loss(pred: torch.Tensor, target: torch.Tensor, distance: str) -> torch.Tensor:
    """Mean over rows of D(pred_i, target_i) as a 0-d fp32 tensor; Triton on CUDA, torch elsewhere."""
    return (latent_loss_triton if pred.is_cuda else latent_loss_reference)(pred, target, distance)
