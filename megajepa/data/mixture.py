"""Mixtures of shard directories (`data.sources`) and the per-source figures of a batch.

A source is one MDS shard directory (local, or `remote` with `shards` as its local cache) and at
most one weight, as mosaicml-streaming's `Stream` takes it:

    proportion  this source's share of an epoch (relative weights; streaming's epoch_size, when
                set, is the total, otherwise the sum of the sources' sizes)
    repeat      how many times its records are taken per epoch (2.5: every record twice, half of
                them a third time, a different half each epoch)
    choose      exactly this many of its records per epoch

Sources either all give a proportion or none does (streaming's rule). Each source becomes one
streaming `Stream`; StreamingDataset does the sampling, shuffling and resumption. How batches mix
the sources is streaming's `batching_method` (data.mixing): `random` mixes per record, `stratified`
gives every batch the sources in their epoch proportions, `per_stream` draws each batch (of every
rank) from one source.

Every record the loader yields carries `source_index` (its source's position in the list), and
each batch carries `source_index` [N] (record order) with per-source counts and, with several
sources, each labelled token's source (`ce_source`); the objective sums its per-token CE by source
on the device, and `source_step_values` / `with_source_ce` turn both into metrics.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, is_dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence

if TYPE_CHECKING:  # torch and streaming load on first use: the config validates sources without them
    import torch
    from streaming import Stream

MIXING = ("random", "stratified", "per_stream")


@dataclass
class Source:
    shards: str  # the MDS directory, or the local cache when `remote` is set
    remote: Optional[str] = None
    proportion: Optional[float] = None
    repeat: Optional[float] = None
    choose: Optional[int] = None
    name: Optional[str] = None  # for metrics; default: the directory's base name

    @property
    def label(self) -> str:
        return self.name or os.path.basename(os.path.normpath(self.remote or self.shards))


def sources_from_config(data: Any) -> list[Source]:
    """data.sources as Source objects; `data.shards` (+ `data.remote`) is the one-source shorthand."""
    if data.sources:
        return [Source(**(asdict(s) if is_dataclass(s) else dict(s))) for s in data.sources]
    return [Source(shards=data.shards, remote=data.remote)]


def check_sources(sources: Sequence[Source]) -> None:
    """Refuse what streaming would refuse later, naming data.sources[i]."""
    if not sources:
        raise ValueError("data.sources: no source given")
    weighted = [s.proportion is not None for s in sources]
    for i, source in enumerate(sources):
        where = f"data.sources[{i}] ({source.label})"
        given = [key for key in ("proportion", "repeat", "choose") if getattr(source, key) is not None]
        if len(given) > 1:
            raise ValueError(f"{where}: give at most one of proportion, repeat, choose (got {', '.join(given)})")
        for key in given:
            if getattr(source, key) < 0:
                raise ValueError(f"{where}: {key} must be >= 0, got {getattr(source, key)}")
    if any(weighted) and not all(weighted):
        missing = [i for i, w in enumerate(weighted) if not w]
        raise ValueError(
            f"data.sources[{missing[0]}]: when one source has a proportion, every source needs one "
            "(streaming weighs proportions against each other)"
        )
    labels = [s.label for s in sources]
    if len(set(labels)) != len(labels):
        raise ValueError(f"data.sources: names must differ (got {labels}); set `name` on each source")


def to_stream(source: Source) -> Stream:
    from streaming import Stream

    return Stream(
        remote=source.remote,
        local=source.shards,
        proportion=source.proportion,
        repeat=source.repeat,
        choose=source.choose,
    )


SOURCE_PREFIX = "source/"
SOURCE_COUNTS = ("records", "pairs", "tokens")  # a batch's source_records, source_pairs, source_tokens


def source_step_values(names: Sequence[str], counts: torch.Tensor, ce: Optional[torch.Tensor] = None) -> dict:
    """One step's per-source metrics for the metrics logger: source/NAME/records, /pairs, /tokens
    from `counts` [3, S] (host, the batches' source_records / source_pairs / source_tokens) and,
    given the objective's per-source CE [2, S] (device: sums, labelled tokens), /ce_sum and
    /ce_tokens as 0-d device tensors (no host read). Summed over a logging window and across ranks,
    with_source_ce(row) adds source/NAME/ce = ce_sum / ce_tokens."""
    values: dict = {}
    for i, name in enumerate(names):
        for j, key in enumerate(SOURCE_COUNTS):
            values[f"{SOURCE_PREFIX}{name}/{key}"] = float(counts[j, i])
        if ce is not None:
            values[f"{SOURCE_PREFIX}{name}/ce_sum"] = ce[0, i]
            values[f"{SOURCE_PREFIX}{name}/ce_tokens"] = ce[1, i]
    return values


def with_source_ce(row: dict[str, float]) -> dict[str, float]:
    """The row with source/NAME/ce, the per-source mean CE, wherever its sums are present (nan for
    a source with no labelled token in the window). Sums scaled alike (averaged over ranks) give
    the same mean."""
    out = dict(row)
    for key, total in row.items():
        if key.startswith(SOURCE_PREFIX) and key.endswith("/ce_sum"):
            tokens = row.get(key[: -len("ce_sum")] + "ce_tokens", 0.0)
            out[key[: -len("_sum")]] = total / tokens if tokens else float("nan")
    return out
