"""Every supported Hugging Face causal-LM family is exact in the packed pass; the rest are refused.

The oracle is the model's own HF forward on each sequence alone (`model(input_ids)`: its logits
and hidden states). The packed pass is megajepa's: decoder_of(lm) on hand-packed rows with
attention_mask(batch, lm), lm_logits and lm_cross_entropy. fp32, dropout off.
"""

import json

import pytest
import torch

from _families import (
    FAMILIES, REFUSED, VOCAB, build, causal_lm_types, classify, oracle_pass, pack, packed_pass, tiny_spec, write_config,
)
from _ranks import run_worker
from megajepa.config import ModelConfig
from megajepa.model.build import check_architecture
from megajepa.model.attention import attention_mask
from megajepa.model.families import (
    TESTED_FAMILIES, UnsupportedArchitecture, check_supported, decoder_of, text_config, verified,
)

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


def test_gpt_neo_local_window_under_gradient_checkpointing(tmp_path):
    """Checkpointing recomputes each local layer in the backward with the same mask tensor: its
    packed mask and causal buffer again, so the gradients are the lone runs' (dropout off)."""
    spec = {**FAMILIES["gpt_neo"], "resid_dropout": 0.0, "embed_dropout": 0.0, "attention_dropout": 0.0}
    lm = build(tmp_path, "gpt_neo", spec=spec)
    lm.gradient_checkpointing_enable()
    lm.train()  # transformers checkpoints in training mode only
    packed = pack()
    packed_pass(lm, packed)[0].backward()
    checkpointed = {n: p.grad.clone() for n, p in lm.named_parameters()}
    lm.zero_grad(set_to_none=True)
    oracle_pass(lm, packed)[0].backward()
    for name, param in lm.named_parameters():
        torch.testing.assert_close(checkpointed[name], param.grad, rtol=1e-4, atol=1e-5, msg=name)
    assert all(m.bias.sum() < torch.ones_like(m.bias).tril().sum() for m in lm.modules() if getattr(m, "attention_type", "") == "local"
               and hasattr(m, "bias"))  # the model's own local buffer is back


def test_gemma3n_padding_gradients_are_finite(tmp_path):
    """The packed rows' padding id is gemma3n's pad id (0), whose embedding row is zero: fed as is,
    AltUp's sqrt(mean(x^2)) at 0 makes every gradient NaN although no output is read there;
    packed_input_ids feeds padding another token and the gradients are the lone runs'."""
    lm = build(tmp_path, "gemma3n_text").eval()
    packed = pack()
    assert lm.config.pad_token_id == 0 and (packed.batch["input_ids"][packed.batch["sequence"] == 0] == 0).all()
    raw = decoder_of(lm)(
        input_ids=packed.batch["input_ids"], position_ids=packed.batch["position_ids"],
        attention_mask=attention_mask(packed.batch, lm), use_cache=False,
    ).last_hidden_state
    raw[packed.batch["sequence"] != 0].sum().backward()
    assert not all(torch.isfinite(p.grad).all() for p in lm.parameters() if p.grad is not None)  # the cause
    lm.zero_grad(set_to_none=True)
    packed_pass(lm, packed)[0].backward()
    assert all(torch.isfinite(p.grad).all() for p in lm.parameters() if p.grad is not None)


def test_matrix_covers_the_tested_families():
    # the hand-tuned configs (fast, CI) are a subset; the rest is verified by the generated sweep (slow)
    from transformers import AutoConfig

    for spec in FAMILIES.values():
        args = dict(spec)
        assert verified(AutoConfig.for_model(args.pop("model_type"), **args)), spec["model_type"]


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


