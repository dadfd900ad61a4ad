"""The architecture matrix shared by tests/test_families.py and its 2-rank ZeRO-3 worker.

Tiny (2-layer) configs of each Hugging Face causal-LM family, packed rows built by hand (several
sequences per row, a tail that shares a prefix with an earlier sequence, padding), the packed
pass through megajepa's decoder + mask + head, and the oracle: every sequence run alone through
the model's own HF forward (`model(input_ids)`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megajepa.config import ModelConfig
from megajepa.model.attention import attention_mask
from megajepa.model.build import build_model
from megajepa.model.families import decoder_of, packed_input_ids
from megajepa.model.head import lm_cross_entropy, lm_logits
from megajepa.model.router_aux import router_aux_coef, router_aux_loss

VOCAB = 96
WINDOW = 4  # shorter than most sequences below, so a dropped window shows
_LLAMA_LIKE = dict(
    hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64,
)

# family name -> HF config (model_type + arguments); every dropout is off in eval() mode.
FAMILIES: dict[str, dict] = {
    "llama": dict(model_type="llama", **_LLAMA_LIKE, tie_word_embeddings=False),
    "llama_tied": dict(model_type="llama", **_LLAMA_LIKE, tie_word_embeddings=True),
    "mistral": dict(model_type="mistral", **_LLAMA_LIKE, sliding_window=WINDOW),
    "mixtral": dict(model_type="mixtral", **_LLAMA_LIKE, sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2),
    "qwen2": dict(model_type="qwen2", **_LLAMA_LIKE, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    "qwen2_moe": dict(
        model_type="qwen2_moe", **_LLAMA_LIKE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
        shared_expert_intermediate_size=24, use_sliding_window=True, sliding_window=WINDOW,
    ),
    "qwen3": dict(model_type="qwen3", **_LLAMA_LIKE, head_dim=8, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    "qwen3_moe": dict(
        model_type="qwen3_moe", **_LLAMA_LIKE, head_dim=8, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=24, use_sliding_window=True, sliding_window=WINDOW,
    ),
    "gemma": dict(model_type="gemma", **_LLAMA_LIKE, head_dim=8),
    "gemma2": dict(model_type="gemma2", **_LLAMA_LIKE, head_dim=8, sliding_window=WINDOW, final_logit_softcapping=2.0),
    "gemma3_text": dict(
        model_type="gemma3_text", **_LLAMA_LIKE, head_dim=8, sliding_window=WINDOW, final_logit_softcapping=2.0,
        layer_types=["sliding_attention", "full_attention"],
    ),
    # the Gemma 3 4B/12B/27B config: image-text composite; megajepa trains its text-only causal LM
    "gemma3": dict(model_type="gemma3", text_config=dict(
        **_LLAMA_LIKE, head_dim=8, sliding_window=WINDOW, final_logit_softcapping=2.0,
        layer_types=["sliding_attention", "full_attention"],
    )),
    # pad id 0 = the packed rows' padding id: its zero embedding row under AltUp's magnitude norm
    "gemma3n_text": dict(
        model_type="gemma3n_text", **_LLAMA_LIKE, head_dim=8, sliding_window=WINDOW, pad_token_id=0,
        layer_types=["sliding_attention", "full_attention"], num_kv_shared_layers=0, vocab_size_per_layer_input=VOCAB,
        hidden_size_per_layer_input=8, laurel_rank=8, activation_sparsity_pattern=[0.95, 0.0],
    ),
    "phi": dict(model_type="phi", hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64, partial_rotary_factor=0.5),
    "phi3": dict(model_type="phi3", **_LLAMA_LIKE, sliding_window=WINDOW),  # default pad id 32000 > VOCAB
    "olmo": dict(model_type="olmo", **_LLAMA_LIKE),
    "olmo2": dict(model_type="olmo2", **_LLAMA_LIKE),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=64),
    "gpt_neox": dict(model_type="gpt_neox", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64, rotary_pct=0.5),
    # global layer 0, local layer 1 (window 4, in positions: the tail C reads A's prefix within it)
    "gpt_neo": dict(model_type="gpt_neo", hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                    max_position_embeddings=64, attention_types=[[["global", "local"], 1]], window_size=WINDOW),
    "gptj": dict(model_type="gptj", n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=4),
    "opt": dict(model_type="opt", hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64, word_embed_proj_dim=32),
    "falcon": dict(model_type="falcon", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2,
                   new_decoder_architecture=True, alibi=False),
    "starcoder2": dict(model_type="starcoder2", **_LLAMA_LIKE, sliding_window=WINDOW),
    # no SDPA: eager's additive mask (transformers 5 passes a 4D mask through unchanged)
    "xglm": dict(model_type="xglm", d_model=32, ffn_dim=48, num_layers=2, attention_heads=4, max_position_embeddings=64),
    "granite": dict(model_type="granite", **_LLAMA_LIKE, logits_scaling=4.0, embedding_multiplier=2.0,
                    residual_multiplier=0.5, attention_multiplier=0.3),
    "cohere": dict(model_type="cohere", **_LLAMA_LIKE, logit_scale=0.5),
}

# Refused by name: ALiBi computes its bias from a 2D padding mask over the whole row.
REFUSED: dict[str, dict] = {
    "falcon_alibi": dict(model_type="falcon", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, alibi=True),
    "bloom": dict(model_type="bloom", hidden_size=32, n_layer=2, n_head=4),
    "mpt": dict(model_type="mpt", d_model=32, n_layers=2, n_heads=4, max_seq_len=64),
}


def write_config(tmp_path, name: str, spec: dict) -> str:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(spec))
    return str(path)


def build(tmp_path, name: str, attention: str = "auto", ds_config=None, spec=None):
    cfg = ModelConfig(config=write_config(tmp_path, name, spec or FAMILIES[name]), attention=attention)
    return build_model(cfg, range(VOCAB), dtype=torch.float32, ds_config=ds_config, seed=0)


@dataclass
class Packed:
    """Hand-packed rows and, per sequence, what its lone run is and where its tokens sit."""

    batch: dict  # input_ids, position_ids, sequence, prefix_sequence, prefix_length, labels
    alone: list  # per sequence: the token ids of its lone run [n]
    where: list  # per sequence: (row, row indices [m], indices into its lone run [m])


def pack(seed: int = 0, width: int = 40) -> Packed:
    """Row 0: A (10 tokens), B (6), C = A[:5] + a 4-token tail stored as the tail only, padding.
    Row 1: D (15 tokens), E (1 token), padding. Labels are each token's next token in its own
    sequence (-100 at a sequence's last token, on padding and on C's shared part)."""
    g = torch.Generator().manual_seed(seed)
    a, b, tail, d, e = (torch.randint(0, VOCAB, (n,), generator=g) for n in (10, 6, 4, 15, 1))
    shared = 5
    c = torch.cat([a[:shared], tail])
    keys = ("input_ids", "position_ids", "sequence", "prefix_sequence", "prefix_length")
    batch = {k: torch.zeros(2, width, dtype=torch.long) for k in keys}
    batch["labels"] = torch.full((2, width), -100, dtype=torch.long)
    alone, where = [], []

    def place(row, start, ids, seq_id, positions, first_in_alone, full, prefix=(0, 0)):
        n = len(ids)
        cols = torch.arange(start, start + n)
        batch["input_ids"][row, cols] = ids
        batch["position_ids"][row, cols] = positions
        batch["sequence"][row, cols] = seq_id
        batch["prefix_sequence"][row, cols] = prefix[0]
        batch["prefix_length"][row, cols] = prefix[1]
        nxt = torch.cat([full[first_in_alone + 1:first_in_alone + n], torch.tensor([-100])])
        batch["labels"][row, cols] = nxt
        alone.append(full)
        where.append((row, cols, torch.arange(first_in_alone, first_in_alone + n)))
        return start + n

    s = place(0, 0, a, 1, torch.arange(10), 0, a)
    s = place(0, s, b, 2, torch.arange(6), 0, b)
    place(0, s, tail, 3, torch.arange(shared, shared + 4), shared, c, prefix=(1, shared))
    s = place(1, 0, d, 1, torch.arange(15), 0, d)
    place(1, s, e, 2, torch.arange(1), 0, e)
    return Packed(batch, alone, where)


def readout_weights(lm, n_sequences: int) -> torch.Tensor:
    """Fixed weights for a term on each sequence's last hidden state (its 'embedding')."""
    g = torch.Generator().manual_seed(7)
    return torch.randn(n_sequences, lm.config.hidden_size, generator=g)


