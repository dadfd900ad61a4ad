"""Debug record of the data each rank consumed (data.record_ids_dir): tests check coverage with it."""

from __future__ import annotations

import json
import os


def record_step(directory: str, rank: int, step: int, loader, loss: float) -> None:
    """Append the sample ids this rank consumed in `step` and this rank's own loss (metrics.jsonl
    logs the mean over the ranks) to rank{rank}.jsonl."""
    os.makedirs(directory, exist_ok=True)
    ids = [i for batch_ids in loader.recorded_ids for i in batch_ids]
    loader.recorded_ids.clear()
    line = {"step": step, "sample_ids": ids, "loss": loss}
    with open(os.path.join(directory, f"rank{rank}.jsonl"), "a") as f:
        f.write(json.dumps(line) + "\n")
