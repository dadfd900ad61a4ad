"""`megajepa bench head`: the LM head + CE, forward and backward, when the labelled tokens fit one
chunk: the logits kept for the backward (megajepa.model.head.token_cross_entropy) against the same
call under activation checkpointing (the head recomputed in the backward). Same inputs,
interleaved, process CPU time (steadier than wall time on a shared CPU)."""

from __future__ import annotations

import statistics
import time

import torch
from torch.utils.checkpoint import checkpoint

from megajepa.model.head import token_cross_entropy

SHAPES = ((2048, 128, 1500), (32000, 512, 400))  # (vocabulary, hidden, labelled tokens)


class HeadOnly(torch.nn.Module):
    """What token_cross_entropy reads of a causal LM: its output embedding and a config."""

    def __init__(self, hidden: int, vocab: int):
        super().__init__()
        self.head = torch.nn.Linear(hidden, vocab, bias=False)
        self.config = type("Config", (), {})()

    def get_output_embeddings(self):
        return self.head


def run(steps: int) -> None:
    """Print the markdown table: median milliseconds of `steps` rounds after 3 warm-up rounds."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    print("| vocabulary | hidden | tokens | kept ms | recomputed ms | recomputed / kept |")
    print("|---:|---:|---:|---:|---:|---:|")
    for vocab, hidden, tokens in SHAPES:
        lm = HeadOnly(hidden, vocab)
        h = torch.randn(tokens, hidden, requires_grad=True)
        y = torch.randint(0, vocab, (tokens,))
        ways = {
            "kept": lambda: token_cross_entropy(lm, h, y).sum().backward(),
            "recomputed": lambda: checkpoint(token_cross_entropy, lm, h, y, use_reentrant=False).sum().backward(),
        }
        seconds = {name: [] for name in ways}
        for step in range(3 + steps):  # 3 warm-up rounds
            for name, run in ways.items():
                start = time.process_time()
                run()
                if step >= 3:
                    seconds[name].append(time.process_time() - start)
        kept, recomputed = (statistics.median(seconds[name]) * 1e3 for name in ways)
        print(f"| {vocab} | {hidden} | {tokens} | {kept:.1f} | {recomputed:.1f} | {recomputed / kept:.2f}x |")
