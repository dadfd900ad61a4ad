"""The packed single pass against the published LLM-JEPA objective, re-derived from its source.

The oracle below is written from galilai-group/llm-jepa's finetune.py and uses nothing of
megajepa's layout, views or objective: for each record it renders the three sequences the
reference renders (the conversation; the user turn alone with k predictor tokens appended to its
content, predictor_k first; the assistant message alone), tokenizes each with
`tokenizer(text, truncation=True, max_length=512, padding="max_length")`, runs them as three
padded batches through the model's own HF forward with the labels the reference's collator
gives, reads the last hidden layer at len(unpadded) + last_token, and forms
gamma * CE + lambda * (1 - mean cos). megajepa prepares the same records, packs them into rows
and computes the loss in one forward. Both run on the same weights; CE, the JEPA term and every
parameter's gradient must agree to fp32 rounding.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _tiny_chat import DEMO_CONFIG, assert_gradients_close, gradients, regex_conversations, tiny_llama
from _tiny_chat import tokenizer  # noqa: F401  (a fixture)
from tokenizers import processors

from megajepa.config import load_config
from megajepa.data.layout import Layout
from megajepa.data.prepare import RecordEncoder
from megajepa.data.tokenizer import add_pred_tokens, pred_token_ids
from megajepa.jepa.objective import JepaModel

MAX_LENGTH = 96  # the reference's --max_length (512 there); every record here is shorter

# A Llama-3-style template (header ids, <|eot_id|>, a default system block when none is given,
# contents trimmed), with a post-processor that adds BOS as Llama's tokenizer does: the reference
# then tokenizes a double BOS, and so must we.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|start_header_id|>system<|end_header_id|>\\n\\nCutting Knowledge Date: December 2023<|eot_id|>' }}"
    "{% endif %}"
    "{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


def _with_template(base, template: str):
    """A copy of `base` with 4 [PRED] tokens and, for "llama3", that template and BOS handling."""
    tokenizer = copy.deepcopy(base)
    add_pred_tokens(tokenizer, 4)
    if template == "llama3":
        tokenizer.add_special_tokens(
            {"extra_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]},
            replace_extra_special_tokens=False,
        )
        tokenizer.chat_template = LLAMA3_TEMPLATE
        bos = (tokenizer.bos_token, tokenizer.bos_token_id)
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos[0]} $A", pair=f"{bos[0]} $A $B", special_tokens=[bos]
        )
    return tokenizer


def _messages(system: bool):
    return regex_conversations(system)[:5]  # the five this comparison was written with (test_stp's rows take seven)


# ---------------------------------------------------------------------------------------------
# the oracle: finetune.py's three padded passes, re-derived


def _pad_batch(tokenizer, texts, max_length):
    enc = [tokenizer(t, truncation=True, max_length=max_length, padding="max_length") for t in texts]
    ids = torch.tensor([e["input_ids"] for e in enc])
    mask = torch.tensor([e["attention_mask"] for e in enc])
    return ids, mask


def _last_token_index(mask: torch.Tensor, last_token: int) -> torch.Tensor:
    # the reference's unpad(): the tokens up to the first padding after a real one
    return mask.sum(dim=1) + last_token


def reference_loss(
    lm, tokenizer, conversations, k, last_token, labels_mode, max_length=MAX_LENGTH, front_pred=False, reverse_pred=False
):
    full_texts, user_texts, assistant_texts, prompts = [], [], [], []
    for messages in conversations:
        full_texts.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False))
        # messages[1:2] in the reference, whose records all open with a system message
        user = [dict(m) for m in messages if m["role"] == "user"][-1:]
        assistant = [dict(messages[-1])]
        if reverse_pred:  # the assistant message carries the predictor tokens and predicts the user turn
            user, assistant = assistant, user
        for i in range(k, 0, -1):  # to_add = k .. 1; <|predictor_i|> is our <|pred_{i-1}|>
            if front_pred:
                user[0]["content"] = f"<|pred_{i - 1}|>" + user[0]["content"]
            else:
                user[0]["content"] += f"<|pred_{i - 1}|>"
        user_texts.append(tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=False))
        assistant_texts.append(tokenizer.apply_chat_template(assistant, tokenize=False, add_generation_prompt=False))
        prompts.append(tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True))
    full, full_mask = _pad_batch(tokenizer, full_texts, max_length)
    user, user_mask = _pad_batch(tokenizer, user_texts, max_length)
    assistant, assistant_mask = _pad_batch(tokenizer, assistant_texts, max_length)
    if labels_mode == "conversation":  # DataCollatorForLanguageModeling(mlm=False)
        labels = full.masked_fill(full == tokenizer.pad_token_id, -100)
    elif labels_mode == "content":  # create_masked_labels: the assistant content, found by its decoded tokens
        labels = torch.full_like(full, -100)
        for i, messages in enumerate(conversations):
            content = tokenizer.encode(messages[-1]["content"], add_special_tokens=False)
            want = [tokenizer.decode(t) for t in content]
            have = [tokenizer.decode(t) for t in full[i].tolist()]
            for j in range(len(have) - len(want) + 1):
                if full_mask[i, j] == 1 and have[j : j + len(want)] == want:
                    labels[i, j : j + len(want)] = full[i, j : j + len(want)]
                    break
    else:  # response: the tokens after the generation prompt
        labels = torch.full_like(full, -100)
        for i, prompt in enumerate(prompts):
            start = len(tokenizer(prompt)["input_ids"])
            labels[i, start:] = full[i, start:]
        labels = labels.masked_fill(full_mask == 0, -100)
    ignore = torch.full_like(user, -100)
    outputs = lm(
        input_ids=torch.cat([full, user, assistant]),
        attention_mask=torch.cat([full_mask, user_mask, assistant_mask]),
        labels=torch.cat([labels, ignore, ignore]),
        output_hidden_states=True,
    )
    n = full.shape[0]
    hidden = outputs.hidden_states[-1]
    rows = torch.arange(n)
    user_embedding = hidden[n : 2 * n][rows, _last_token_index(user_mask, last_token)]
    assistant_embedding = hidden[2 * n :][rows, _last_token_index(assistant_mask, last_token)]
    jepa = 1.0 - F.cosine_similarity(user_embedding, assistant_embedding, dim=-1).mean()
    return outputs.loss + jepa, outputs.loss, jepa  # gamma = lambda = 1


# ---------------------------------------------------------------------------------------------
# megajepa: prepare the same records, pack them, one forward


def packed_loss(lm, tokenizer, conversations, k, overrides, max_length=MAX_LENGTH):
    cfg = load_config(
        DEMO_CONFIG,
        [f"jepa.k={k}", f"data.max_length={max_length}", "data.row_length=512", "jepa.lambda_=1", "jepa.gamma=1",
         *overrides],
    )
    encoder = RecordEncoder(tokenizer, max_length=max_length)
    samples = []
    for i, messages in enumerate(conversations):
        sample, _ = encoder({"messages": messages})
        samples.append({**sample, "sample_id": i})
    layout = Layout(cfg.data, cfg.jepa, pred_token_ids(tokenizer, k), tokenizer.pad_token_id)
    batch = layout(samples)
    out = JepaModel(lm, cfg.jepa)(batch)
    return out.loss, out.ce, out.jepa, batch


def _assert_same(ref, ours, lm):
    (ref_loss, ref_ce, ref_jepa), (loss, ce, jepa) = ref, ours
    assert abs(ce.item() - ref_ce.item()) < 2e-5, (ce.item(), ref_ce.item())
    assert abs(jepa.item() - ref_jepa.item()) < 2e-5, (jepa.item(), ref_jepa.item())
    ref_grads, grads = gradients(lm, ref_loss), gradients(lm, loss)
    assert ref_grads.keys() == grads.keys()
    assert_gradients_close(ref_grads, grads)


@pytest.mark.parametrize("template", ["embedded", "llama3"])
@pytest.mark.parametrize("system", [True, False], ids=["system", "no-system"])
@pytest.mark.parametrize("k", [0, 1, 3])
@pytest.mark.parametrize("last_token", [-1, -2, -3])
def test_packed_pass_is_the_reference_objective(tokenizer, template, system, k, last_token):
    tokenizer = _with_template(tokenizer, template)
    lm = tiny_llama(len(tokenizer))
    conversations = _messages(system)
    ref = reference_loss(lm, tokenizer, conversations, k, last_token, "conversation")
    loss, ce, jepa, _ = packed_loss(
        lm, tokenizer, conversations, k,
        ["jepa.readout=offset", f"jepa.last_token={last_token}", "data.labels=conversation"],
    )
    assert ref[2].item() > 1e-3, "the JEPA term must be non-trivial for the comparison to mean anything"
    _assert_same(ref, (loss, ce, jepa), lm)


@pytest.mark.parametrize("template", ["embedded", "llama3"])
def test_content_labels_are_the_references_masked_labels(tokenizer, template):
    tokenizer = _with_template(tokenizer, template)
    lm = tiny_llama(len(tokenizer))
    conversations = _messages(True)
    ref = reference_loss(lm, tokenizer, conversations, 1, -1, "content")
    loss, ce, jepa, _ = packed_loss(
        lm, tokenizer, conversations, 1, ["jepa.readout=offset", "jepa.last_token=-1", "data.labels=content"]
    )
    _assert_same(ref, (loss, ce, jepa), lm)


@pytest.mark.parametrize("template,offset", [("embedded", -3), ("llama3", -2)])
def test_content_end_readout_is_the_offset_for_the_template(tokenizer, template, offset):
    """README's table: where the readout that needs no per-family number reads, per template."""
    tokenizer = _with_template(tokenizer, template)
    lm = tiny_llama(len(tokenizer))
    conversations = _messages(True)
    ref = reference_loss(lm, tokenizer, conversations, 1, offset, "response")
    loss, ce, jepa, _ = packed_loss(lm, tokenizer, conversations, 1, ["jepa.readout=content_end", "data.labels=response"])
    _assert_same(ref, (loss, ce, jepa), lm)


