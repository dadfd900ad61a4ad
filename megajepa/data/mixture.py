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
each batch carries `source_index` [N] (record order) with per-source counts; `per_source_ce` turns
per-token losses into per-source sums on the device, with no host synchronisation.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, is_dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence

if TYPE_CHECKING:  # torch and streaming load on first use: the config validates sources without them
    import torch
    from streaming import Stream

IGNORE_INDEX = -100
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


def per_source_sums(
    values: torch.Tensor, record_index: torch.Tensor, source_index: torch.Tensor, num_sources: int
) -> torch.Tensor:
    """Sum of `values` per source, [num_sources], on the values' device.

    values and record_index have the same shape; record_index is each position's record in the
    batch (-1: no record, e.g. padding), source_index [N] each record's source.
    """
    import torch

    valid = record_index >= 0
    source = torch.where(valid, source_index[record_index.clamp(min=0)], num_sources)  # bin S: none
    sums = torch.zeros(num_sources + 1, dtype=values.dtype, device=values.device)
    sums.index_add_(0, source.flatten(), torch.where(valid, values, 0).flatten().to(values.dtype))
    return sums[:num_sources]


def per_source_ce(
    token_ce: torch.Tensor,
    labels: torch.Tensor,
    record_index: torch.Tensor,
    source_index: torch.Tensor,
    num_sources: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE sum, labelled tokens) per source, both [num_sources] on the device.

    token_ce: the per-token CE, same shape as `labels` (any value where labels is IGNORE_INDEX);
    record_index: the batch's record index per token (the collator's pair_index), -1 on padding.
    The per-source mean is sum / tokens, once both are summed across ranks and steps.
    """
    import torch

    labelled = labels != IGNORE_INDEX
    index = torch.where(labelled, record_index, -1)
    sums = per_source_sums(token_ce.float(), index, source_index, num_sources)
    tokens = per_source_sums(labelled.float(), index, source_index, num_sources)
    return sums, tokens


SOURCE_PREFIX = "source/"


def source_step_values(
    names: Sequence[str], batch: dict, ce_sums: Optional[torch.Tensor] = None, ce_tokens: Optional[torch.Tensor] = None
) -> dict[str, torch.Tensor]:
    """One micro-step's per-source metrics as 0-d tensors (no host read), for the metrics logger:
    source/NAME/records, /pairs, /tokens (the batch's counts) and, given per_source_ce's output,
    /ce_sum and /ce_tokens. Sum them over a logging window and across ranks, then
    with_source_ce(row) adds source/NAME/ce = ce_sum / ce_tokens."""
    values = {}
    for i, name in enumerate(names):
        for key in ("records", "pairs", "tokens"):
            values[f"{SOURCE_PREFIX}{name}/{key}"] = batch[f"source_{key}"][i]
        if ce_sums is not None:
            values[f"{SOURCE_PREFIX}{name}/ce_sum"] = ce_sums[i]
            values[f"{SOURCE_PREFIX}{name}/ce_tokens"] = ce_tokens[i]
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
