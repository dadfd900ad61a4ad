"""`megajepa bench`: the reference layouts, the FLOPs count, and a tiny end-to-end run (about 60 s)."""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import numpy as np

from _records import expected_views, layout, make_records
from megajepa.bench.flops import FlopModel, attended_keys, batch_flops, peak_flops
from megajepa.bench.reference_layouts import pack_reference
from megajepa.config import JepaConfig
from megajepa.data.layout import SEG_PAD
from megajepa.jepa.objective import JepaModel
from megajepa.model.attention import MASK_KEYS, dense_mask

REPO = Path(__file__).resolve().parent.parent
VOCAB, K, HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS = 101, 2, 64, 96, 2, 4, 2


def tiny_lm(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).float()


def records(n: int, seed: int = 1, **kwargs):
    return make_records(n, seed, **kwargs)


def packer(**settings):
    return layout(row_length=128, **settings)[0]


def reference(recs, lay, kind, max_length=64):
    return pack_reference(recs, lay.data, lay.jepa, lay.pred_token_ids, lay.pad_token_id, kind, max_length)


@pytest.mark.parametrize("kind,rows_per_pair", [("ref3", 3), ("ref2", 2)])
def test_reference_rows_are_the_reference_sequences_padded(kind, rows_per_pair):
    recs = records(6, shared=True)  # views opening like the conversation: still whole rows of their own
    lay = packer()
    packed = lay(recs)
    ref = reference(recs, lay, kind)
    assert ref["input_ids"].shape == (rows_per_pair * len(recs), 64)
    assert int(ref["computed_tokens"]) == rows_per_pair * len(recs) * 64
    for key in ("useful_tokens", "num_pairs", "jepa_pairs", "sample_ids"):
        assert torch.equal(ref[key], packed[key]), key
    assert sorted(ref["ce_targets"].tolist()) == sorted(packed["ce_targets"].tolist())  # rows in another order
    pred = np.array(lay.pred_token_ids)
    want = [list(r["full"]) for r in recs]
    for r in recs:
        src, _, tgt, _ = expected_views(r, pred, lay.jepa, 0)
        want += [list(src), list(tgt)] if kind == "ref3" else [list(src) + list(tgt)]
    rows = sorted(ids[seg != SEG_PAD].tolist() for ids, seg in zip(ref["input_ids"], ref["segment"]))
    assert rows == sorted(want)
    assert not (ref["prefix_length"] > 0).any()


@pytest.mark.parametrize("kind", ["ref3", "ref2"])
def test_reference_layouts_give_the_packed_ce_and_embeddings(kind):
    recs = records(5, seed=4, shared=True)
    lay = packer()
    model = JepaModel(tiny_lm(), lay.jepa)
    with torch.no_grad():
        packed = model(lay(recs))
        ref = model(reference(recs, lay, kind))
    for name in ("ce", "z_a", "z_b", "jepa"):
        torch.testing.assert_close(getattr(ref, name), getattr(packed, name), atol=1e-5, rtol=1e-5, msg=name)


def test_reference_layout_keeps_dropout_and_refuses_what_it_cannot_lay_out():
    recs = records(20, seed=5)
    lay = packer(dropout=0.5)
    kept = lay(recs)["jepa_pairs"]
    ref = reference(recs, lay, "ref3")
    assert 0 < kept.numel() < len(recs)
    assert torch.equal(ref["jepa_pairs"], kept)
    assert ref["input_ids"].shape[0] == len(recs) + 2 * kept.numel()
    with pytest.raises(ValueError, match="exceeds max_length=16"):
        reference(recs, packer(), "ref2", max_length=16)
    with pytest.raises(ValueError, match="jepa.target=online"):
        reference(recs, packer(target="ema"), "ref3")


