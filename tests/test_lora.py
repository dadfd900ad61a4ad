"""LoRA (model.lora.*) under DeepSpeed ZeRO-3 on two ranks: only the adapters train, export merges them."""

import json
import shutil

import pytest
import torch
from deepspeed.utils import zero_to_fp32
from safetensors.torch import load_file
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from _train_utils import demo_overrides, metrics, run_train
from megajepa.config import LoraConfig
from megajepa.export import export
from megajepa.model.lora import ALL_LINEAR, target_modules
from test_build import save_pretrained_tiny

RANK = 4
REFERENCE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def consolidated(checkpoints, tag: str) -> dict:
    return zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(checkpoints), tag=tag)


def plain_name(key: str) -> str:
    """A key of the trained JepaModel's LM as the pretrained model names it."""
    return key.removeprefix("lm.").replace(".base_layer.", ".")


@pytest.fixture(scope="module")
def lora_run(demo_data, tmp_path_factory):
    """6 steps of rank-4 LoRA on a saved tiny Llama, 2 ranks, ZeRO-3, checkpoints at 3 and 6."""
    root = tmp_path_factory.mktemp("lora")
    tokenizer = AutoTokenizer.from_pretrained(demo_data["tokenizer"])
    pretrained = save_pretrained_tiny(root / "pre", len(tokenizer))
    out = root / "run"
    extra = {
        "model.pretrained": root / "pre", "model.lora.rank": RANK, "train.steps": 6, "train.save_every": 3,
        "optim.lr": 1e-2, "optim.warmup_steps": 1, "deepspeed.zero_stage": 3,
        # Adapter dropout on, so the resume test also checks that a resumed run draws the
        # uninterrupted run's dropout masks (the RNG is restored after iter(loader) draws from it).
        "model.lora.dropout": 0.1,
    }
    result = run_train(demo_overrides(demo_data, out, **extra), root, nproc=2, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    base = {k: v.detach().clone() for k, v in pretrained.state_dict().items()}
    return out, base, extra


def test_only_the_adapters_train(lora_run):
    out, base, _ = lora_run
    early, late = consolidated(out / "checkpoints", "step00000003"), consolidated(out / "checkpoints", "step00000006")
    adapters = sorted(k for k in late if ".lora_" in k)
    assert len(adapters) == 2 * 2 * len(REFERENCE_TARGETS)  # A and B, 2 layers, the reference's 7 projections
    assert all(k.split(".")[-4] in REFERENCE_TARGETS for k in adapters)
    frozen = [k for k in late if ".lora_" not in k]
    compared = 0
    for key in frozen:
        torch.testing.assert_close(late[key], early[key], rtol=0, atol=0)  # not one step moved them
        if plain_name(key) in base:
            torch.testing.assert_close(late[key], base[plain_name(key)], rtol=0, atol=0)
            compared += 1
    assert compared >= len(frozen) - 1  # every base weight (an untied head may be absent from one side)
    for key in adapters:
        assert not torch.equal(late[key], early[key]), key  # every adapter moved between step 3 and 6
    assert all(late[k].abs().sum() > 0 for k in adapters if ".lora_B." in k)  # B starts at zero


def test_the_optimizer_holds_the_adapters_alone(lora_run):
    out, _, _ = lora_run
    tag_dir = out / "checkpoints" / "step00000006"
    states = zero_to_fp32.parse_model_states(zero_to_fp32.get_model_state_files(str(tag_dir)))
    optimized = [name for group in states[0].param_shapes for name in group]
    assert optimized and all(".lora_" in name for name in optimized)
    assert len(optimized) == 2 * 2 * len(REFERENCE_TARGETS)


def test_lora_training_lowers_the_loss(lora_run):
    out, _, _ = lora_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_ce"] < summary["start_eval_ce"]  # the same held-out batches, before and after
    rows = metrics(out)
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_export_merges_the_adapters(lora_run, tmp_path):
    out, base, _ = lora_run
    state = consolidated(out / "checkpoints", "step00000006")
    hf_dir = export(str(out), str(tmp_path / "hf"), dtype="fp32")
    exported = load_file(f"{hf_dir}/model.safetensors")
    assert not any("lora" in k or "base_layer" in k for k in exported)
    scale = 2.0 * RANK / RANK  # the reference's alpha = 2 x rank, over the rank
    merged = 0
    for key, weight in state.items():
        if ".lora_A." not in key:
            continue
        module = key.split(".lora_A.")[0]
        a, b = weight, state[f"{module}.lora_B.default.weight"]
        expected = state[f"{module}.base_layer.weight"] + scale * torch.einsum("or,ri->oi", b, a)
        torch.testing.assert_close(exported[plain_name(module) + ".weight"], expected, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(expected, base[plain_name(module) + ".weight"])  # the merge changed it
        merged += 1
    assert merged == 2 * len(REFERENCE_TARGETS)
    untouched = [k for k in exported if k.split(".")[-2] not in REFERENCE_TARGETS]
    for key in untouched:
        torch.testing.assert_close(exported[key], base[key], rtol=0, atol=0)


def test_lora_resumes_exactly(lora_run, demo_data, tmp_path):
    """Steps 4-6 resumed from the step-3 checkpoint (adapters, their optimizer state, the frozen
    base, the RNG that draws the adapters' dropout masks) give the uninterrupted run's losses."""
    out, _, extra = lora_run
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(out / "checkpoints" / "step00000003", resumed / "checkpoints" / "step00000003")
    (resumed / "checkpoints" / "latest").write_text("step00000003")
    overrides = demo_overrides(demo_data, resumed, **{**extra, "train.resume": "auto"})
    result = run_train(overrides, tmp_path, nproc=2, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    assert "at step 3" in result.stdout
    full = {r["step"]: r for r in metrics(out)}
    rows = metrics(resumed)
    assert [r["step"] for r in rows] == [4, 5, 6]
    for row in rows:
        for key in ("loss", "ce", "jepa"):
            assert row[key] == full[row["step"]][key], (row["step"], key)


# ------------------------------------------------------------------------------ target modules


def test_target_modules_follow_the_model():
    tiny_gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16))
    assert target_modules(tiny_gpt2, LoraConfig(rank=2)) == ALL_LINEAR  # no q_proj ...: every linear layer
    assert target_modules(tiny_gpt2, LoraConfig(rank=2, target_modules=["c_attn", "q_proj"])) == ["c_attn"]
    with pytest.raises(ValueError, match="model.lora.target_modules: none of \\['wq'\\]"):
        target_modules(tiny_gpt2, LoraConfig(rank=2, target_modules=["wq"]))
