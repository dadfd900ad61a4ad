"""Semantic Tube Prediction in the packed pass against the reference's loss, re-derived from its source.

The oracle below is written from galilai-group/llm-jepa's stp.py (RepresentationTrainer with
--linear) and uses nothing of megajepa's layout or objective: each conversation is rendered with
the chat template, tokenized, and run alone through the model's own HF forward; the user and
assistant contents are found in the tokens as the reference's find_start_end finds them (the
content tokenized alone, matched by decoded tokens, last occurrence), giving its
user_start_end / assistant_start_end = (first content index - 1, last content index); spans are
drawn with its get_s_t from a torch.Generator per conversation; embeddings are its
get_embeddings (before, patch, after) or its e2e differences; the loss is
gamma * CE + lambda * (1 - sum(cos * w) / sum(w)), CE over every non-pad token as the reference's
collator labels them. megajepa prepares the same records, packs several conversations per row and
computes the loss in one forward on the same weights: loss and every gradient to fp32 rounding.

The one thing shared is the generator's seed, the documented contract of megajepa.jepa.stp:
blake2b-64 of "stp:{data.seed}:{sample_id}:{epoch}", shifted right by one bit.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _tiny_chat import DEMO_CONFIG, assert_gradients_close, gradients, regex_conversations, tiny_llama
from _tiny_chat import tokenizer  # noqa: F401  (a fixture)

from megajepa.config import ConfigError, load_config
from megajepa.data.layout import Layout
from megajepa.data.prepare import RecordEncoder
from megajepa.jepa.objective import JepaModel

SEED, EPOCH = 77, 3


# ---------------------------------------------------------------------------------------------
# the oracle: stp.py's loss, one conversation at a time


def _seed(sample_id: int) -> int:
    digest = hashlib.blake2b(f"stp:{SEED}:{sample_id}:{EPOCH}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def find_start_end(tokenizer, content: str, input_ids: list[int]) -> tuple[int, int]:
    tokens = tokenizer.encode(content, add_special_tokens=False)
    decoded_content = [tokenizer.decode(t) for t in tokens]
    decoded_input = [tokenizer.decode(t) for t in input_ids]
    for i in range(len(input_ids) - len(tokens), -1, -1):
        if decoded_input[i : i + len(tokens)] == decoded_content:
            assert i > 0
            return i - 1, i + len(tokens) - 1
    raise AssertionError(f"cannot find {content!r}")


def get_s_t(full_length: int, g: torch.Generator, knobs: dict):
    max_length = knobs.get("max_span", -1)
    if knobs.get("draw") == "both":
        while True:
            pick_1 = torch.randint(0, full_length, (1,), generator=g)
            pick_2 = torch.randint(1, full_length + 1, (1,), generator=g)
            start, end = torch.min(pick_1, pick_2), torch.max(pick_1, pick_2)
            if knobs.get("from_start"):
                start = 0
            if max_length >= 0 and end - start > max_length:
                end = start + max_length
            if start < end and end - start < full_length:
                return int(start), int(end)
    if knobs.get("draw") == "uniform":
        total = full_length * (full_length + 1) // 2
        while True:
            r = torch.randint(total, (1,), generator=g, dtype=torch.long)
            two_n_plus_1 = 2 * full_length + 1
            start = torch.floor((two_n_plus_1 - torch.sqrt(two_n_plus_1**2 - 8 * r.float())) / 2).long()
            prev = start * (2 * full_length - start + 1) // 2
            end = start + 1 + (r - prev)
            if end - start < full_length:
                return int(start), int(end)
    start = 0 if knobs.get("from_start") else torch.randint(0, full_length, (), generator=g)
    high = full_length + 1
    if max_length >= 0:
        high = min(high, start + 1 + max_length)
    while True:
        end = torch.randint(start + 1, high, (), generator=g)
        if end - start < full_length:
            return int(start), int(end)


def get_embeddings(h, user_start_end, assistant_start_end, s, t):
    user_start, user_end = user_start_end[0] + 1, user_start_end[1] + 1
    assistant_start, assistant_end = assistant_start_end[0] + 1, assistant_start_end[1] + 1
    if s + user_start < user_end:
        patch_start = user_start + s
    else:
        patch_start = assistant_start + s - (user_end - user_start)
    if t + user_start < user_end:
        patch_end = user_start + t
    else:
        patch_end = assistant_start + t - (user_end - user_start)
    us, ue = h[user_start - 1], h[user_end - 1]
    as_, ae = h[assistant_start - 1], h[assistant_end - 1]
    ps, pe = h[patch_start - 1], h[patch_end - 1]
    if patch_start >= assistant_start:
        return ue - us + ps - as_, pe - ps, ae - pe
    if patch_end <= user_end:
        return ps - us, pe - ps, ue - pe + ae - as_
    return ps - us, ue - ps + pe - as_, ae - pe


def get_weight(knobs: dict, full_length: int, patch_length: int) -> float:
    rest = full_length - patch_length
    if knobs.get("length_adjustment") == "cosine_like":
        return 2.0 * rest * patch_length / (rest * rest + patch_length * patch_length)
    if knobs.get("length_adjustment") == "jaccard_like":
        return 1.0 - abs(rest - patch_length) / (rest + patch_length)
    return 1.0


def reference_loss(lm, predictor, tokenizer, conversations, variant, knobs, gamma, lam, mse=False):
    ce_sum, ce_count = 0.0, 0
    users, assistants, weights = [], [], []
    for sample_id, messages in enumerate(conversations):
        ids = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False))["input_ids"]
        input_ids = torch.tensor([ids])
        labels = input_ids.masked_fill(input_ids == tokenizer.pad_token_id, -100)  # the LM collator
        out = lm(input_ids=input_ids, output_hidden_states=True)
        ce_sum = ce_sum + F.cross_entropy(out.logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum")
        ce_count += int((labels[0, 1:] != -100).sum())
        h = out.hidden_states[-1][0]
        user_se = list(find_start_end(tokenizer, messages[-2]["content"], ids))
        assistant_se = list(find_start_end(tokenizer, messages[-1]["content"], ids))
        if variant == "e2e":
            users.append(h[user_se[1]] - h[user_se[0]])
            assistants.append(h[assistant_se[1]] - h[assistant_se[0]])
            weights.append(1.0)
            continue
        if knobs.get("between"):
            assistant_se[0] = user_se[1]
        if knobs.get("from_first_token"):
            user_se[0] = 0
        g = torch.Generator().manual_seed(_seed(sample_id))
        full_length = (user_se[1] - user_se[0]) + (assistant_se[1] - assistant_se[0])
        for _ in range(knobs.get("spans", 1)):
            s, t = get_s_t(full_length, g, knobs)
            before, patch, after = get_embeddings(h, user_se, assistant_se, s, t)
            users.append(before + after)
            assistants.append(patch)
            weights.append(get_weight(knobs, full_length, t - s))
    user_embedding, assistant_embedding = torch.stack(users), torch.stack(assistants)
    if predictor is not None:
        user_embedding = user_embedding @ predictor.T
    cosine = F.cosine_similarity(user_embedding, assistant_embedding, dim=-1)
    w = torch.tensor(weights)
    jepa = 1.0 - torch.sum(cosine * w) / torch.sum(w)
    if mse:  # --jepa_mse: unweighted, over every element
        jepa = torch.mean((user_embedding - assistant_embedding) ** 2)
    ce = ce_sum / ce_count
    return gamma * ce + lam * jepa, ce, jepa


# ---------------------------------------------------------------------------------------------
# megajepa: the same records packed, one forward


def _overrides(variant: str, linear: bool, knobs: dict, gamma: float, lam: float) -> list[str]:
    out = [
        "jepa.objective=stp", f"jepa.stp.variant={variant}", f"jepa.stp.linear_predictor={linear}",
        f"jepa.lambda_={lam}", f"jepa.gamma={gamma}", "data.labels=conversation", f"data.seed={SEED}",
        "data.max_length=96", "data.row_length=160",  # several conversations per row, several rows
    ]
    return out + [f"jepa.stp.{k}={v}" for k, v in knobs.items()]


def _samples(tokenizer, conversations, epoch=EPOCH):
    encoder = RecordEncoder(tokenizer, max_length=96)
    return [{**encoder({"messages": m})[0], "sample_id": i, "epoch": epoch} for i, m in enumerate(conversations)]


def packed(lm, tokenizer, conversations, overrides):
    cfg = load_config(DEMO_CONFIG, overrides)
    layout = Layout(cfg.data, cfg.jepa, [], tokenizer.pad_token_id)
    batch = layout(_samples(tokenizer, conversations))
    model = JepaModel(lm, cfg.jepa)
    return model, model(batch), batch


KNOBS = {
    "default": {},
    "three-short-spans-cosine-weights": {"spans": 3, "max_span": 4, "length_adjustment": "cosine_like"},
    "draw-both-between": {"draw": "both", "between": True, "length_adjustment": "jaccard_like"},
    "uniform-from-first-token": {"draw": "uniform", "from_first_token": True},
    "from-start": {"from_start": True, "spans": 2},
}
# (variant, knobs, linear predictor, system message): both variants with and without the
# predictor; each other knob set once, the predictor alternating
CASES = [(v, "default", linear, True) for v in ("random_span", "e2e") for linear in (False, True)]
CASES += [("random_span", name, i % 2 == 0, True) for i, name in enumerate(list(KNOBS)[1:])]
CASES += [("random_span", "default", False, False), ("e2e", "default", True, False)]


@pytest.mark.parametrize(
    "variant,knobs,linear,system",
    CASES,
    ids=[f"{v}-{k}-{'linear' if lin else 'identity'}-{'system' if sys_ else 'no-system'}" for v, k, lin, sys_ in CASES],
)
def test_packed_stp_is_the_reference_loss(tokenizer, variant, knobs, linear, system):
    conversations = regex_conversations(system)
    lm = tiny_llama(len(tokenizer))
    gamma, lam = 0.7, 1.3
    model, out, batch = packed(lm, tokenizer, conversations, _overrides(variant, linear, KNOBS[knobs], gamma, lam))
    assert 1 < batch["input_ids"].shape[0] < len(conversations), "several conversations per row, several rows"
    spans = KNOBS[knobs].get("spans", 1) if variant == "random_span" else 1
    assert batch["stp_weight"].numel() == spans * len(conversations)
    weight = model.predictor.weight if linear else None
    ref_loss, ref_ce, ref_jepa = reference_loss(lm, weight, tokenizer, conversations, variant, KNOBS[knobs], gamma, lam)
    assert ref_jepa.item() > 1e-2, "a non-trivial latent term"
    assert abs(out.ce.item() - ref_ce.item()) < 2e-5, (out.ce.item(), ref_ce.item())
    assert abs(out.jepa.item() - ref_jepa.item()) < 2e-5, (out.jepa.item(), ref_jepa.item())
    assert abs(out.loss.item() - ref_loss.item()) < 4e-5
    ref_grads, grads = gradients(model, ref_loss), gradients(model, out.loss)
    assert ref_grads.keys() == grads.keys() and ("predictor.weight" in grads) == linear
    assert_gradients_close(ref_grads, grads)


def test_latent_term_alone_has_the_reference_gradients(tokenizer):
    """gamma 0: the gradients are the STP term's alone, not hidden under CE's."""
    conversations = regex_conversations(True)
    lm = tiny_llama(len(tokenizer))
    knobs = KNOBS["three-short-spans-cosine-weights"]
    model, out, _ = packed(lm, tokenizer, conversations, _overrides("random_span", True, knobs, 0.0, 1.0))
    ref_loss, _, _ = reference_loss(lm, model.predictor.weight, tokenizer, conversations, "random_span", knobs, 0.0, 1.0)
    ref_grads, grads = gradients(model, ref_loss), gradients(model, out.loss)
    assert_gradients_close(ref_grads, grads)


def test_mse_distance_is_the_reference_jepa_mse(tokenizer):
    conversations = regex_conversations(True)
    lm = tiny_llama(len(tokenizer))
    overrides = _overrides("random_span", True, {"spans": 2}, 1.0, 1.0) + ["jepa.distance=mse"]
    model, out, _ = packed(lm, tokenizer, conversations, overrides)
    ref_loss, _, ref_jepa = reference_loss(
        lm, model.predictor.weight, tokenizer, conversations, "random_span", {"spans": 2}, 1.0, 1.0, mse=True
    )
    assert abs(out.jepa.item() - ref_jepa.item()) < 1e-5 * max(1.0, ref_jepa.item())
    ref_grads, grads = gradients(model, ref_loss), gradients(model, out.loss)
    assert_gradients_close(ref_grads, grads)


def _terms(batch) -> list[tuple]:
    """Per term, its record and the (token position in the record's row, sign) it reads."""
    width = batch["input_ids"].shape[1]
    starts = {}
    for flat in range(batch["input_ids"].numel()):
        r, c = divmod(flat, width)
        starts.setdefault(int(batch["pair_index"][r, c]), flat)
    count = batch["stp_weight"].numel()
    out = []
    for e in range(count):
        record = int(batch["stp_pairs"][e])
        sides = []
        for slot in (e, count + e):
            chosen = batch["stp_slot"] == slot
            sides.append(sorted(zip((batch["stp_index"][chosen] - starts[record]).tolist(), batch["stp_sign"][chosen].tolist())))
        out.append((int(batch["sample_ids"][record]), *map(tuple, sides)))
    return sorted(out)


def test_spans_depend_on_the_record_and_epoch_only(tokenizer):
    cfg = load_config(DEMO_CONFIG, _overrides("random_span", False, {}, 1.0, 1.0))
    samples = _samples(tokenizer, regex_conversations(True))
    layout = Layout(cfg.data, cfg.jepa, [], tokenizer.pad_token_id)
    whole = _terms(layout(samples))
    # another batch composition and order, another row length: the same spans
    cfg.data.row_length = 512
    other = Layout(cfg.data, cfg.jepa, [], tokenizer.pad_token_id)
    part = _terms(other(samples[::-1][:4]))
    assert part == [t for t in whole if t[0] in {s["sample_id"] for s in samples[::-1][:4]}]
    # every read stays inside its own conversation
    for sid, source, target in whole:
        assert all(0 <= i < len(samples[sid]["full"]) for i, _ in source + target)
    # another epoch draws other spans
    later = _terms(layout(_samples(tokenizer, regex_conversations(True), epoch=EPOCH + 1)))
    assert later != whole and [t[0] for t in later] == [t[0] for t in whole]


def test_records_without_usable_spans_carry_ce_only(tokenizer):
    cfg = load_config(DEMO_CONFIG, _overrides("random_span", False, {}, 1.0, 1.0))
    samples = _samples(tokenizer, regex_conversations(True))[:3]
    samples[0]["full_spans"] = np.full(4, -1, dtype=np.int32)  # plain text: spans unknown
    samples[1]["full"] = samples[1]["full"][: int(samples[1]["full_spans"][3]) - 1]  # the reply cut off
    batch = Layout(cfg.data, cfg.jepa, [], tokenizer.pad_token_id)(samples)
    assert batch["stp_pairs"].tolist() == [2]
    assert batch["za_index"].numel() == 0 and (batch["segment"] <= 1).all(), "no views are packed"
    # lambda 0: the same rows, no term at all; the objective still runs
    cfg.jepa.lambda_ = 0.0
    batch = Layout(cfg.data, cfg.jepa, [], tokenizer.pad_token_id)(samples)
    assert batch["stp_weight"].numel() == 0
    out = JepaModel(tiny_llama(len(tokenizer)), cfg.jepa)(batch)
    assert out.jepa.item() == 0.0 and math.isfinite(out.loss.item())


@pytest.mark.parametrize(
    "override,message",
    [
        ("jepa.distance=l2", "STP uses cosine or mse"),
        ("jepa.target=ema", "only the online target"),
        ("jepa.stp.max_span=0", "jepa.stp.max_span"),
        ("jepa.stp.variant=mean", "jepa.stp.variant"),
        ("jepa.stp.draw=sorted", "jepa.stp.draw"),
    ],
)
def test_config_refuses_what_stp_cannot_run(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DEMO_CONFIG, ["jepa.objective=stp", override])


def test_bench_stp_mode_packs_the_ce_rows(tokenizer):
    from megajepa.bench.modes import mode_config

    cfg = load_config(DEMO_CONFIG, ["data.max_length=96", "data.row_length=288"])
    cfg.data.row_length = 160  # several rows, as in the oracle test
    samples = _samples(tokenizer, regex_conversations(True))
    ce, stp = (
        Layout(mode_config(cfg, mode, 1).data, mode_config(cfg, mode, 1).jepa, [], tokenizer.pad_token_id)(samples)
        for mode in ("ce", "stp")
    )
    for key in ("input_ids", "position_ids", "labels", "sequence", "computed_tokens", "useful_tokens"):
        assert torch.equal(ce[key], stp[key]), key
    assert "stp_index" not in ce and stp["stp_weight"].numel() == len(samples)