def test_attended_keys_by_hand_and_against_the_mask():
    one = {**records(1)[0], "full": np.array([1, 2, 5, 6, 7]), "prompt_len": 3}
    one.update(user=np.array([1, 2, 5]), user_insert=np.array([2, 3]), assistant=np.array([8, 9]),
               assistant_insert=np.array([0, 2]))
    batch = layout(row_length=16, row_multiple=0, k=1)[0]([one])
    # conversation 5 tokens: 15; user view [1 2 5 P] shares 3 tokens: its P sees 3 + 1 = 4;
    # assistant view 2 tokens: 3. Padding is not counted.
    assert attended_keys(batch["sequence"], batch["prefix_length"]) == 22
    lay = packer()
    recs = records(9, seed=6, shared=True)
    for batch in (lay(recs), reference(recs, lay, "ref2")):
        mask = dense_mask(*(batch[key] for key in MASK_KEYS))[:, 0]
        queries = (batch["segment"] != SEG_PAD)[:, :, None]
        assert attended_keys(batch["sequence"], batch["prefix_length"]) == int((mask & queries).sum())


def test_flops_formula_on_a_hand_computed_case():
    model = FlopModel(body_params=10, head_params=7, predictor_params=5, layers=2, attention_width=4)
    one = {**records(1)[0], "full": np.array([1, 2, 5, 6, 7]), "prompt_len": 3}
    one.update(user=np.array([1, 2, 5]), user_insert=np.array([2, 3]), assistant=np.array([8, 9]),
               assistant_insert=np.array([0, 2]))
    online = layout(row_length=16, row_multiple=0, k=1)[0]([one])
    # 8 tokens (conversation 5, the user view's [PRED] 1, the assistant view 2), 2 labelled
    # (the reply's two tokens), 1 JEPA pair, 22 attended keys
    assert batch_flops(online, model) == {
        "trained": 6 * 10 * 8 + 6 * 7 * 2 + 6 * 5 * 1 + 12 * 2 * 4 * 22,
        "teacher": 0,
        "total": 2676 + 30,
    }
    ema = layout(row_length=16, row_multiple=0, k=1, target="ema")[0]([one])
    # online: 6 tokens, 19 keys; teacher: the assistant view, 2 tokens, forward only, 3 keys
    flops = batch_flops(ema, model)
    assert flops["trained"] == 6 * 10 * 6 + 6 * 7 * 2 + 6 * 5 + 12 * 2 * 4 * 19
    assert flops["teacher"] == 2 * 10 * 2 + 4 * 2 * 4 * 3


def test_flop_model_counts_the_transformer_body():
    model = FlopModel.of(JepaModel(tiny_lm(), JepaConfig(k=K, predictor="mlp")))
    kv = HIDDEN // HEADS * KV_HEADS
    per_layer = 2 * HIDDEN * HIDDEN + 2 * HIDDEN * kv + 3 * HIDDEN * INTERMEDIATE + 2 * HIDDEN
    assert model.body_params == LAYERS * per_layer + HIDDEN  # + the final norm; tied embedding excluded
    assert model.head_params == VOCAB * HIDDEN
    assert model.predictor_params == 2 * (HIDDEN * 4 * HIDDEN) + 4 * HIDDEN + HIDDEN
    assert (model.layers, model.attention_width) == (LAYERS, HIDDEN)


@pytest.mark.parametrize(
    "name,precision,peak",
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989e12),
        ("NVIDIA H100 PCIe", "bf16", 756e12),
        ("NVIDIA H200", "bf16", 989e12),
        ("NVIDIA A100-SXM4-80GB", "fp16", 312e12),
        ("NVIDIA H100 NVL", "bf16", None),
        ("NVIDIA H100 80GB HBM3", "fp32", None),
        ("cpu (2 cores)", "bf16", None),
    ],
)
def test_peak_flops_table(name, precision, peak):
    assert peak_flops(name, precision) == peak


def test_regularizer_modes_are_jepa_with_the_term_and_not_run_by_default():
    from megajepa.bench.command import parse_args
    from megajepa.bench.modes import mode_config
    from megajepa.config import load_config

    cfg = load_config("configs/demo.yaml", [])
    for name in ("sigreg", "vicreg"):
        mode = mode_config(cfg, f"jepa-{name}", 5)
        assert mode.jepa.regularizer == name and mode.jepa.target == "online" and mode.jepa.views == "reference"
    assert mode_config(cfg, "jepa", 5).jepa.regularizer == "none"
    assert not {"jepa-sigreg", "jepa-vicreg"} & set(parse_args(["configs/demo.yaml"]).modes)


