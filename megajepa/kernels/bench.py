"""Benchmark of the fused kernels against their torch references.

    megajepa bench kernels [--sizes 1048576 16777216] [--json PATH]      (arguments: megajepa.bench.command)

Each size is a number of elements: the EMA updates a flat shard of that many parameters; the latent
loss (cosine, forward + backward, stop-gradient target, bf16) runs on [size // HIDDEN, HIDDEN].
GB/s counts the bytes each operation must move at the least (byte models below), the same for the
kernel and the reference, so it is an effective bandwidth and the speed-up is the ratio of times.
Without a GPU only the references are timed: the Triton path needs CUDA.
"""

import json
import os
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch
from tqdm import tqdm

from megajepa.kernels.ema import ema_update_reference, ema_update_triton
from megajepa.kernels.latent_loss import latent_loss_reference, latent_loss_triton

HIDDEN = 4096
MOMENTUM = 0.996
GPU_SIZES = [1 << 20, 1 << 24, 1 << 27]
CPU_SIZES = [1 << 16, 1 << 20]

# Peak HBM bandwidth in TB/s, matched on torch.cuda.get_device_name(): all the words must appear.
PEAK_BANDWIDTH_TBPS = [
    (("H200",), 4.8),
    (("H100", "PCIe"), 2.0),
    (("H100", "HBM3"), 3.35),  # the SXM part reports itself as "NVIDIA H100 80GB HBM3"
    (("H100", "SXM"), 3.35),
    (("A100", "80GB"), 2.0),
    (("A100", "40GB"), 1.555),
]


def peak_bandwidth_bytes_per_s(device_name: str) -> Optional[float]:
    for words, tbps in PEAK_BANDWIDTH_TBPS:
        if all(word.lower() in device_name.lower() for word in words):
            return tbps * 1e12
    return None


def ema_bytes(numel: int) -> int:
    # read master (4 B) and ema (4 B), write ema (4 B) and the bf16 teacher (2 B)
    return 14 * numel


def latent_loss_bytes(numel: int) -> int:
    # bf16: read pred and target (2 B each), write the gradient w.r.t. pred (2 B)
    return 6 * numel


def _seconds_per_call(fn: Callable[[], object], on_gpu: bool, warmup: int = 3, repeats: int = 10) -> float:
    """Median over `repeats` calls, after `warmup` calls (compilation, allocator, caches)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if on_gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _ema_call(numel: int, device: str, update) -> Callable[[], None]:
    master = torch.randn(numel, device=device)
    ema = master.clone()
    teacher = torch.empty(numel, dtype=torch.bfloat16, device=device)
    return lambda: update(master, ema, teacher, MOMENTUM)


def _latent_loss_call(numel: int, device: str, loss_fn) -> Callable[[], object]:
    rows = max(1, numel // HIDDEN)
    pred = torch.randn(rows, HIDDEN, device=device, dtype=torch.bfloat16, requires_grad=True)
    target = torch.randn(rows, HIDDEN, device=device, dtype=torch.bfloat16)
    return lambda: torch.autograd.grad(loss_fn(pred, target, "cosine"), pred)


KERNELS = {
    # name: (make a call for (numel, device, implementation), bytes moved, {implementation: function})
    "ema_update": (_ema_call, ema_bytes, {"reference": ema_update_reference, "triton": ema_update_triton}),
    "latent_loss": (
        _latent_loss_call,
        latent_loss_bytes,
        {"reference": latent_loss_reference, "triton": latent_loss_triton},
    ),
}


def _shape(kernel: str, numel: int) -> str:
    return f"[{numel}]" if kernel == "ema_update" else f"[{max(1, numel // HIDDEN)}, {HIDDEN}]"


def run(sizes: Optional[List[int]] = None, json_path: Optional[str] = None) -> Dict:
    """Times every kernel and size, prints a Markdown table, and returns (and optionally writes) the results."""
    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    device_name = torch.cuda.get_device_name() if on_gpu else "cpu"
    peak = peak_bandwidth_bytes_per_s(device_name) if on_gpu else None
    sizes = sizes or (GPU_SIZES if on_gpu else CPU_SIZES)
    if any(numel < 1 for numel in sizes):
        raise ValueError(f"megajepa.kernels.bench: sizes must be positive element counts, got {sizes}")
    implementations = ["reference", "triton"] if on_gpu else ["reference"]
    if not on_gpu:
        print("No CUDA device: the Triton kernels need a GPU; timing the torch references only.")

    cases = [(kernel, numel, impl) for kernel in KERNELS for numel in sizes for impl in implementations]
    results, reference_seconds = [], {}
    for kernel, numel, impl in tqdm(cases, desc="kernel bench", unit="case"):
        make_call, bytes_of, functions = KERNELS[kernel]
        seconds = _seconds_per_call(make_call(numel, device, functions[impl]), on_gpu)
        if impl == "reference":
            reference_seconds[kernel, numel] = seconds
        bandwidth = bytes_of(numel) / seconds
        results.append(
            {
                "kernel": kernel,
                "shape": _shape(kernel, numel),
                "implementation": impl,
                "seconds": seconds,
                "bytes": bytes_of(numel),
                "GB_per_s": bandwidth / 1e9,
                "speedup_vs_reference": reference_seconds[kernel, numel] / seconds,
                "fraction_of_peak_bandwidth": bandwidth / peak if peak else None,
            }
        )
        if on_gpu:
            torch.cuda.empty_cache()

    report = {
        "device": device_name,
        "peak_bandwidth_GB_per_s": peak / 1e9 if peak else None,
        "byte_models": {"ema_update": "14 B/param", "latent_loss": "6 B/element (bf16 fwd+bwd)"},
        "results": results,
    }
    print(markdown_table(report))
    if json_path:
        _write_json_atomically(report, json_path)
    return report


def markdown_table(report: Dict) -> str:
    peak = f"{report['peak_bandwidth_GB_per_s']:.0f} GB/s" if report["peak_bandwidth_GB_per_s"] else "n/a"
    lines = [
        f"Device: {report['device']} (peak memory bandwidth {peak})",
        "",
        "| kernel | shape | implementation | time (ms) | GB/s | speed-up vs reference | % of peak bandwidth |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        fraction = r["fraction_of_peak_bandwidth"]
        lines.append(
            f"| {r['kernel']} | {r['shape']} | {r['implementation']} | {r['seconds'] * 1e3:.3f} "
            f"| {r['GB_per_s']:.1f} | {r['speedup_vs_reference']:.2f}x | "
            f"{'n/a' if fraction is None else f'{100 * fraction:.0f}%'} |"
        )
    return "\n".join(lines)


def _write_json_atomically(report: Dict, path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    partial = f"{path}.partial"
    with open(partial, "w") as f:
        json.dump(report, f, indent=2)
    os.replace(partial, path)

