"""Two "nodes" on one machine, each with its own /dev/shm and TMPDIR.

test_two_nodes_split_one_epoch (in `make test`, seconds): one rank per node reads one epoch
through the trainer's own loader set-up; together they read every sample once.

The rest (`slow`) runs two ranks through the launch scripts, training configs/demo.yaml on a tiny
data set:

- launch/torchrun.sh as two nodes of one rank each on 127.0.0.1 (c10d rendezvous). Each node has
  its own TMPDIR and its own /dev/shm (a private tmpfs in a mount namespace), so StreamingDataset
  sees two nodes (LOCAL_WORLD_SIZE=1 on each), as it would on two machines.
- launch/deepspeed.sh as one node with two ranks.

Each launcher trains FIRST_STEPS steps, then resumes with train.resume=auto up to EPOCH_STEPS:
exactly one epoch of the data (PAIRS = EPOCH_STEPS x 2 ranks x PAIRS_PER_BATCH, so StreamingDataset
pads nothing and drops nothing).

Runtime: about a minute per launcher on two busy cores (both runs), hence `slow`.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
from _train_utils import free_port


REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/demo.yaml"
PAIRS_PER_BATCH = 8
EPOCH_STEPS = 8
FIRST_STEPS = 3
PAIRS = EPOCH_STEPS * 2 * PAIRS_PER_BATCH
TIMEOUT_S = 600
# Mounts a private /dev/shm, then runs the node: "$0" "$@" are the node's command.
PRIVATE_SHM = 'mount -t tmpfs tmpfs /dev/shm && exec "$0" "$@"'


def private_shm_prefix() -> Optional[list[str]]:
    """A command prefix that gives what follows its own /dev/shm, or None where none works."""
    for unshare in (["unshare", "--mount", "--propagation", "private"], ["unshare", "--user", "--map-root-user", "--mount"]):
        prefix = [*unshare, "sh", "-c", PRIVATE_SHM]
        try:
            if subprocess.run([*prefix, "true"], capture_output=True, timeout=10).returncode == 0:
                return prefix
        except (OSError, subprocess.TimeoutExpired):
            pass
    return None


def decompress_shards(directory: str) -> None:
    """Write each zstd shard's raw form beside it, as StreamingDataset does on first read.

    Nodes sharing one shard directory would each decompress into the same temporary name at once
    and fail (FileNotFoundError on the rename): shards on a shared file system are decompressed
    once, before the job, as here.
    """
    from streaming.base.compression import decompress

    with open(os.path.join(directory, "index.json")) as f:
        shards = json.load(f)["shards"]
    for shard in shards:
        if not shard.get("zip_data"):
            continue
        raw = os.path.join(directory, shard["raw_data"]["basename"])
        with open(os.path.join(directory, shard["zip_data"]["basename"]), "rb") as f:
            data = decompress(shard["compression"], f.read())
        with open(f"{raw}.part", "wb") as f:
            f.write(data)
        os.replace(f"{raw}.part", raw)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> dict[str, str]:
    from megajepa.data.embedded import ensure_embedded

    paths = ensure_embedded(str(tmp_path_factory.mktemp("tiny-data")), n_train=PAIRS, n_eval=32, progress=False)
    for split in ("train_shards", "eval_shards"):
        decompress_shards(paths[split])
    return paths


def node_env(tmpdir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    tmpdir.mkdir(parents=True, exist_ok=True)
    env.update(PATH=f"{Path(sys.executable).parent}:{env['PATH']}", TMPDIR=str(tmpdir), OMP_NUM_THREADS="1")
    # DeepSpeed JIT-builds its CPU comm op under ~/.cache/torch_extensions, shared by every checkout
    # on the machine; builds from another venv differ in their flags and ninja rebuilds (~80 s).
    venv = hashlib.sha1(sys.prefix.encode()).hexdigest()[:12]
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions" / f"megajepa-{venv}"))
    env.update(extra)
    return env


@dataclass
class Run:
    returncodes: list[int]
    logs: list[str]
    seconds: float

    def failure(self) -> str:
        return "\n".join(f"--- process {i}, exit {rc}:\n{log[-3000:]}" for i, (rc, log) in enumerate(zip(self.returncodes, self.logs)))


def run_processes(commands: list[tuple[list[str], dict[str, str]]], log_dir: Path) -> Run:
    """Start every command at once, wait for all; kill their process groups past TIMEOUT_S."""
    log_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    procs, paths = [], []
    for i, (argv, env) in enumerate(commands):
        paths.append(log_dir / f"process{i}.log")
        with open(paths[-1], "w") as log:
            procs.append(subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, TIMEOUT_S - (time.monotonic() - started)))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return Run([p.returncode for p in procs], [p.read_text() for p in paths], time.monotonic() - started)


def train_overrides(data: dict[str, str], output_dir: Path, steps: int, record_dir: Optional[Path]) -> list[str]:
    overrides = [
        "data.embedded=null",
        f"data.shards={data['train_shards']}",
        f"data.eval_shards={data['eval_shards']}",
        f"data.tokenizer={data['tokenizer']}",
        f"data.pairs_per_batch={PAIRS_PER_BATCH}",
        f"train.steps={steps}",
        "train.resume=auto",
        "train.eval_batches=1",
        f"train.output_dir={output_dir}",
        "logging.progress=false",
        "logging.log_every=1",
        "logging.tensorboard=false",
    ]
    if record_dir is not None:
        overrides.append(f"data.record_ids_dir={record_dir}")
    return overrides


def torchrun_two_nodes(overrides: list[str], work: Path) -> list[tuple[list[str], dict[str, str]]]:
    prefix = private_shm_prefix()
    if prefix is None:
        pytest.skip("cannot give each node its own /dev/shm here (unshare --mount fails): two nodes on one machine collide in it")
    port = str(free_port())
    return [
        (
            [*prefix, "bash", "launch/torchrun.sh", CONFIG, *overrides],
            node_env(work / f"node{rank}-tmp", NNODES="2", NODE_RANK=str(rank), NPROC_PER_NODE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
        )
        for rank in (0, 1)
    ]


def deepspeed_one_node(overrides: list[str], work: Path) -> list[tuple[list[str], dict[str, str]]]:
    env = node_env(work / "node-tmp", NPROC_PER_NODE="2", MASTER_PORT=str(free_port()))
    return [(["bash", "launch/deepspeed.sh", CONFIG, *overrides], env)]


@dataclass
class Training:
    first: Run
    resumed: Run
    output_dir: Path
    record_dir: Path
    latest_after_first: Optional[str]
    train_shards: str

    def require_success(self) -> None:
        for run in (self.first, self.resumed):
            assert run.returncodes and all(rc == 0 for rc in run.returncodes), run.failure()

    def metrics(self) -> list[dict]:
        with open(self.output_dir / "metrics.jsonl") as f:
            return [json.loads(line) for line in f]

    def records(self) -> dict[int, list[dict]]:
        """rank -> its per-step records, in the order written (both runs)."""
        result = {}
        for rank in (0, 1):
            with open(self.record_dir / f"rank{rank}.jsonl") as f:
                result[rank] = [json.loads(line) for line in f]
        return result


EPOCH_READER = """
import json, sys
import torch.distributed as td
from megajepa.config import load_config
from megajepa.data.layout import Layout
from megajepa.train.setup import run_tokenizers, train_loader
from megajepa.data.loader import set_stream_env
set_stream_env()
td.init_process_group("gloo")
cfg = load_config(sys.argv[1], sys.argv[3:])
prepared, tokenizer, pred_ids = run_tokenizers(cfg)
layout = Layout(cfg.data, cfg.jepa, pred_ids, tokenizer.pad_token_id or 0)
loader = train_loader(cfg.data, layout, prepared, record_ids=True)
for _ in loader.iter_epoch():
    pass
