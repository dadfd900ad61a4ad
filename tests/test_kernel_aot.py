"""Every Triton kernel variant compiles to a cubin for sm_80 and sm_90, without a GPU.

The compile runs in a subprocess with TRITON_INTERPRET unset: under the interpreter @triton.jit
returns an object the compiler cannot take.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from megajepa.kernels.aot import kernel_variants

REPO_ROOT = Path(__file__).resolve().parents[1]


def _run_without_interpreter(args):
    # Triton's own cache (~/.triton/cache) may answer: its key covers the source, options, target and
    # Triton version, and only successful compiles are stored.
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600
    )


def test_every_kernel_variant_compiles_for_sm80_and_sm90():
    result = _run_without_interpreter(["-m", "megajepa.kernels.aot", "--cc", "80", "90"])
    assert result.returncode == 0, f"AOT compile failed:\n{result.stdout}\n{result.stderr}"
    for variant in kernel_variants():
        for cc in (80, 90):
            assert f"| {variant.name} | {cc} | ok | cubin |" in result.stdout, f"{variant.name} on sm_{cc} missing"


def test_a_kernel_the_interpreter_accepts_but_the_compiler_rejects_is_reported(tmp_path):
    """An integer argument equal to 1 reaches the kernel as a Python int (the JIT's specialization),
    so `n.to(...)` runs under the interpreter and fails to compile."""
    script = tmp_path / "broken_kernel.py"
    script.write_text(
        textwrap.dedent(
            """
            import triton
            import triton.language as tl
            from megajepa.kernels.aot import KernelVariant, compile_variant

            @triton.jit
            def broken(x_ptr, n, BLOCK: tl.constexpr):
                tl.store(x_ptr + tl.arange(0, BLOCK), n.to(tl.float32) + tl.zeros([BLOCK], tl.float32))

            variant = KernelVariant(
                name="broken",
                fn=broken,
                signature={"x_ptr": "*fp32", "n": "constexpr", "BLOCK": "constexpr"},
                constexprs={"n": 1, "BLOCK": 16},
                num_warps=1,
            )
            result = compile_variant(variant, 90)
            print("ok" if result.ok else "failed", result.error.strip().splitlines()[-1] if result.error else "")
            """
        )
    )
    result = _run_without_interpreter([str(script)])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("failed") and "has no attribute 'to'" in result.stdout, result.stdout
