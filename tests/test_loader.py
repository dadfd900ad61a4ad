"""The view-pair loader on real MDS shards: coverage, order, resumption, errors, two ranks."""

import json
import os
import subprocess
import sys
import time
from itertools import islice
from pathlib import Path

import pytest
import torch

from megajepa.data.fingerprint import FINGERPRINT_FILE, FingerprintMismatch, tokenizer_hash
from megajepa.data.layout import SEG_FULL
from megajepa.bench.loader import loader_throughput
from megajepa.data.loader import build_loader, set_stream_env
from _mixture_shards import make_layout, random_records, write_records
from _shards import tiny_tokenizer
from _ranks import run_worker
from _train_utils import REPO, free_port

NUM_PAIRS = 203  # 25 batches of 8 and a dropped tail of 3 on one rank
BATCH = 8
LAYOUT = make_layout()
WORKER = Path(__file__).with_name("_loader_worker.py")
CONCURRENT_WORKER = Path(__file__).with_name("_concurrent_loader_worker.py")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def records():
    return random_records(NUM_PAIRS, kind="pair", seed=0, name="train")


@pytest.fixture(scope="module")
def shards(tmp_path_factory, records, tokenizer):
    return write_records(str(tmp_path_factory.mktemp("shards") / "train"), records, tokenizer, size_limit=4096)


def loader_for(shards, **kwargs):
    return build_loader(shards, batch_pairs=BATCH, layout=LAYOUT, record_ids=True, **kwargs)


def flat(batches):
    return [sid for batch in batches for sid in batch]


def conversation(batch, j):
    """Record j's conversation as packed (its `full` tokens in column order)."""
    return batch["input_ids"][(batch["pair_index"] == j) & (batch["segment"] == SEG_FULL)].tolist()


def test_one_epoch_yields_every_sample_once(shards, records, tokenizer):
    loader = loader_for(shards, tokenizer=tokenizer, seed=1)
    batches = list(loader.iter_epoch())
    ids = flat(loader.recorded_ids)
    assert len(batches) == loader.batches_per_epoch == NUM_PAIRS // BATCH
    assert len(ids) == len(set(ids)) == loader.pairs_per_epoch
    assert set(ids) <= set(range(NUM_PAIRS))  # the NUM_PAIRS % BATCH left out are the dropped tail
    for batch in batches[:3]:
        for j, sid in enumerate(batch["sample_ids"].tolist()):
            assert conversation(batch, j) == records[sid]["full"].tolist()
        assert batch["source_index"].tolist() == [0] * BATCH and batch["source_records"].tolist() == [BATCH]


def test_iterating_goes_on_into_the_next_epoch_in_a_new_order(shards):
    loader = loader_for(shards, seed=1)
    per_epoch = loader.batches_per_epoch
    epochs = []
    for _ in islice(loader, per_epoch + 4):
        epochs.append(loader.epoch)
    assert epochs == [0] * per_epoch + [1] * 4
    first, second = loader.recorded_ids[:4], loader.recorded_ids[per_epoch:]
    assert first != second and len(set(flat(second))) == 4 * BATCH


def test_order_follows_the_seed(shards):
    orders = []
    for seed in (1, 1, 2):
        loader = loader_for(shards, seed=seed)
        for _ in loader.iter_epoch():
            pass
        orders.append(loader.recorded_ids)
    assert orders[0] == orders[1]
    assert orders[0] != orders[2] and sorted(flat(orders[0])) != flat(orders[0])


# (batches taken before the checkpoint, its epoch, its sample_in_epoch): mid-epoch, at the very end
# of the first epoch, and into the second
@pytest.mark.parametrize("stop,epoch,sample_in_epoch", [(10, 0, 80), (25, 0, 200), (30, 1, 40)])
def test_resume_yields_exactly_the_unseen_batches(shards, stop, epoch, sample_in_epoch):
    total = NUM_PAIRS // BATCH + 8  # into the second epoch
    reference = list(islice(loader_for(shards), total))

    interrupted = loader_for(shards)
    for _ in islice(interrupted, stop):
        pass
    state = json.loads(json.dumps(interrupted.state_dict()))  # as a checkpoint stores it
    assert (state["epoch"], state["sample_in_epoch"]) == (epoch, sample_in_epoch)

    resumed = loader_for(shards)
    resumed.load_state_dict(state)
    rest = list(islice(resumed, total - stop))
    assert [b["sample_ids"].tolist() for b in rest] == [b["sample_ids"].tolist() for b in reference[stop:]]
    for got, want in zip(rest, reference[stop:]):
        assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(got["labels"], want["labels"])
    assert resumed.epoch == 1


def test_workers_deliver_the_same_batches(shards):
    alone, with_workers = loader_for(shards, seed=3), loader_for(shards, seed=3, num_workers=2)
    for loader in (alone, with_workers):
        for _ in loader.iter_epoch():
            pass
    assert with_workers.recorded_ids == alone.recorded_ids


def test_fingerprint_mismatch_refused(shards):
    other = tiny_tokenizer(vocab_size=65)
    with pytest.raises(FingerprintMismatch) as error:
        loader_for(shards, tokenizer=other)
    with open(os.path.join(shards, FINGERPRINT_FILE)) as f:
        stored = json.load(f)["tokenizer_hash"]
    message = str(error.value)
    assert os.path.join(shards, FINGERPRINT_FILE) in message
    assert stored[:12] in message and tokenizer_hash(other)[:12] in message


