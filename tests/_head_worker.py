"""One rank of the ZeRO-3 LM-head tests (run by tests/test_head_zero3.py with RANK, WORLD_SIZE, ...).

Trains a tiny Llama JepaModel (CE only: jepa.lambda 0) with DeepSpeed ZeRO-3 on CPU (gloo), each
rank on its own record whose assistant view has --labels[step][rank] tokens, so that the ranks'
label counts differ and the CE runs a different number of chunks on each. Per step it records the
batch, the gathered weights before the step, the CE of an eval forward (no_grad) and of the
training forward, the full reduced gradients, the collectives each of those issued, and which CE
path ran; at the end, what the CE says when called outside a module that gathers the head. With
--liger-on-cpu, Liger-Kernel's fused CE runs on the CPU (Triton's interpreter); on a GPU (NCCL) it
runs where it is installed. Writes --out/rank{r}.pt; the test computes the dense oracle from it.
"""

import argparse
import datetime
import json
import os

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad

from _ranks import count_collectives
from _shards import pair_record

from megajepa.config import Config, DataConfig, JepaConfig, ModelConfig
from megajepa.data.layout import Layout
from megajepa.jepa.objective import JepaModel
from megajepa.model import head
from megajepa.model.build import build_model
from megajepa.train.deepspeed_json import online_config

JEPA = JepaConfig(k=1, predictor="tokens", lambda_=0.0)  # the loss is the CE alone
USER_TOKENS = 7


def model_spec(vocab: int) -> dict:
    return {
        "model_type": "llama", "vocab_size": vocab, "hidden_size": 16, "intermediate_size": 32,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
        "max_position_embeddings": 4096, "tie_word_embeddings": False,
    }  # fmt: skip


def make_batch(vocab: int, labels: int, step: int, rank: int) -> dict:
    """One record whose conversation has `labels` assistant tokens (the CE's labelled tokens)."""
    rng = np.random.default_rng(100 * step + rank)
    user, assistant = (rng.integers(0, vocab - 1, size=n) for n in (USER_TOKENS, labels))
    layout = Layout(DataConfig(shards="", tokenizer="", row_length=4 * (USER_TOKENS + labels), max_length=0), JEPA, [vocab - 1], 0)
    return layout([{"sample_id": 0, **pair_record(user, assistant)}])


def gathered(module) -> dict:
    params = dict(module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {name: p.detach().clone() for name, p in params.items()}


class PathSpy:
    """Wraps head.ce_path and Liger's function: which path each CE call took, and the
    accumulation dtype Liger was given."""

    def __init__(self):
        self.paths, self.accum_dtypes = [], []
        choose, liger = head.ce_path, head._liger

        def ce_path(lm, hidden):
            path = choose(lm, hidden)
            self.paths.append(path)
            return path

        def fused(*args, **kwargs):
            self.accum_dtypes.append(str(kwargs.get("accum_dtype")))
            return liger()(*args, **kwargs)

        head.ce_path = ce_path
        head._liger = lambda: fused if liger() is not None else None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--vocab", type=int, required=True)
    parser.add_argument("--labels", nargs="+", required=True, help="per step: the ranks' label counts, e.g. 400,600")
    parser.add_argument("--liger-on-cpu", action="store_true")
    args = parser.parse_args()

    # a rank left waiting in a collective the other never issues fails in minutes, not gloo's 30
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=300))
    rank, world = dist.get_rank(), dist.get_world_size()
    model_json = os.path.join(args.out, "model.json")
    if rank == 0:
        with open(model_json, "w") as f:
            json.dump(model_spec(args.vocab), f)
    dist.barrier()
    if args.liger_on_cpu:
        head.FUSED_DEVICE_TYPES = ("cpu",)  # Triton's interpreter runs Liger's kernels on CPU tensors
    spy = PathSpy()

    cfg = Config()
    cfg.data.pairs_per_batch = 1
    cfg.optim.lr = 1e-2
    cfg.deepspeed.zero_stage = 3
    cfg.deepspeed.precision = "fp32"
    cfg.deepspeed.param_persistence_threshold = 0  # every parameter partitioned, the head included
    cfg.model.config = model_json
    ds_config = online_config(cfg, world, args.out)
    for section in ("scheduler", "tensorboard", "csv_monitor"):
        ds_config.pop(section, None)
    lm = build_model(ModelConfig(config=model_json, attention="sdpa"), range(args.vocab), ds_config=ds_config)
    engine, *_ = deepspeed.initialize(model=JepaModel(lm, JEPA), model_parameters=lm.parameters(), config=ds_config)
    weight = engine.module.lm.get_output_embeddings().weight

    record = {"vocab": args.vocab, "steps": []}
    for step, counts in enumerate(args.labels):
        batch = make_batch(args.vocab, int(counts.split(",")[rank]), step, rank)
        entry = {"batch": batch, "labels": batch["ce_index"].numel(), "weights": gathered(engine.module)}
        batch = {key: value.to(engine.device) for key, value in batch.items()}
        entry["head_partitioned"] = weight.numel() == 0
        spy.paths.clear()
        engine.eval()
        with torch.no_grad(), count_collectives(with_sizes=True) as calls:
            entry["eval_ce"] = engine(batch, step=step).ce
        entry["eval_calls"] = list(calls)
        engine.train()
        with count_collectives(with_sizes=True) as calls:
            out = engine(batch, step=step)
            engine.backward(out.loss)
        entry["grads"] = {n: safe_get_full_grad(p) for n, p in engine.module.named_parameters()}  # collectives too
        with count_collectives(with_sizes=True) as step_calls:
            engine.step()
        entry["train_calls"] = calls + step_calls
        entry["ce"] = out.ce
        entry["paths"] = list(spy.paths)
        record["steps"].append(entry)
    record["accum_dtypes"] = spy.accum_dtypes
    try:
        one = torch.zeros(1, dtype=torch.long, device=engine.device)
        head.lm_cross_entropy(engine.module.lm, torch.zeros(1, 16, device=engine.device), one)
    except RuntimeError as error:
        record["outside_error"] = str(error)
    torch.save(record, os.path.join(args.out, f"rank{rank}.pt"))


if __name__ == "__main__":
    main()