def packed_pass(lm, packed: Packed):
    """-> (loss, ce, final hidden [R, L, d], logits at labelled tokens [N, V]) of the packed pass;
    a MoE family's loss includes its router's auxiliary term, as megajepa trains it."""
    batch = packed.batch
    router = router_aux_coef(lm) > 0
    out = decoder_of(lm)(
        input_ids=packed_input_ids(lm, batch["input_ids"], batch["sequence"]), position_ids=batch["position_ids"],
        attention_mask=attention_mask(batch, lm), use_cache=False,
        **({"output_router_logits": True} if router else {}),
    )
    hidden = out.last_hidden_state
    labels = batch["labels"].flatten()
    labelled = torch.nonzero(labels != -100).squeeze(1)  # test-side selection, outside the CE
    flat = hidden.flatten(0, 1)
    ce = lm_cross_entropy(lm, flat[labelled], labels[labelled])
    last = torch.stack([hidden[row, cols[-1]] for row, cols, _ in packed.where])
    loss = ce + (last * readout_weights(lm, len(packed.where))).sum()
    aux = router_aux_loss(lm, out.router_logits, batch) if router else None
    if aux is not None:
        loss = loss + router_aux_coef(lm) * aux
    return loss, ce, hidden, lm_logits(lm, flat[labelled])


