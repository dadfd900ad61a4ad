"""One rank of the EMA teacher tests (run by tests/test_ema_target.py with RANK, WORLD_SIZE, ...).

Trains a tiny Llama JepaModel with DeepSpeed on CPU (gloo) for --steps steps, with two teachers:
layout "auto" and layout "per_parameter". It records, per rank, into --out/rank{r}.pt: the full fp32
master weights after every step (rank 0), both teachers' gathered weights and z_b, the batches,
collective calls counted during update() and during encode(), the save/load round trip, and what
the teachers report. The test process compares these with a plain single-process reference.
"""

import argparse
import json
import os
import warnings

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param

from _ranks import count_collectives
from _shards import pair_record

from megajepa.config import Config, DataConfig, EmaConfig, JepaConfig, ModelConfig
from megajepa.data.layout import Layout
from megajepa.bench.memory import teacher_state_bytes
from megajepa.jepa.ema_target import EmaTeacher, stack_teacher_rows
from megajepa.jepa.objective import JepaModel
from megajepa.model.build import build_model
from megajepa.train import ema_checkpoint
from megajepa.train.checkpoint import ResumePoint
from megajepa.train.deepspeed_json import online_config, teacher_config

VOCAB = 101
PRED_ID = VOCAB - 1
MODEL = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "tie_word_embeddings": True,
}
JEPA = JepaConfig(k=1, predictor="tokens", target="ema")
EMA = EmaConfig(schedule="cosine", momentum_start=0.5, momentum_end=0.9)
FROZEN = "lm.model.layers.1.mlp.down_proj.weight"  # not trained: the teacher copies it once


def make_batch(step: int, rank: int, pairs: int = 4) -> dict:
    g = torch.Generator().manual_seed(1000 * step + rank)
    view_a, view_b = [], []
    for _ in range(pairs):
        view_a.append(torch.randint(0, PRED_ID, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g))
        view_b.append(torch.randint(0, PRED_ID, (int(torch.randint(2, 10, (1,), generator=g)),), generator=g))
    layout = Layout(DataConfig(shards="", tokenizer="", row_length=48, max_length=0), JEPA, [PRED_ID], 0)
    return layout([{"sample_id": i, **pair_record(a.numpy(), b.numpy())} for i, (a, b) in enumerate(zip(view_a, view_b))])


def build(model_json: str, ds_config: dict, dtype: torch.dtype, seed: int) -> JepaModel:
    model_cfg = ModelConfig(config=model_json, attention="sdpa")
    return JepaModel(build_model(model_cfg, range(VOCAB), dtype=dtype, ds_config=ds_config, seed=seed), JEPA)


def full_ndim(param) -> int:
    return len(getattr(param, "ds_shape", param.shape))  # ZeRO-3 leaves param.data empty


