"""One rank of tests/test_regularizers.py's 2-rank check (RANK, WORLD_SIZE, ... set by run_worker).

Every rank builds the same records (x_a, x_b: [N, 5]) and the same linear encoder; rank r takes
its rows of --split (one rank may take none). Per regulariser: the value over the global batch,
the encoder's gradient as data parallelism sees it (the ranks' gradients averaged), and the
collectives the forward and backward issued; and the collapse report of the encoded rows.
Writes --out/rank{r}.pt.
"""

import argparse
import os

import torch

from _ranks import count_collectives
from megajepa import dist
from megajepa.jepa.collapse import collapse_report
from megajepa.jepa.regularizers import regularizer

N, D_IN, D = 14, 5, 6
STEP, PROJECTIONS = 3, 8


def records() -> tuple[torch.Tensor, torch.Tensor, torch.nn.Linear]:
    g = torch.Generator().manual_seed(0)
    x_a, x_b = torch.randn(N, D_IN, generator=g), torch.randn(N, D_IN, generator=g)
    encoder = torch.nn.Linear(D_IN, D)
    with torch.no_grad():
        encoder.weight.copy_(torch.randn(D, D_IN, generator=g))
        encoder.bias.copy_(torch.randn(D, generator=g))
    return x_a, x_b, encoder


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--split", required=True, help="rows per rank, e.g. 5,9")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.rank(), dist.world_size()
    sizes = [int(s) for s in args.split.split(",")]
    assert len(sizes) == world and sum(sizes) == N
    start = sum(sizes[:rank])
    rows = slice(start, start + sizes[rank])
    x_a, x_b, encoder = records()
    record = {}
    for name in ("sigreg", "vicreg"):
        encoder.zero_grad()
        with count_collectives(with_sizes=True) as calls:
            value = regularizer(name, encoder(x_a[rows]), encoder(x_b[rows]), STEP, PROJECTIONS)
            value.backward()
        grads = torch.cat([encoder.weight.grad.flatten(), encoder.bias.grad])
        record[name] = {
            "value": value.item(),
            "grad": dist.all_reduce(grads.clone()) / world,  # what DeepSpeed's data parallelism applies
            "collectives": list(calls),
        }
    with torch.no_grad():
        record["collapse"] = collapse_report(encoder(x_a[rows]), encoder(x_b[rows]))
    torch.save(record, os.path.join(args.out, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