def oracle_pass(lm, packed: Packed):
    """The same quantities from each sequence run alone through `lm(input_ids)`:
    -> (loss, ce, per sequence (hidden [m, d], logits [m, V]) at its packed tokens)."""
    total, count, lasts, per_sequence = 0.0, 0, [], []
    # the final hidden state is what the model's own LM head reads (gemma3n's hidden_states
    # tuple holds its AltUp streams, not that)
    heads_input = []
    hook = lm.get_output_embeddings().register_forward_hook(lambda module, args, out: heads_input.append(args[0]))
    for ids, (row, cols, in_alone) in zip(packed.alone, packed.where):
        out = lm(input_ids=ids[None], use_cache=False)
        logits, hidden = out.logits[0], heads_input.pop()[0]
        labels = packed.batch["labels"][row, cols]
        keep = labels != -100
        if keep.any():
            total = total + F.cross_entropy(logits[in_alone][keep].float(), labels[keep], reduction="sum")
            count += int(keep.sum())
        lasts.append(hidden[in_alone[-1]])
        per_sequence.append((hidden[in_alone], logits[in_alone]))
    hook.remove()
    ce = total / count
    loss = ce + (torch.stack(lasts) * readout_weights(lm, len(packed.where))).sum()
    aux = oracle_router_aux(lm, packed) if router_aux_coef(lm) > 0 else None
    if aux is not None:
        loss = loss + router_aux_coef(lm) * aux  # the (router_)aux_loss_coef the model's forward uses
    return loss, ce, per_sequence


def oracle_router_aux(lm, packed: Packed):
    """The model's own forward's auxiliary loss (unweighted) on the batch of every packed sequence,
    each whole (a tail with its shared prefix), right-padded, with its 2D attention mask; None
    when no layer of the model routes (its own forward then fails on the empty tuple of logits)."""
    width = max(len(ids) for ids in packed.alone)
    ids = torch.zeros(len(packed.alone), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, alone in enumerate(packed.alone):
        ids[i, :len(alone)], mask[i, :len(alone)] = alone, 1
    with torch.no_grad():
        routed = decoder_of(lm)(input_ids=ids[:1], output_router_logits=True, use_cache=False).router_logits
    if not routed:
        return None
    return lm(input_ids=ids, attention_mask=mask, output_router_logits=True, use_cache=False).aux_loss


# --- every causal-LM model type transformers lists, from its own mapping --------------------------

# Sizes every config class is shrunk to, where it has the attribute (attribute_map included).
_SHRINK = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, ffn_dim=48,
    max_position_embeddings=64, n_positions=64, vocab_size=VOCAB, num_local_experts=4, num_experts=4,
    n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, shared_expert_intermediate_size=24,
    first_k_dense_replace=1, n_group=1, topk_group=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4,
    qk_nope_head_dim=4, v_head_dim=8, word_embed_proj_dim=32, decoder_start_token_id=0, decoder_layers=2,
    encoder_layers=2, decoder_attention_heads=4, encoder_attention_heads=4, decoder_ffn_dim=48, encoder_ffn_dim=48,
)
_IF_SET = dict(num_key_value_heads=2, head_dim=8, sliding_window=WINDOW, window_size=WINDOW, rotary_dim=4)
_SUB_CONFIGS = ("text_config", "vision_config", "audio_config", "decoder", "encoder")
# model_type -> arguments the generic shrink cannot guess (kept small: what each family needs).
OVERRIDES: dict[str, dict] = {
    "gpt_neo": dict(num_layers=2, attention_types=[[["global", "local"], 1]]),
    "flint": dict(mlp_only_layers=[0]),  # layer 1 routes (the default shrink leaves both dense)
    # no layer shares another's KV cache (15 of its 35 do), small per-layer embeddings and laurel
    "gemma3n_text": dict(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"], num_kv_shared_layers=0, vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=8,
                         laurel_rank=8, intermediate_size=48, activation_sparsity_pattern=[0.95, 0.0]),
    "lfm2": dict(num_hidden_layers=2, layer_types=["conv", "full_attention"]),  # its defaults are all attention
    # transformers 5.25's own defaults fail its validator (a per-layer input, unshared kv layers)
    "gemma4_assistant": dict(text_config=dict(
        hidden_size_per_layer_input=0, vocab_size_per_layer_input=0, num_hidden_layers=2, num_kv_shared_layers=2,
    )),
}


