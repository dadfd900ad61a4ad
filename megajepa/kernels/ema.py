"""Fused EMA update of the teacher's flat shard: one pass over memory per optimizer step.

    ema     = momentum * ema + (1 - momentum) * master      (fp32)
    teacher = ema, cast to the teacher's dtype               (bf16, fp16 or fp32)

Under ZeRO-3 `master`, `ema` and `teacher` are this rank's flat slices with the same layout, so the
update is purely elementwise: it reads master (4 B) and ema (4 B) and writes ema (4 B) and the
teacher (2 B for bf16): 14 bytes per parameter, where the torch reference's four ops move 34.

`ema_update` runs the Triton kernel on CUDA tensors and the plain-torch reference elsewhere.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

# Elements per program. Fixed on purpose: the kernel updates `ema` in place, and autotuning would
# replay it once per candidate config, applying the update several times.
EMA_BLOCK_SIZE = 4096
EMA_NUM_WARPS = 8

TEACHER_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _ema_update_kernel(
    master_ptr,
    ema_ptr,
    teacher_ptr,
    n_elements,
    momentum,
    master_weight,
    WRITE_TEACHER: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    # int64 before multiplying: a flat shard can hold more than 2**31 elements.
    block_start = tl.program_id(0).to(tl.int64) * BLOCK_SIZE
    offsets = block_start + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements

    master = tl.load(master_ptr + offsets, mask=mask)
    ema = tl.load(ema_ptr + offsets, mask=mask)
    # The same three roundings as the reference (two products, one sum), so that CPU runs agree exactly.
    ema = momentum * ema + master_weight * master
    tl.store(ema_ptr + offsets, ema, mask=mask)
    if WRITE_TEACHER:
        tl.store(teacher_ptr + offsets, ema.to(teacher_ptr.dtype.element_ty), mask=mask)


def _check_inputs(master: torch.Tensor, ema: torch.Tensor, teacher: Optional[torch.Tensor], momentum: float) -> None:
    for name, tensor in (("master", master), ("ema", ema)):
        if tensor.dtype != torch.float32:
            raise TypeError(f"ema_update: {name} must be float32, got {tensor.dtype}")
    named = [("master", master), ("ema", ema)] + ([("teacher", teacher)] if teacher is not None else [])
    for name, tensor in named:
        if not tensor.is_contiguous():
            raise ValueError(f"ema_update: {name} must be contiguous (a flat shard), got strides {tensor.stride()}")
        if tensor.numel() != master.numel():
            raise ValueError(f"ema_update: {name} has {tensor.numel()} elements, master has {master.numel()}")
        if tensor.device != master.device:
            raise ValueError(f"ema_update: {name} is on {tensor.device}, master on {master.device}")
    if teacher is not None and teacher.dtype not in TEACHER_DTYPES:
        raise TypeError(f"ema_update: teacher dtype must be one of {TEACHER_DTYPES}, got {teacher.dtype}")
    if not isinstance(momentum, (float, int)) or isinstance(momentum, bool) or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"ema_update: momentum must be a number in [0, 1], got {momentum!r}")


def ema_update_reference(
    master: torch.Tensor, ema: torch.Tensor, teacher: Optional[torch.Tensor], momentum: float
) -> None:
    """Plain-torch EMA update, in place; the specification the kernel is tested against."""
    _check_inputs(master, ema, teacher, momentum)
    with torch.no_grad():
        ema.mul_(float(momentum)).add_(master * (1.0 - float(momentum)))
        if teacher is not None:
            teacher.view(-1).copy_(ema.view(-1))


def ema_update_triton(
    master: torch.Tensor, ema: torch.Tensor, teacher: Optional[torch.Tensor], momentum: float
) -> None:
    """Launch the fused kernel (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)."""
    _check_inputs(master, ema, teacher, momentum)
    n_elements = master.numel()
    if n_elements == 0:
        return
    momentum = float(momentum)
    grid = (triton.cdiv(n_elements, EMA_BLOCK_SIZE),)
    _ema_update_kernel[grid](
        master,
        ema,
        teacher if teacher is not None else ema,  # placeholder pointer, never written when WRITE_TEACHER is off
        n_elements,
        momentum,
        1.0 - momentum,
        WRITE_TEACHER=teacher is not None,
        BLOCK_SIZE=EMA_BLOCK_SIZE,
        num_warps=EMA_NUM_WARPS,
    )


def ema_update(master: torch.Tensor, ema: torch.Tensor, teacher: Optional[torch.Tensor], momentum: float) -> None:
    """ema <- momentum * ema + (1 - momentum) * master, then teacher <- ema; in place, flat tensors.

    master, ema: fp32, contiguous, equal numel; teacher: bf16/fp16/fp32 of the same numel, or None.
    """
    on_cuda = master.is_cuda and ema.is_cuda and (teacher is None or teacher.is_cuda)
    (ema_update_triton if on_cuda else ema_update_reference)(master, ema, teacher, momentum)
