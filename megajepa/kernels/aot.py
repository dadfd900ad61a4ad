"""Ahead-of-time compile of every Triton kernel, for sm_80 and sm_90, on a machine with no GPU.

The interpreter (TRITON_INTERPRET=1) runs the kernels' Python on numpy and accepts code the real
compiler rejects (types, constexpr misuse, layouts); this lowers each kernel variant the launchers
can produce to a cubin with Triton's bundled ptxas, without a driver.

    env -u TRITON_INTERPRET python -m megajepa.kernels.aot [--cc 80 90]

prints one row per (variant, capability) and exits non-zero if any failed.
"""

import argparse
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from megajepa.kernels import ema, latent_loss


def _triton_type(dtype) -> str:
    return {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}[str(dtype)]


@dataclass(frozen=True)
class KernelVariant:
    name: str
    fn: object  # a triton JITFunction
    signature: Dict[str, str]  # argument -> Triton type ("*bf16", "i32", "fp32", "constexpr")
    constexprs: Dict[str, object]
    num_warps: int
    # Arguments the JIT would see divisible by 16 (pointers from torch's allocator, hidden sizes).
    aligned: Tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class CompileResult:
    variant: str
    cc: int
    ok: bool
    error: str
    binary: str  # "cubin" when ptxas ran, else the last stage reached
    seconds: float


def _specialize(signature: Dict[str, str], constexprs: Dict[str, object], ones: Tuple[str, ...]):
    """The JIT turns an integer argument equal to 1 into a constexpr; compile that case as it would."""
    signature = {name: "constexpr" if name in ones else kind for name, kind in signature.items()}
    return signature, {**constexprs, **{name: 1 for name in ones}}


def _ema_variant(teacher, n_elements: str) -> KernelVariant:
    """n_elements: "i32/16" (a multiple of 16: vector loads), "i32", "i64" (over 2**31) or "1"."""
    index_type = "i32" if n_elements == "1" else n_elements.split("/")[0]
    signature = {
        "master_ptr": "*fp32",
        "ema_ptr": "*fp32",
        "teacher_ptr": f"*{teacher or 'fp32'}",
        "n_elements": index_type,
        "momentum": "fp32",
        "master_weight": "fp32",
        "WRITE_TEACHER": "constexpr",
        "BLOCK_SIZE": "constexpr",
    }
    constexprs = {"WRITE_TEACHER": teacher is not None, "BLOCK_SIZE": ema.EMA_BLOCK_SIZE}
    signature, constexprs = _specialize(signature, constexprs, ("n_elements",) if n_elements == "1" else ())
    pointers = ("master_ptr", "ema_ptr", "teacher_ptr")
    return KernelVariant(
        name=f"ema_update[teacher={teacher or 'none'},n={n_elements}]",
        fn=ema._ema_update_kernel,
        signature=signature,
        constexprs=constexprs,
        num_warps=ema.EMA_NUM_WARPS,
        aligned=pointers + (("n_elements",) if n_elements.endswith("/16") else ()),
    )


def _ema_variants() -> List[KernelVariant]:
    teachers = [_triton_type(dtype) for dtype in ema.TEACHER_DTYPES] + [None]
    return [_ema_variant(teacher, "i32/16") for teacher in teachers] + [
        _ema_variant("bf16", n_elements) for n_elements in ("i32", "i64", "1")
    ]


