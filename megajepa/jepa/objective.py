"""The LLM-JEPA objective over one forward pass of packed rows:

    L = gamma * CE  +  lambda(step) * D( pred(z_a), sg?(z_b) )

CE runs over the labelled tokens of the rows (view B by default; A and B for pretraining text),
z_a is read at the last [PRED] token (the last view-A token without [PRED] tokens), z_b at the
last token of the view-B-alone segment C' (online target) or from the teacher's rows (EMA
target, passed in already computed). The row layout is megajepa.data.layout's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from kernels.latent_loss import latent_loss
from megajepa.config import JepaConfig
from megajepa.data.layout import IGNORE_INDEX, SEG_CB, SEG_P, SEG_T
from megajepa.model.attention import attention_mask
from megajepa.model.predictor import build_predictor, uses_pred_tokens


@dataclass
class JepaOutput(ModelOutput):
    """A ModelOutput (a dict) so that DeepSpeed's ZeRO-3 hooks can see the tensors inside."""

    loss: Optional[torch.Tensor] = None
    ce: Optional[torch.Tensor] = None
    jepa: Optional[torch.Tensor] = None
    lambda_: Optional[float] = None
    z_a: Optional[torch.Tensor] = None  # pred(z_a), [J, d]
    z_b: Optional[torch.Tensor] = None  # the target, [J, d]


def lambda_at(cfg: JepaConfig, step: int) -> float:
    """The latent term's weight, ramped linearly over jepa.lambda_warmup_steps."""
    if cfg.lambda_warmup_steps <= 0:
        return cfg.lambda_
    return cfg.lambda_ * min(1.0, step / cfg.lambda_warmup_steps)


def collapse_std(z: torch.Tensor) -> torch.Tensor:
    """Std across the batch of the L2-normalised embeddings, averaged over dimensions.

    About 1/sqrt(d) for well-spread embeddings; it falls towards 0 when they collapse to a point."""
    if z.shape[0] < 2:
        return torch.zeros((), device=z.device)
    return F.normalize(z.detach().float(), dim=-1).std(dim=0).mean()


class JepaModel(nn.Module):
    """What the DeepSpeed engine trains: the causal LM and the predictor head (if any).

    The EMA teacher is a second instance, so its flat parameter layout matches the online one."""

    def __init__(self, lm: nn.Module, cfg: JepaConfig):
        super().__init__()
        self.lm = lm
        self.cfg = cfg
        self.predictor = build_predictor(cfg.predictor, lm.config.hidden_size).to(lm.dtype)
        self.za_kind = SEG_P if uses_pred_tokens(cfg.predictor, cfg.k) else SEG_T

    def hidden_states(self, input_ids, position_ids, pair_index, segment):
        """-> (final hidden [R, L, d] the LM head reads, embedding-layer hidden [R, L, d])."""
        mask = attention_mask(pair_index, segment, self.lm.config._attn_implementation)
        layer = self.cfg.embedding_layer
        out = self.lm.base_model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=mask,
            output_hidden_states=layer != -1,
            use_cache=False,
        )
        final = out.last_hidden_state
        # -1 is the final, normalised state; other indices are transformers' hidden_states tuple
        return final, (final if layer == -1 else out.hidden_states[layer])

    def read_embeddings(self, hidden, pair_index, segment, index, pairs, kind) -> torch.Tensor:
        """Per-pair embeddings: the token at the flat `index` (pooling 'last') or the mean over
        the pair's `kind` segment (pooling 'mean'), for the pairs in `pairs`."""
        flat = hidden.flatten(0, 1)
        if self.cfg.pooling == "last":
            return flat[index]
        selected = segment.flatten() == kind
        owner = pair_index.flatten()[selected]
        n = int(pair_index.max().item()) + 1 if pair_index.numel() else 0
        sums = flat.new_zeros(n, flat.shape[-1]).index_add(0, owner, flat[selected])
        counts = torch.bincount(owner, minlength=n).clamp_min(1).to(flat.dtype)
        return (sums / counts[:, None])[pairs]

    @torch.no_grad()
    def encode_targets(self, batch: dict) -> torch.Tensor:
        """z_b from the teacher rows (this model is then the EMA teacher)."""
        _, emb = self.hidden_states(
            batch["teacher_input_ids"],
            batch["teacher_position_ids"],
            batch["teacher_pair_index"],
            batch["teacher_segment"],
        )
        return self.read_embeddings(
            emb, batch["teacher_pair_index"], batch["teacher_segment"], batch["zb_index"], batch["jepa_pairs"], SEG_CB
        )

    def forward(self, batch: dict, step: int = 0, target_embeddings: Optional[torch.Tensor] = None) -> JepaOutput:
        final, emb = self.hidden_states(
            batch["input_ids"], batch["position_ids"], batch["pair_index"], batch["segment"]
        )
        labels = batch["labels"].flatten()
        labelled = labels != IGNORE_INDEX
        # The LM head runs only where there is a label: a third of the tokens or fewer.
        logits = self.lm.get_output_embeddings()(final.flatten(0, 1)[labelled]).float()
        if labelled.any():
            ce = F.cross_entropy(logits, labels[labelled])
        else:
            ce = logits.sum() * 0.0

        lam = lambda_at(self.cfg, step)
        pairs = batch["jepa_pairs"]
        # The predictor runs on every rank every step, even on zero pairs: under ZeRO-3 a module
        # one rank skips would leave the others waiting in its parameter all-gather.
        z_a = self.predictor(
            self.read_embeddings(emb, batch["pair_index"], batch["segment"], batch["za_index"], pairs, self.za_kind)
        )
        if target_embeddings is not None:
            z_b = target_embeddings.to(z_a.dtype)
        else:
            z_b = self.read_embeddings(emb, batch["pair_index"], batch["segment"], batch["zb_index"], pairs, SEG_CB)
            if self.cfg.stop_grad:
                z_b = z_b.detach()
        if pairs.numel() == 0:
            jepa = z_a.sum() * 0.0
        else:
            jepa = latent_loss(z_a, z_b, self.cfg.distance)
        loss = self.cfg.gamma * ce + lam * jepa
        return JepaOutput(loss=loss, ce=ce.detach(), jepa=jepa.detach(), lambda_=lam, z_a=z_a, z_b=z_b)
