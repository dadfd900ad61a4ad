"""One job of test_loader's concurrent-start test: waits for the go file, builds a loader on the
shards (as a one-rank job of its own), reads one batch.

    --no-lock   build it without megajepa's registration lock
    --widen     sleep 0.1 s after each of streaming's searches for a free shared-memory prefix,
                before it creates one (fault injection: the race window, made wide enough to hit)

It keeps the loader (and so its shared memory) alive for 3 s after the batch, as a training job
would, so that a job that starts later cannot take a prefix an earlier one already gave back.
"""

import contextlib
import sys
import time
from pathlib import Path

from streaming.base.shared import prefix

from megajepa.data import loader as loader_module
from _mixture_shards import make_layout

shards, go = sys.argv[1], Path(sys.argv[2])
if "--no-lock" in sys.argv:
    loader_module.streaming_registration_lock = contextlib.nullcontext
if "--widen" in sys.argv:
    search = prefix._check_and_find_retrying

    def slow_search(*args, **kwargs):
        found = search(*args, **kwargs)
        time.sleep(0.1)
        return found

    prefix._check_and_find_retrying = slow_search
while not go.exists():
    time.sleep(0.001)
loader = loader_module.build_loader(shards, batch_pairs=4, layout=make_layout())
next(iter(loader.iter_epoch()))
time.sleep(3)
