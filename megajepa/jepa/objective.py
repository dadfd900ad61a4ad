"""The LLM-JEPA objective over one forward pass of packed rows (megajepa.data.layout):

    L = gamma * CE  +  lambda(step) * D( pred(z_a), sg?(z_b) )  [+ router_aux_coef * router_aux]

as the published reference computes it (galilai-group/llm-jepa, finetune.py): CE is the mean over
the labelled tokens of the conversations (the LM head's, megajepa.model.head); z_a and z_b are the
hidden states read in the user view (with its [PRED] tokens) and in the assistant view, each
sequence seen alone; D is 1 - cos by default. With the EMA target z_b comes from the teacher's
rows, passed in already computed. `jepa.distance=infonce` is the reference's --infonce:
cross-entropy of the cosine similarities over temperature, each pair's own target its positive
and the micro-batch's other targets its negatives. A mixture-of-experts family also trains its
router's load-balancing loss, as its own forward adds it (megajepa.model.router_aux;
model.router_aux_loss_coef, 0 to disable). `jepa.regularizer` (not the reference's) adds
weight * R(pred(z_a), z_b) in training forwards, R over the global batch (megajepa.jepa.regularizers).

The latent term is the objective's, chosen once when the model is built (jepa.objective): LlmJepa
here, or Stp (Semantic Tube Prediction, megajepa.jepa.stp). Each makes its predictor and computes
(term, pred(z_a), z_b) from the hidden states.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from megajepa.kernels.latent_loss import latent_loss
from megajepa.config import JepaConfig
from megajepa.jepa.regularizers import regularizer
from megajepa.jepa.stp import Stp
from megajepa.model.attention import MASK_KEYS, attention_mask, bucket_width
from megajepa.model.families import decoder_of, packed_input_ids
from megajepa.model.head import HeadLoss
from megajepa.model.predictor import build_predictor
from megajepa.model.router_aux import router_aux_coef, router_aux_loss


@dataclass
class JepaOutput(ModelOutput):
    """A ModelOutput (a dict) so that DeepSpeed's ZeRO-3 hooks can see the tensors inside."""

    loss: Optional[torch.Tensor] = None
    ce: Optional[torch.Tensor] = None
    jepa: Optional[torch.Tensor] = None
    lambda_: Optional[float] = None
    z_a: Optional[torch.Tensor] = None  # pred(z_a), [J, d]
    z_b: Optional[torch.Tensor] = None  # the target, [J, d]
    source_ce: Optional[torch.Tensor] = None  # with several sources: [2, S] CE sum, labelled tokens
    router_aux: Optional[torch.Tensor] = None  # a MoE family's load-balancing loss (unweighted), else None
    regularizer: Optional[torch.Tensor] = None  # jepa.regularizer's value (training forwards), unweighted


def lambda_at(cfg: JepaConfig, step: int) -> float:
    """The latent term's weight, ramped linearly over jepa.lambda_warmup_steps."""
    if cfg.lambda_warmup_steps <= 0:
        return cfg.lambda_
    return cfg.lambda_ * min(1.0, step / cfg.lambda_warmup_steps)


