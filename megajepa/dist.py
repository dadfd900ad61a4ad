"""Every torch.distributed call megajepa makes, with its tensors on the backend's device.

NCCL takes CUDA tensors only and gloo CPU ones, and a CPU test run (gloo) accepts anything: a
collective written elsewhere with a tensor made on the CPU passes every test here and raises on
the first GPU step. So no other module imports torch.distributed (tests/test_dist.py checks):
they call the functions below, which move a tensor to `communication_device()` when the backend
cannot take it where it is, and hand the result back on the caller's device.

Without an initialized process group (a single process) every collective is the identity.
"""

from __future__ import annotations

import time
import warnings
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as _dist

_OPS = {"sum": _dist.ReduceOp.SUM, "max": _dist.ReduceOp.MAX, "min": _dist.ReduceOp.MIN}
# The device types each torch.distributed backend communicates from.
_BACKEND_DEVICES = {"nccl": ("cuda",), "gloo": ("cpu",), "mpi": ("cpu",), "ccl": ("cpu",), "xccl": ("xpu",)}


def quiet_deprecated_collectives() -> None:
    """DeepSpeed's ZeRO-3 calls torch.distributed names that torch deprecates (all_gather_into_tensor,
    reduce_scatter_tensor) every step; one FutureWarning per call site buries the run's own output."""
    warnings.filterwarnings("ignore", r"`torch\.distributed\.\w+` is deprecated", FutureWarning)


def is_initialized() -> bool:
    return _dist.is_available() and _dist.is_initialized()


def rank() -> int:
    return _dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return _dist.get_world_size() if is_initialized() else 1


def group_rank(group) -> int:
    """This process's rank within `group` (a ZeRO-3 parameter's ds_process_group, say)."""
    return _dist.get_rank(group=group) if is_initialized() else 0


def init_process_group(backend: str) -> None:
    _dist.init_process_group(backend=backend)


# (config key, seconds) of the timeout in force, for the message when a collective times out
_timeout: Optional[tuple[str, float]] = None
_ROLL_CALL = "megajepa/timed_out/{rank}"


def set_timeout(seconds: float, key: str) -> None:
    """From now on a collective that waits `seconds` for another rank fails (gloo raises, NCCL's
    watchdog aborts the process, dumping its flight recorder with TORCH_NCCL_DUMP_ON_TIMEOUT=1), on
    every process group this rank belongs to (DeepSpeed's too): torch's set_timeout, which gloo and
    NCCL honour. `key` is the config key it comes from, named when it fires."""
    global _timeout
    _timeout = (key, seconds)
    if not is_initialized():
        return
    groups = list(getattr(_dist.distributed_c10d._world, "pg_map", None) or [_dist.group.WORLD])
    for group in groups:
        _dist.set_timeout(timedelta(seconds=seconds), group)


def timed_out(err: BaseException) -> bool:
    """Whether `err` is a collective's timeout (gloo: "Timed out waiting Nms for recv"; NCCL, where
    its watchdog lets Python see it: "Watchdog caught collective operation timeout")."""
    return isinstance(err, RuntimeError) and is_initialized() and any(
        text in str(err) for text in ("Timed out waiting", "collective operation timeout")
    )


def peer_lost(err: BaseException) -> bool:
    """Whether `err` is a collective failing because another rank's process ended (gloo)."""
    return isinstance(err, RuntimeError) and is_initialized() and any(
        text in str(err) for text in ("Connection closed by peer", "Connection reset by peer")
    )


def timeout_message(grace: float = 15.0) -> str:
    """After a collective timed out on this rank: which timeout fired, and the ranks that did not
    arrive where that is knowable: every rank that times out says so in the launcher's store, and
    those that have not within `grace` seconds (stopped, hung, or dead) are named."""
    key, seconds = _timeout or ("the process group's default", None)
    after = f" after {seconds:g} s" if seconds else ""
    head = f"rank {rank()}: a collective timed out{after} ({key})"
    try:
        store = _dist.distributed_c10d._get_default_store()
        store.set_timeout(timedelta(seconds=grace))
        store.set(_ROLL_CALL.format(rank=rank()), "1")
        deadline = time.monotonic() + grace
        while True:
            absent = [r for r in range(world_size()) if not store.check([_ROLL_CALL.format(rank=r)])]
            if not absent or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    except Exception:  # noqa: BLE001 - the store's host may be the rank that hangs: unknowable then
        return f"{head}; which rank did not arrive is unknown (the store did not answer)"
    if not absent:
        return f"{head}; every rank timed out (a collective that some ranks never called?)"
    return f"{head}: rank(s) {', '.join(map(str, absent))} did not arrive (stopped, hung or dead)"


