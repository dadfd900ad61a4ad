"""Test-wide setup: Triton's interpreter without a GPU, a private TMPDIR per test, markers."""

import os
import tempfile

# Must happen before anything imports a Triton kernel: @triton.jit reads it at decoration time.
if not os.path.exists("/dev/nvidia0") and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: longer than ~30 s; run with `make test-all`")
    config.addinivalue_line("markers", "slurm: brings up a one-node Slurm cluster; run with `make test-all` or `-m slurm`")
    config.addinivalue_line("markers", "faults: fault injection (tests/test_faults.py): `pytest -m 'faults and (slow or not slow)'`")
    config.addinivalue_line(
        "markers",
        "interpreter: runs Triton kernels on CPU tensors under TRITON_INTERPRET=1 (set above without a GPU); "
        "skipped where the interpreter is off (a GPU machine), except tests also marked gpu",
    )


def pytest_collection_modifyitems(config, items):
    import torch

    selected = config.getoption("-m") or ""
    run_slow = "slow" in selected
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    for item in items:
        # The markers themselves: item.keywords also holds the names of the test's directories.
        if item.get_closest_marker("gpu") and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
        if item.get_closest_marker("interpreter") and not item.get_closest_marker("gpu") and not interpreting:
            item.add_marker(pytest.mark.skip(reason="needs TRITON_INTERPRET=1: CPU tensors cannot reach a compiled kernel"))
        if item.get_closest_marker("slow") and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow: run with `make test-all`"))
        if item.get_closest_marker("slurm") and not (run_slow or "slurm" in selected):
            item.add_marker(pytest.mark.skip(reason="slurm: run with `make test-all` or `pytest -m slurm`"))


@pytest.fixture(autouse=True)
def private_tmpdir(tmp_path, monkeypatch):
    """StreamingDataset keeps locks and shared-memory names under TMPDIR: one per test."""
    path = tmp_path / "tmpdir"
    path.mkdir()
    monkeypatch.setenv("TMPDIR", str(path))
    monkeypatch.setattr(tempfile, "tempdir", str(path))
    yield path


class _ExitHooks:
    """Stands in for the atexit module inside streaming.base.shared.memory: collects the hooks."""

    def __init__(self):
        self.hooks = []

    def register(self, hook, *args, **kwargs):
        self.hooks.append((hook, args, kwargs))
        return hook


@pytest.fixture(autouse=True)
def release_streaming_shared_memory(monkeypatch):
    """Every StreamingDataset opens six shared-memory blocks and registers their release with
    atexit, which keeps them (and their file descriptors) alive until the process exits; over a
    whole suite in one process that runs out of descriptors. The blocks a test's datasets open are
    released when the test ends instead (no test keeps a dataset past its own end)."""
    from streaming.base.shared import memory

    hooks = _ExitHooks()
    monkeypatch.setattr(memory, "atexit", hooks)
    yield
    for hook, args, kwargs in hooks.hooks:
        hook(*args, **kwargs)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """A small embedded dataset (2,000 training pairs), built once per test session."""
    from megajepa.data.embedded import ensure_embedded

    root = tmp_path_factory.mktemp("demo-data")
    return ensure_embedded(str(root), n_train=2000, n_eval=200, progress=False)

