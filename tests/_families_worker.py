"""One rank of the 2-rank ZeRO-3 family check (run by tests/test_families.py with RANK, WORLD_SIZE, ...).

For each family: random init under zero.Init (pad ids included), the init really ran (embedding
spread near initializer_range, the pad row zero), the packed pass equals each sequence alone on
the sharded model, and one optimizer step through a DeepSpeed engine lowers the packed loss on
that batch. Writes --out/rank{r}.json: family -> what was measured, or the error.
"""

import argparse
import json
import os
import time
import traceback
import warnings
from pathlib import Path

import deepspeed
import torch
from torch import nn

from _families import FAMILIES, build, oracle_pass, pack, packed_pass
from megajepa.model.head import register_head

DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 1,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
    "steps_per_print": 1 << 30,
}


class PackedLoss(nn.Module):
    """The engine's module: the packed loss, computed inside its forward as JepaModel does (the
    CE reads the head's weight directly: registered, it is gathered for this forward)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        register_head(self, lm)

    def forward(self, packed):
        return packed_pass(self.lm, packed)[0]


def check(family: str, tmp: Path) -> dict:
    started = time.monotonic()
    lm = build(tmp, family, ds_config=DS_CONFIG)
    embedding = lm.get_input_embeddings().weight
    with deepspeed.zero.GatheredParameters([embedding]):
        full = embedding.detach().clone()
    pad = lm.config.pad_token_id
    record = {
        "embedding_std": full.std().item(),
        "initializer_range": getattr(lm.config, "initializer_range", 0.02),
        "pad_token_id": pad,
        "pad_row_max": None if pad is None else full[pad].abs().max().item(),
    }
    packed = pack()
    engine, *_ = deepspeed.initialize(model=PackedLoss(lm), config=DS_CONFIG, model_parameters=lm.parameters())
    engine.eval()  # dropout off; gradients still flow
    with torch.no_grad():
        record["oracle_loss"] = oracle_pass(lm, packed)[0].item()
    loss = engine(packed)
    record["loss"] = loss.item()
    engine.backward(loss)
    engine.step()
    with torch.no_grad():
        record["loss_after_step"] = engine(packed).item()
    engine.destroy()
    record["seconds"] = time.monotonic() - started
    return record


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--families", nargs="+", default=sorted(FAMILIES))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    deepspeed.init_distributed(dist_backend="gloo")
    rank = int(os.environ["RANK"])
    tmp = Path(args.out) / f"configs{rank}"
    tmp.mkdir(parents=True, exist_ok=True)
    results = {}
    for family in args.families:
        try:
            results[family] = check(family, tmp)
        except Exception:  # noqa: BLE001 - recorded per family, the test names it
            results[family] = {"error": traceback.format_exc()[-3000:]}
            break  # the other rank may be stuck in a collective: stop here
    with open(Path(args.out) / f"rank{rank}.json", "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
