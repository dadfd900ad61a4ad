"""`megajepa plan CONFIG --gpus N --gpu-memory GB`: the expected GPU memory per rank, and the largest
token budget per micro-batch that fits.

The formulas, term by term, and what each counts: docs/plan.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

from megajepa.config import Config, ConfigError, load_config, max_record_tokens

GIB = 1024**3
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
OPTIMIZER_BYTES = 12  # fp32 master + Adam's exp_avg and exp_avg_sq, per partition element
FP32 = 4
LOGIT_BYTES_PER_VOCAB = 12  # fp32 logits + log-probs, then their gradients (see the module doc)


class PlanError(ValueError):
    """A config or argument the plan cannot work from; the message names it."""


@dataclass
class Dims:
    """The model's shape, as the activation formula needs it."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def of(cls, arch) -> "Dims":
        heads = arch.num_attention_heads
        head_dim = getattr(arch, "head_dim", None) or arch.hidden_size // heads
        return cls(
            hidden=arch.hidden_size,
            intermediate=arch.intermediate_size,
            layers=arch.num_hidden_layers,
            heads=heads,
            kv_heads=getattr(arch, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            vocab=arch.vocab_size,
        )

    def layer_activation_bytes(self) -> int:
        """A: bytes autograd keeps per token for one decoder layer (module doc)."""
        h, i = self.hidden, self.intermediate
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return 16 * h + 8 + 4 * q + 4 * kv + 4 * self.heads + 8 * i

    def activation_bytes_per_token(self, checkpointing: bool) -> int:
        a, h = self.layer_activation_bytes(), self.hidden
        body = self.layers * 2 * h + a if checkpointing else self.layers * a
        return body + 12 * h + 4


@dataclass
class Zero:
    """The ZeRO settings the run would use, with DeepSpeed's defaults filled in."""

    stage: int
    persistence_threshold: int
    model_persistence_threshold: int
    reduce_bucket_size: int
    prefetch_bucket_size: int
    sub_group_size: int
    offload_optimizer: bool
    offload_param: bool

    @classmethod
    def of(cls, ds_config: dict) -> "Zero":
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

        z = DeepSpeedZeroConfig(**ds_config.get("zero_optimization", {}))
        return cls(
            stage=int(z.stage),
            persistence_threshold=int(z.param_persistence_threshold),
            model_persistence_threshold=int(z.model_persistence_threshold),
            reduce_bucket_size=int(z.reduce_bucket_size),
            prefetch_bucket_size=int(z.prefetch_bucket_size),
            sub_group_size=int(z.sub_group_size),
            offload_optimizer=z.offload_optimizer is not None and str(z.offload_optimizer.device) != "none",
            offload_param=z.offload_param is not None and str(z.offload_param.device) != "none",
        )


@dataclass
class Plan:
    config_path: str
    gpus: int
    gpu_memory: float  # bytes
    headroom: float  # bytes
    precision: str
    dims: Dims
    zero: Zero
    num_params: int
    state: dict[str, float]  # model state, bytes per rank, by the bench's names (and gradients)
    buffers: dict[str, float]
    step_transient: float  # the fp32 gradient of the largest sub-group, at the optimizer step
    host: dict[str, float]  # offloaded to host memory, bytes per rank
    resume_from: int  # the saved world size the elastic figures assume
    gpus_per_node: int
    conversion_workers: int
    elastic_host: dict[str, float]  # host memory at an elastic resume (docs/plan.md), bytes
    grad_accum: int
    teacher: bool  # jepa.target=ema: the teacher's one forward per step
    labelled_fraction: float
    ce_chunk: int
    row_length: int
    checkpointing: bool  # model.gradient_checkpointing
    config_tokens: tuple[str, int]  # (how the config sizes a micro-batch, the most tokens it holds)
    notes: list[str] = field(default_factory=list)

    def _logit_bytes(self, tokens: int, chunked: bool) -> float:
        labelled = self.labelled_fraction * tokens
        if chunked:  # a chunk never holds more than the labelled tokens there are
            labelled = min(labelled, self.ce_chunk)
        return labelled * LOGIT_BYTES_PER_VOCAB * self.dims.vocab

    def state_bytes(self) -> float:
        return sum(self.state.values())

    def usable(self) -> float:
        return self.gpu_memory - self.headroom

    def _backward(self, tokens: int, checkpointing: bool, chunked: bool) -> float:
        activations = tokens * self.dims.activation_bytes_per_token(checkpointing)
        return self.state_bytes() + sum(self.buffers.values()) + activations + self._logit_bytes(tokens, chunked)

    def _teacher_forward(self, tokens: int) -> float:
        if not self.teacher:
            return 0.0
        transient = self.grad_accum * tokens / 2 * self.dims.layer_activation_bytes()
        return self.state_bytes() + sum(self.buffers.values()) + transient

    def peak_bytes(self, tokens: int, checkpointing: bool, chunked: bool) -> float:
        """Bytes at the peak for `tokens` per micro-batch: the backward's, the optimizer step's, or
        the teacher's forward over the step's micro-batches."""
        return max(
            self._backward(tokens, checkpointing, chunked),
            self.state_bytes() + self.step_transient,
            self._teacher_forward(tokens),
        )

    def node_host_bytes(self) -> float:
        """Host memory one node needs at an elastic resume: the conversion (node 0, alone) or
        its ranks loading."""
        e = self.elastic_host
        loading = self.gpus_per_node * (e["universal load per rank"] + e["EMA reshard per rank"])
        return max(e["conversion, extract"], e["conversion, merge"], loading)

    def max_tokens(self, checkpointing: bool, chunked: bool) -> int:
        """The largest tokens per micro-batch per rank whose peak fits (0: not even the model state).

        The peak grows with the tokens piecewise linearly: bisect on it."""
        usable = self.usable()
        if self.peak_bytes(1, checkpointing, chunked) > usable:
            return 0
        low, high = 1, 2
        while self.peak_bytes(high, checkpointing, chunked) <= usable:
            low, high = high, high * 2
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if self.peak_bytes(mid, checkpointing, chunked) <= usable else (low, mid)
        return low


def _vocab_size(cfg: Config, spec: dict, override: Optional[int]) -> int:
    """The vocabulary the run trains, as build_model sizes it: model.vocab_size, else the
    tokenizer with its [PRED] tokens."""
    from megajepa.model.predictor import uses_pred_tokens

    if cfg.model.vocab_size is not None:
        return cfg.model.vocab_size
    k = cfg.jepa.k if uses_pred_tokens(cfg.jepa.predictor, cfg.jepa.k) else 0
    if override is not None:
        return override + k  # a tokenizer without reserved [PRED] tokens, like Llama 3's
    if os.path.isdir(cfg.data.tokenizer):
        from transformers import AutoTokenizer

        from megajepa.data.tokenizer import add_pred_tokens

        tokenizer = AutoTokenizer.from_pretrained(cfg.data.tokenizer)
        add_pred_tokens(tokenizer, k)
        return len(tokenizer)
    own = spec.get("vocab_size", (spec.get("text_config") or {}).get("vocab_size"))  # a composite's: its text config's
    if own is not None:
        return int(own) + k
    raise PlanError(
        f"data.tokenizer: no such directory: {cfg.data.tokenizer}, and the model config has no vocab_size: "
        "pass --vocab-size (the tokenizer's size, e.g. 128256 for Llama 3)"
    )


def architecture(cfg: Config, vocab_override: Optional[int] = None):
    """The HF config of the model the run would train, its vocabulary sized as training sizes it."""
    from transformers import AutoConfig

    from megajepa.model.families import causal_lm_config

    if cfg.model.pretrained is not None:
        path = os.path.join(cfg.model.pretrained, "config.json")
        key = "model.pretrained"
    else:
        path, key = cfg.model.config, "model.config"
    if not os.path.isfile(path):
        raise PlanError(f"{key}: no such file: {path}")
    with open(path) as f:
        try:
            spec = json.load(f)
        except json.JSONDecodeError as err:
            raise PlanError(f"{path}: not valid JSON: {err}") from None
    model_type = spec.pop("model_type", None)
    if model_type is None:
        raise PlanError(f"{path}: missing 'model_type' (e.g. \"llama\")")
    vocab = _vocab_size(cfg, spec, vocab_override)
    for name in ("architectures", "transformers_version", "_name_or_path", "torch_dtype", "dtype"):
        spec.pop(name, None)
    arch = causal_lm_config(AutoConfig.for_model(model_type, **spec))  # a composite: its text-only LM
    arch.vocab_size = vocab
    return arch


def parameter_numels(arch, jepa) -> dict[str, list[int]]:
    """Element counts of the trained parameters (tied ones once), grouped by owning module,
    from a model built on the meta device (no memory, the model's own definition); the predictor
    is the one jepa.objective builds (STP's own, not jepa.predictor's)."""
    import torch
    from transformers import AutoModelForCausalLM

    from megajepa.jepa.objective import OBJECTIVES

    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(arch)
        head = OBJECTIVES[jepa.objective](jepa).make_predictor(arch.hidden_size)
    modules: dict[str, list[int]] = {}
    seen: set[int] = set()
    for root, model in (("lm", lm), ("predictor", head)):
        for name, module in model.named_modules():
            for param in module.parameters(recurse=False):
                if id(param) not in seen:
                    seen.add(id(param))
                    modules.setdefault(f"{root}.{name}", []).append(param.numel())
    return modules


def worst_case_tokens(cfg: Config) -> tuple[str, int]:
    """(how the config sizes a micro-batch, the most online-row tokens it can hold).

    data.tokens_per_batch counts every sequence of a record (the assistant view too, which the EMA
    target moves to the teacher's rows): a bound on the online rows. Otherwise data.pairs_per_batch
    records, each at most megajepa.config.max_record_tokens (without a max_length cut, a row)."""
    if cfg.data.tokens_per_batch is not None:
        return f"data.tokens_per_batch={cfg.data.tokens_per_batch:,}", cfg.data.tokens_per_batch
    per_record = max_record_tokens(cfg.data, cfg.jepa) or cfg.data.row_length
    how = f"data.pairs_per_batch={cfg.data.pairs_per_batch} records x at most {per_record:,} tokens each"
    return how, cfg.data.pairs_per_batch * per_record


def plan_precision(cfg: Config) -> str:
    """The planned precision: `auto` is bf16 (what it resolves to on a bf16-capable GPU)."""
    return "bf16" if cfg.deepspeed.precision == "auto" else cfg.deepspeed.precision


def make_plan(
    cfg: Config,
    config_path: str,
    gpus: int,
    gpu_memory_gb: float,
    *,
    vocab_size: Optional[int] = None,
    headroom_gb: Optional[float] = None,
    ce_chunk: int = 1024,
    labelled_fraction: Optional[float] = None,
    resume_from: Optional[int] = None,
    gpus_per_node: Optional[int] = None,
    conversion_workers: int = 16,
) -> Plan:
    if gpus < 1:
        raise PlanError(f"--gpus must be >= 1, got {gpus}")
    if not gpu_memory_gb > 0:
        raise PlanError(f"--gpu-memory must be > 0 GB, got {gpu_memory_gb}")
    if ce_chunk < 1:
        raise PlanError(f"--ce-chunk must be >= 1, got {ce_chunk}")
    if labelled_fraction is not None and not 0 <= labelled_fraction <= 1:
        raise PlanError(f"--labelled-fraction must be in [0, 1], got {labelled_fraction}")
    resume_from = 2 * gpus if resume_from is None else resume_from  # half the ranks lost
    gpus_per_node = min(gpus, 8) if gpus_per_node is None else gpus_per_node
    if resume_from < 1 or gpus_per_node < 1 or conversion_workers < 1:
        raise PlanError("--resume-from, --gpus-per-node and --conversion-workers must be >= 1")
    cfg = copy.deepcopy(cfg)
    cfg.deepspeed.precision = plan_precision(cfg)
    prec = cfg.deepspeed.precision
    try:
        from megajepa.train.deepspeed_json import online_config  # imports torch: not for `plan --help`

        ds = online_config(cfg, gpus, cuda=True)  # the JSON a GPU run derives
    except ConfigError as err:
        raise PlanError(str(err)) from None
    zero = Zero.of(ds)
    arch = architecture(cfg, vocab_size)
    dims = Dims.of(arch)
    modules = parameter_numels(arch, cfg.jepa)
    numels = [n for ns in modules.values() for n in ns]
    p_bytes = DTYPE_BYTES[prec]
    grad_dtype_bytes = DTYPE_BYTES[prec]  # DeepSpeed accumulates in the model dtype unless told otherwise

    def partition(n: int, sharded: bool) -> int:
        return math.ceil(n / gpus) if sharded else n

    params_sharded = zero.stage == 3
    grads_sharded = zero.stage >= 2
    optim_sharded = zero.stage >= 1
    partition_elements = sum(partition(n, params_sharded) for n in numels)
    optim_elements = sum(partition(n, optim_sharded) for n in numels)
    grad_elements = sum(partition(n, grads_sharded) for n in numels)
    persistent = 0
    if zero.stage == 3:  # DeepSpeed's mark_persistent_parameters, in parameter order
        total = 0
        for n in numels:
            if n <= zero.persistence_threshold and n + total <= zero.model_persistence_threshold:
                persistent += n
                total += n
    state = {
        "parameters": partition_elements * p_bytes,
        "persistent": persistent * p_bytes,
        "optimizer": optim_elements * OPTIMIZER_BYTES,
        "gradients": grad_elements * grad_dtype_bytes,
        "ema": 0,
        "teacher": 0,
    }
    if cfg.jepa.target == "ema" and cfg.jepa.lambda_ > 0:
        state["ema"] = partition_elements * FP32  # ZeRO-3: the master's partitions; below it, whole
        state["teacher"] = partition_elements * p_bytes
    host: dict[str, float] = {}
    if zero.offload_optimizer:
        host["optimizer"] = state["optimizer"]
        state["optimizer"] = 0
    if zero.offload_param:
        host["parameters"] = state["parameters"]
        state["parameters"] = 0
    largest_module = max(sum(ns) for ns in modules.values())
    buffers = {
        "reduce bucket": zero.reduce_bucket_size * grad_dtype_bytes if zero.stage >= 2 else 0,
        "prefetch bucket": min(zero.prefetch_bucket_size, sum(numels)) * p_bytes if zero.stage == 3 else 0,
        # gathered whole for its forward and its backward, with its full gradient before the reduce
        "largest module gathered": 2 * largest_module * p_bytes if zero.stage == 3 else largest_module * p_bytes,
    }
    step_transient = 0 if zero.offload_optimizer else min(zero.sub_group_size, optim_elements) * FP32
    if labelled_fraction is None:
        # the reply twice per record (conversation, assistant view): only with the reference's views
        # and the online target (the EMA target moves the assistant view to the teacher's rows)
        twice = cfg.jepa.views == "reference" and cfg.jepa.target == "online" and cfg.jepa.lambda_ > 0
        labelled_fraction = 0.5 if cfg.data.labels in ("response", "content") and twice else 1.0
    headroom = (0.10 * gpu_memory_gb if headroom_gb is None else headroom_gb) * 1e9
    largest = max(numels)
    saved_shard = sum(math.ceil(n / resume_from) for n in numels)
    shards_read = min(resume_from, math.ceil(resume_from / gpus) + 1) + 1
    teacher = cfg.jepa.target == "ema" and cfg.jepa.lambda_ > 0
    elastic_host = {
        "conversion, extract": conversion_workers * OPTIMIZER_BYTES * saved_shard,
        "conversion, merge": conversion_workers * 2 * OPTIMIZER_BYTES * largest,
        "universal load per rank": OPTIMIZER_BYTES * largest,
        "EMA reshard per rank": (shards_read * saved_shard + partition_elements) * FP32 if teacher and params_sharded else 0,
    }
    notes = []
    if cfg.deepspeed.config_file is not None:
        notes.append(f"ZeRO settings from {cfg.deepspeed.config_file}")
    if cfg.model.lora.rank > 0:
        notes.append("model.lora.rank > 0: planned as full training (LoRA's smaller optimizer state is not modelled)")
    if cfg.model.attention == "sdpa":
        notes.append("model.attention=sdpa: the dense [rows, 1, L, L] mask and SDPA's repeated k/v are not counted")
    return Plan(
        config_path=config_path,
        gpus=gpus,
        gpu_memory=gpu_memory_gb * 1e9,
        headroom=headroom,
        precision=prec,
        dims=dims,
        zero=zero,
        num_params=sum(numels),
        state=state,
        buffers=buffers,
        step_transient=step_transient,
        host=host,
        resume_from=resume_from,
        gpus_per_node=gpus_per_node,
        conversion_workers=conversion_workers,
        elastic_host=elastic_host,
        grad_accum=cfg.optim.grad_accum,
        teacher=teacher,
        labelled_fraction=labelled_fraction,
        ce_chunk=ce_chunk,
        row_length=cfg.data.row_length,
        checkpointing=cfg.model.gradient_checkpointing,
        config_tokens=worst_case_tokens(cfg),
        notes=notes,
    )


def _gib(value: float) -> str:
    return f"{value / GIB:,.2f}"


def render(plan: Plan) -> str:
    d, z = plan.dims, plan.zero
    lines = [
        f"# Memory plan: {plan.config_path} on {plan.gpus} GPU(s) of {plan.gpu_memory / 1e9:g} GB",
        "",
        f"model: {plan.num_params / 1e9:.3f} B parameters; h={d.hidden}, i={d.intermediate}, L={d.layers}, "
        f"heads={d.heads}, kv_heads={d.kv_heads}, head_dim={d.head_dim}, vocab={d.vocab}",
        f"precision: {plan.precision}; ZeRO stage {z.stage}, param_persistence_threshold={z.persistence_threshold:,}, "
        f"reduce_bucket_size={z.reduce_bucket_size:,}, prefetch_bucket_size={z.prefetch_bucket_size:,}",
        "",
        "| per rank | GiB | how |",
        "|---|---:|---|",
    ]
    how = {
        "parameters": f"ceil(numel / {plan.gpus}) x {DTYPE_BYTES[plan.precision]} B per parameter",
        "persistent": f"full copies of parameters with <= {z.persistence_threshold:,} elements",
        "optimizer": "partition x 12 B (fp32 master, Adam moments)",
        "gradients": f"partition x {DTYPE_BYTES[plan.precision]} B",
        "ema": "partition x 4 B (fp32), jepa.target=ema",
        "teacher": f"partition x {DTYPE_BYTES[plan.precision]} B, jepa.target=ema",
    }
    for name, value in plan.state.items():
        lines.append(f"| {name} | {_gib(value)} | {how[name]} |")
    lines.append(f"| **model state** | **{_gib(plan.state_bytes())}** | |")
    for name, value in plan.buffers.items():
        lines.append(f"| {name} | {_gib(value)} | ZeRO working buffer |")
    lines.append(f"| fp32 gradient at the step | {_gib(plan.step_transient)} | largest sub-group x 4 B, after the backward |")
    for ckpt in (False, True):
        per = d.activation_bytes_per_token(ckpt)
        label = "with" if ckpt else "without"
        lines.append(f"| activations {label} checkpointing | {per / 2**20:.3f} MiB/token | per token, {d.layers} layers |")
    per_vocab = LOGIT_BYTES_PER_VOCAB * d.vocab
    lines.append(
        f"| logits, full | {plan.labelled_fraction * per_vocab / 2**20:.3f} MiB/token | "
        f"12 B x {d.vocab:,} per labelled token, labelled fraction {plan.labelled_fraction:g} |"
    )
    lines.append(f"| logits, chunked CE | {_gib(per_vocab * plan.ce_chunk)} | 12 B x vocab x {plan.ce_chunk} tokens |")
    lines.append(f"| headroom | {_gib(plan.headroom)} | CUDA context, NCCL, fragmentation |")
    for name, value in plan.host.items():
        lines.append(f"| {name} (host, offloaded) | {_gib(value)} | not on the GPU |")
    lines += [
        "",
        "Largest tokens per micro-batch per rank that fit (rows of data.row_length="
        f"{plan.row_length} in brackets; peak GiB at that budget):",
        "",
        "| activation checkpointing | full logits | chunked CE |",
        "|---|---:|---:|",
    ]
    for ckpt in (True, False):
        cells = []
        for chunked in (False, True):
            tokens = plan.max_tokens(ckpt, chunked)
            peak = plan.peak_bytes(tokens, ckpt, chunked)
            cells.append(f"{tokens:,} ({tokens // plan.row_length} rows; {_gib(peak)})" if tokens else "does not fit")
        mark = " (this config)" if ckpt == plan.checkpointing else ""
        lines.append(f"| {'on' if ckpt else 'off'}{mark} | {cells[0]} | {cells[1]} |")
    how, tokens = plan.config_tokens
    budget = plan.max_tokens(plan.checkpointing, chunked=False)
    verdict = "fits" if tokens <= budget else "does NOT fit"
    lines += [
        "",
        f"This config: at most {tokens:,} tokens per micro-batch per rank ({how}): "
        f"{verdict} the full-logits budget of {budget:,} "
        f"(peak {_gib(plan.peak_bytes(tokens, plan.checkpointing, False))} GiB).",
        "",
        f"Host memory at an elastic resume from {plan.resume_from} saved ranks to {plan.gpus} "
        f"({plan.gpus_per_node} per node, {plan.conversion_workers} conversion workers; see megajepa/plan.py):",
        "",
        "| host | GiB |",
        "|---|---:|",
        *(f"| {name} | {_gib(value)} |" for name, value in plan.elastic_host.items()),
        f"| **per node, the largest of the conversion and its ranks loading** | **{_gib(plan.node_host_bytes())}** |",
        "",
        "Expected figures from formulas (see megajepa/plan.py); no GPU run measured them.",
    ]
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="megajepa plan", description="Expected GPU memory per rank and the largest token budget that fits."
    )
    parser.add_argument("config", help="YAML config, e.g. configs/llama-8b.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. jepa.target=ema")
    parser.add_argument("--gpus", type=int, required=True, help="data-parallel ranks (ZeRO partitions)")
    parser.add_argument("--gpu-memory", type=float, required=True, help="memory of one GPU, GB (1e9 bytes)")
    parser.add_argument("--vocab-size", type=int, default=None, help="the tokenizer's size, when data.tokenizer is absent")
    parser.add_argument("--headroom", type=float, default=None, help="GB kept free per GPU (default: 10%% of it)")
    parser.add_argument("--ce-chunk", type=int, default=1024, help="labelled tokens per chunk of the chunked CE")
    parser.add_argument("--labelled-fraction", type=float, default=None, help="labelled tokens over all tokens")
    parser.add_argument("--resume-from", type=int, default=None, help="saved ranks of an elastic resume (default: 2 x --gpus)")
    parser.add_argument("--gpus-per-node", type=int, default=None, help="for the host figures (default: min(--gpus, 8))")
    parser.add_argument("--conversion-workers", type=int, default=16, help="megajepa universal --workers")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, need_tokenizer=False)  # _vocab_size names it if needed
        plan = make_plan(
            cfg, args.config, args.gpus, args.gpu_memory, vocab_size=args.vocab_size, headroom_gb=args.headroom,
            ce_chunk=args.ce_chunk, labelled_fraction=args.labelled_fraction, resume_from=args.resume_from,
            gpus_per_node=args.gpus_per_node, conversion_workers=args.conversion_workers,
        )  # fmt: skip
    except (ConfigError, PlanError) as err:
        print(f"megajepa plan: {err}", file=sys.stderr)
        return 2
    print(render(plan))
    if args.json:
        from megajepa.files import write_text

        write_text(args.json, json.dumps(to_json(plan), indent=2))
    return 0


def to_json(plan: Plan) -> dict:
    budgets = {
        f"{'checkpointing' if ckpt else 'no_checkpointing'}/{'chunked' if chunked else 'full_logits'}": plan.max_tokens(
            ckpt, chunked
        )
        for ckpt in (True, False)
        for chunked in (True, False)
    }
    return {
        "gpus": plan.gpus,
        "gpu_memory_bytes": plan.gpu_memory,
        "precision": plan.precision,
        "num_params": plan.num_params,
        "state_bytes": plan.state,
        "buffers_bytes": plan.buffers,
        "step_transient_bytes": plan.step_transient,
        "activation_bytes_per_token": {
            "checkpointing": plan.dims.activation_bytes_per_token(True),
            "no_checkpointing": plan.dims.activation_bytes_per_token(False),
        },
        "max_tokens": budgets,
        "config_tokens": plan.config_tokens[1],
        "elastic_host_bytes": {**plan.elastic_host, "per node": plan.node_host_bytes()},
    }