def test_gemma3_composite_builds_its_text_only_causal_lm(tmp_path):
    """Gemma3Config (the 4B/12B/27B checkpoints' config): sizes, windows and the refusal check read
    through its text config, and the model built is Gemma3ForCausalLM (AutoModelForCausalLM would
    build the image-text Gemma3ForConditionalGeneration); its packed pass is in the matrix above."""
    lm = build(tmp_path, "gemma3")
    assert type(lm).__name__ == "Gemma3ForCausalLM" and lm.config.model_type == "gemma3_text"
    assert lm.get_input_embeddings().num_embeddings == VOCAB and lm.config.sliding_window == FAMILIES["gemma3"]["text_config"]["sliding_window"]
    check_architecture(ModelConfig(config=write_config(tmp_path, "gemma3", FAMILIES["gemma3"])))
    (tmp_path / "composite").mkdir()
    json.dump({**FAMILIES["gemma3"], "architectures": ["Gemma3ForConditionalGeneration"]},
              open(tmp_path / "composite" / "config.json", "w"))
    with pytest.raises(UnsupportedArchitecture, match="composite gemma3 checkpoint"):
        check_architecture(ModelConfig(config=None, pretrained=str(tmp_path / "composite")))


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


# --- every causal-LM type transformers lists: exact, or refused by name ----------------------------

STATEFUL = ["mamba", "mamba2", "falcon_mamba", "falcon_h1", "bamba", "jamba", "zamba", "zamba2", "rwkv",
            "recurrent_gemma", "lfm2", "granitemoehybrid", "qwen3_next", "minimax", "cpmant", "doge"]


def tiny_or_default(model_type):
    """The tiny config, else the class's defaults, else None: transformers cannot construct even
    its own default config (gemma4_assistant in 5.25: hidden_size_per_layer_input must be 0), so a
    user cannot either and there is nothing for megajepa to build."""
    from transformers import AutoConfig

    try:
        spec = dict(tiny_spec(model_type))
        spec.pop("model_type")
        return AutoConfig.for_model(model_type, **spec)
    except Exception:  # noqa: BLE001 - a config class whose validators the generic shrink does not satisfy
        try:
            return AutoConfig.for_model(model_type)
        except Exception:  # noqa: BLE001
            return None


@pytest.mark.parametrize("model_type", STATEFUL)
def test_stateful_mixers_refused_by_name_even_when_allowed(model_type):
    """Recurrent, state-space, convolutional mixers and self-made masks are refused from what the
    architecture does, flag or not (these ran silently wrong or crashed before)."""
    with pytest.raises(UnsupportedArchitecture, match=f"model architecture {model_type}"):
        check_supported(tiny_or_default(model_type), allow_unverified=True)


def test_every_causal_lm_type_is_verified_or_refused_by_name():
    """From transformers' own mapping, config time only (meta device): a verified family builds,
    any other is refused with its model type named."""
    types = causal_lm_types()
    assert len(types) > 100 and set(TESTED_FAMILIES) <= set(types)
    for model_type in types:
        config = tiny_or_default(model_type)
        if config is None:
            assert model_type not in TESTED_FAMILIES
            continue
        if verified(config):  # a composite: as the text-only causal LM built from it
            check_supported(config)
            continue
        with pytest.raises(UnsupportedArchitecture) as err:
            check_supported(config)
        assert f"model architecture {config.model_type}" in str(err.value) or \
            f"model architecture {text_config(config).model_type}" in str(err.value)


def test_unverified_family_needs_the_flag(tmp_path):
    spec = tiny_spec("persimmon")
    with pytest.raises(UnsupportedArchitecture, match="persimmon: not in megajepa's verified matrix.*allow_unverified_family"):
        check_architecture(ModelConfig(config=write_config(tmp_path, "persimmon", spec)))
    check_architecture(ModelConfig(config=write_config(tmp_path, "persimmon", spec), allow_unverified_family=True))


@pytest.mark.slow
def test_every_causal_lm_type_exact_or_refused(tmp_path):
    """The full sweep (scripts/families_table.py writes README's table from the same function):
    each type transformers lists is exact against its own forward, or refused by name; exactly
    the exact ones are the verified matrix."""
    outcomes = {t: classify(tmp_path, t, compare) for t in causal_lm_types()}
    exact = {t for t, (outcome, _) in outcomes.items() if outcome == "exact"}
    expected = {t for t in outcomes if tiny_or_default(t) is not None and verified(tiny_or_default(t))}
    assert exact == expected, sorted(exact ^ expected)
