"""What the loader delivers to one rank, measured: `megajepa bench`'s loader figures.

    stats = loader_throughput(loader, batches=30)   # or seconds=10
"""

from __future__ import annotations

import os
import time
from typing import Optional

from tqdm import tqdm

from megajepa.data.layout import SEG_PAD
from megajepa.data.loader import PairLoader


def loader_throughput(loader: PairLoader, *, seconds: Optional[float] = None, batches: Optional[int] = None) -> dict:
    """What `loader` delivers to this rank, for `seconds` or `batches` (its batches from where it
    stands: one source or a mixture, by count or by token budget).

    pairs_per_s: records (pairs and texts) delivered per second.
    padding_fraction: row slots holding padding / all row slots (online and teacher rows).
    view_token_fraction: the layout's useful_tokens / computed_tokens.
    record_tokens_per_s: the records' `full` tokens delivered per second.
    """
    if (seconds is None) == (batches is None):
        raise ValueError("give exactly one of seconds or batches")
    records = useful = computed = padding = rows = count = record_tokens = 0
    start = time.perf_counter()
    with tqdm(total=batches, desc="loader", unit="batch", disable=int(os.environ.get("RANK", 0)) > 0) as bar:
        for batch in loader:
            count += 1
            records += len(batch["source_index"])
            record_tokens += int(batch["source_tokens"].sum())
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
        "pairs_per_s": records / elapsed,
        "tokens_per_s": computed / elapsed,
        "record_tokens_per_s": record_tokens / elapsed,
        "padding_fraction": padding / computed,
        "view_token_fraction": useful / computed,
        "rows_per_batch": rows / count,
        "last_epoch": loader.epoch,
    }
