"""One gloo rank: a 3 x 4 linear model in a DeepSpeed ZeRO-3 engine with megajepa's DeepSpeed JSON
and learning-rate schedule, stepped by megajepa.train.step.train_step (test_update.py).

    python tests/_update_worker.py OUT.json optim.accumulate=sum optim.warmup_steps=0 ...

Writes {"lrs": the optimizer's lr before each step, "grad_norms": DeepSpeed's global grad norm
after each, "weight0": the initial weights, "weight1": after the first update, "inputs": the
micro-batches (x, y)} for the test's own dense computation."""

import json
import os
import sys

import deepspeed
import torch

from megajepa.config import load_config
from megajepa.jepa.objective import JepaOutput
from megajepa.train.deepspeed_json import online_config
from megajepa.train.lr_schedule import lr_scheduler
from megajepa.train.step import train_step

STEPS = 4


class Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(3, 4))

    def forward(self, batch, step, target_embeddings=None):
        loss = ((batch["x"] @ self.weight.T - batch["y"]) ** 2).mean()
        z = batch["x"][:, :3]
        return JepaOutput(loss=loss, ce=loss.detach(), jepa=loss.detach() * 0, lambda_=0.0, z_a=z, z_b=z)


def main(out: str, overrides: list[str]) -> None:
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"])
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    cfg = load_config("configs/demo.yaml", ["deepspeed.precision=fp32", "optim.weight_decay=0", *overrides])
    ds = online_config(cfg, 1, os.path.dirname(out), cuda=False)
    for section in ("tensorboard", "csv_monitor"):
        ds.pop(section)
    torch.manual_seed(0)
    model = Linear()
    weight0 = model.weight.detach().clone()
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=ds, lr_scheduler=lr_scheduler(cfg.optim, STEPS)
    )
    generator = torch.Generator().manual_seed(1)
    counts = {key: torch.tensor(1) for key in ("computed_tokens", "useful_tokens", "num_pairs")}
    inputs, lrs, grad_norms, weight1 = [], [], [], None
    for step in range(STEPS):
        batches = [
            {"x": torch.randn(cfg.data.pairs_per_batch, 4, generator=generator),
             "y": torch.randn(cfg.data.pairs_per_batch, 3, generator=generator), **counts}
            for _ in range(cfg.optim.grad_accum)
        ]
        inputs.append([(b["x"].tolist(), b["y"].tolist()) for b in batches])
        lrs.append(engine.get_lr()[0])
        train_step(engine, None, batches, step, accumulate=cfg.optim.accumulate)
        grad_norms.append(float(engine.get_global_grad_norm()))
        if weight1 is None:
            with deepspeed.zero.GatheredParameters([engine.module.weight]):
                weight1 = engine.module.weight.detach().clone()
    with open(out, "w") as f:
        json.dump({"lrs": lrs, "grad_norms": grad_norms, "weight0": weight0.tolist(),
                   "weight1": weight1.tolist(), "inputs": inputs}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