def _latent_loss_variant(input_type: str, distance: str, target_grad: bool, single_column: bool) -> KernelVariant:
    signature = {
        "pred_ptr": f"*{input_type}",
        "pred_row_stride": "i32",
        "target_ptr": f"*{input_type}",
        "target_row_stride": "i32",
        "grad_pred_ptr": "*fp32",
        "grad_target_ptr": "*fp32",
        "loss_ptr": "*fp32",
        "n_cols": "i32",
        "eps": "fp32",
        "grad_scale": "fp32",
        "DISTANCE": "constexpr",
        "TARGET_GRAD": "constexpr",
        "BLOCK_SIZE": "constexpr",
    }
    sizes = ("pred_row_stride", "target_row_stride", "n_cols")
    # d == 1 makes the sizes constexpr 1; hidden sizes are otherwise multiples of 16, as the JIT sees.
    signature, constexprs = _specialize(
        signature,
        {
            "DISTANCE": distance,
            "TARGET_GRAD": target_grad,
            "BLOCK_SIZE": 1 if single_column else latent_loss.MAX_BLOCK_SIZE,
        },
        sizes if single_column else (),
    )
    pointers = ("pred_ptr", "target_ptr", "grad_pred_ptr", "grad_target_ptr", "loss_ptr")
    return KernelVariant(
        name=f"latent_loss[{distance},{input_type},target_grad={int(target_grad)}{',d=1' if single_column else ''}]",
        fn=latent_loss._latent_loss_kernel,
        signature=signature,
        constexprs=constexprs,
        num_warps=latent_loss.NUM_WARPS,
        aligned=pointers if single_column else pointers + sizes,
    )


def _latent_loss_variants() -> List[KernelVariant]:
    variants = [
        _latent_loss_variant(_triton_type(dtype), distance, target_grad, single_column=False)
        for dtype in latent_loss.INPUT_DTYPES
        for distance in latent_loss.DISTANCES
        for target_grad in (False, True)
    ]
    return variants + [_latent_loss_variant("bf16", distance, True, True) for distance in latent_loss.DISTANCES]


def kernel_variants() -> List[KernelVariant]:
    """Every kernel, once per dtype and constexpr combination its launcher can produce."""
    return _ema_variants() + _latent_loss_variants()


def compile_variant(variant: KernelVariant, cc: int) -> CompileResult:
    if not isinstance(variant.fn, triton.runtime.JITFunction):
        raise RuntimeError(
            f"{variant.name}: the kernel is a {type(variant.fn).__name__}, not a JITFunction; "
            "TRITON_INTERPRET is set. Run `env -u TRITON_INTERPRET python -m megajepa.kernels.aot`."
        )
    arg_names = variant.fn.arg_names
    attrs = {(arg_names.index(name),): [["tt.divisibility", 16]] for name in variant.aligned}
    source = ASTSource(fn=variant.fn, signature=variant.signature, constexprs=variant.constexprs, attrs=attrs)
    start = time.perf_counter()
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", cc, 32), options={"num_warps": variant.num_warps})
    except Exception:  # noqa: BLE001 - any compiler failure is the result being reported
        return CompileResult(variant.name, cc, False, traceback.format_exc(), "", time.perf_counter() - start)
    binary = "cubin" if "cubin" in compiled.asm else list(compiled.asm)[-1]
    return CompileResult(variant.name, cc, binary == "cubin", "", binary, time.perf_counter() - start)


def compile_results(capabilities=(80, 90)) -> List[CompileResult]:
    return [compile_variant(variant, cc) for cc in capabilities for variant in kernel_variants()]


def _markdown_table(results: List[CompileResult]) -> str:
    lines = ["| kernel variant | sm | result | binary | seconds (~0: Triton's cache) |", "|---|---|---|---|---|"]
    for r in results:
        status = "ok" if r.ok else "FAILED"
        lines.append(f"| {r.variant} | {r.cc} | {status} | {r.binary or '-'} | {r.seconds:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cc", type=int, nargs="+", default=[80, 90], help="compute capabilities (default 80 90)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("megajepa.kernels.aot: TRITON_INTERPRET=1 turns kernels into interpreter objects; unset it.", file=sys.stderr)
        return 2
    results = compile_results(args.cc)
    print(_markdown_table(results))
    failures = [r for r in results if not r.ok]
    for r in failures:
        print(f"\n--- {r.variant} on sm_{r.cc} ---\n{r.error or 'no cubin produced'}", file=sys.stderr)
    print(f"\n{len(results) - len(failures)}/{len(results)} compiled to cubin")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
