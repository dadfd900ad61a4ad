"""Greedy decoding of view B from the prompt (view A alone: no [PRED] tokens at inference)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megajepa.data.tokenizer import pad_token_id


@dataclass
class Generation:
    text: str  # decoded up to the end-of-turn token, special tokens dropped
    stopped: bool  # the model emitted the end-of-turn token within the cap
    new_tokens: int


def normalize(text: str) -> str:
    """Exact match compares texts with runs of whitespace collapsed and ends stripped."""
    return " ".join(text.split())


def _left_padded(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt):] = torch.tensor(prompt)
        mask[i, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int) -> list[Generation]:
    """One batch of prompts, left-padded, decoded greedily until each emits eos or the cap."""
    eos, pad = tokenizer.eos_token_id, pad_token_id(tokenizer)
    ids, mask = _left_padded(prompts, pad, model.device)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    results = []
    for row in out[:, ids.shape[1]:].tolist():
        stopped = eos in row
        tokens = row[: row.index(eos)] if stopped else row
        results.append(Generation(tokenizer.decode(tokens, skip_special_tokens=True), stopped, len(tokens)))
    return results