@pytest.mark.parametrize("template", ["embedded", "llama3"])
def test_sequences_longer_than_max_length_are_cut_as_the_reference_cuts_them(tokenizer, template):
    tokenizer = _with_template(tokenizer, template)
    lm = tiny_llama(len(tokenizer))
    conversations = _messages(True)
    full_lengths = [len(tokenizer(tokenizer.apply_chat_template(m, tokenize=False))["input_ids"]) for m in conversations]
    max_length = min(full_lengths) - 3  # every conversation is cut, some views too
    settings = ["jepa.readout=offset", "jepa.last_token=-1", "data.labels=conversation"]
    ref = reference_loss(lm, tokenizer, conversations, 2, -1, "conversation", max_length)
    loss, ce, jepa, _ = packed_loss(lm, tokenizer, conversations, 2, settings, max_length)
    _assert_same(ref, (loss, ce, jepa), lm)


@pytest.mark.parametrize("template", ["embedded", "llama3"])
@pytest.mark.parametrize("option", ["front_pred", "reverse_pred"])
def test_front_and_reverse_pred_are_the_references(tokenizer, template, option):
    tokenizer = _with_template(tokenizer, template)
    lm = tiny_llama(len(tokenizer))
    conversations = _messages(True)
    ref = reference_loss(lm, tokenizer, conversations, 3, -1, "conversation", **{option: True})
    settings = ["jepa.readout=offset", "jepa.last_token=-1", "data.labels=conversation", f"jepa.{option}=true"]
    loss, ce, jepa, _ = packed_loss(lm, tokenizer, conversations, 3, settings)
    _assert_same(ref, (loss, ce, jepa), lm)


def test_the_user_view_shares_the_conversation_prefix_only_without_a_system_message(tokenizer):
    tokenizer = _with_template(tokenizer, "embedded")
    lm = tiny_llama(len(tokenizer))
    *_, with_system = packed_loss(lm, tokenizer, _messages(True), 1, [])
    *_, without = packed_loss(lm, tokenizer, _messages(False), 1, [])
    # without a system message the user view's opening tokens are read in the conversation
    assert (without["prefix_sequence"] > 0).any()
    assert without["computed_tokens"] < with_system["computed_tokens"]
    assert not (with_system["prefix_length"] > 0).any()
