"""megajepa.dist: the one module that calls torch.distributed, and where it puts tensors."""

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from megajepa import dist

PACKAGE = Path(__file__).resolve().parent.parent / "megajepa"


def _distributed_imports(path: Path) -> list[str]:
    """`import torch.distributed` / `from torch import distributed` / `deepspeed.comm` in `path`, or
    `torch.distributed.NAME` reached through `import torch`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Attribute) and ast.unparse(node.value) == "torch.distributed":
            names = [f"torch.distributed.{node.attr}"]
        else:
            continue
        found += [f"{path.name}:{node.lineno}: {n}" for n in names if n.startswith(("torch.distributed", "deepspeed.comm"))]
    return found


def test_only_megajepa_dist_imports_torch_distributed():
    offenders = [
        hit
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != PACKAGE / "dist.py"
        for hit in _distributed_imports(path)
    ]
    assert offenders == [], "call megajepa.dist instead: " + "; ".join(offenders)


def test_the_import_check_sees_each_spelling(tmp_path):
    source = tmp_path / "m.py"
    source.write_text(
        "import torch.distributed as d\nfrom torch import distributed\nfrom deepspeed import comm\n"
        "import torch\nrank = torch.distributed.get_rank()\n"
    )
    assert len(_distributed_imports(source)) == 4


@pytest.mark.parametrize(
    "backend,tensor_device,expected",
    [
        ("nccl", "cpu", "cuda:3"),  # a CPU tensor goes to this rank's GPU
        ("nccl", "cuda:1", "cuda:1"),
        ("gloo", "cpu", "cpu"),
        ("gloo", "cuda:0", "cpu"),  # gloo here communicates from the CPU
        ("cpu:gloo,cuda:nccl", "cpu", "cpu"),
        ("cpu:gloo,cuda:nccl", "cuda:2", "cuda:2"),
    ],
)
def test_placement_follows_the_backend(backend, tensor_device, expected):
    assert dist.placement(backend, torch.device(tensor_device), cuda_index=3) == torch.device(expected)


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="'smoke'"):
        dist.backend_device_types("smoke")


class _Reached(Exception):
    pass


def test_collectives_use_the_backend_device(monkeypatch):
    """Under a (pretend) backend that communicates from one device type only, every collective
    hands torch.distributed its tensor on that device, whatever device the caller made it on."""
    seen = []

    def fake_all_reduce(tensor, op):
        seen.append(tensor.device)
        raise _Reached  # "meta" stands in for CUDA (no GPU here): it holds no values to go on with

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist._dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist._dist, "get_backend", lambda: "pretend")
    monkeypatch.setattr(dist._dist, "all_reduce", fake_all_reduce)
    monkeypatch.setitem(dist._BACKEND_DEVICES, "pretend", ("meta",))
    calls = [
        lambda: dist.all_reduce(torch.ones(3)),
        lambda: dist.reduce_values([1.0, 2.0], "max"),
        lambda: dist.agree({"nonfinite": torch.tensor(False), "stop": True}),
    ]
    for call in calls:
        with pytest.raises(_Reached):
            call()
    assert [device.type for device in seen] == ["meta"] * len(calls)


WORKER = textwrap.dedent(
    """
    import sys, torch
    import torch.distributed as td
    from megajepa import dist
    td.init_process_group("gloo")
    r = dist.rank()
    assert dist.world_size() == 2
    assert dist.all_reduce(torch.tensor([1.0, 10.0]) * (r + 1)).tolist() == [3.0, 30.0]
    assert dist.reduce_values([r, 5.0 * r], "max") == [1.0, 5.0]
    # one rank's NaN and the other rank's stop signal: both ranks see both
    flags = dist.agree({"nonfinite": torch.tensor(r == 0), "stop": r == 1, "other": False})
    assert flags == {"nonfinite": True, "stop": True, "other": False}, flags
    assert dist.all_gather_object({"rank": r}) == [{"rank": 0}, {"rank": 1}]
    dist.barrier()
    dist.destroy_process_group()
    """
)


def test_two_gloo_ranks(tmp_path):
    from _train_utils import free_port

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE.parent), env.get("PYTHONPATH", "")])
        procs.append(subprocess.Popen([sys.executable, str(script)], env=env, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]


def test_single_process_is_the_identity():
    assert not dist.is_initialized()
    t = torch.tensor([1.0, 2.0])
    assert dist.all_reduce(t) is t
    assert dist.reduce_values([4.0], "max") == [4.0]
    assert dist.agree({"a": torch.tensor(True), "b": False}) == {"a": True, "b": False}
    assert dist.all_gather_object(7) == [7]
