"""Running `megajepa train` in real processes for the trainer tests."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def demo_overrides(paths: dict, output_dir, **extra) -> list[str]:
    """Overrides that point configs/demo.yaml at `paths` (the demo_data fixture), kept small."""
    values = {
        "data.embedded": paths["root"],
        "data.shards": paths["train_shards"],
        "data.eval_shards": paths["eval_shards"],
        "data.tokenizer": paths["tokenizer"],
        "data.pairs_per_batch": 8,
        "train.output_dir": str(output_dir),
        "train.eval_batches": 2,
        "logging.progress": "false",
        "logging.log_every": 1,
        "logging.tensorboard": "false",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_command(overrides: list[str], tmpdir, nproc: int, env_extra: Optional[dict] = None) -> tuple[list[str], dict]:
    env = dict(os.environ, TMPDIR=str(tmpdir), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env_extra or {}))
    env.pop("RANK", None)
    if nproc == 1:
        command = [str(BIN / "megajepa"), "train", "configs/demo.yaml", *overrides]
    else:
        command = [
            str(BIN / "torchrun"),
            f"--nproc_per_node={nproc}",
            "--master_addr=127.0.0.1",
            f"--master_port={free_port()}",
            "-m",
            "megajepa.cli",
            "train",
            "configs/demo.yaml",
            *overrides,
        ]
    return command, env


def run_train(
    overrides: list[str], tmpdir, nproc: int = 1, timeout: int = 300, env_extra: Optional[dict] = None
) -> subprocess.CompletedProcess:
    """`megajepa train configs/demo.yaml ...`, under torchrun when nproc > 1."""
    command, env = _train_command(overrides, tmpdir, nproc, env_extra)
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def start_train(
    overrides: list[str], tmpdir, nproc: int = 1, env_extra: Optional[dict] = None, new_session: bool = False
) -> subprocess.Popen:
    """`megajepa train` in the background (for signal tests); its output goes to tmpdir/train.out
    and tmpdir/train.err (a pipe nobody reads would fill and block it). `new_session`: in a process
    group of its own (its pid), as a terminal's foreground job is, for os.killpg."""
    command, env = _train_command(overrides, tmpdir, nproc, env_extra)
    with open(Path(tmpdir) / "train.out", "w") as out, open(Path(tmpdir) / "train.err", "w") as err:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=err, text=True,
                                start_new_session=new_session)


def metrics(output_dir) -> list[dict]:
    with open(Path(output_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def remark_complete(tag_dir) -> None:
    """After a test edits a checkpoint on purpose: record its files' current sizes and digests in
    the completion marker, so that the edit is what the test exercises, not the integrity check."""
    tag_dir = Path(tag_dir)
    marker = tag_dir / "complete.json"
    data = json.loads(marker.read_text())
    files = [p for p in sorted(tag_dir.iterdir()) if p.is_file() and p.name != marker.name]
    data["files"] = {p.name: p.stat().st_size for p in files}
    data["sha256"] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    marker.write_text(json.dumps(data))


def rank_pids(marker: str) -> dict[int, int]:
    """{RANK: pid} of the live processes whose environment has FAULT_RUN=marker."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                trainer = b"megajepa.cli" in f.read()  # not a compiler or helper the rank started
        except OSError:
            continue
        if trainer and env.get(b"FAULT_RUN") == marker.encode() and b"RANK" in env and b"LOCAL_RANK" in env:
            found[int(env[b"RANK"])] = int(entry)
    return found
