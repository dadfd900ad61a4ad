"""`megajepa export`: ZeRO-3 checkpoint -> HF directory, online and EMA weights."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from _train_utils import demo_overrides, remark_complete, run_train
from megajepa.cli import main as cli
from megajepa.eval.data import load_eval_pairs
from megajepa.eval.latent import batch_metrics
from megajepa.eval.run import load_hf
from megajepa.export import ExportError, export
from megajepa.train.checkpoint import EMA_FILE

PAIRS = 8


@pytest.fixture(scope="module")
def ema_run(demo_data, tmp_path_factory):
    """3 steps with an mlp predictor head and an EMA target of momentum 0 (the EMA equals the
    online weights after every step), evaluated by the trainer on 2 batches."""
    out = tmp_path_factory.mktemp("ema-run")
    extra = {
        "train.steps": 3,
        "data.pairs_per_batch": PAIRS,
        "jepa.predictor": "mlp",
        "jepa.target": "ema",
        "jepa.ema.schedule": "constant",
        "jepa.ema.momentum_start": 0.0,
    }
    result = run_train(demo_overrides(demo_data, out, **extra), tmpdir=tmp_path_factory.mktemp("tmp"))
    assert result.returncode == 0, result.stderr[-5000:]
    return out


@pytest.fixture(scope="module")
def online_export(ema_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "online"
    assert cli(["export", str(ema_run), "--out", str(out)]) == 0
    return out


def _weights(hf_dir) -> dict:
    """The LM's and the predictor head's exported tensors, by name."""
    hf_dir = Path(hf_dir)
    head = {f"predictor.{k}": v for k, v in load_file(hf_dir / "predictor.safetensors").items()}
    return {**load_file(hf_dir / "model.safetensors"), **head}


def test_export_loads_with_transformers_and_reproduces_the_trainers_eval(online_export, ema_run, demo_data):
    model = AutoModelForCausalLM.from_pretrained(online_export)
    tokenizer = AutoTokenizer.from_pretrained(online_export)
    assert model.config.vocab_size == len(tokenizer)
    assert tokenizer.chat_template and "<|pred_0|>" in tokenizer.get_vocab()
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    saved = json.loads((online_export / "megajepa.json").read_text())
    assert saved["jepa"]["predictor"] == "mlp" and saved["weights"] == "online" and saved["step"] == 3
    assert set(load_file(online_export / "predictor.safetensors")) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert not any(k.startswith(("lm.", "predictor.")) for k in load_file(online_export / "model.safetensors"))

    # The trainer's held-out CE and JEPA loss (its first 2 eval batches), recomputed from the export.
    loaded = load_hf(str(online_export), torch.device("cpu"))
    pairs = load_eval_pairs(demo_data["eval_shards"], loaded.tokenizer, 2 * PAIRS)
    batches = [batch_metrics(loaded.model, pairs[i : i + PAIRS], loaded.pred_ids, 0) for i in (0, PAIRS)]
    summary = json.loads((ema_run / "summary.json").read_text())
    assert sum(b.ce_sum / b.tokens for b in batches) / 2 == pytest.approx(summary["eval_ce"], rel=1e-5)
    assert sum(b.latent_sum / PAIRS for b in batches) / 2 == pytest.approx(summary["eval_jepa"], rel=1e-4, abs=1e-6)


def test_exported_files_are_readable_by_all(online_export):
    modes = {path.name: path.stat().st_mode & 0o777 for path in online_export.iterdir()}
    assert modes and set(modes.values()) == {0o644}, modes


def test_ema_export_reads_the_ema_shards(ema_run, online_export, tmp_path):
    """At momentum 0 the EMA equals the online weights; scaling the saved EMA shows it is what
    is exported, in the flat (per sub-group) layout and in the per-parameter one."""
    online = _weights(online_export)
    ema = _weights(export(str(ema_run), str(tmp_path / "ema"), "ema"))
    assert ema.keys() == online.keys() and all(torch.equal(v, online[k]) for k, v in ema.items())

    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(ema_run / "checkpoints" / "step00000003", checkpoint)
    ema_path = checkpoint / EMA_FILE.format(rank=0)
    state = torch.load(ema_path, weights_only=True)
    assert state["layout"] == "flat"
    torch.save({**state, "ema": [2 * t for t in state["ema"]]}, ema_path)
    remark_complete(checkpoint)
    doubled = _weights(export(str(checkpoint), str(tmp_path / "doubled"), "ema"))
    assert all(torch.allclose(v, 2 * online[k]) for k, v in doubled.items())

    # per parameter, one rank: each slot is a whole parameter, in named_parameters order
    model_states = torch.load(next(checkpoint.glob("*_model_states.pt")), weights_only=False)
    shapes = {name: shape for group in model_states["param_shapes"] for name, shape in group.items()}
    flat = torch.cat([t.view(-1) for t in state["ema"]])
    slots, offset = {}, 0
    for name, shape in shapes.items():
        slots[name] = 3 * flat[offset : offset + shape.numel()]
        offset += shape.numel()
    names = list(reversed(slots))  # the file's order need not be DeepSpeed's
    torch.save({**state, "layout": "per_parameter", "names": names, "ema": [slots[n] for n in names]}, ema_path)
    remark_complete(checkpoint)
    tripled = _weights(export(str(checkpoint), str(tmp_path / "tripled"), "ema"))
    assert all(torch.allclose(v, 3 * online[k]) for k, v in tripled.items())


def test_export_refusals(ema_run, online_export, tmp_path, capsys):
    checkpoint = tmp_path / "no-ema"
    shutil.copytree(ema_run / "checkpoints" / "step00000003", checkpoint)
    (checkpoint / EMA_FILE.format(rank=0)).unlink()
    remark_complete(checkpoint)  # a complete checkpoint of a run without the EMA target
    with pytest.raises(ExportError, match="ema_rank0.pt: missing; --weights ema needs a run trained with jepa.target"):
        export(str(checkpoint), str(tmp_path / "out"), "ema")
    assert not (tmp_path / "out").exists()

    with pytest.raises(ExportError, match="not a megajepa checkpoint"):
        export(str(tmp_path), str(tmp_path / "out"))

    # an existing directory is kept unless --overwrite
    assert cli(["export", str(ema_run), "--out", str(online_export)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err

    other_tokenizer = tmp_path / "tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(online_export)
    tokenizer.add_tokens(["<|extra|>"])
    tokenizer.save_pretrained(other_tokenizer)
    with pytest.raises(ExportError, match="not the tokenizer .* was trained with"):
        export(str(ema_run), str(tmp_path / "out"), tokenizer_dir=str(other_tokenizer))
