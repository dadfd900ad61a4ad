"""The packed single pass equals every sequence run alone through the model's own HF forward.

For each record the oracle runs, each on its own with the model's ordinary causal mask: the
conversation (CE over its labelled tokens), the view with the [PRED] tokens and the other view
(the last hidden state at the readout token). The packed pass puts many records in a row, views
sharing the conversation's opening where they can, the EMA target's views in teacher rows.
Same CE, z_a, z_b and gradients, in fp32. The InfoNCE distance is checked against its formula.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from _records import PRED_IDS, expected_views, layout, make_records
from megajepa.jepa.objective import JepaModel

VOCAB = 101


def tiny_lm(attn: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, attn_implementation=attn,
    )
    return LlamaForCausalLM(config).float()


def alone(lm, records, lay):
    """(CE, z_a, z_b) with every sequence run alone, response labels."""
    pred = np.array(lay.pred_token_ids)
    ce_sum, n_labels, z_a, z_b = 0.0, 0, [], []
    last_hidden = lambda seq: lm.base_model(input_ids=torch.as_tensor(seq)[None], use_cache=False).last_hidden_state[0]  # noqa: E731
    for record in records:
        full = torch.as_tensor(record["full"])
        logits = lm(input_ids=full[None], use_cache=False).logits[0]
        start = record["prompt_len"]
        ce_sum = ce_sum + F.cross_entropy(logits[start - 1 : -1], full[start:], reduction="sum")
        n_labels += len(full) - start
        src, src_read, tgt, tgt_read = expected_views(record, pred, lay.jepa, lay.data.max_length)
        z_a.append(last_hidden(src)[src_read])
        z_b.append(last_hidden(tgt)[tgt_read])
    return ce_sum / n_labels, torch.stack(z_a), torch.stack(z_b)


@pytest.mark.parametrize(
    "attn,shared,settings",
    [
        ("sdpa", False, {}),
        ("sdpa", True, {}),
        ("sdpa", True, {"reverse_pred": True, "front_pred": True}),
        ("sdpa", False, {"readout": "offset", "last_token": -1, "k": 1}),
        ("flex_attention", True, {}),
    ],
)
def test_packed_pass_equals_each_sequence_alone(attn, shared, settings):
    lay, _ = layout(lambda_=1.5, **settings)
    records = make_records(7, seed=1, shared=shared)
    batch = lay(records)
    assert batch["input_ids"].shape[0] < len(records)  # several records share a row

    # FlexAttention has no backward on CPU: there its forward is checked, gradients on CUDA
    # (model and batch on the GPU; the fp32 reference stays on the CPU).
    on_gpu = attn == "flex_attention" and torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    packed_model = JepaModel(tiny_lm(attn), lay.jepa).to(device)
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    with_grad = attn == "sdpa" or on_gpu
    with torch.set_grad_enabled(with_grad):
        out = packed_model(batch)
    if with_grad:
        out.loss.backward()
    out = {name: getattr(out, name).detach().cpu() for name in ("ce", "z_a", "z_b", "jepa")}

    ref_lm = tiny_lm("sdpa")
    ref_lm.load_state_dict({k: v.cpu() for k, v in packed_model.lm.state_dict().items()})
    ce, z_a, z_b = alone(ref_lm, records, lay)
    jepa = (1 - F.cosine_similarity(z_a, z_b, dim=-1)).mean()
    (ce + 1.5 * jepa).backward()

    torch.testing.assert_close(out["ce"], ce.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["z_a"], z_a.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["z_b"], z_b.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["jepa"], jepa.detach(), atol=1e-5, rtol=1e-5)
    if not with_grad:
        return
    ref_grads = dict(ref_lm.named_parameters())
    for name, param in packed_model.lm.named_parameters():
        torch.testing.assert_close(param.grad.cpu(), ref_grads[name].grad, atol=2e-5, rtol=1e-4, msg=name)


def test_teacher_rows_give_the_online_targets():
    """With the EMA target the assistant views go to teacher rows: same weights, same z_b."""
    records = make_records(6, seed=4, shared=True)
    online, _ = layout()
    ema, _ = layout(target="ema")
    model = JepaModel(tiny_lm("sdpa"), online.jepa)
    with torch.no_grad():
        expected = model(online(records)).z_b
        got = JepaModel(model.lm, ema.jepa).encode_targets(ema(records))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_stop_grad_blocks_target_gradient():
    records = make_records(3, seed=2)
    lay, _ = layout(gamma=0.0)
    grads = {}
    for stop_grad in (False, True):
        lay.jepa.stop_grad = stop_grad
        model = JepaModel(tiny_lm("sdpa"), lay.jepa)
        model(lay(records)).loss.backward()
        grads[stop_grad] = model.lm.model.embed_tokens.weight.grad.clone()
    # assistant-only tokens get gradient only through z_b (gamma=0 removes CE): none with stop_grad
    assistant = np.unique(np.concatenate([r["assistant"] for r in records]))
    user = np.unique(np.concatenate([r["user"] for r in records] + [np.array(PRED_IDS)]))
    only_b = torch.as_tensor(np.setdiff1d(assistant, user))
    assert only_b.numel() > 0
    assert grads[False][only_b].abs().sum() > 0
    assert grads[True][only_b].abs().sum() == 0


def test_infonce_is_the_in_batch_contrastive_formula():
    lay, _ = layout(distance="infonce", infonce_temperature=0.07, gamma=0.0)
    records = make_records(5, seed=6)
    out = JepaModel(tiny_lm("sdpa"), lay.jepa)(lay(records))
    a, b = out.z_a.detach().double(), out.z_b.detach().double()
    a, b = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
    logits = a @ b.T / 0.07
    expected = (torch.logsumexp(logits, dim=1) - logits.diagonal()).mean()  # -log softmax of the positive
    torch.testing.assert_close(out.jepa.double(), expected, atol=1e-5, rtol=1e-5)


def test_mean_pooling_is_the_mean_of_the_views_own_states():
    lay, _ = layout(pooling="mean")
    records = make_records(4, seed=8, shared=True)
    model = JepaModel(tiny_lm("sdpa"), lay.jepa)
    with torch.no_grad():
        out = model(lay(records))
        pred = np.array(lay.pred_token_ids)
        expected = [
            model.lm.base_model(input_ids=torch.as_tensor(expected_views(r, pred, lay.jepa, 0)[2])[None]).last_hidden_state[0].mean(0)
            for r in records
        ]
    torch.testing.assert_close(out.z_b, torch.stack(expected), atol=1e-5, rtol=1e-5)
