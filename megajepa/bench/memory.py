"""Memory of one rank: the peak while a mode runs, and what the model state occupies.

Peak: the CUDA caching allocator's max_memory_allocated on GPU. On Linux CPU the resident set's
high-water mark (VmHWM), reset by writing "5" to /proc/self/clear_refs after glibc's malloc_trim
has handed freed heap back to the system (otherwise a mode's peak would include what an earlier,
bigger one freed but the allocator kept). Elsewhere the resident set when asked (psutil), which
can miss a short peak.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

import psutil
import torch


def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


class PeakMemory:
    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.high_water_mark = not self.cuda and self._clear_refs()
        self.trim = _malloc_trim() if self.high_water_mark else None
        if self.cuda:
            self.kind = "CUDA max_memory_allocated"
        elif self.high_water_mark:
            self.kind = "resident set high-water mark (VmHWM)"
        else:
            self.kind = "resident set at the end of the step (psutil)"

    @staticmethod
    def _clear_refs() -> bool:
        """Reset the resident set's high-water mark; False where that is not possible."""
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        elif self.high_water_mark:
            if self.trim is not None:
                self.trim(0)
            self._clear_refs()

    def peak(self) -> int:
        """Bytes at the peak since the last reset."""
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        if self.high_water_mark:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        return psutil.Process(os.getpid()).memory_info().rss


def _bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _storages(tensors) -> dict[int, int]:
    """Distinct storages of `tensors` (address -> bytes): views of one buffer count once."""
    found = {}
    for t in tensors:
        storage = t.untyped_storage()
        if storage.nbytes():
            found[storage.data_ptr()] = storage.nbytes()
    return found


def _optimizer_tensors(optimizer) -> list[torch.Tensor]:
    """The fp32 master partitions (ZeRO-3, else ZeRO-1/2, else the inner optimizer's parameters)
    and the optimizer's per-parameter state (Adam's moments)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    masters = getattr(optimizer, "fp32_partitioned_groups_flat", None) or getattr(
        optimizer, "single_partition_of_fp32_groups", None
    )
    if masters is None:
        masters = [p for group in inner.param_groups for p in group["params"]]
    state = [t for per_param in inner.state.values() for t in per_param.values() if torch.is_tensor(t)]
    return [*masters, *state]


def teacher_state_bytes(teacher) -> dict[str, int]:
    """Bytes this rank holds for the EMA buffers and the teacher's parameter partitions
    (megajepa.jepa.ema_target.EmaTeacher)."""
    ema = sum(_bytes(slot.ema) for slot in teacher.slots)
    tensors = [p.ds_tensor for p in teacher.teacher_params.values()] if teacher.zero3 else teacher.teacher_params.values()
    return {"ema": ema, "teacher": sum(_bytes(t) for t in tensors)}


def model_state_bytes(engine, teacher=None) -> dict[str, int]:
    """Bytes this rank holds for the model state, by kind:

    parameters   this rank's ZeRO-3 partitions (whole parameters below stage 3)
    persistent   full copies ZeRO-3 keeps of parameters under stage3_param_persistence_threshold
    optimizer    fp32 master partitions (where not the parameters' own memory) and Adam's moments
    ema, teacher the EMA buffers and the teacher's partitions (teacher_state_bytes)
    """
    params = list(engine.module.parameters())
    zero3 = all(hasattr(p, "ds_tensor") for p in params)
    if zero3:
        partitions = [p.ds_tensor for p in params]
        persistent = sum(_bytes(p.data) for p in params if p.ds_persist)
    else:
        partitions, persistent = params, 0
    own = _storages(partitions)
    optimizer = _storages(_optimizer_tensors(engine.optimizer)) if engine.optimizer is not None else {}
    report = {
        "parameters": sum(_bytes(t) for t in partitions),
        "persistent": persistent,
        "optimizer": sum(size for address, size in optimizer.items() if address not in own),
        "ema": 0,
        "teacher": 0,
    }
    if teacher is not None:
        report.update(teacher_state_bytes(teacher))
    report["total"] = sum(report.values())
    return report