def _set(config, key, value) -> None:
    try:
        setattr(config, key, value)
    except (AttributeError, NotImplementedError):  # a derived property
        pass


def _shrink(config) -> None:
    depth = getattr(config, "num_hidden_layers", None)
    for key, value in {**_SHRINK, **_IF_SET}.items():
        try:
            current = getattr(config, key)
        except Exception:  # noqa: BLE001 - absent, or per-layer only
            continue
        if isinstance(current, bool) or not isinstance(current, int):
            continue
        _set(config, key, value)
    if isinstance(depth, int) and depth > 2:
        # per-layer lists (layer_types, mlp_layer_types, ...): two layers, one of each of the first
        # two kinds of layer where there are several, so a hybrid stays hybrid
        types = list(getattr(config, "layer_types", None) or [])
        firsts = sorted({kind: i for i, kind in reversed(list(enumerate(types)))}.values())[:2]
        keep = (firsts + [i for i in range(depth) if i not in firsts])[:2]
        for key, value in list(vars(config).items()):
            if isinstance(value, list) and len(value) == depth:
                _set(config, key, [value[i] for i in sorted(keep)])
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value >= VOCAB:
            _set(config, key, VOCAB - 1)
    for key in _SUB_CONFIGS:
        sub = getattr(config, key, None)
        if sub is not None and hasattr(sub, "to_dict"):
            _shrink(sub)


def causal_lm_types() -> list[str]:
    """Every model type transformers builds with AutoModelForCausalLM (its own mapping)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def tiny_spec(model_type: str) -> dict:
    """A tiny random config of `model_type`: its config class's defaults shrunk (hidden 32, 2
    layers, 4 heads, vocabulary VOCAB), then OVERRIDES (a composite's sub-configs get those of
    their own model type); as the JSON megajepa's model.config reads."""
    from transformers import CONFIG_MAPPING, AutoConfig

    overrides = dict(OVERRIDES.get(model_type, {}))
    for key, sub in getattr(CONFIG_MAPPING[model_type], "sub_configs", {}).items():
        if getattr(sub, "model_type", None) in OVERRIDES:
            overrides.setdefault(key, dict(OVERRIDES[sub.model_type]))
    config = AutoConfig.for_model(model_type, **overrides)
    _shrink(config)
    spec = config.to_diff_dict()
    for key in ("transformers_version", "architectures", "_name_or_path", "dtype", "torch_dtype"):
        spec.pop(key, None)
    return {**spec, "model_type": model_type}


def default_refusal(model_type: str):
    """refusal() of the config class's own defaults (on the meta device), flag set."""
    from transformers import AutoConfig

    from megajepa.model.families import refusal

    return refusal(AutoConfig.for_model(model_type), allow_unverified=True)


def classify(tmp_path, model_type: str, compare) -> tuple[str, str]:
    """(outcome, detail) of one model type: 'refused' (by name, what the architecture does, even
    with model.allow_unverified_family), 'exact' (`compare` against its own forward passed),
    'wrong' (compare failed) or 'crash' (building or running raised)."""
    import traceback

    from megajepa.model.families import UnsupportedArchitecture

    try:
        spec = tiny_spec(model_type)
        cfg = ModelConfig(config=write_config(tmp_path, model_type, spec), allow_unverified_family=True)
        lm = build_model(cfg, range(VOCAB), dtype=torch.float32, seed=0)
    except UnsupportedArchitecture as err:
        return "refused", str(err)
    except Exception as err:  # noqa: BLE001
        reason = default_refusal(model_type)  # the tiny config does not validate: judge the real one
        if reason is not None:
            return "refused", f"model architecture {reason}"
        return "crash", f"build: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    try:
        compare(lm, pack())
    except AssertionError as err:
        return "wrong", str(err).splitlines()[0][:200]
    except Exception as err:  # noqa: BLE001
        frame = traceback.extract_tb(err.__traceback__)[-1]
        return "crash", f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''} ({frame.filename.split('/')[-1]}:{frame.lineno})"
    return "exact", ""