def gathered(module) -> dict:
    params = dict(module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {name: p.detach().float().clone() for name, p in params.items()}


def masters(engine) -> dict:
    """The full fp32 master weights (the parameter itself where the optimizer has none)."""
    weights = gathered(engine.module)
    for name, param in engine.module.named_parameters():
        if param.requires_grad:
            weights[name] = safe_get_full_fp32_param(param).detach().clone()
    return weights


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--stage", type=int, default=3)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--persistence-threshold", type=int, default=100)
    parser.add_argument("--sub-group-size", type=int, default=10_000)
    args = parser.parse_args()

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model_json = os.path.join(args.out, "model.json")
    if rank == 0:
        with open(model_json, "w") as f:
            json.dump(MODEL, f)
    dist.barrier()

    cfg = Config()
    cfg.data.pairs_per_batch = 4
    cfg.optim.lr = 1e-2
    cfg.deepspeed.zero_stage = args.stage
    cfg.deepspeed.precision = args.precision
    cfg.deepspeed.param_persistence_threshold = args.persistence_threshold
    cfg.model.config = model_json
    ds_config = online_config(cfg, world, args.out)
    for section in ("tensorboard", "csv_monitor"):  # no logs (and no scheduler: a constant learning rate)
        ds_config.pop(section)
    ds_config["zero_optimization"]["sub_group_size"] = args.sub_group_size
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.precision]

    online = build(model_json, ds_config, dtype, seed=0)
    online.get_parameter(FROZEN).requires_grad_(False)
    # Two parameter groups, as the trainer makes (decay for matrices, none for vectors).
    matrices = [p for p in online.parameters() if full_ndim(p) >= 2 and p.requires_grad]
    vectors = [p for p in online.parameters() if full_ndim(p) < 2]
    groups = [{"params": matrices}, {"params": vectors, "weight_decay": 0.0}]
    engine, *_ = deepspeed.initialize(model=online, model_parameters=groups, config=ds_config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        teachers = {
            # seeded apart from the online model: the teacher must start as its copy all the same
            layout: EmaTeacher(engine, build(model_json, ds_config, dtype, seed=1), EMA, args.steps, teacher_config(ds_config), layout)
            for layout in ("auto", "per_parameter")
        }
    record = {
        "warnings": [str(w.message) for w in caught if "EMA teacher" in str(w.message)],
        "layouts": {k: t.layout for k, t in teachers.items()},
        "sub_groups": len(getattr(engine.optimizer, "fp16_groups", [])),
        "online_persistent": sorted(n for n, p in engine.module.named_parameters() if getattr(p, "ds_persist", False)),
        "teacher_persistent": sorted(
            n for t in teachers.values() for n, p in t.teacher_params.items() if getattr(p, "ds_persist", False)
        ),
        "memory": teacher_state_bytes(teachers["auto"]),
        "masters": [masters(engine)],
        "teacher": {k: [gathered(t.engine.module.model)] for k, t in teachers.items()},
        "z_b": {k: [] for k in teachers},
        "batches": [],
        "updates": {k: [] for k in teachers},
        "update_calls": [],
        "encode_calls": [],
    }

    for step in range(args.steps):
        batch = make_batch(step, rank)
        record["batches"].append(batch)
        with count_collectives() as calls:
            z_b = teachers["auto"].encode(batch)
        record["encode_calls"].append(list(calls))
        record["z_b"]["auto"].append(z_b.float())
        record["z_b"]["per_parameter"].append(teachers["per_parameter"].encode(batch).float())
        out = engine(batch, step=step, target_embeddings=z_b)
        engine.backward(out.loss)
        engine.step()
        with count_collectives() as calls:
            for layout, teacher in teachers.items():
                record["updates"][layout].append(teacher.update(step + 1))
        record["update_calls"].append(list(calls))
        record["masters"].append(masters(engine))
        for layout, teacher in teachers.items():
            record["teacher"][layout].append(gathered(teacher.engine.module.model))

    # A step's micro-batches (rows of other widths, a rank-dependent number of pairs) through one
    # teacher forward, as train_step runs them, against one forward per micro-batch.
    micro = [make_batch(args.steps + 10 + i, rank, pairs=2 + 3 * i + rank) for i in range(3)]
    record["micro_widths"] = [b["teacher_input_ids"].shape[1] for b in micro]
    with count_collectives() as calls:
        record["per_micro_z_b"] = [teachers["auto"].encode(b).float() for b in micro]
    record["per_micro_calls"] = list(calls)
    record["stacked_calls"] = {}
    for n in (1, 3):
        rows, pairs = stack_teacher_rows(micro[:n])
        with count_collectives() as calls:
            z_b = teachers["auto"].encode(rows)
        record["stacked_calls"][n] = list(calls)
    record["stacked_z_b"] = [z.float() for z in z_b.split(pairs)]

    # A second update without an optimizer step in between must change nothing.
    record["repeat_update"] = teachers["auto"].update(args.steps)

    # Save, train on (the EMA moves), load: the saved EMA and step come back exactly.
    teacher = teachers["auto"]
    checkpoint = os.path.join(args.out, "checkpoint")
    ema_checkpoint.save(teacher, checkpoint, rank)
    # DeepSpeed's checkpoint with the EMA shards beside it, for the consolidation tests
    engine.save_checkpoint(os.path.join(args.out, "ds"), tag="t")
    ema_checkpoint.save(teacher, os.path.join(args.out, "ds", "t"), rank)
    record["ds_checkpoint"] = os.path.join(args.out, "ds", "t")
    saved = ema_checkpoint.state_of(teacher)
    batch = make_batch(args.steps, rank)
    out = engine(batch, step=args.steps, target_embeddings=teacher.encode(batch))
    engine.backward(out.loss)
    engine.step()
    record["moved_update"] = teacher.update(args.steps + 1)
    record["moved_differs"] = any(not torch.equal(a, b) for a, b in zip(saved["ema"], ema_checkpoint.state_of(teacher)["ema"]))
    # the elastic path: this rank's partitions read back out of DeepSpeed's checkpoint and the shards
    if teacher.zero3:
        ema_checkpoint.reshard(teacher, ResumePoint(os.path.join(args.out, "ds"), "t"), world, args.steps)
        record["pieces_equal"] = all(torch.equal(a, b) for a, b in zip(saved["ema"], ema_checkpoint.state_of(teacher)["ema"]))
    ema_checkpoint.load(teacher, checkpoint, rank)
    loaded = ema_checkpoint.state_of(teacher)
    record["saved_step"], record["loaded_step"] = saved["step"], loaded["step"]
    record["loaded_equal"] = all(torch.equal(a, b) for a, b in zip(saved["ema"], loaded["ema"]))
    record["loaded_teacher"] = gathered(teacher.engine.module.model)
    record["checkpoint_files"] = sorted(os.listdir(checkpoint))
    if record["layouts"]["auto"] != record["layouts"]["per_parameter"]:
        try:
            ema_checkpoint.load(teachers["per_parameter"], checkpoint, rank)
        except ValueError as err:
            record["layout_mismatch_error"] = str(err)
    try:
        ema_checkpoint.load(teacher, os.path.join(args.out, "no-checkpoint"), rank)
    except FileNotFoundError as err:
        record["missing_error"] = str(err)
    teacher.total_steps += 1  # as when a run is resumed with more train.steps
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ema_checkpoint.load(teacher, checkpoint, rank)
    record["schedule_warnings"] = [str(w.message) for w in caught]

    torch.save(record, os.path.join(args.out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
