"""Record loader: MDS shards (one or a mixture of sources) -> StreamingDataset -> packed batches.

    loader = build_loader("data/demo/shards/train", batch_pairs=32, layout=layout, tokenizer=tok)
    for batch in loader:            # never ends; loader.epoch says which epoch a batch came from
        ...
    state = loader.state_dict()     # after a batch: exactly where this run stands in its epoch
    loader.load_state_dict(state)   # on a fresh loader, before iterating: yields the rest

Order, resumption, the two ways to cut micro-batches (by count, by token budget), sources, where
shards may live, ranks and shared memory: docs/loader.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import warnings
from itertools import chain
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from streaming import StreamingDataLoader, StreamingDataset
from streaming.base.format import get_index_basename
from streaming.base.storage import CloudDownloader
from streaming.base.world import World

from megajepa.data import fingerprint
from megajepa.data.layout import Layout, is_pair
from megajepa.data.mixture import MIXING, Source, check_sources, to_stream
from megajepa.data.shard_hashes import CorruptShard, check_file, shard_file
from megajepa.files import atomic_path

RECORD_LENGTHS_FILE = "record_lengths.npy"  # int32 [records, 3]: len(full), len(user), len(assistant)
RECORD_ARRAYS = ("full", "full_spans", "user", "user_insert", "assistant", "assistant_insert")
VIEW_COLUMNS = ("full", "user", "assistant")
WINDOW_MICRO_BATCHES = 16  # a token-budget window holds about this many micro-batches


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



def decode_record(sample: dict) -> dict[str, Any]:
    """A stored record as the layout takes it (megajepa.data.prepare's columns as int64 arrays,
    prompt_len, sample_id, source). A view stored as `bytes` (raw little-endian int32: how
    prepare-text stores the empty views of a CE-only record, since MDS cannot encode an empty
    ndarray) is decoded to its array."""
    record = {}
    for name in RECORD_ARRAYS:
        value = sample[name]
        if isinstance(value, bytes):
            value = np.frombuffer(value, dtype="<i4")
        record[name] = np.asarray(value, dtype=np.int64)
    record["prompt_len"] = int(sample["prompt_len"])
    record["sample_id"] = int(sample["sample_id"])
    record["source"] = sample.get("source", "")
    return record


def record_lengths(sample: dict) -> tuple[int, int, int]:
    """(full, user, assistant) token counts of a record."""
    return len(sample["full"]), len(sample["user"]), len(sample["assistant"])


def record_costs(lengths: np.ndarray, k: int, *, views: bool = True, max_length: int = 0) -> np.ndarray:
    """Token cost of each record packed, an upper bound: full + user + k [PRED] tokens + assistant
    for a pair (both views non-empty) when the layout builds views, full alone otherwise; each
    sequence cut at max_length as the layout cuts it (0: no cut)."""
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1, 3)
    cut = (lambda n: np.minimum(n, max_length)) if max_length > 0 else (lambda n: n)  # noqa: E731
    pair = views & (lengths[:, 1] > 0) & (lengths[:, 2] > 0)
    return cut(lengths[:, 0]) + np.where(pair, cut(lengths[:, 1] + k) + cut(lengths[:, 2]), 0)


def plan_windows(costs: np.ndarray, budget: int) -> list[Optional[list[int]]]:
    """Micro-batch cuts per window, the same for every rank.

    costs: [windows, ranks, window] record costs in each rank's order, -1 where streaming padded
    the epoch with no record. Returns per window the end positions of its micro-batches (the last
    is the window size), each the furthest at which no rank's records exceed `budget` (at least
    one record), or None for a window that is incomplete on some rank.
    """
    plans: list[Optional[list[int]]] = []
    for window in costs:
        if (window < 0).any():
            plans.append(None)
            continue
        prefix = np.concatenate([np.zeros((len(window), 1), np.int64), np.cumsum(window, axis=1)], axis=1)
        cuts, start, size = [], 0, window.shape[1]
        while start < size:
            # per rank: the last end whose records since `start` still fit the budget
            ends = [int(np.searchsorted(p, p[start] + budget, side="right")) - 1 for p in prefix]
            start = max(min(ends), start + 1)
            cuts.append(start)
        plans.append(cuts)
    return plans


def _identity(item):
    return item


class SourceCollator:
    """The layout's collate function, plus each record's source and per-source counts."""

    def __init__(self, collate: Callable[[list[dict]], dict], num_sources: int):
        self.collate = collate
        self.num_sources = num_sources

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.collate(samples)
        sources = np.asarray([s["source_index"] for s in samples], dtype=np.int64)
        lengths = np.asarray([record_lengths(s) for s in samples], dtype=np.int64).reshape(-1, 3)
        pairs = np.asarray([is_pair(s) for s in samples], dtype=bool)  # as the layout's num_pairs counts them
        batch["source_index"] = torch.from_numpy(sources)
        batch["source_records"] = torch.from_numpy(np.bincount(sources, minlength=self.num_sources))
        batch["source_pairs"] = torch.from_numpy(np.bincount(sources[pairs], minlength=self.num_sources))
        batch["source_tokens"] = torch.from_numpy(
            np.bincount(sources, weights=lengths[:, 0], minlength=self.num_sources).astype(np.int64)
        )
        if self.num_sources > 1 and "ce_index" in batch:  # each labelled token's source, for the per-source CE
            batch["ce_source"] = batch["source_index"][batch["pair_index"].flatten()[batch["ce_index"]]]
        batch.setdefault("sample_ids", torch.as_tensor([int(s["sample_id"]) for s in samples], dtype=torch.long))
        return batch


class PairDataset(StreamingDataset):
    """StreamingDataset of records from one or more sources (decode_record's dict, with sample_id =
    streaming's global index and source_index); with a token budget it yields one item per window:
    {"micro_batches": [packed batch, ...], "records": n}."""

    def __init__(self, *, sources: Sequence[Source], **kwargs: Any):
        super().__init__(streams=[to_stream(s) for s in sources], **kwargs)
        self.sources = list(sources)
        self.costs: Optional[np.ndarray] = None  # per record, set by use_token_budget
        self.budget = 0
        self.collate: Optional[Callable] = None
        self._plan: Optional[list] = None  # per window: micro-batch ends, or None (left out)
        self._order: Optional[np.ndarray] = None  # per window: this rank's records, longest first
        self._checked: set[str] = set()  # shard files this process found as their index says

    def raw_item(self, sample_id: int) -> dict[str, Any]:
        return decode_record(self._checked_item(sample_id))

    def get_item(self, sample_id: int, retry: int = 7) -> dict[str, Any]:
        sample = decode_record(self._checked_item(sample_id, retry))
        shard_id, _ = self.spanner[sample_id]
        sample["sample_id"] = sample_id
        sample["source_index"] = int(self.stream_per_shard[shard_id])
        sample["epoch"] = max(self.next_epoch - 1, 0)  # STP draws a record's spans anew each epoch
        return sample

    # Shard integrity (megajepa.data.shard_hashes): the first time this process opens a shard, its
    # raw file is checked against the index's digest; a compressed file before streaming
    # decompresses it, and again when decompressing (or downloading) fails.
    def _checked_item(self, sample_id: int, retry: int = 7) -> dict[str, Any]:
        shard_id, _ = self.spanner[sample_id]
        shard = self.shards[shard_id]
        raw_path = shard_file(shard, shard.file_pairs[0][0])
        if raw_path not in self._checked:
            self.prepare_shard(shard_id)
            self._check(shard_id, zips=False)
        return super().get_item(sample_id, retry)

    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        shard = self.shards[shard_id]
        if not os.path.isfile(shard_file(shard, shard.file_pairs[0][0])):
            self._check(shard_id, zips=True)  # streaming is about to decompress what is there
        try:
            super().prepare_shard(shard_id, blocking)
        except Exception:
            self._check(shard_id, zips=True)  # a damaged compressed file is the likeliest cause
            raise

    def _raise_if_background_failed(self) -> None:
        # streaming wraps a failure of its prefetching threads in a RuntimeError; a corrupt shard
        # found there is reported as itself
        error = getattr(self, "_background_error", None)
        if isinstance(error, CorruptShard) and self._event.is_set():
            raise error
        super()._raise_if_background_failed()

    def _check(self, shard_id: int, zips: bool) -> None:
        """Check the shard's raw files (zips: its compressed ones) present here, each once."""
        shard = self.shards[shard_id]
        stream = self.streams[self.stream_per_shard[shard_id]]
        for raw_info, zip_info in shard.file_pairs:
            info = zip_info if zips else raw_info
            path = None if info is None else shard_file(shard, info)
            if path is None or path in self._checked or not os.path.isfile(path):
                continue
            check_file(path, info, stream.remote or stream.local)
            self._checked.add(path)

    def shard_path(self, sample_id: int) -> str:
        shard_id, _ = self.spanner[sample_id]
        shard = self.shards[shard_id]
        return shard_file(shard, shard.file_pairs[0][0])

    def use_token_budget(self, costs: np.ndarray, budget: int, window: int, collate: Callable) -> None:
        self.costs, self.budget, self.collate = costs, budget, collate
        self.batch_size = window  # streaming deals records to ranks and workers in windows

    # Streaming computes the epoch's partition of all ranks once per node (the local leader shares
    # it, the others attach to it); the token-budget plan needs every rank's part, so it is made
    # from the partition here, in each worker, before streaming keeps only this worker's part.
    def _share_work(self, sample_ids: np.ndarray):
        self._make_plan(sample_ids)
        return super()._share_work(sample_ids)

    def _attach_work(self):
        sample_ids, shape_shm, data_shm = super()._attach_work()
        self._make_plan(sample_ids)
        return sample_ids, shape_shm, data_shm

    def _make_plan(self, sample_ids: np.ndarray) -> None:
        if self.costs is None:
            return
        info = torch.utils.data.get_worker_info()
        work = sample_ids[:, :, info.id if info is not None else 0]  # [nodes, ranks, windows, window]
        work = work.reshape(-1, *work.shape[2:]).transpose(1, 0, 2)  # [windows, all ranks, window]
        costs = np.where(work >= 0, self.costs[np.maximum(work, 0)], -1)
        order = np.argsort(-costs, axis=2, kind="stable")
        self._plan = plan_windows(np.take_along_axis(costs, order, axis=2), self.budget)
        self._order = order[:, World.detect().rank]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.costs is None:
            yield from super().__iter__()
            return
        self._plan = None
        samples = super().__iter__()
        first = next(samples, None)  # streaming partitions the epoch (and we plan it) here
        if first is None:
            return
        samples = chain([first], samples)
        for cuts, order in zip(self._plan, self._order):
            if cuts is None:  # incomplete windows come last
                return
            dealt = [next(samples) for _ in range(cuts[-1])]
            records = [dealt[i] for i in order]
            bounds = zip([0] + cuts[:-1], cuts)
            yield {"micro_batches": [self.collate(records[a:b]) for a, b in bounds], "records": len(records)}


class _PairDataLoader(StreamingDataLoader):
    """StreamingDataLoader that counts records, not rows: by count a batch holds N records, by
    token budget an item is a window of them."""

    def _get_batch_size(self, batch: dict) -> int:
        if "micro_batches" in batch:
            return int(batch["records"])
        return len(batch["source_index"])


class PairLoader:
    """Packed batches for this rank, epoch after epoch, resumable mid-epoch."""

    def __init__(self, dataloader: _PairDataLoader, *, record_ids: bool = False):
        self.dataloader = dataloader
        self.dataset: PairDataset = dataloader.dataset
        self.batch_pairs: Optional[int] = dataloader.batch_size  # None with a token budget
        self.epoch = 0  # the epoch of the last batch yielded (or of the loaded state)
        # record_ids: one list of sample_ids per yielded batch, to check coverage across ranks
        self.recorded_ids: Optional[list[list[int]]] = [] if record_ids else None
        # token budget: where this rank stands inside the window it is handing out
        self._window_records = 0
        self._window_taken = 0
        self._window_left = 0
        self._skip = 0  # micro-batches of the first window to leave out after a resume
        self._resumed_at_end = False  # a state saved at an epoch's very end resumes to an empty pass

    @property
    def by_tokens(self) -> bool:
        return self.dataset.costs is not None

    @property
    def batches_per_epoch(self) -> int:
        """Full batches this rank yields in a complete epoch (by count; the last partial one is dropped)."""
        if self.by_tokens:
            raise ValueError("batches_per_epoch: with a token budget the epoch's batches are known only once planned")
        return len(self.dataset) // self.batch_pairs

    @property
    def pairs_per_epoch(self) -> int:
        return self.batches_per_epoch * self.batch_pairs

    @property
    def num_sources(self) -> int:
        return len(self.dataset.sources)

    @property
    def source_names(self) -> list[str]:
        return [s.label for s in self.dataset.sources]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            empty = True
            for batch in self.iter_epoch():
                empty = False
                yield batch
            if empty and not self._resumed_at_end:
                raise RuntimeError(f"an epoch of {self.dataset.size} records gave this rank no batch")
            self._resumed_at_end = False

    def iter_epoch(self) -> Iterator[dict[str, torch.Tensor]]:
        """One pass: the rest of the current epoch after a resume, otherwise the next whole epoch.

        Starting a pass before the previous one finished abandons the previous one (streaming
        moves on to the next epoch).
        """
        self._window_left = 0
        for item in self.dataloader:
            self.epoch = self.dataset.next_epoch - 1
            if "micro_batches" not in item:
                yield self._record(item)
                continue
            batches, skip, self._skip = item["micro_batches"], self._skip, 0
            self._window_records = int(item["records"])
            for i in range(skip, len(batches)):
                self._window_taken, self._window_left = i + 1, len(batches) - i - 1
                yield self._record(batches[i])
        self._window_left = 0

    def _record(self, batch: dict) -> dict:
        if self.recorded_ids is not None:
            self.recorded_ids.append(batch["sample_ids"].tolist())
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Where this run stands: epoch, sample_in_epoch (all ranks), shuffle seed, canonical nodes;
        with a token budget inside a window, the window's start and micro_batches_in_window."""
        state = self.dataloader.state_dict()
        if self._window_left:
            state["sample_in_epoch"] -= self._window_records * World.detect().num_ranks
            state["micro_batches_in_window"] = self._window_taken
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state` on the next pass; call before iterating (on every rank)."""
        state = dict(state)
        self._skip = int(state.pop("micro_batches_in_window", 0))
        self._resumed_at_end = True
        self.dataloader.load_state_dict(state)
        self.epoch = max(int(state["epoch"]), 0)


REGISTRATION_LOCK = "megajepa_streaming_registration.lock"


@contextlib.contextmanager
def streaming_registration_lock() -> Iterator[None]:
    """Held by each node's local leader around the StreamingDataset constructor.

    The constructor finds the first free shared-memory prefix, then its local leader creates it,
    with no lock between the two: two jobs starting together on one machine can pick the same
    prefix and one fails (FileExistsError: '/000003_locals'). A machine-wide file lock (beside the
    shared memory, released by the kernel if the process dies) makes leaders register one at a
    time; the other ranks take no lock, so they cannot wait on it while their leader waits on them."""
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        yield
        return
    directory = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    with open(os.path.join(directory, REGISTRATION_LOCK), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _require_index(directory: str) -> None:
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: shard directory does not exist; create it with `megajepa prepare`")
    index = os.path.join(directory, get_index_basename())
    if not os.path.isfile(index):
        raise FileNotFoundError(f"{index}: missing; {directory} is not an MDS shard directory")


def _beside_index(source: Source, name: str) -> Optional[str]:
    """The path of `name` beside the source's index: in the shards, a mounted remote, or downloaded
    into the local cache (None when a remote lacks it)."""
    if source.remote is None or os.path.isdir(source.remote):
        path = os.path.join(source.remote or source.shards, name)
        return path if os.path.isfile(path) else None
    os.makedirs(source.shards, exist_ok=True)
    target = os.path.join(source.shards, name)
    partial = f"{target}.{os.getpid()}.part"  # every rank downloads; each renames its own copy
    try:
        CloudDownloader.direct_download(f"{source.remote.rstrip('/')}/{name}", partial)
    except Exception:  # noqa: BLE001 - streaming raises whatever its backend raises for a missing file
        if name == fingerprint.FINGERPRINT_FILE:
            raise
        return None
    os.replace(partial, target)
    return target


def _fingerprint_dir(source: Source) -> str:
    path = _beside_index(source, fingerprint.FINGERPRINT_FILE)
    return os.path.dirname(path) if path else (source.remote or source.shards)


def source_lengths(dataset: PairDataset, stream_id: int) -> np.ndarray:
    """record_lengths of one source: its record_lengths.npy, or read from every record once and
    saved in its local directory for the next run."""
    source = dataset.sources[stream_id]
    count = int(dataset.samples_per_stream[stream_id])
    path = _beside_index(source, RECORD_LENGTHS_FILE)
    if path is not None:
        lengths = np.load(path)
        if lengths.shape != (count, 3):
            raise ValueError(f"{path}: shape {lengths.shape}, but the index has {count} records; prepare it again")
        return lengths
    first = int(dataset.sample_offset_per_stream[stream_id])
    lengths = np.asarray([record_lengths(dataset.raw_item(i)) for i in range(first, first + count)], np.int32)
    return write_record_lengths(source.shards, lengths)


def write_record_lengths(directory: str, lengths) -> np.ndarray:
    """Save record_lengths.npy (int32 [records, 3]: full, user, assistant, in index order) beside an
    index, atomically; prepare calls it so that the token-budget loader need not read every record."""
    lengths = np.asarray(lengths, dtype=np.int32).reshape(-1, 3)
    with atomic_path(os.path.join(directory, RECORD_LENGTHS_FILE)) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, lengths)
    return lengths


def _token_budget_window(dataset: PairDataset, budget: int, layout: Layout, collate: Callable) -> None:
    lengths = np.concatenate([source_lengths(dataset, i) for i in range(dataset.num_streams)])
    views = bool(getattr(layout, "with_views", True))
    k = len(layout.pred_token_ids) if views else 0
    costs = record_costs(lengths, k, views=views, max_length=layout.data.max_length)
    worst = int(np.argmax(costs))
    if costs[worst] > budget:
        raise ValueError(
            f"{dataset.shard_path(worst)}: a record of {costs[worst]} tokens (full + views + [PRED]) "
            f"exceeds data.tokens_per_batch={budget}"
        )
    window = max(1, round(WINDOW_MICRO_BATCHES * budget / max(float(costs.mean()), 1.0)))
    window = min(window, len(dataset))  # at least one whole window per rank and epoch
    dataset.use_token_budget(costs, budget, window, collate)


def build_loader(
    shards: Optional[str] = None,
    *,
    batch_pairs: int,
    layout: Layout,
    tokenizer=None,
    remote: Optional[str] = None,
    shuffle: bool = True,
    seed: int = 1234,
    num_workers: int = 0,
    pin_memory: bool = False,
    record_ids: bool = False,
    sources: Optional[Sequence[Source]] = None,
    mixing: str = "random",
    tokens_per_batch: Optional[int] = None,
    collate: Optional[Callable[[list[dict]], dict]] = None,
) -> PairLoader:
    """Loader of packed batches for this rank (docs/loader.md).

    shards (+ remote): one source; or `sources`, a mixture (megajepa.data.mixture.Source).
    layout: the packer (megajepa.data.layout.Layout), the collate function.
    tokenizer: when given, every source's fingerprint must match it (FingerprintMismatch otherwise).
    mixing: streaming's batching_method (random: per record; stratified; per_stream: per batch).
    tokens_per_batch: cut micro-batches by this token budget instead of batch_pairs records.
    pin_memory: the DataLoader's pinning thread copies each batch to page-locked memory, from
        which the copy to a GPU is asynchronous (set on CUDA).
    collate: packs instead of `layout` (tests).
    """
    if sources is None:
        if shards is None:
            raise ValueError("give shards (one source) or sources (a mixture)")
        sources = [Source(shards=shards, remote=remote)]
    elif shards is not None or remote is not None:
        raise ValueError("give either shards/remote or sources, not both")
    check_sources(sources)
    if mixing not in MIXING:
        raise ValueError(f"mixing={mixing!r}: expected one of {', '.join(MIXING)}")
    if batch_pairs < 1:
        raise ValueError(f"batch_pairs must be at least 1, got {batch_pairs}")
    if tokens_per_batch is not None and tokens_per_batch < 1:
        raise ValueError(f"tokens_per_batch must be at least 1, got {tokens_per_batch}")
    set_stream_env()
    for source in sources:
        if source.remote is None or os.path.isdir(source.remote):
            _require_index(source.remote or source.shards)
        if tokenizer is not None:
            prepared = fingerprint.check_fingerprint(_fingerprint_dir(source), tokenizer)
            if layout is not None:
                layout.check_row_length(prepared, os.path.join(_fingerprint_dir(source), fingerprint.FINGERPRINT_FILE))

    with streaming_registration_lock():
        dataset = PairDataset(
            sources=sources,
            batch_size=batch_pairs,
            shuffle=shuffle,
            shuffle_seed=seed,
            batching_method=mixing,
        )
    collate_fn = SourceCollator(collate or layout, len(sources))
    # Each epoch's iterator draws its workers' base seed: from a generator of the loader's own, not
    # torch's global RNG, which the training step's dropout draws from (and a resume restores).
    options = dict(num_workers=num_workers, pin_memory=pin_memory, generator=torch.Generator().manual_seed(seed))
    if tokens_per_batch is not None:
        _token_budget_window(dataset, tokens_per_batch, layout, collate_fn)
        dataloader = _PairDataLoader(dataset, batch_size=None, collate_fn=_identity, **options)
    else:
        dataloader = _PairDataLoader(dataset, batch_size=batch_pairs, collate_fn=collate_fn, drop_last=True, **options)
    loader = PairLoader(dataloader, record_ids=record_ids)
    if tokens_per_batch is None and loader.batches_per_epoch == 0:
        names = ", ".join(s.shards for s in sources)
        raise ValueError(
            f"{names}: {dataset.size} records give this rank {len(dataset)} per epoch, fewer than "
            f"batch_pairs={batch_pairs}"
        )
    return loader
