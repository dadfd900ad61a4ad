"""One rank of tests/test_mixtures.py's two-rank test: a token-budget mixture loader.

Records, as JSON: the `source` strings of every micro-batch of one epoch ("epoch"), the window
size, the first --head micro-batches of a second loader and its state after them ("head",
"state"); with --resume-from, what a third loader yields after loading that state ("resumed").
"""

import argparse
import json
import os

import torch.distributed as dist

from megajepa.data.loader import build_loader
from megajepa.data.mixture import Source
from _mixture_shards import make_layout, summary_collate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)  # a directory: rank r writes rank{r}.json
    parser.add_argument("--sources", nargs="+", required=True)
    parser.add_argument("--budget", type=int, required=True)
    parser.add_argument("--head", type=int, required=True)
    parser.add_argument("--resume-from")
    args = parser.parse_args()
    dist.init_process_group("gloo")

    def loader():
        sources = [Source(shards=d, name=os.path.basename(d)) for d in args.sources]
        layout = make_layout()
        return build_loader(
            sources=sources, batch_pairs=4, layout=layout, collate=summary_collate, seed=7,
            tokens_per_batch=args.budget,
        )

    full = loader()
    result = {"epoch": [b["sources"] for b in full.iter_epoch()], "window": full.dataset.batch_size}
    head = loader()
    result["head"] = []
    for step, batch in enumerate(head, 1):
        result["head"].append(batch["sources"])
        if step == args.head:
            break
    result["state"] = head.state_dict()
    if args.resume_from:
        resumed = loader()
        with open(args.resume_from) as f:
            resumed.load_state_dict(json.load(f))
        result["resumed"] = [b["sources"] for b in resumed.iter_epoch()]
    with open(os.path.join(args.out, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
