"""Every supported Hugging Face causal-LM family is exact in the packed pass; the rest are refused.

The oracle is the model's own HF forward on each sequence alone (`model(input_ids)`: its logits
and hidden states). The packed pass is megajepa's: decoder_of(lm) on hand-packed rows with
attention_mask(batch, lm), lm_logits and lm_cross_entropy. fp32, dropout off.
"""

import json

import pytest
import torch

from _families import FAMILIES, REFUSED, VOCAB, build, oracle_pass, pack, packed_pass, write_config
from _ranks import run_worker
from megajepa.config import ModelConfig
from megajepa.model.build import check_architecture
from megajepa.model.families import TESTED_FAMILIES, UnsupportedArchitecture, decoder_of

TOL = dict(rtol=1e-4, atol=1e-5)
# eager attention (additive mask) beside SDPA: gptj has no SDPA; gemma2 soft-caps attention
# scores only in eager and flex, so eager is where its attention soft-capping is checked.
EAGER = ("gptj", "gemma2", "llama", "opt")


def compare(lm, packed):
    lm.eval()  # dropout off
    loss, ce, hidden, logits = packed_pass(lm, packed)
    loss.backward()
    packed_grads = {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}
    lm.zero_grad(set_to_none=True)
    oracle_loss, oracle_ce, per_sequence = oracle_pass(lm, packed)
    oracle_loss.backward()
    oracle_grads = {n: p.grad for n, p in lm.named_parameters() if p.grad is not None}

    torch.testing.assert_close(ce, oracle_ce, **TOL)
    torch.testing.assert_close(loss, oracle_loss, **TOL)
    labels = packed.batch["labels"]
    offset = 0
    for (row, cols, _), (alone_hidden, alone_logits) in zip(packed.where, per_sequence):
        torch.testing.assert_close(hidden[row, cols], alone_hidden, **TOL)
        keep = labels[row, cols] != -100
        n = int(keep.sum())
        torch.testing.assert_close(logits[offset:offset + n], alone_logits[keep], **TOL)
        offset += n
    assert packed_grads.keys() == oracle_grads.keys() and packed_grads
    for name, grad in oracle_grads.items():
        # fp32 rounding scales with the gradient (gemma's embeddings are scaled by sqrt(d))
        atol = TOL["atol"] * max(1.0, grad.abs().max().item())
        torch.testing.assert_close(packed_grads[name], grad, rtol=TOL["rtol"], atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_packed_pass_equals_each_sequence_alone_sdpa(family, tmp_path):
    lm = build(tmp_path, family, attention="auto")  # auto on CPU: SDPA where the model has it
    assert lm.config._attn_implementation == ("sdpa" if transformers_accepts(family, "sdpa") else "eager")
    compare(lm, pack())


@pytest.mark.parametrize("family", EAGER)
def test_packed_pass_equals_each_sequence_alone_eager(family, tmp_path):
    lm = build(tmp_path, family, attention="eager")
    assert lm.config._attn_implementation == "eager"
    compare(lm, pack(seed=1))


def test_window_is_applied(tmp_path):
    """The matrix can fail: the same mistral without its window in the mask is not exact."""
    lm = build(tmp_path, "mistral").eval()
    packed = pack()
    _, _, hidden, _ = packed_pass(lm, packed)
    lm.config.sliding_window = None  # the mask now drops the window; the lone runs below keep it
    _, _, unwindowed, _ = packed_pass(lm, packed)
    lm.config.sliding_window = FAMILIES["mistral"]["sliding_window"]
    _, _, per_sequence = oracle_pass(lm, packed)
    row, cols, _ = packed.where[3]  # D: 15 tokens, window 4
    torch.testing.assert_close(hidden[row, cols], per_sequence[3][0], **TOL)
    assert (unwindowed[row, cols] - per_sequence[3][0]).abs().max() > 1e-2


def test_matrix_covers_the_tested_families():
    assert {spec["model_type"] for spec in FAMILIES.values()} == set(TESTED_FAMILIES)


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_alibi_families_refused_by_name(family, tmp_path):
    spec = REFUSED[family]
    with pytest.raises(UnsupportedArchitecture, match=f"model architecture {spec['model_type']}.*ALiBi"):
        check_architecture(ModelConfig(config=write_config(tmp_path, family, spec)))  # config alone
    with pytest.raises(UnsupportedArchitecture, match=f"model architecture {spec['model_type']}.*ALiBi"):
        build(tmp_path, family, spec=spec)


def transformers_accepts(family: str, implementation: str) -> bool:
    """Whether transformers itself builds `family` with this attention (its own check, on the meta device)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(FAMILIES[family])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    try:
        with torch.device("meta"):
            AutoModelForCausalLM.from_config(config, attn_implementation=implementation)
    except (ValueError, ImportError):
        return False
    return True


def test_explicit_attention_the_model_lacks_is_refused(tmp_path):
    lacking = [f for f in sorted(FAMILIES) if not transformers_accepts(f, "sdpa")]
    if not lacking:
        pytest.skip("every family of the matrix has SDPA in this transformers")
    with pytest.raises(UnsupportedArchitecture, match="model.attention=sdpa: .* does not support sdpa"):
        build(tmp_path, lacking[0], attention="sdpa")


def test_decoder_of_gemma3_is_its_text_model(tmp_path):
    lm = build(tmp_path, "gemma3_text")
    assert decoder_of(lm) is lm.model  # transformers 4.57's base_model was the CausalLM itself here


def test_phi3_default_pad_id_outside_the_vocabulary(tmp_path):
    lm = build(tmp_path, "phi3")
    assert FAMILIES["phi3"].get("pad_token_id") is None and lm.config.pad_token_id is None
    assert lm.get_input_embeddings().num_embeddings == VOCAB


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "qwen2"])
def test_packed_pass_flex_attention_forward(family, tmp_path):
    """FlexAttention on CPU (compiled by transformers: about 25 s a model): the packed forward
    with the BlockMask equals each sequence alone through the SDPA forward."""
    lm = build(tmp_path, family).eval()
    packed = pack(width=128)  # one FlexAttention tile
    with torch.no_grad():
        _, _, per_sequence = oracle_pass(lm, packed)
        lm.set_attn_implementation("flex_attention")
        _, _, hidden, _ = packed_pass(lm, packed)
    for (row, cols, _), (alone_hidden, _) in zip(packed.where, per_sequence):
        torch.testing.assert_close(hidden[row, cols], alone_hidden, rtol=1e-4, atol=1e-4)


def run_two_ranks(out, families) -> list[dict]:
    run_worker("_families_worker.py", out, 2, "--families", *families, timeout=900.0)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def check_zero3(records, families):
    for rank, record in enumerate(records):
        assert list(record) == list(families), f"rank {rank} stopped early"
        for family, got in record.items():
            assert "error" not in got, f"rank {rank}, {family}:\n{got.get('error')}"
            # init really ran on the partitioned weights: the config's spread, the pad row zero
            assert 0.8 < got["embedding_std"] / got["initializer_range"] < 1.2, (family, got)
            assert got["pad_row_max"] in (None, 0.0), (family, got)
            # the packed pass on the sharded model equals each sequence alone on it
            assert abs(got["loss"] - got["oracle_loss"]) <= 1e-4 * (1 + abs(got["oracle_loss"])), (family, got)
            assert got["loss_after_step"] < got["loss"], (family, got)  # the step trained something
    assert records[0] == {f: {**r, "seconds": records[0][f]["seconds"]} for f, r in records[1].items()}


def test_zero3_build_and_step_two_ranks_every_family(tmp_path):
    """One 2-rank ZeRO-3 job for the whole matrix (about 1.5 s a family after start-up)."""
    families = sorted(FAMILIES)
    check_zero3(run_two_ranks(tmp_path, families), families)


@pytest.mark.parametrize("family, on_cuda", [("llama", True), ("gemma2", True), ("gemma2", False), ("gpt2", True), ("llama", False)])
def test_auto_attention_picks_what_the_model_supports_and_says_so(family, on_cuda, monkeypatch, caplog):
    from transformers import AutoConfig

    from megajepa.model import families

    preference = (["flex_attention"] if on_cuda else []) + ["sdpa"]
    expected = next((impl for impl in preference if transformers_accepts(family, impl)), "eager")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: on_cuda)
    monkeypatch.setattr(families, "_announced", set())
    spec = dict(FAMILIES[family])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    with caplog.at_level("INFO", logger="megajepa.model.families"):
        assert families.attention_implementation("auto", config) == expected
        assert families.attention_implementation("auto", config) == expected
    said = [r.getMessage() for r in caplog.records if "model.attention=auto" in r.getMessage()]
    assert said == [f"model.attention=auto: {config.model_type} uses {expected} attention"]
