"""A test's worker script on several ranks, as real processes (gloo on CPU), for the ZeRO-3 tests
whose worker writes one record per rank (tests/_ema_worker.py, _pretrained_worker.py,
_families_worker.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from _train_utils import REPO, free_port


def run_worker(script: str, out: Path, world: int, *args: str, timeout: float) -> None:
    """`tests/SCRIPT --out OUT ARGS...` on `world` ranks (RANK, WORLD_SIZE, a free MASTER_PORT, ...
    set; TMPDIR out/tmp; rank r's output in out/log{r}.txt); asserts that every rank exited 0,
    naming the rank and its log's tail. One rank failing stops the others, which would otherwise
    wait in a collective until gloo's timeout; so does `timeout` (seconds)."""
    tmpdir = out / "tmp"
    tmpdir.mkdir(parents=True)
    env = dict(
        os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1", TMPDIR=str(tmpdir), PYTHONPATH=str(REPO),
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