def destroy_process_group() -> None:
    if is_initialized():
        _dist.destroy_process_group()


def backend_device_types(backend: str) -> tuple[str, ...]:
    """The device types `backend` communicates from: "nccl" -> ("cuda",); a per-device backend
    string such as "cpu:gloo,cuda:nccl" -> ("cpu", "cuda")."""
    if ":" in backend:
        return tuple(part.split(":")[0] for part in backend.split(","))
    if backend not in _BACKEND_DEVICES:
        raise ValueError(f"megajepa.dist: unknown torch.distributed backend {backend!r}")
    return _BACKEND_DEVICES[backend]


def placement(backend: str, tensor_device: torch.device, cuda_index: Optional[int] = None) -> torch.device:
    """Where a collective of `backend` must see a tensor that lives on `tensor_device`: where it
    is when the backend takes that device type, else the backend's own device (for CUDA, the
    current device, `cuda_index`)."""
    types = backend_device_types(backend)
    if tensor_device.type in types:
        return tensor_device
    if types[0] == "cuda":
        return torch.device("cuda", torch.cuda.current_device() if cuda_index is None else cuda_index)
    return torch.device(types[0])


def communication_device(tensor_device: torch.device = torch.device("cpu")) -> torch.device:
    """The device the current process group's backend needs for a tensor on `tensor_device`."""
    if not is_initialized():
        return tensor_device
    return placement(str(_dist.get_backend()), tensor_device)


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """`tensor` reduced over all ranks (a new tensor or `tensor` itself, on `tensor`'s device)."""
    if world_size() == 1:
        return tensor
    comm = tensor.to(communication_device(tensor.device))
    _dist.all_reduce(comm, op=_OPS[op])
    return comm.to(tensor.device)


class _GlobalSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        return all_reduce(tensor.clone())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # Every rank computes the same function of the same global sums, so every rank's upstream
        # gradient is the same: the gradient of the global value with respect to this rank's part
        # is that gradient (no collective needed). Data parallelism then averages the ranks'
        # parameter gradients, so each hands back world_size times it: the average is the
        # single-process gradient of the global value.
        return grad * world_size()


def global_sum(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over all ranks, differentiable (one all-reduce forward, none backward):
    for sufficient statistics of the global batch (megajepa.jepa.regularizers). Every rank must
    call it, with the same shape, whatever its data."""
    return _GlobalSum.apply(tensor)


def reduce_values(values: list[float], op: str = "sum") -> list[float]:
    """Python numbers reduced over all ranks in one collective (float64, so counts stay exact)."""
    if world_size() == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=communication_device())
    return all_reduce(tensor, op).tolist()


def agree(flags: dict[str, Any], device: torch.device = torch.device("cpu")) -> dict[str, bool]:
    """Each flag (a bool, or a 0-d tensor on any device) OR-ed across ranks in one all-reduce
    and read once, so that every rank takes the same branch. Device tensors stay on the device
    until that single read."""
    names = list(flags)
    if not names:
        return {}
    target = communication_device(device)
    # torch.full, not torch.tensor(...).to(target): a host-to-device copy waits for the device.
    stacked = torch.stack(
        [
            flags[name].to(target, torch.float32).reshape(())
            if torch.is_tensor(flags[name])
            else torch.full((), float(bool(flags[name])), device=target)
            for name in names
        ]
    )
    agreed = all_reduce(stacked, "max").tolist()
    return {name: value > 0 for name, value in zip(names, agreed)}


def barrier() -> None:
    if world_size() > 1:
        _dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (pickled; torch places the bytes for the backend)."""
    if world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * world_size()
    _dist.all_gather_object(gathered, obj)
    return gathered
