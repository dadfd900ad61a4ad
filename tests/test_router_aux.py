"""A mixture-of-experts family trains its router's load-balancing loss as its own forward adds it.

The oracle is the model's own HF forward with output_router_logits=True on the batch of every
sequence the packed rows hold, each whole (a tail with the prefix it shares), right-padded, with
its 2D attention mask: its `aux_loss`, and `router_aux_loss_coef * aux_loss` in the loss.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _families import FAMILIES, VOCAB, oracle_router_aux, pack, tiny_spec, write_config
from _records import expected_views, layout, make_records
from megajepa.config import JepaConfig, ModelConfig
from megajepa.jepa.objective import JepaModel
from megajepa.model.attention import MASK_KEYS, attention_mask
from megajepa.model.build import build_model
from megajepa.model.families import decoder_of
from megajepa.model.router_aux import load_balancing_function, router_aux_coef, router_aux_loss, sequences_holding

# hand-tuned configs, then generated ones (tiny_spec) of the families with a load-balancing loss
MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "ernie4_5_moe", "flex_olmo", "flint", "gpt_oss", "granitemoe", "jetmoe",
       "olmoe", "phimoe")


def build(tmp_path, family, coef=None):
    spec = FAMILIES[family] if family in FAMILIES else tiny_spec(family)
    cfg = ModelConfig(config=write_config(tmp_path, family, spec), router_aux_loss_coef=coef, allow_unverified_family=True)
    return build_model(cfg, range(VOCAB), dtype=torch.float32, seed=0)


def grads(lm, loss):
    lm.zero_grad(set_to_none=True)
    loss.backward()
    out = {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}
    lm.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("family", MOE)
def test_router_aux_equals_the_models_own_forward(family, tmp_path):
    lm = build(tmp_path, family).eval()
    packed = pack()
    batch = packed.batch
    out = decoder_of(lm)(
        input_ids=batch["input_ids"], position_ids=batch["position_ids"],
        attention_mask=attention_mask(batch, lm), use_cache=False, output_router_logits=True,
    )
    ours = router_aux_loss(lm, out.router_logits, batch)
    reference = oracle_router_aux(lm, packed)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    ours_grads, reference_grads = grads(lm, ours), grads(lm, reference)
    assert ours_grads.keys() == reference_grads.keys() and any("gate" in n or "router" in n for n in ours_grads)
    for name, grad in reference_grads.items():
        torch.testing.assert_close(ours_grads[name], grad, rtol=1e-4, atol=1e-7, msg=lambda m: f"{name}: {m}")
    # the shared prefix counts once per sequence that holds it, as the reference's batch does
    once = load_balancing_function(lm)(
        tuple(out.router_logits), lm.num_experts, lm.num_experts_per_tok, (batch["sequence"] != 0).float()
    )
    assert (once - reference).abs() > 1e-6


def test_coefficient_is_the_configs_unless_set(tmp_path):
    from transformers import AutoConfig

    spec = dict(FAMILIES["mixtral"])
    default = AutoConfig.for_model(spec.pop("model_type"), **spec).router_aux_loss_coef
    assert router_aux_coef(build(tmp_path, "mixtral")) == default > 0
    lm = build(tmp_path, "mixtral", coef=0.25)
    assert router_aux_coef(lm) == lm.router_aux_loss_coef == lm.config.router_aux_loss_coef == 0.25
    assert router_aux_coef(build(tmp_path, "mixtral", coef=0.0)) == 0.0
    assert router_aux_coef(build(tmp_path, "llama", coef=0.25)) == 0.0  # no router: nothing to weigh


def holding_by_definition(batch) -> torch.Tensor:
    """Per token, how many sequences hold it: its own, plus each tail whose shared prefix covers it."""
    sequence, prefix_sequence, prefix_length, position = (batch[k] for k in MASK_KEYS)
    out = (sequence != 0).float()
    for r in range(sequence.shape[0]):
        tails = {int(s): (int(p), int(n)) for s, p, n in zip(sequence[r], prefix_sequence[r], prefix_length[r]) if s and p}
        for p, n in tails.values():
            out[r] += ((sequence[r] == p) & (position[r] < n)).float()
    return out


def test_sequences_holding_counts_each_shared_prefix_per_tail():
    from test_attention_masks import random_rows

    for seed in range(5):
        batch = random_rows(3, 200, seed)
        expected = holding_by_definition(batch)
        assert expected.max() > 1  # some prefix is shared
        torch.testing.assert_close(sequences_holding(batch["sequence"], batch["prefix_sequence"], batch["prefix_length"]), expected)


def moe_lm(coef):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, num_local_experts=4, num_experts_per_tok=2,
        router_aux_loss_coef=coef, attn_implementation="sdpa",
    )
    return MixtralForCausalLM(config).float()


def test_jepa_model_trains_the_router_aux_as_the_model_does():
    """JepaModel's loss on layout rows = CE + lambda * JEPA + coef * the model's own aux_loss over
    every sequence the rows hold (conversations, both views), gradients included."""
    lay, pred = layout(lambda_=1.5)
    records = make_records(5, seed=3, shared=True)
    model = JepaModel(moe_lm(coef=0.5), lay.jepa)
    out = model(lay(records))
    out.loss.backward()
    assert out.router_aux is not None

    reference = moe_lm(coef=0.5)
    reference.load_state_dict(model.lm.state_dict())
    ce_sum, labels, z_a, z_b, sequences = 0.0, 0, [], [], []
    for record in records:
        full = torch.as_tensor(record["full"])
        start = record["prompt_len"]
        logits = reference(input_ids=full[None], use_cache=False).logits[0]
        ce_sum = ce_sum + F.cross_entropy(logits[start - 1:-1], full[start:], reduction="sum")
        labels += len(full) - start
        src, src_read, tgt, tgt_read = expected_views(record, np.array(pred), lay.jepa, lay.data.max_length)
        hidden = lambda seq: reference.model(input_ids=torch.as_tensor(seq)[None]).last_hidden_state[0]  # noqa: E731
        z_a.append(hidden(src)[src_read])
        z_b.append(hidden(tgt)[tgt_read])
        sequences += [full, torch.as_tensor(src), torch.as_tensor(tgt)]
    ids = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(s) for s in sequences], batch_first=True)
    aux = reference(input_ids=ids, attention_mask=mask, output_router_logits=True).aux_loss
    jepa = (1 - F.cosine_similarity(torch.stack(z_a), torch.stack(z_b), dim=-1)).mean()
    (ce_sum / labels + 1.5 * jepa + 0.5 * aux).backward()

    torch.testing.assert_close(out.router_aux, aux.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss.detach(), out.ce + 1.5 * out.jepa + 0.5 * aux.detach(), rtol=1e-5, atol=1e-6)
    expected = dict(reference.named_parameters())
    for name, param in model.lm.named_parameters():
        torch.testing.assert_close(param.grad, expected[name].grad, rtol=1e-4, atol=2e-5, msg=name)


def test_zero_coefficient_trains_no_router_aux():
    lay, _ = layout()
    batch = lay(make_records(3, seed=1, shared=True))
    with torch.no_grad():
        off = JepaModel(moe_lm(coef=0.0), lay.jepa)(batch)
    assert off.router_aux is None
    torch.testing.assert_close(off.loss, off.ce + JepaConfig().lambda_ * off.jepa)


def test_negative_coefficient_is_refused(tmp_path):
    from megajepa.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="model.router_aux_loss_coef: must be >= 0"):
        load_config("configs/demo.yaml", ["model.router_aux_loss_coef=-1"])


def test_summary_table_shows_router_aux_for_a_moe_run_only():
    from megajepa.cli import summary_table

    moe = {"first": {"loss": 8.8, "router_aux": 2.01}, "last": {"loss": 8.6, "router_aux": 2.02}}
    assert "| train router aux (MoE) | 2.0100 | 2.0200 |" in summary_table(moe)
    assert "router aux" not in summary_table({"first": {"loss": 8.8}, "last": {"loss": 8.6}})