def test_bench_end_to_end_one_rank(demo_data, tmp_path):
    out = tmp_path / "bench"
    overrides = [
        f"data.embedded={demo_data['root']}",
        "data.shards=null",  # the training data as data.sources: the loader figures read them too
        f"data.sources=[{{shards: {demo_data['train_shards']}, name: chat}}]",
        f"data.eval_shards={demo_data['eval_shards']}",
        f"data.tokenizer={demo_data['tokenizer']}",
        "data.pairs_per_batch=4",
    ]
    command = [
        str(Path(sys.executable).parent / "megajepa"), "bench", "configs/demo.yaml", *overrides,
        "--nproc", "1", "--scaling", "1", "--steps", "2", "--warmup", "0", "--loader-batches", "2", "--out", str(out),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]

    assert "| mode | step time s" in result.stdout
    assert (out / "time_per_pair.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "bench.md").read_text().strip() in result.stdout
    report = json.loads((out / "bench.json").read_text())
    modes = report["modes"]
    assert list(modes) == ["ce", "jepa", "jepa-shared", "jepa-ema", "ref3", "ref2", "stp"]
    assert report["config"]["data"]["pairs_per_batch"] == 4 and report["versions"]["torch"] == torch.__version__
    assert report["order"] == ("sequence" if torch.cuda.is_available() else "alternate")
    assert report["loader"]["batches"] == 2 and report["loader"]["pairs_per_s_per_rank"][0] > 0
    # same init, same pairs: every layout computes the same CE and JEPA loss at the first step
    assert modes["jepa-shared"]["first_step"]["ce"] == pytest.approx(modes["ce"]["first_step"]["ce"], rel=1e-4)
    for name in ("jepa-ema", "ref3", "ref2"):
        assert modes[name]["first_step"]["ce"] == pytest.approx(modes["ce"]["first_step"]["ce"], rel=1e-4)
        assert modes[name]["first_step"]["jepa"] == pytest.approx(modes["jepa"]["first_step"]["jepa"], rel=1e-3)
    for name, mode in modes.items():
        assert mode["pairs_per_step"] == 4 and len(mode["step_seconds"]["all"]) == 2
        # the ratio from the raw step times: median step time per pair, over the ce mode's
        per_pair = lambda m: statistics.median(m["step_seconds"]["all"]) / m["pairs_per_step"]  # noqa: E731
        assert mode["time_per_pair_vs_ce"] == pytest.approx(per_pair(mode) / per_pair(modes["ce"]))
        assert mode["useful_tokens_per_step"] == modes["ce"]["useful_tokens_per_step"]
    assert modes["ref3"]["computed_tokens_per_step"] == 3 * 4 * 512
    assert modes["ref3"]["padding_fraction"] > 0.5 > modes["jepa"]["padding_fraction"]
    assert modes["jepa-ema"]["ema_update_seconds"] is not None and modes["jepa"]["ema_update_seconds"] is None
    assert modes["jepa-ema"]["flops_per_step"]["teacher"] > 0 == modes["jepa"]["flops_per_step"]["teacher"]
    state = report["scaling"]["1"]
    assert state["ema"] > 0 and state["teacher"] > 0 and state["optimizer"] >= 2 * state["parameters"]
    assert report["loader"]["batches"] == 2 and len(report["loader"]["pairs_per_s_per_rank"]) == 1


def test_bench_head_times_each_shape_both_ways(capsys):
    from megajepa.bench.command import main
    from megajepa.bench.head import SHAPES

    assert main(["head", "--steps", "1"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line[:3].strip("| ").isdigit()]
    assert [tuple(int(cell) for cell in row[:3]) for row in rows] == list(SHAPES)
    for row in rows:
        kept, recomputed = float(row[3]), float(row[4])
        assert kept > 0 and recomputed > 0
        assert float(row[5].strip(" x")) == pytest.approx(recomputed / kept, abs=0.01 + 0.05 * recomputed / kept)
