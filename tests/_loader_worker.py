"""One rank of the multi-process loader tests (run by tests/test_loader.py with RANK, WORLD_SIZE, ...).

Records, as JSON: the sample_ids of every batch of one epoch ("epoch"); the first --head batches of
a second loader and its state_dict after them ("head", "state"); with --resume-from, the batches a
third loader yields after loading that state ("resumed"). Like a trainer, it initializes
torch.distributed (gloo) before building any loader.
"""

import argparse
import json
import os

import torch.distributed as dist

from megajepa.data.loader import build_loader
from _mixture_shards import make_layout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", required=True)
    parser.add_argument("--out", required=True)  # a directory: rank r writes rank{r}.json
    parser.add_argument("--batch-pairs", type=int, required=True)
    parser.add_argument("--head", type=int, required=True)
    parser.add_argument("--resume-from")
    args = parser.parse_args()

    dist.init_process_group("gloo")

    def loader():
        return build_loader(args.shards, batch_pairs=args.batch_pairs, layout=make_layout(), seed=7, record_ids=True)

    result = {}
    full = loader()
    for _ in full.iter_epoch():
        pass
    result["epoch"] = full.recorded_ids

    head = loader()
    for step, _ in enumerate(head, 1):
        if step == args.head:
            break
    result["head"] = head.recorded_ids
    result["state"] = head.state_dict()

    if args.resume_from:
        resumed = loader()
        with open(args.resume_from) as f:
            resumed.load_state_dict(json.load(f))
        for _ in resumed.iter_epoch():
            pass
        result["resumed"] = resumed.recorded_ids

    with open(os.path.join(args.out, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
