"""The packed single pass equals the reference implementation's three separate passes.

Reference (per pair): the full conversation A ++ B (CE on B), view A followed by the k [PRED]
tokens (z_a at the last one), view B alone (z_b at its last token), each encoded on its own with
the model's ordinary causal mask. Packed: many pairs per row, one forward. Same CE, z_a, z_b and
gradients, in fp32.
"""

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from megajepa.config import JepaConfig
from megajepa.data.layout import LayoutConfig, pack_pairs
from megajepa.jepa.objective import JepaModel

VOCAB, K = 101, 2
PRED_IDS = [VOCAB - 2, VOCAB - 1]


def tiny_lm(attn: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        attn_implementation=attn,
    )
    return LlamaForCausalLM(config).float()


def random_pairs(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n):
        a = int(torch.randint(3, 24, (1,), generator=g))
        b = int(torch.randint(2, 16, (1,), generator=g))
        pairs.append(
            (torch.randint(0, VOCAB - 2, (a,), generator=g), torch.randint(0, VOCAB - 2, (b,), generator=g))
        )
    return pairs


def reference_three_passes(lm, pairs):
    """The published reference's layout: three sequences per pair, each encoded alone."""
    base = lm.base_model
    ce_sum, n_labels, z_a, z_b = 0.0, 0, [], []
    for a, b in pairs:
        full = torch.cat([a, b])[None]
        logits = lm(input_ids=full, use_cache=False).logits[0]
        # positions a-1 .. a+b-2 predict B's tokens
        ce_sum = ce_sum + F.cross_entropy(logits[len(a) - 1 : -1], b, reduction="sum")
        n_labels += len(b)
        with_pred = torch.cat([a, torch.tensor(PRED_IDS)])[None]
        z_a.append(base(input_ids=with_pred, use_cache=False).last_hidden_state[0, -1])
        z_b.append(base(input_ids=b[None], use_cache=False).last_hidden_state[0, -1])
    return ce_sum / n_labels, torch.stack(z_a), torch.stack(z_b)


@pytest.mark.parametrize("attn", ["sdpa", "flex_attention"])
def test_packed_pass_equals_three_passes(attn):
    pairs = random_pairs(7)
    cfg = JepaConfig(k=K, predictor="tokens", distance="cosine", target="online", lambda_=1.5)
    layout = LayoutConfig(row_length=128, pred_token_ids=PRED_IDS, labels="response", target="online")
    batch = pack_pairs([a for a, _ in pairs], [b for _, b in pairs], list(range(len(pairs))), layout)
    assert batch["input_ids"].shape[0] < len(pairs)  # several pairs share a row

    # FlexAttention has no backward on CPU: there its forward is checked, gradients on CUDA
    # (model and batch on the GPU; the fp32 reference stays on the CPU).
    on_gpu = attn == "flex_attention" and torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    packed_model = JepaModel(tiny_lm(attn), cfg).to(device)
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    with_grad = attn == "sdpa" or on_gpu
    with torch.set_grad_enabled(with_grad):
        out = packed_model(batch)
    if with_grad:
        out.loss.backward()
    out = {name: getattr(out, name).detach().cpu() for name in ("ce", "z_a", "z_b", "jepa")}

    ref_lm = tiny_lm("sdpa")
    ref_lm.load_state_dict({k: v.cpu() for k, v in packed_model.lm.state_dict().items()})
    ce, z_a, z_b = reference_three_passes(ref_lm, pairs)
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


def test_stop_grad_blocks_target_gradient():
    pairs = random_pairs(3, seed=2)
    layout = LayoutConfig(row_length=128, pred_token_ids=PRED_IDS, target="online")
    batch = pack_pairs([a for a, _ in pairs], [b for _, b in pairs], [0, 1, 2], layout)
    grads = {}
    for stop_grad in (False, True):
        model = JepaModel(tiny_lm("sdpa"), JepaConfig(k=K, stop_grad=stop_grad, gamma=0.0))
        out = model(batch)
        out.loss.backward()
        grads[stop_grad] = model.lm.model.embed_tokens.weight.grad.clone()
    # view B's tokens get gradient only through z_b (gamma=0 removes CE): none with stop_grad
    b_tokens = torch.unique(torch.cat([b for _, b in pairs]))
    a_tokens = torch.unique(torch.cat([a for a, _ in pairs] + [torch.tensor(PRED_IDS)]))
    only_b = b_tokens[~torch.isin(b_tokens, a_tokens)]
    assert only_b.numel() > 0
    assert grads[False][only_b].abs().sum() > 0
    assert grads[True][only_b].abs().sum() == 0


def test_head_predictor_reads_last_view_a_token():
    pairs = random_pairs(4, seed=3)
    layout = LayoutConfig(row_length=128, pred_token_ids=(), target="online")
    batch = pack_pairs([a for a, _ in pairs], [b for _, b in pairs], [0, 1, 2, 3], layout)
    model = JepaModel(tiny_lm("sdpa"), JepaConfig(k=0, predictor="identity"))
    out = model(batch)
    base = model.lm.base_model
    expected = torch.stack([base(input_ids=a[None], use_cache=False).last_hidden_state[0, -1] for a, _ in pairs])
    torch.testing.assert_close(out.z_a, expected, atol=1e-5, rtol=1e-5)