def test_remote_directory_through_a_local_cache(shards, tokenizer, tmp_path):
    cache = str(tmp_path / "cache")
    loader = loader_for(cache, remote=shards, tokenizer=tokenizer)
    for _ in loader.iter_epoch():
        pass
    assert len(set(flat(loader.recorded_ids))) == loader.pairs_per_epoch
    with pytest.raises(FingerprintMismatch, match=os.path.join(shards, FINGERPRINT_FILE)):
        loader_for(str(tmp_path / "cache2"), remote=shards, tokenizer=tiny_tokenizer(vocab_size=65))


def test_missing_shards_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        loader_for(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/index\.json: missing"):
        loader_for(str(tmp_path / "empty"))


def test_stream_env_from_deepspeed_local_size(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        monkeypatch.setenv(name, "0")  # so that teardown also removes what set_stream_env adds
        monkeypatch.delenv(name)
    assert set_stream_env() == {"RANK": 0, "WORLD_SIZE": 1, "LOCAL_RANK": 0, "LOCAL_WORLD_SIZE": 1}
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_SIZE", "2")
    assert set_stream_env() == {"RANK": 3, "WORLD_SIZE": 4, "LOCAL_RANK": 1, "LOCAL_WORLD_SIZE": 2}
    assert os.environ["LOCAL_WORLD_SIZE"] == "2"
    monkeypatch.setenv("LOCAL_SIZE", "4")  # an explicit LOCAL_WORLD_SIZE wins
    assert set_stream_env()["LOCAL_WORLD_SIZE"] == 2


def test_throughput_counts_what_the_loader_delivered(shards, records):
    """The bench's loader figures, against the records the loader says it yielded."""
    loader = loader_for(shards)
    stats = loader_throughput(loader, batches=30)
    delivered = flat(loader.recorded_ids)
    assert stats["batches"] == 30 and len(delivered) == 30 * BATCH
    assert stats["pairs_per_s"] * stats["seconds"] == pytest.approx(30 * BATCH)
    full_tokens = sum(len(records[i]["full"]) for i in delivered)
    assert stats["record_tokens_per_s"] * stats["seconds"] == pytest.approx(full_tokens)
    assert stats["last_epoch"] == (30 * BATCH - 1) // loader.pairs_per_epoch
    assert 0 < stats["padding_fraction"] < 1 - stats["view_token_fraction"]


# --- two ranks, each its own process -----------------------------------------------------------

RANK_PAIRS = 191  # padded with one repeat to 192 = 2 ranks x 12 batches of 8
HEAD = 5


def run_ranks(tmp_path, name, shards, *extra, world=2, timeout=120):
    """Run the worker as `world` ranks of one node; return each rank's JSON result."""
    out = tmp_path / name
    run_worker(WORKER.name, out, world, "--shards", shards, "--batch-pairs", str(BATCH), "--head", str(HEAD), *extra,
               timeout=timeout)
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(world)]


def test_two_ranks_partition_rerun_and_resume(tmp_path, tokenizer):
    shards = write_records(str(tmp_path / "shards"), random_records(RANK_PAIRS, kind="pair", seed=2, name="r"), tokenizer)
    first = run_ranks(tmp_path, "first", shards)
    state_file = tmp_path / "state.json"
    assert first[0]["state"] == first[1]["state"]
    assert first[0]["state"]["sample_in_epoch"] == HEAD * BATCH * 2
    state_file.write_text(json.dumps(first[0]["state"]))
    rerun = run_ranks(tmp_path, "rerun", shards, "--resume-from", str(state_file))

    epoch = [flat(result["epoch"]) for result in first]
    both = epoch[0] + epoch[1]
    assert len(epoch[0]) == len(epoch[1]) == 12 * BATCH
    assert set(both) == set(range(RANK_PAIRS))
    assert len(both) - len(set(both)) == 2 * 12 * BATCH - RANK_PAIRS  # the padding repeat, on either rank
    for rank in range(2):
        assert rerun[rank]["epoch"] == first[rank]["epoch"]
        assert first[rank]["head"] == first[rank]["epoch"][:HEAD]
        assert rerun[rank]["resumed"] == first[rank]["epoch"][HEAD:]


def start_together(shards, tmp_path, jobs: int, *extra: str) -> list[str]:
    """`jobs` one-rank jobs that build a loader on `shards` at the same instant; the stderr tails
    of those that failed."""
    go = tmp_path / "go"
    procs = []
    for job in range(jobs):
        tmpdir = tmp_path / f"job{job}"
        tmpdir.mkdir()
        env = dict(os.environ, TMPDIR=str(tmpdir), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), PYTHONPATH=f"{REPO}:{WORKER.parent}")
        command = [sys.executable, str(CONCURRENT_WORKER), shards, str(go), *extra]
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    time.sleep(3)  # every job imported and waiting
    go.touch()
    return [p.communicate(timeout=120)[1][-2000:] for p in procs if p.wait(timeout=120) != 0]


def test_jobs_starting_together_on_one_machine(shards, tmp_path):
    """Jobs that build a loader at the same instant (as `megajepa compare --jobs N` starts its
    runs) each get shared memory of their own, with streaming's search-then-create window widened
    (_concurrent_loader_worker --widen): with megajepa's registration lock all four read a batch;
    without it the same start fails (two jobs pick the same prefix: FileExistsError), so the test
    sees the race it guards against."""
    (tmp_path / "locked").mkdir()
    (tmp_path / "unlocked").mkdir()
    assert start_together(shards, tmp_path / "locked", 4, "--widen") == []
    failures = start_together(shards, tmp_path / "unlocked", 4, "--widen", "--no-lock")
    assert failures and all("FileExistsError" in tail for tail in failures), failures