with open(sys.argv[2], "w") as f:
    json.dump(loader.recorded_ids, f)
td.destroy_process_group()
"""


def test_two_nodes_split_one_epoch(tiny_data, tmp_path):
    """Node 0 and node 1 (one rank each, LOCAL_WORLD_SIZE=1, private /dev/shm) read one epoch
    through megajepa.train.trainer's loader: every sample exactly once across the two, the same
    number of batches on each, and no sample on both."""
    from streaming import LocalDataset

    prefix = private_shm_prefix()
    if prefix is None:
        pytest.skip("cannot give each node its own /dev/shm here (unshare --mount fails)")
    script = tmp_path / "epoch_reader.py"
    script.write_text(EPOCH_READER)
    port = str(free_port())
    overrides = [o for o in train_overrides(tiny_data, tmp_path / "out", 1, None) if not o.startswith("train.resume")]
    commands = []
    for rank in (0, 1):
        env = node_env(tmp_path / f"node{rank}-tmp", RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0")
        env.update(LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port, PYTHONPATH=str(REPO))
        argv = [*prefix, sys.executable, str(script), CONFIG, str(tmp_path / f"rank{rank}.json"), *overrides]
        commands.append((argv, env))
    run = run_processes(commands, tmp_path / "logs")
    assert run.returncodes == [0, 0], run.failure()
    batches = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert len(batches[0]) == len(batches[1]) == EPOCH_STEPS
    per_node = [collections.Counter(i for batch in node for i in batch) for node in batches]
    shards = LocalDataset(tiny_data["train_shards"])
    expected = {int(shards[i]["sample_id"]) for i in range(len(shards))}
    assert len(expected) == PAIRS
    assert set(per_node[0]) & set(per_node[1]) == set(), "a sample went to both nodes"
    assert set(per_node[0]) | set(per_node[1]) == expected
    assert max((per_node[0] + per_node[1]).values()) == 1


@pytest.fixture(scope="module", params=[torchrun_two_nodes, deepspeed_one_node], ids=["torchrun-2-nodes", "deepspeed-1-node-2-ranks"])
def training(request, tiny_data, tmp_path_factory) -> Training:
    work = tmp_path_factory.mktemp(request.param.__name__)
    output_dir = work / "out"
    record_dir = work / "records"
    first = run_processes(request.param(train_overrides(tiny_data, output_dir, FIRST_STEPS, record_dir), work), work / "logs-first")
    latest = output_dir / "checkpoints" / "latest"
    latest_after_first = latest.read_text().strip() if latest.exists() else None
    resumed = run_processes(request.param(train_overrides(tiny_data, output_dir, EPOCH_STEPS, record_dir), work), work / "logs-resumed")
    print(f"{request.param.__name__}: first run {first.seconds:.0f} s, resumed run {resumed.seconds:.0f} s")
    return Training(first, resumed, output_dir, record_dir, latest_after_first, tiny_data["train_shards"])


@pytest.mark.slow
def test_every_rank_finishes(training):
    training.require_success()
    with open(training.output_dir / "summary.json") as f:
        summary = json.load(f)
    assert summary["world_size"] == 2
    assert summary["steps"] == EPOCH_STEPS


@pytest.mark.slow
def test_resume_continues_after_the_checkpoint(training):
    training.require_success()
    assert training.latest_after_first == f"step{FIRST_STEPS:08d}", training.first.failure()
    steps = [row["step"] for row in training.metrics()]
    assert steps[:FIRST_STEPS] == list(range(1, FIRST_STEPS + 1))
    resumed = steps[FIRST_STEPS:]
    assert resumed and resumed[0] == FIRST_STEPS + 1, f"the resumed run logged steps {resumed}"
    assert resumed == list(range(FIRST_STEPS + 1, EPOCH_STEPS + 1))
    assert f"at step {FIRST_STEPS}" in "".join(training.resumed.logs)


@pytest.mark.slow
def test_logged_loss_is_the_mean_of_the_ranks_losses(training):
    """Each rank records its own loss; metrics.jsonl logs their mean, step by step."""
    training.require_success()
    records = training.records()
    logged = {row["step"]: row["loss"] for row in training.metrics()}
    by_step = {step: [rows[step - 1]["loss"] for rows in records.values()] for step in logged}
    for step, losses in by_step.items():
        assert logged[step] == pytest.approx(sum(losses) / len(losses), rel=1e-6), step
    # the ranks trained on different pairs: their own losses differ (a copied mean would not)
    assert any(losses[0] != losses[1] for losses in by_step.values())


@pytest.mark.slow
def test_one_epoch_consumes_every_sample_once(training):
    from streaming import LocalDataset

    training.require_success()
    records = training.records()
    for rank, rows in records.items():
        assert [row["step"] for row in rows] == list(range(1, EPOCH_STEPS + 1)), f"rank {rank} repeated or skipped steps"
    consumed = collections.Counter(i for rows in records.values() for row in rows for i in row["sample_ids"])
    shards = LocalDataset(training.train_shards)
    expected = {int(shards[i]["sample_id"]) for i in range(len(shards))}
    assert len(expected) == PAIRS
    assert set(consumed) == expected, f"never consumed: {sorted(expected - set(consumed))[:10]}"
    assert max(consumed.values()) == 1, f"consumed twice: {sorted(k for k, n in consumed.items() if n > 1)[:10]}"



@pytest.mark.parametrize(
    "rank, local_rank, builds", [(0, "0", True), (1, "0", True), (1, "1", False), (3, None, False), (0, None, True)]
)
def test_embedded_data_is_built_by_the_first_rank_of_every_node(monkeypatch, rank, local_rank, builds):
    """Node 1's first rank (global rank 1, LOCAL_RANK 0) builds the embedded data too: its disk (a
    container's) has none of node 0's. Without a launcher (no LOCAL_RANK) rank 0 builds."""
    from megajepa.config import load_config
    from megajepa.data import embedded
    from megajepa.train import setup

    built, waited = [], []
    monkeypatch.setattr(embedded, "ensure_embedded", lambda root, **options: built.append(root))
    monkeypatch.setattr(setup.dist, "barrier", lambda: waited.append(1))
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    setup.prepare_embedded(load_config(str(REPO / CONFIG), []), rank)
    assert built == (["data/demo"] if builds else []) and waited == [1]
