"""View-pair loader: MDS shards -> StreamingDataset -> packed batches (megajepa.data.layout).

    loader = build_loader("data/demo/shards/train", batch_pairs=32, layout=layout, tokenizer=tok)
    for batch in loader:            # never ends; loader.epoch says which epoch a batch came from
        ...
    state = loader.state_dict()     # after a batch: exactly where this run stands in its epoch
    loader.load_state_dict(state)   # on a fresh loader, before iterating: yields the rest

Order and resumption are mosaicml-streaming's own. Each epoch the dataset shuffles the global sample
order from the seed and the epoch, pads it with repeats so it divides evenly over the ranks, and
deals it out in batches of `batch_pairs` per rank; with drop_last a rank's last partial batch
(fewer than batch_pairs pairs) is left out of that epoch. StreamingDataLoader counts the pairs
this rank has yielded since its epoch began; state_dict() reports them as sample_in_epoch
(times the world size), and after load_state_dict() the next epoch pass re-deals the epoch without
its first sample_in_epoch samples: with the same world size and batch_pairs (num_workers may
differ) the resumed loader yields exactly the batches the interrupted one had not yet yielded.

Where the shards may live:
  - a local directory (`shards`), which must be writable: streaming decompresses each zstd shard
    beside itself;
  - `remote` (any location streaming can download from, or a mounted directory) with `shards` as
    the local cache. The fingerprint is read from `remote` when it is a directory, otherwise it is
    downloaded into the cache with streaming's own downloader.

Ranks, shared memory and locks: StreamingDataset reads RANK, WORLD_SIZE, LOCAL_RANK and
LOCAL_WORLD_SIZE (set_stream_env fills the last from DeepSpeed's LOCAL_SIZE), builds its
constructor barrier on torch.distributed when it is initialized (it initializes gloo itself
otherwise, which needs MASTER_ADDR/MASTER_PORT), keeps its lock files under TMPDIR and its state in
/dev/shm. Every rank must build the loader at the same point. After a crash on a dedicated node,
`streaming.base.util.clean_stale_shared_memory()` (all ranks, once, before building) frees what
the dead job left in /dev/shm; it frees every streaming job's memory, so never call it on a
machine shared with other jobs.
"""

from __future__ import annotations

import os
import time
import warnings
from typing import Any, Iterator, Optional

import numpy as np
import torch
from streaming import StreamingDataLoader, StreamingDataset
from streaming.base.format import get_index_basename
from streaming.base.storage import CloudDownloader
from tqdm import tqdm

from megajepa.data import fingerprint
from megajepa.data.layout import SEG_PAD, Layout


def set_stream_env() -> dict[str, int]:
    """Resolve the rank variables StreamingDataset reads, filling LOCAL_WORLD_SIZE from LOCAL_SIZE.

    DeepSpeed's launcher sets LOCAL_SIZE only; without LOCAL_WORLD_SIZE the ranks of one node each
    think they are alone on theirs and collide in shared memory (FileExistsError).
    """
    if "LOCAL_WORLD_SIZE" not in os.environ and "LOCAL_SIZE" in os.environ:
        os.environ["LOCAL_WORLD_SIZE"] = os.environ["LOCAL_SIZE"]
    defaults = {"RANK": 0, "WORLD_SIZE": 1, "LOCAL_RANK": 0, "LOCAL_WORLD_SIZE": 1}
    env = {name: int(os.environ.get(name, default)) for name, default in defaults.items()}
    if env["WORLD_SIZE"] > 1 and "LOCAL_WORLD_SIZE" not in os.environ:
        warnings.warn(
            f"WORLD_SIZE={env['WORLD_SIZE']} but neither LOCAL_WORLD_SIZE nor LOCAL_SIZE is set: "
            "StreamingDataset will assume one rank per node"
        )
    if env["WORLD_SIZE"] % env["LOCAL_WORLD_SIZE"]:
        raise ValueError(
            f"WORLD_SIZE={env['WORLD_SIZE']} is not a multiple of LOCAL_WORLD_SIZE={env['LOCAL_WORLD_SIZE']}"
        )
    return env


RECORD_ARRAYS = ("full", "full_spans", "user", "user_insert", "assistant", "assistant_insert")


class PairDataset(StreamingDataset):
    """StreamingDataset of prepared records (megajepa.data.prepare's columns, as numpy arrays)."""

    def get_item(self, sample_id: int, retry: int = 7) -> dict[str, Any]:
        sample = super().get_item(sample_id, retry)
        record = {name: np.asarray(sample[name], dtype=np.int64) for name in RECORD_ARRAYS}
        record["prompt_len"] = int(sample["prompt_len"])
        record["sample_id"] = int(sample["sample_id"])
        return record


class _PairDataLoader(StreamingDataLoader):
    """StreamingDataLoader that counts pairs, not rows: a packed batch's first tensor has R rows."""

    def _get_batch_size(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["num_pairs"])


