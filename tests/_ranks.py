"""A test's worker script on several ranks, as real processes (gloo on CPU), for the ZeRO-3 tests
whose worker writes one record per rank (tests/_ema_worker.py, _pretrained_worker.py,
_families_worker.py, _head_worker.py); and, inside a worker, the collectives it issues."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from _train_utils import REPO, free_port

HOOK_ID = 1234


@contextmanager
def count_collectives(with_sizes: bool = False):
    """Names of the collectives issued meanwhile (with_sizes: (name, element count of each input
    tensor)), on any process group, seen through torch's ProcessGroup pre-hooks: below
    DeepSpeed's comm layer, which holds its own references to torch.distributed's functions."""
    from torch.distributed import distributed_c10d as c10d

    def hook(args):
        calls.append((args.name.name, [t.numel() for t in args.input_tensors]) if with_sizes else args.name.name)

    calls = []
    groups = list(c10d._world.pg_map)
    for group in groups:
        group.register_pre_hook(HOOK_ID, hook)
    try:
        yield calls
    finally:
        for group in groups:
            group.unregister_pre_hook(HOOK_ID)


def run_worker(script: str, out: Path, world: int, *args: str, timeout: float) -> None:
    """`tests/SCRIPT --out OUT ARGS...` on `world` ranks (RANK, WORLD_SIZE, a free MASTER_PORT, ...
    set; TMPDIR out/tmp; rank r's output in out/log{r}.txt); asserts that every rank exited 0,
    naming the rank and its log's tail. One rank failing stops the others, which would otherwise
    wait in a collective until gloo's timeout; so does `timeout` (seconds)."""
    tmpdir = out / "tmp"
    tmpdir.mkdir(parents=True)
    env = dict(
        os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1", TMPDIR=str(tmpdir),
        # the repository first, then what the caller had (gpu_check.sh's carried wheels)
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )  # fmt: skip
    cmd = [sys.executable, str(REPO / "tests" / script), "--out", str(out), *args]
    logs = [out / f"log{r}.txt" for r in range(world)]
    procs = []
    for r, log in enumerate(logs):
        with open(log, "w") as f:
            procs.append(subprocess.Popen(cmd, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=f, stderr=f))
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
        if any(p.returncode not in (None, 0) for p in procs) or time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            break
        time.sleep(0.2)
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} exited with {p.returncode}:\n{log.read_text()[-4000:]}"
