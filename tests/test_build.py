"""Building models: from a local pretrained directory, with [PRED] rows added sensibly."""

import json

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from _train_utils import demo_overrides, run_train
from megajepa.config import ModelConfig
from megajepa.model.build import build_model


def save_pretrained_tiny(path, vocab_size: int, embedding_std: float = 0.02) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, embedding_std)
    model.save_pretrained(path)
    return model


def test_pretrained_gets_new_rows_at_the_mean(demo_data, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(demo_data["tokenizer"])
    old_vocab = len(tokenizer) - 8  # as if the reserved [PRED] tokens were new to this model
    saved = save_pretrained_tiny(tmp_path / "pre", old_vocab)
    model = build_model(ModelConfig(config=None, pretrained=str(tmp_path / "pre")), tokenizer)
    weight = model.get_input_embeddings().weight.detach()
    old = saved.get_input_embeddings().weight.detach()
    assert weight.shape[0] == len(tokenizer)
    torch.testing.assert_close(weight[:old_vocab], old)
    new_rows = weight[old_vocab:]
    assert new_rows.abs().sum() > 0
    # sampled around the mean of the old rows, at a fraction of their spread
    assert (new_rows.mean(0) - old.mean(0)).norm() < old.std(0).norm()
    assert model.config.use_cache is False


def test_train_from_pretrained_under_zero3(demo_data, tmp_path):
    """Weights loaded shard by shard under ZeRO-3 are the pretrained ones: with embeddings of
    std 1 the CE starts far above the ln(V) of a fresh init."""
    tokenizer = AutoTokenizer.from_pretrained(demo_data["tokenizer"])
    save_pretrained_tiny(tmp_path / "pre", len(tokenizer), embedding_std=1.0)
    out = tmp_path / "run"
    overrides = demo_overrides(demo_data, out, **{"train.steps": 2, "model.pretrained": tmp_path / "pre"})
    result = run_train(overrides, tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["start_eval_ce"] > 3 * torch.log(torch.tensor(float(len(tokenizer)))).item()


def test_model_vocab_size_pads_the_embedding_and_head_beyond_the_tokenizer(demo_data):
    import pytest

    tokenizer = AutoTokenizer.from_pretrained(demo_data["tokenizer"])
    rows = len(tokenizer) + 77
    model = build_model(ModelConfig(vocab_size=rows), tokenizer)
    assert model.get_input_embeddings().num_embeddings == rows
    assert model.get_output_embeddings().out_features == rows
    ids = torch.tensor([tokenizer("(a|b)*")["input_ids"]])
    assert model(input_ids=ids).logits.shape[-1] == rows  # every row takes part in the softmax
    with pytest.raises(ValueError, match="model.vocab_size: .* cannot hold the tokenizer's"):
        build_model(ModelConfig(vocab_size=len(tokenizer) - 1), tokenizer)