class PairLoader:
    """Packed batches for this rank, epoch after epoch, resumable mid-epoch."""

    def __init__(self, dataloader: _PairDataLoader, *, record_ids: bool = False):
        self.dataloader = dataloader
        self.dataset: PairDataset = dataloader.dataset
        self.batch_pairs: int = dataloader.batch_size
        self.epoch = 0  # the epoch of the last batch yielded (or of the loaded state)
        # record_ids: one list of sample_ids per yielded batch, to check coverage across ranks
        self.recorded_ids: Optional[list[list[int]]] = [] if record_ids else None

    @property
    def batches_per_epoch(self) -> int:
        """Full batches this rank yields in a complete epoch (the last partial one is dropped)."""
        return len(self.dataset) // self.batch_pairs

    @property
    def pairs_per_epoch(self) -> int:
        return self.batches_per_epoch * self.batch_pairs

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield from self.iter_epoch()

    def iter_epoch(self) -> Iterator[dict[str, torch.Tensor]]:
        """One pass: the rest of the current epoch after a resume, otherwise the next whole epoch.

        Starting a pass before the previous one finished abandons the previous one (streaming
        moves on to the next epoch).
        """
        for batch in self.dataloader:
            self.epoch = self.dataset.next_epoch - 1
            if self.recorded_ids is not None:
                self.recorded_ids.append(batch["sample_ids"].tolist())
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """Where this run stands: epoch, sample_in_epoch (all ranks), shuffle seed, canonical nodes."""
        return self.dataloader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state` on the next pass; call before iterating (on every rank)."""
        self.dataloader.load_state_dict(state)
        self.epoch = max(int(state["epoch"]), 0)


def _require_index(directory: str) -> None:
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: shard directory does not exist; create it with `megajepa prepare`")
    index = os.path.join(directory, get_index_basename())
    if not os.path.isfile(index):
        raise FileNotFoundError(f"{index}: missing; {directory} is not an MDS shard directory")


def _fingerprint_dir(shards: str, remote: Optional[str]) -> str:
    """The directory holding fingerprint.json: the shards, a mounted remote, or the local cache."""
    if remote is None or os.path.isdir(remote):
        return remote or shards
    os.makedirs(shards, exist_ok=True)
    target = os.path.join(shards, fingerprint.FINGERPRINT_FILE)
    partial = f"{target}.{os.getpid()}.part"  # every rank downloads; each renames its own copy
    CloudDownloader.direct_download(f"{remote.rstrip('/')}/{fingerprint.FINGERPRINT_FILE}", partial)
    os.replace(partial, target)
    return shards


def build_loader(
    shards: str,
    *,
    batch_pairs: int,
    layout: Layout,
    tokenizer=None,
    remote: Optional[str] = None,
    shuffle: bool = True,
    seed: int = 1234,
    num_workers: int = 0,
    record_ids: bool = False,
) -> PairLoader:
    """Loader of packed view-pair batches for this rank (see the module docstring).

    shards: the MDS directory, or the local cache when `remote` is given.
    tokenizer: when given, the shards' fingerprint must match it (FingerprintMismatch otherwise).
    """
    if batch_pairs < 1:
        raise ValueError(f"batch_pairs must be at least 1, got {batch_pairs}")
    set_stream_env()
    if remote is None or os.path.isdir(remote):
        _require_index(remote or shards)
    if tokenizer is not None:
        fingerprint.check_fingerprint(_fingerprint_dir(shards, remote), tokenizer)

    dataset = PairDataset(
        local=shards,
        remote=remote,
        batch_size=batch_pairs,
        shuffle=shuffle,
        shuffle_seed=seed,
    )
    loader = PairLoader(
        _PairDataLoader(
            dataset,
            batch_size=batch_pairs,
            collate_fn=layout,
            num_workers=num_workers,
            drop_last=True,
        ),
        record_ids=record_ids,
    )
    if loader.batches_per_epoch == 0:
        raise ValueError(
            f"{shards}: {dataset.size} pairs give this rank {len(dataset)} per epoch, fewer than "
            f"batch_pairs={batch_pairs}"
        )
    return loader


def loader_throughput(
    shards: str,
    *,
    batch_pairs: int,
    layout: Layout,
    seconds: Optional[float] = None,
    batches: Optional[int] = None,
    tokenizer=None,
    num_workers: int = 0,
    seed: int = 1234,
) -> dict[str, float]:
    """What the loader delivers to this rank from local shards, for `seconds` or `batches`.

    padding_fraction: row slots holding padding / all row slots (online and teacher rows).
    view_token_fraction: the layout's useful_tokens / computed_tokens, i.e. view A + view B tokens
    over all slots; it also leaves out the [PRED] and view-B-alone (C') tokens the JEPA term adds.
    """
    if (seconds is None) == (batches is None):
        raise ValueError("give exactly one of seconds or batches")
    loader = build_loader(
        shards, batch_pairs=batch_pairs, layout=layout, tokenizer=tokenizer, num_workers=num_workers, seed=seed
    )
    pairs = useful = computed = padding = rows = count = 0
    start = time.perf_counter()
    with tqdm(total=batches, desc="loader", unit="batch", disable=int(os.environ.get("RANK", 0)) > 0) as bar:
        for batch in loader:
            count += 1
            pairs += int(batch["num_pairs"])
            useful += int(batch["useful_tokens"])
            computed += int(batch["computed_tokens"])
            padding += int((batch["segment"] == SEG_PAD).sum())
            rows += batch["segment"].shape[0]
            if "teacher_segment" in batch:
                padding += int((batch["teacher_segment"] == SEG_PAD).sum())
                rows += batch["teacher_segment"].shape[0]
            bar.update()
            elapsed = time.perf_counter() - start
            if count == batches or (seconds is not None and elapsed >= seconds):
                break
    return {
        "batches": count,
        "seconds": elapsed,
        "pairs_per_s": pairs / elapsed,
        "tokens_per_s": computed / elapsed,
        "padding_fraction": padding / computed,
        "view_token_fraction": useful / computed,
        "rows_per_batch": rows / count,
        "last_epoch": loader.epoch,
    }
