"""lm_logits and the memory-bounded lm_cross_entropy / token_cross_entropy against the plain
full-logits CE."""

import pytest
import torch
import torch.nn.functional as F

from _families import build
from megajepa.model.head import lm_cross_entropy, lm_logits, token_cross_entropy


def full_logits_ce(lm, hidden, labels):
    """The oracle: the model's own forward head (logits of every token at once), then CE."""
    return F.cross_entropy(lm_logits(lm, hidden).float(), labels)


@pytest.mark.parametrize("family", ["llama", "gemma2", "granite", "cohere", "gptj"])  # plain, soft-cap, /scale, *scale, bias
@pytest.mark.parametrize("max_logit_bytes", [1, 96 * 4 * 7, 1 << 28])  # 1 token, 7 tokens (ragged), one chunk
def test_chunked_ce_equals_full_logits_ce(family, max_logit_bytes, tmp_path):
    lm = build(tmp_path, family)
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(23, lm.config.hidden_size, generator=g, requires_grad=True)
    labels = torch.randint(0, 96, (23,), generator=g)
    ce = lm_cross_entropy(lm, hidden, labels, max_logit_bytes=max_logit_bytes)
    ce.backward()
    grads = [hidden.grad.clone()] + [p.grad.clone() for p in lm.parameters() if p.grad is not None]
    hidden.grad = None
    lm.zero_grad(set_to_none=True)
    expected = full_logits_ce(lm, hidden, labels)
    expected.backward()
    expected_grads = [hidden.grad] + [p.grad for p in lm.parameters() if p.grad is not None]
    torch.testing.assert_close(ce, expected)
    assert len(grads) == len(expected_grads) > 1
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("family", ["gemma2", "granite", "cohere"])
def test_lm_logits_is_the_forward_of_the_model(family, tmp_path):
    """With a large head, soft-capping (gemma2, cap 2) and scaling (granite /4, cohere *0.5)
    change the logits a lot: lm_logits matches the model's forward, the bare head does not."""
    lm = build(tmp_path, family).eval()
    with torch.no_grad():
        lm.get_output_embeddings().weight.mul_(100.0)
    out = lm(input_ids=torch.randint(0, 96, (1, 9)), output_hidden_states=True)
    final = out.hidden_states[-1]
    torch.testing.assert_close(lm_logits(lm, final), out.logits)
    assert (lm.get_output_embeddings()(final) - out.logits).abs().max() > 1.0


def test_no_labelled_tokens_is_zero_with_a_graph(tmp_path):
    lm = build(tmp_path, "llama")
    hidden = torch.zeros(0, lm.config.hidden_size, requires_grad=True)
    ce = lm_cross_entropy(lm, hidden, torch.zeros(0, dtype=torch.long))
    assert ce.item() == 0.0 and ce.requires_grad


def test_chunks_bound_the_logits_in_memory(tmp_path, monkeypatch):
    """No head call sees more tokens than the byte budget allows."""
    lm = build(tmp_path, "llama")
    head = lm.get_output_embeddings()
    seen = []
    head.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    hidden = torch.randn(50, lm.config.hidden_size, requires_grad=True)
    lm_cross_entropy(lm, hidden, torch.randint(0, 96, (50,)), max_logit_bytes=96 * 4 * 8).backward()
    assert max(seen) == 8 and sum(seen) == 2 * 50  # forward, then recomputed in the backward


def test_one_chunk_runs_the_head_once(tmp_path):
    """Within the budget the logits are kept for the backward: no recompute of the head."""
    lm = build(tmp_path, "llama")
    seen = []
    lm.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    hidden = torch.randn(50, lm.config.hidden_size, requires_grad=True)
    lm_cross_entropy(lm, hidden, torch.randint(0, 96, (50,))).backward()
    assert seen == [50]


@pytest.mark.parametrize("max_logit_bytes", [96 * 4 * 7, 1 << 28])
def test_token_ce_equals_unreduced_full_logits_ce(max_logit_bytes, tmp_path):
    lm = build(tmp_path, "gemma2")
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(23, lm.config.hidden_size, generator=g, requires_grad=True)
    labels = torch.randint(0, 96, (23,), generator=g)
    weights = torch.rand(23, generator=g)  # a backward through every token's own loss
    token_ce = token_cross_entropy(lm, hidden, labels, max_logit_bytes=max_logit_bytes)
    (grad,) = torch.autograd.grad((token_ce * weights).sum(), hidden)
    expected = F.cross_entropy(lm_logits(lm, hidden).float(), labels, reduction="none")
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), hidden)
    assert token_ce.shape == (23,)
    torch.testing.assert_close(token_ce, expected)
    torch.testing.assert_close(grad, expected_grad)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "gemma2", "granite"])
def test_liger_fused_ce_equals_full_logits_ce(family, tmp_path):
    pytest.importorskip("liger_kernel")
    lm = build(tmp_path, family).cuda()
    hidden = torch.randn(300, lm.config.hidden_size, device="cuda", requires_grad=True)
    labels = torch.randint(0, 96, (300,), device="cuda")
    ce = lm_cross_entropy(lm, hidden, labels)
    (grad,) = torch.autograd.grad(ce, hidden)
    expected = full_logits_ce(lm, hidden, labels)
    (expected_grad,) = torch.autograd.grad(expected, hidden)
    torch.testing.assert_close(ce, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-3, atol=1e-5)
