"""lm_logits and the memory-bounded lm_cross_entropy / token_cross_entropy against the plain
full-logits CE."""

import pytest
import torch
import torch.nn.functional as F

from _families import build
from megajepa.model import head
from megajepa.model.head import ce_path, lm_cross_entropy, lm_logits, token_cross_entropy


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


def head_calls(monkeypatch, lm) -> list[int]:
    """Tokens of each product with the LM head's weight (F.linear, as the CE computes it)."""
    weight, linear, seen = lm.get_output_embeddings().weight, F.linear, []

    def spy(x, w, *args, **kwargs):
        if w is weight:
            seen.append(x.shape[0])
        return linear(x, w, *args, **kwargs)

    monkeypatch.setattr(F, "linear", spy)
    return seen


def test_chunks_bound_the_logits_in_memory(tmp_path, monkeypatch):
    """No head product sees more tokens than the byte budget allows."""
    lm = build(tmp_path, "llama")
    seen = head_calls(monkeypatch, lm)
    hidden = torch.randn(50, lm.config.hidden_size, requires_grad=True)
    lm_cross_entropy(lm, hidden, torch.randint(0, 96, (50,)), max_logit_bytes=96 * 4 * 8).backward()
    assert max(seen) == 8 and sum(seen) == 2 * 50  # forward, then recomputed in the backward


def test_one_chunk_runs_the_head_once(tmp_path, monkeypatch):
    """Within the budget the logits are kept for the backward: no recompute of the head."""
    lm = build(tmp_path, "llama")
    seen = head_calls(monkeypatch, lm)
    hidden = torch.randn(50, lm.config.hidden_size, requires_grad=True)
    lm_cross_entropy(lm, hidden, torch.randint(0, 96, (50,))).backward()
    assert seen == [50]


def test_the_head_module_is_never_called(tmp_path):
    """Under ZeRO-3 each call of the head module may gather its weight: the chunks must not call it."""
    lm = build(tmp_path, "llama")
    calls = []
    lm.get_output_embeddings().register_forward_pre_hook(lambda module, args: calls.append(1))
    hidden = torch.randn(50, lm.config.hidden_size, requires_grad=True)
    lm_cross_entropy(lm, hidden, torch.randint(0, 96, (50,)), max_logit_bytes=96 * 4 * 8).backward()
    assert calls == []


def test_a_head_that_is_not_a_linear_is_refused(tmp_path):
    """A LoRA adapter on the head would be skipped by a CE that reads the base weight."""
    from peft import LoraConfig, inject_adapter_in_model

    lm = inject_adapter_in_model(LoraConfig(r=2, target_modules=["lm_head"]), build(tmp_path, "llama"))
    with pytest.raises(TypeError, match="not a Linear"):
        lm_cross_entropy(lm, torch.randn(3, lm.config.hidden_size), torch.randint(0, 96, (3,)))


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


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])  # cpu: Triton's interpreter
@pytest.mark.parametrize("family", ["llama", "gemma2", "granite"])  # plain, soft-cap, /scale
def test_liger_fused_ce_equals_full_logits_ce(family, device, tmp_path, monkeypatch, request):
    if family == "gemma2" and device == "cpu":
        from triton.runtime.errors import InterpreterError

        # Liger's soft-cap branch calls .to() on the scalar, which compiled Triton makes a tensor
        # and Triton 3.9's interpreter leaves a Python float; strict, so a fix upstream shows here.
        request.applymarker(pytest.mark.xfail(raises=InterpreterError, strict=True, reason="Liger 0.8.5 soft-cap under TRITON_INTERPRET"))
    monkeypatch.setattr(head, "FUSED_DEVICE_TYPES", (device,))
    liger, calls = head._liger(), []
    assert liger is not None, "liger-kernel is not installed"

    def fused(*args, **kwargs):
        calls.append(kwargs)
        return liger(*args, **kwargs)

    monkeypatch.setattr(head, "_liger", lambda: fused)
    lm = build(tmp_path, family).to(device)
    hidden = torch.randn(300, lm.config.hidden_size, device=device, requires_grad=True)
    labels = torch.randint(0, 96, (300,), device=device)
    ce = lm_cross_entropy(lm, hidden, labels)
    (grad,) = torch.autograd.grad(ce, hidden)
    assert len(calls) == 1 and calls[0]["accum_dtype"] == torch.float32  # the fused path ran
    expected = full_logits_ce(lm, hidden, labels)
    (expected_grad,) = torch.autograd.grad(expected, hidden)
    torch.testing.assert_close(ce, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-3, atol=1e-5)


def test_ce_path(tmp_path, monkeypatch):
    """Liger's kernel where it runs (a device in FUSED_DEVICE_TYPES, installed, tokens to score,
    a logit scale it can take on the input), else the chunked CE."""
    llama, gptj = build(tmp_path, "llama"), build(tmp_path, "gptj")  # gptj's head has a bias
    hidden, none = torch.randn(5, 32), torch.randn(0, 32)
    assert ce_path(llama, hidden) == "chunked"  # cpu is not a device of Liger's kernels
    monkeypatch.setattr(head, "FUSED_DEVICE_TYPES", ("cpu",))
    assert [ce_path(llama, hidden), ce_path(llama, none), ce_path(gptj, hidden)] == ["liger", "chunked", "liger"]
    assert ce_path(build(tmp_path, "granite"), hidden) == "liger"  # logits / 4: the input is scaled instead
    gptj.config.logit_scale = 0.5
    assert ce_path(gptj, hidden) == "chunked"  # 0.5 (hW + b) is not (0.5 h) W + b
    monkeypatch.setattr(head, "_liger", lambda: None)  # not installed
    assert ce_path(llama, hidden) == "chunked"