def infonce(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE with in-batch negatives: row i of z_a should pick row i of z_b."""
    similarity = F.normalize(z_a.float(), dim=-1) @ F.normalize(z_b.float(), dim=-1).T
    return F.cross_entropy(similarity / temperature, torch.arange(z_a.shape[0], device=z_a.device))


class LlmJepa:
    """jepa.objective=llm_jepa, the reference's: z_a read in view A (then through the predictor
    head, if any), z_b in view B or, with the EMA target, in the teacher's rows."""

    def __init__(self, cfg: JepaConfig):
        self.cfg = cfg

    def make_predictor(self, hidden_size: int) -> nn.Module:
        return build_predictor(self.cfg.predictor, hidden_size)

    def read_embeddings(self, hidden: torch.Tensor, batch: dict, name: str) -> torch.Tensor:
        """Per-pair embeddings `name` ('za' or 'zb'): the token at the layout's readout (pooling
        'last') or the mean over the view's tokens (pooling 'mean'). Index tensors only: no
        data-dependent shapes on the device."""
        flat = hidden.flatten(0, 1)
        if self.cfg.pooling == "last":
            return flat[batch[name + "_index"]]
        pairs = batch["jepa_pairs"].numel()
        owner = batch[name + "_pool_owner"]
        # in fp32: a bf16 sum loses the low bits of every added token, a bf16 count is inexact past 256
        sums = flat.new_zeros(pairs, flat.shape[-1], dtype=torch.float32).index_add(
            0, owner, flat[batch[name + "_pool_index"]].float()
        )
        counts = torch.zeros(pairs, device=flat.device).index_add(0, owner, torch.ones_like(owner, dtype=torch.float32))
        return (sums / counts.clamp_min(1)[:, None]).to(flat.dtype)

    def distance(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        if z_a.shape[0] == 0:
            return z_a.sum() * 0.0
        if self.cfg.distance == "infonce":
            return infonce(z_a, z_b, self.cfg.infonce_temperature)
        return latent_loss(z_a, z_b, self.cfg.distance)

    def latent(self, hidden: torch.Tensor, batch: dict, predictor: nn.Module, target_embeddings=None):
        """(loss, pred(z_a) [J, d], z_b [J, d]); z_b is `target_embeddings` where the EMA teacher
        computed them."""
        # The predictor runs on every rank every step, even on zero pairs: under ZeRO-3 a module
        # one rank skips would leave the others waiting in its parameter all-gather.
        z_a = predictor(self.read_embeddings(hidden, batch, "za"))
        if target_embeddings is not None:
            z_b = target_embeddings.to(z_a.dtype)
        else:
            z_b = self.read_embeddings(hidden, batch, "zb")
            if self.cfg.stop_grad:
                z_b = z_b.detach()
        return self.distance(z_a, z_b), z_a, z_b


OBJECTIVES = {"llm_jepa": LlmJepa, "stp": Stp}  # jepa.objective -> its class


class JepaModel(nn.Module):
    """What the DeepSpeed engine trains: the causal LM and the predictor head (if any).

    The EMA teacher is a second instance, so its flat parameter layout matches the online one."""

    def __init__(self, lm: nn.Module, cfg: JepaConfig):
        super().__init__()
        self.lm = lm
        self.cfg = cfg
        self.objective = OBJECTIVES[cfg.objective](cfg)  # a plain object: no parameters of its own
        self.predictor = self.objective.make_predictor(lm.config.hidden_size).to(lm.dtype)
        self.head_loss = HeadLoss(lm)

    def hidden_states(self, batch: dict, prefix: str = ""):
        """-> (final hidden [R, L, d] the LM head reads, embedding-layer hidden [R, L, d], the
        router's auxiliary loss or None) of the batch's online rows (prefix '') or teacher rows
        (prefix 'teacher_', which train nothing: no auxiliary loss)."""
        rows = {key: batch[prefix + key] for key in ("input_ids", *MASK_KEYS)}
        width = rows["input_ids"].shape[1]
        if self.lm.config._attn_implementation == "flex_attention":
            # whole tiles for the BlockMask; the added columns are padding (sequence 0), cut off
            # again below
            extra = bucket_width(width) - width
            rows = {key: F.pad(value, (0, extra)) for key, value in rows.items()}
        mask = attention_mask(rows, self.lm)
        layer = self.cfg.embedding_layer
        router = prefix == "" and router_aux_coef(self.lm) > 0
        out = decoder_of(self.lm)(
            input_ids=packed_input_ids(self.lm, rows["input_ids"], rows["sequence"]),
            position_ids=rows["position_ids"],
            attention_mask=mask,
            output_hidden_states=layer != -1,
            use_cache=False,
            **({"output_router_logits": True} if router else {}),
        )
        final = out.last_hidden_state[:, :width]
        aux = router_aux_loss(self.lm, out.router_logits, rows) if router else None
        # -1 is the final, normalised state; other indices are transformers' hidden_states tuple
        return final, (final if layer == -1 else out.hidden_states[layer][:, :width]), aux

    @torch.no_grad()
    def encode_targets(self, batch: dict) -> torch.Tensor:
        """z_b from the teacher rows (this model is then the EMA teacher)."""
        _, emb, _ = self.hidden_states(batch, "teacher_")
        return self.objective.read_embeddings(emb, batch, "zb")

    def forward(self, batch: dict, step: int = 0, target_embeddings: Optional[torch.Tensor] = None) -> JepaOutput:
        final, emb, aux = self.hidden_states(batch)
        # The LM head runs only where there is a label, exactly as the model's own forward applies
        # it, inside one module call on every rank (under ZeRO-3: one gather of the head whatever
        # the labels).
        ce, source_ce = self.head_loss(self.lm, final, batch)
        lam = lambda_at(self.cfg, step)
        jepa, z_a, z_b = self.objective.latent(emb, batch, self.predictor, target_embeddings)
        loss = self.cfg.gamma * ce + lam * jepa
        reg = None
        if self.training and self.cfg.regularizer != "none":  # one collective, on every rank
            reg = regularizer(self.cfg.regularizer, z_a, z_b, step, self.cfg.sigreg_projections)
            loss = loss + self.cfg.regularizer_weight * reg
            reg = reg.detach()
        if aux is not None:  # the term the family's own forward adds to its loss
            loss = loss + router_aux_coef(self.lm) * aux
            aux = aux.detach()
        return JepaOutput(
            loss=loss, ce=ce.detach(), jepa=jepa.detach(), lambda_=lam, z_a=z_a, z_b=z_b, source_ce=source_ce,
            router_aux=aux, regularizer=reg,
        )
