"""Typed configuration: dataclass schema, YAML files + dotted overrides merged by OmegaConf.

    cfg = load_config("configs/demo.yaml", ["jepa.lambda_=2", "train.steps=50"])

Every error names the offending key and where its value came from (a file or the command line),
and is raised before any work starts. A YAML file may start from another one: a top-level
`base: other.yaml` (relative to the file) is merged first, and the file's own keys over it; a
file's `key: ???` must be set by a later file or on the command line.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration that cannot run. The message names the key and its source."""


# The reference's LoRA targets (finetune.py): the attention and MLP projections of Llama-style models.
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraConfig:
    rank: int = 0  # 0: full fine-tuning; N: LoRA of rank N on the target modules, the rest frozen
    alpha: Optional[float] = None  # None: 2 x rank, as the reference
    dropout: float = 0.1
    # Module names (suffixes) to adapt; those of the list the model lacks are left out, and with none
    # of them present every linear layer but the output head is adapted (peft's "all-linear").
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))


@dataclass
class ModelConfig:
    # An HF config JSON (architecture only, random init) or a local pretrained directory.
    config: Optional[str] = "configs/models/tiny-llama.json"
    pretrained: Optional[str] = None
    attention: str = "auto"  # auto (flex on CUDA where the model supports it, else sdpa, else eager) | flex | sdpa | eager
    trust_remote_code: bool = False
    # A model type outside megajepa's verified families matrix (README, Model families) is refused;
    # true builds it anyway (architectures the packed pass cannot run exactly stay refused).
    allow_unverified_family: bool = False
    gradient_checkpointing: bool = False
    # Rows of the embedding and LM head: the tokenizer's size (with its [PRED] tokens) when null;
    # a larger value pads them, as Llama 3's 128,256 rows hold its reserved tokens.
    vocab_size: Optional[int] = None
    # A mixture-of-experts family's router load-balancing loss joins the loss with this weight,
    # as its own forward adds it with output_router_logits=True: null keeps the model config's
    # router_aux_loss_coef, 0 disables it. Other families have none (ignored).
    router_aux_loss_coef: Optional[float] = None
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class SourceConfig:
    """One source of a mixture (megajepa.data.mixture): at most one of proportion, repeat, choose."""

    shards: str = MISSING  # MDS directory (the local cache when `remote` is set)
    remote: Optional[str] = None
    proportion: Optional[float] = None  # share of an epoch, relative to the other sources'
    repeat: Optional[float] = None  # times each record is taken per epoch
    choose: Optional[int] = None  # records taken per epoch
    name: Optional[str] = None  # in per-source metrics; default: the directory's base name


@dataclass
class DataConfig:
    # One source: `shards` (+ `remote`); a mixture: `sources` instead.
    shards: Optional[str] = None  # MDS directory (the local cache when `remote` is set)
    remote: Optional[str] = None
    sources: list[SourceConfig] = field(default_factory=list)
    # How batches mix the sources (streaming's batching_method): random (per record),
    # stratified (each batch in the epoch's proportions), per_stream (each batch from one source)
    mixing: str = "random"
    # Micro-batches of records packed up to this many tokens (the same cuts on every rank) instead
    # of pairs_per_batch records; a record costs len(full) + len(user) + len(assistant) + k.
    tokens_per_batch: Optional[int] = None
    eval_shards: Optional[str] = None
    tokenizer: str = MISSING  # HF tokenizer directory
    # Root of the embedded default data: when set, the NL-regex pairs are generated, the tokenizer
    # trained and the shards prepared there first if missing (shards/tokenizer point inside it).
    embedded: Optional[str] = None
    # Packed row length: a record's conversation and its two views share a row, so this must hold
    # the longest prepared record's (the shards' fingerprint says how long; each sequence is at most
    # max_length: with the reference's 512 cut, 3 x 512 covers any data).
    row_length: int = 2048
    row_multiple: int = 16  # rows trimmed to a multiple of this (0: always row_length)
    pairs_per_batch: int = 32  # records per micro-batch per rank
    # Each sequence (conversation, user view with its [PRED] tokens, assistant view) is cut at this
    # many tokens, as the reference's tokenizer call (truncation=True, max_length=512) does. 0: no cut.
    max_length: int = 512
    # CE labels: response (the assistant's reply and end of turn) | all (every token) |
    # conversation (every token but the pad token: the published reference's LM collator, the paper's) |
    # content (the assistant's content tokens only: an unmerged fork pull request's labels)
    labels: str = "response"
    # A view that opens with the conversation's tokens stores only its tail and reads the shared
    # tokens in the conversation (exact; fewer tokens). false: every view is a sequence of its own.
    share_prefix: bool = True
    shuffle: bool = True
    seed: int = 1234
    num_workers: int = 0
    # Debug: each rank appends {step, sample_ids, loss} per step to rank{RANK}.jsonl here.
    record_ids_dir: Optional[str] = None


@dataclass
class EmaConfig:
    schedule: str = "linear"  # constant | linear | cosine
    momentum_start: float = 0.996
    momentum_end: float = 1.0


@dataclass
class StpConfig:
    """Semantic Tube Prediction (galilai-group/llm-jepa, stp.py): the latent term from the
    conversation's own hidden states, h[end - 1] - h[start - 1] as a span's embedding, no views.
    The reference's flag each key stands for, and its default, is named beside it."""

    # random_span (--linear=random_span): a random span of the user + assistant content predicted
    # from the rest (before + after) | e2e (--linear=e2e): the assistant content from the user content
    variant: str = "random_span"
    linear_predictor: bool = False  # --linear_predictor: a learned d x d map (no bias) on the predicting side
    # random_span only:
    spans: int = 1  # --random_span_times: spans drawn per conversation
    max_span: int = -1  # --random_span_max_length: longest span in tokens (-1: no limit)
    # how [s, t) is drawn: start_end (s, then t after it; the default) | both (--random_span_draw_both:
    # two points, ordered) | uniform (--random_span_uniform: uniform over all spans)
    draw: str = "start_end"
    from_start: bool = False  # --random_span_zero: every span starts at the first content token
    between: bool = False  # --random_span_e2e: the template tokens between user and assistant content join the region
    from_first_token: bool = False  # --random_span_all: the region opens at the conversation's second token
    # weight of each span's term by its length: none (every span 1, the default) | cosine_like
    # (2 r p / (r^2 + p^2)) | jaccard_like (1 - |r - p| / (r + p)); p the span's length, r the rest's
    length_adjustment: str = "none"


@dataclass
class JepaConfig:
    # llm_jepa: the reference's views (finetune.py, the paper) | stp: Semantic Tube Prediction
    # (jepa.stp.*: spans of the conversation itself, no views; the reference runs it with
    # lambda_=0.02 and k=0). STP reads jepa.lambda_, gamma, lambda_warmup_steps, dropout,
    # embedding_layer (its --random_span_layer), stop_grad, and distance (cosine, or mse: --jepa_mse).
    objective: str = "llm_jepa"
    stp: StpConfig = field(default_factory=StpConfig)
    lambda_: float = 1.0  # weight of the latent term
    gamma: float = 1.0  # weight of the next-token CE term
    k: int = 1  # [PRED] tokens inserted in the user view (predictor: tokens)
    # reference: the conversation, the user turn alone with its [PRED] tokens and the assistant
    # message alone, as galilai-group/llm-jepa's finetune.py builds them (the paper) |
    # shared_prefix: a cheaper deviation ([PRED] after the conversation's prompt; view B = its reply)
    views: str = "reference"
    # where z_a and z_b are read: offset (the reference's --last_token: len(sequence) + last_token)
    # | content_end (the last token before each view's end-of-turn marker, from the tokenization)
    readout: str = "offset"
    last_token: int = -1
    front_pred: bool = False  # the reference's --front_pred: [PRED] before the user content
    reverse_pred: bool = False  # the reference's --reverse_pred: the assistant view predicts the user view
    predictor: str = "tokens"  # tokens | mlp | linear | identity
    distance: str = "cosine"  # cosine | mse | l2 | infonce (in-batch negatives, the reference's --infonce)
    infonce_temperature: float = 0.07
    target: str = "online"  # online | ema
    stop_grad: bool = False  # online target only; the EMA target never has a gradient
    dropout: float = 0.0  # fraction of pairs whose latent term is left out
    lambda_warmup_steps: int = 0
    embedding_layer: int = -1  # hidden_states index the embeddings are read from
    pooling: str = "last"  # last | mean
    ema: EmaConfig = field(default_factory=EmaConfig)
    # against collapse (megajepa.jepa.regularizers), over the global batch, times regularizer_weight:
    # none (the reference's) | sigreg (LeJEPA's Epps-Pulley statistic of sigreg_projections random
    # projections; LeJEPA weighs it 0.05) | vicreg (VICReg's variance and covariance terms)
    regularizer: str = "none"
    regularizer_weight: float = 0.05
    sigreg_projections: int = 256


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    grad_accum: int = 1
    # The update from grad_accum micro-batches: mean (DeepSpeed's: their gradients averaged) | sum
    # (the reference's: HF Trainer >= 4.46 leaves its custom compute_loss undivided, so the gradients
    # add up, grad_accum times the mean, before clipping at grad_clip)
    accumulate: str = "mean"


@dataclass
class TrainConfig:
    steps: int = 100
    output_dir: str = "runs/demo"
    # none: fresh (refused over existing checkpoints) | auto: the newest complete checkpoint |
    # restart: move this run's outputs aside, then fresh | a checkpoint directory
    resume: str = "none"
    # resume with another train.steps on the checkpoint's lr and EMA schedule (its length):
    # a longer run continues the original schedule to its old end, then holds the lr at its
    # minimum and the momentum at its end value; a shorter one stops early on it
    keep_schedule: bool = False
    # schedule or data keys (megajepa.train.resume_policy) a resume may change, at the cost of exactness
    resume_allow: list[str] = field(default_factory=list)
    # consecutive optimizer steps DeepSpeed may skip (non-finite gradients) before the run stops
    # as diverged; fp16's loss-scale skips do not count (DeepSpeed stops at its minimum scale)
    max_skipped_steps: int = 2
    save_every: int = 0  # 0: only at the end
    eval_every: int = 0
    eval_batches: int = 4
    seed: int = 0
    # torch.cuda.set_sync_debug_mode inside each training step after the first (which builds
    # lazily): warn names every host synchronisation's Python line, error stops at the first
    sync_debug: str = "off"
    # collective timeouts in seconds (megajepa.dist.set_timeout): timeout_start until the first step
    # is done (start-up, loading and verifying a checkpoint, the first step's compilation), then
    # timeout (a hung or stopped rank stops the others this long after, not DeepSpeed's 30 minutes)
    timeout_start: float = 1800.0
    timeout: float = 300.0


@dataclass
class DeepSpeedConfig:
    config_file: Optional[str] = None  # the user's own DeepSpeed JSON, used instead of the derived one
    zero_stage: int = 3
    precision: str = "auto"  # auto (bf16 where supported) | bf16 | fp16 | fp32
    offload_optimizer: bool = False
    offload_param: bool = False
    param_persistence_threshold: int = 100_000
    overlap_comm: Optional[bool] = None  # None: on with CUDA, off on CPU (megajepa.train.deepspeed_json)


@dataclass
class LoggingConfig:
    log_every: int = 1
    tensorboard: bool = True
    csv: bool = True
    progress: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    jepa: JepaConfig = field(default_factory=JepaConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


CHOICES = {
    "model.attention": ("auto", "flex", "sdpa", "eager"),
    "data.labels": ("response", "all", "conversation", "content"),
    "data.mixing": ("random", "stratified", "per_stream"),
    "optim.accumulate": ("mean", "sum"),
    "jepa.views": ("reference", "shared_prefix"),
    "jepa.objective": ("llm_jepa", "stp"),
    "jepa.stp.variant": ("random_span", "e2e"),
    "jepa.stp.draw": ("start_end", "both", "uniform"),
    "jepa.stp.length_adjustment": ("none", "cosine_like", "jaccard_like"),
    "jepa.readout": ("offset", "content_end"),
    "jepa.predictor": ("tokens", "mlp", "linear", "identity"),
    "jepa.distance": ("cosine", "mse", "l2", "infonce"),
    "jepa.target": ("online", "ema"),
    "jepa.pooling": ("last", "mean"),
    "jepa.regularizer": ("none", "sigreg", "vicreg"),
    "train.sync_debug": ("off", "warn", "error"),
    "jepa.ema.schedule": ("constant", "linear", "cosine"),
    "deepspeed.precision": ("auto", "bf16", "fp16", "fp32"),
    "deepspeed.zero_stage": (0, 1, 2, 3),
}


# key -> (lowest, highest or None, whether the lowest itself is allowed)
BOUNDS = {
    **{
        key: (0, None, True)
        for key in (
            "jepa.k", "jepa.lambda_", "jepa.gamma", "jepa.lambda_warmup_steps", "optim.lr",
            "optim.warmup_steps", "optim.weight_decay", "optim.grad_clip", "train.save_every",
            "train.eval_every", "data.num_workers", "data.row_multiple", "data.max_length",
            "deepspeed.param_persistence_threshold", "model.lora.rank", "train.max_skipped_steps", "train.seed",
            "jepa.regularizer_weight",
        )
    },
    **{
        key: (0, None, False)
        for key in (
            "train.steps", "optim.grad_accum", "data.row_length", "data.pairs_per_batch",
            "train.eval_batches", "logging.log_every", "jepa.infonce_temperature", "jepa.stp.spans",
            "train.timeout_start", "train.timeout",
            "jepa.sigreg_projections",
        )
    },
    **{
        key: (0.0, 1.0, True)
        for key in (
            "jepa.dropout", "optim.min_lr_ratio", "jepa.ema.momentum_start", "jepa.ema.momentum_end",
            "model.lora.dropout",
        )
    },
    "optim.eps": (0.0, None, False),
    # numpy and streaming seeds are 32-bit
    "data.seed": (0, 2**32 - 1, True),
}
# Adam's betas: in [0, 1) (beta = 1 never forgets, the bias correction divides by zero)
HALF_OPEN_UNIT = ("optim.beta1", "optim.beta2")
RESUME_MODES = ("none", "auto", "restart")
# The keys a resume may change only when train.resume_allow lists them (megajepa.train.resume_policy):
# the schedule's, and those the loader's exact resume depends on.
RESUME_SCHEDULE_KEYS = (
    "train.steps", "optim.lr", "optim.min_lr_ratio", "optim.warmup_steps", "optim.accumulate", "jepa.lambda_warmup_steps",
    "jepa.ema.schedule", "jepa.ema.momentum_start", "jepa.ema.momentum_end",
)
RESUME_DATA_KEYS = (
    "data.pairs_per_batch", "optim.grad_accum", "data.seed", "data.shuffle", "data.row_length",
    "data.row_multiple", "data.labels", "data.max_length", "data.share_prefix", "jepa.views", "jepa.dropout",
)
# The training data itself (its shards' fingerprint and index, not their paths): either name allows a change.
RESUME_DATA_IDENTITY_KEYS = ("data.shards", "data.sources")


def _source_of(key: str, sources: list[tuple[str, DictConfig]]) -> str:
    """The last source (file or command line) that set `key`, for error messages."""
    for name, cfg in reversed(sources):
        if OmegaConf.select(cfg, key, default=MISSING) is not MISSING:
            return name
    return "defaults"


def _fail(key: str, message: str, sources: list[tuple[str, DictConfig]]) -> None:
    raise ConfigError(f"{_source_of(key, sources)}: {key}: {message}")


def _validate(cfg: Config, sources: list[tuple[str, DictConfig]], need_tokenizer: bool) -> None:
    resolved = OmegaConf.structured(cfg)
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(resolved, key)
        if value not in allowed:
            _fail(key, f"{value!r} is not one of {', '.join(map(str, allowed))}", sources)
    for key, (low, high, low_allowed) in BOUNDS.items():
        value = OmegaConf.select(resolved, key)
        if not math.isfinite(value):
            _fail(key, f"must be finite, got {value}", sources)
        if high is not None and not low <= value <= high:
            _fail(key, f"must be in [{low:g}, {high:g}], got {value}", sources)
        if value < low or (value == low and not low_allowed):
            _fail(key, f"must be {'>=' if low_allowed else '>'} {low}, got {value}", sources)
    for key in HALF_OPEN_UNIT:
        value = OmegaConf.select(resolved, key)
        if not 0.0 <= value < 1.0:
            _fail(key, f"must be in [0, 1), got {value}", sources)
    if cfg.jepa.readout == "offset" and cfg.jepa.last_token >= 0:
        _fail("jepa.last_token", f"an offset from the end of each view must be negative, got {cfg.jepa.last_token}", sources)
    if cfg.jepa.objective == "stp":
        _validate_stp(cfg, sources)
    elif cfg.jepa.lambda_ > 0 and cfg.jepa.predictor == "tokens" and 0 < cfg.data.max_length <= cfg.jepa.k:
        _fail("jepa.k", f"{cfg.jepa.k} [PRED] tokens fill a view cut at data.max_length={cfg.data.max_length} "
              f"tokens, leaving none of its content: keep jepa.k below data.max_length", sources)
    _validate_sources(cfg, sources)
    lora = cfg.model.lora
    if lora.alpha is not None and not (math.isfinite(lora.alpha) and lora.alpha > 0):
        _fail("model.lora.alpha", f"must be > 0 (or null: 2 x rank), got {lora.alpha}", sources)
    if lora.rank > 0 and not lora.target_modules:
        _fail("model.lora.target_modules", "must name at least one module (or all-linear)", sources)
    _validate_resume(cfg, sources)
    _validate_paths(cfg, sources, need_tokenizer)  # last: the value checks above need no files


def _validate_resume(cfg: Config, sources: list[tuple[str, DictConfig]]) -> None:
    resume = cfg.train.resume
    if resume not in RESUME_MODES and not os.path.isdir(resume):
        _fail("train.resume", f"{resume!r} is neither {', '.join(RESUME_MODES)} nor a checkpoint directory", sources)
    allowable = RESUME_SCHEDULE_KEYS + RESUME_DATA_KEYS + RESUME_DATA_IDENTITY_KEYS
    for key in cfg.train.resume_allow:
        if key not in allowable:
            _fail("train.resume_allow", f"{key!r} cannot be allowed to change on resume (one of: "
                  f"{', '.join(allowable)})", sources)


def _validate_paths(cfg: Config, sources: list[tuple[str, DictConfig]], need_tokenizer: bool) -> None:
    """Files and directories named by keys exist (data that data.embedded generates aside)."""
    if cfg.model.config is None and cfg.model.pretrained is None:
        _fail("model.config", "set model.config (an HF config JSON) or model.pretrained (a local directory)", sources)
    if cfg.model.pretrained is not None:
        if not os.path.isfile(os.path.join(cfg.model.pretrained, "config.json")):
            _fail("model.pretrained", f"{cfg.model.pretrained}: no such directory with a config.json", sources)
    elif not os.path.isfile(cfg.model.config):
        _fail("model.config", f"no such file: {cfg.model.config}", sources)
    if cfg.model.vocab_size is not None and cfg.model.vocab_size < 1:
        _fail("model.vocab_size", f"must be >= 1 (or null: the tokenizer's size), got {cfg.model.vocab_size}", sources)
    if cfg.model.router_aux_loss_coef is not None and not cfg.model.router_aux_loss_coef >= 0:
        _fail("model.router_aux_loss_coef", f"must be >= 0 (or null: the model config's), got {cfg.model.router_aux_loss_coef}", sources)
    if cfg.deepspeed.config_file is not None and not os.path.isfile(cfg.deepspeed.config_file):
        _fail("deepspeed.config_file", f"no such file: {cfg.deepspeed.config_file}", sources)
    if need_tokenizer and not os.path.isdir(cfg.data.tokenizer) and not _embedded_builds(cfg, cfg.data.tokenizer):
        _fail("data.tokenizer", f"no such directory: {cfg.data.tokenizer}{_embedded_note(cfg)}", sources)


# where data.embedded=ROOT generates the demo data (megajepa.data.embedded builds it)
EMBEDDED_ROOT = os.path.join("data", "demo")


def embedded_paths(root: str = EMBEDDED_ROOT) -> dict[str, str]:
    """The files data.embedded=root holds once built."""
    jsonl = os.path.join(root, "jsonl")
    return {
        "root": root,
        "jsonl": jsonl,
        "train_jsonl": os.path.join(jsonl, "train.jsonl"),
        "eval_jsonl": os.path.join(jsonl, "eval.jsonl"),
        "paraphrases_jsonl": os.path.join(jsonl, "paraphrases.jsonl"),
        "tokenizer": os.path.join(root, "tokenizer"),
        "train_shards": os.path.join(root, "shards", "train"),
        "eval_shards": os.path.join(root, "shards", "eval"),
    }


def _embedded_builds(cfg: Config, path: str) -> bool:
    """Whether data.embedded generates `path` (its tokenizer or its shards) when it is missing."""
    if cfg.data.embedded is None:
        return False
    built = embedded_paths(cfg.data.embedded)
    return os.path.normpath(path) in {os.path.normpath(built[k]) for k in ("tokenizer", "train_shards", "eval_shards")}


def _embedded_note(cfg: Config) -> str:
    return "" if cfg.data.embedded is None else f" (data.embedded={cfg.data.embedded} builds only its own)"


def check_run_data(cfg: Config) -> None:
    """Raise ConfigError, naming the key or file, unless the shard directories a run reads are there
    (the local ones: data.embedded generates its own; a remote fills its local cache), were
    prepared with data.tokenizer, and hold no record longer than a row. Before any rank starts
    (the loader checks a remote's, or data.embedded's once built, again). Not part of
    load_config: `config` and `plan` read configs whose data lives elsewhere. Also that
    train.output_dir can be written."""
    _check_output_dir(cfg.train.output_dir)
    from megajepa.data.fingerprint import FINGERPRINT_FILE, FingerprintMismatch, check_fingerprint

    local = [("data.shards", cfg.data.shards, cfg.data.remote), ("data.eval_shards", cfg.data.eval_shards, None)]
    local += [(f"data.sources[{i}].shards", s.shards, s.remote) for i, s in enumerate(cfg.data.sources)]
    tokenizer = None
    for key, path, remote in local:
        if path is None or remote is not None:
            continue
        if not os.path.isdir(path) and not _embedded_builds(cfg, path):
            raise ConfigError(
                f"{key}: no such directory: {path} (prepare it with `megajepa prepare`){_embedded_note(cfg)}"
            )
        if not os.path.isfile(os.path.join(path, FINGERPRINT_FILE)) or not os.path.isdir(cfg.data.tokenizer):
            continue
        if tokenizer is None:  # as the run loads it (megajepa.train.setup.run_tokenizers)
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(cfg.data.tokenizer)
        try:
            prepared = check_fingerprint(path, tokenizer)
        except FingerprintMismatch as err:
            raise ConfigError(f"{key}: {err}") from None
        check_row_length(cfg.data, cfg.jepa, prepared, os.path.join(path, FINGERPRINT_FILE))


def check_row_length(data: DataConfig, jepa: JepaConfig, fingerprint: dict, where: str) -> None:
    """Refuse (ConfigError, naming data.row_length and `where`) shards whose longest record's
    packed sequences could not fit a row (`fingerprint`: the shards' fingerprint.json)."""
    longest = {name: stats["max"] for name, stats in fingerprint.get("token_lengths", {}).items()}
    if "record" in longest:  # plain text (prepare-text): the conversation alone
        longest = {"full": longest["record"]}
    needed = max_record_tokens(data, jepa, longest or None)
    if needed is not None and needed > data.row_length:
        raise ConfigError(
            f"{where}: data.row_length={data.row_length} cannot hold the longest record's packed "
            f"sequences, up to {needed} tokens (data.max_length={data.max_length}, "
            f"jepa.views={jepa.views}, jepa.k={jepa.k}): raise data.row_length to {needed}"
        )


def _check_output_dir(path: str) -> None:
    """train.output_dir, or the nearest directory above it that exists, is a writable directory."""
    existing = os.path.abspath(path)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        where = "is a file" if existing == os.path.abspath(path) else f"cannot be created: {existing} is a file"
        raise ConfigError(f"train.output_dir: {path} {where}, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == os.path.abspath(path) else f"cannot be created: {existing} is not writable"
        raise ConfigError(f"train.output_dir: {path} {what} by this user")


def _validate_sources(cfg: Config, sources: list[tuple[str, DictConfig]]) -> None:
    data = cfg.data
    if (data.shards is None) == (not data.sources):
        _fail("data.shards", "set data.shards (one source) or data.sources (a mixture), not both or neither", sources)
    if data.sources and data.remote is not None:
        _fail("data.remote", "with data.sources, give each source its own remote", sources)
    from megajepa.data.mixture import check_sources, sources_from_config

    try:
        check_sources(sources_from_config(data))
    except ValueError as err:
        raise ConfigError(f"{_source_of('data.sources', sources)}: {err}") from None
    budget, needed = data.tokens_per_batch, max_record_tokens(data, cfg.jepa)
    if budget is not None and budget < (needed or 1):
        _fail("data.tokens_per_batch", f"{budget} cannot hold one record of up to {needed or 1} tokens "
              f"(data.max_length={data.max_length})", sources)


def _validate_stp(cfg: Config, sources: list[tuple[str, DictConfig]]) -> None:
    """What STP (jepa.objective=stp) can run: the reference's cosine or MSE, an online target."""
    if cfg.jepa.distance not in ("cosine", "mse"):
        _fail("jepa.distance", f"STP uses cosine or mse (the reference's --jepa_mse), got {cfg.jepa.distance!r}", sources)
    if cfg.jepa.target != "online":
        _fail("jepa.target", "STP reads the conversation's own hidden states: only the online target", sources)
    if cfg.jepa.stp.max_span == 0 or cfg.jepa.stp.max_span < -1:
        _fail("jepa.stp.max_span", f"a span's longest length must be >= 1 (or -1: no limit), got {cfg.jepa.stp.max_span}", sources)


def max_record_tokens(data: DataConfig, jepa: JepaConfig, longest: Optional[dict[str, int]] = None) -> Optional[int]:
    """The most tokens one record's packed sequences take in a row (None: nothing bounds them).

    Each sequence is at most data.max_length tokens (0: no cut) and, given `longest` (the longest
    prepared "full", "user" and "assistant" sequences: a shard fingerprint's), at most that long
    (+ the [PRED] tokens in their view). The conversation shares its row with the view carrying the
    [PRED] tokens and, with the online target, the other view (shared_prefix: the [PRED] tokens)."""
    k = jepa.k if jepa.predictor == "tokens" else 0

    def sequence(name: str, extra: int = 0) -> Optional[int]:
        bounds = [n for n in (data.max_length or None, None if longest is None else longest.get(name, 0) + extra) if n is not None]
        return min(bounds) if bounds else None

    if jepa.lambda_ == 0 or jepa.objective == "stp":  # the conversation alone
        parts = [sequence("full")]
    elif jepa.views == "shared_prefix":
        parts = [sequence("full"), k]
    else:
        pred_view, other = ("assistant", "user") if jepa.reverse_pred else ("user", "assistant")
        parts = [sequence("full"), sequence(pred_view, k)] + ([] if jepa.target == "ema" else [sequence(other)])
    return None if None in parts else sum(parts)


def _read_yaml(path: str) -> DictConfig:
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such config file")
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return OmegaConf.create(raw)


def _describe(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or "?"
    msg = str(err).splitlines()[0]
    return f"{key}: {msg}"


def _file_sources(path: str, including: tuple[str, ...] = ()) -> list[tuple[str, DictConfig]]:
    """The YAML file at `path` after the chain of files its `base:` keys name, bases first."""
    cfg = _read_yaml(path)
    base = cfg.pop("base", None)
    if base is None:
        return [(path, cfg)]
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: must be the path of a YAML file, got {base!r}")
    base_path = os.path.normpath(os.path.join(os.path.dirname(path), base))
    if not os.path.isfile(base_path):
        raise ConfigError(f"{path}: base: no such config file: {base_path}")
    chain = (*including, os.path.abspath(path))
    if os.path.abspath(base_path) in chain:
        raise ConfigError(f"{path}: base: {base} includes itself (through {' -> '.join(chain)})")
    return [*_file_sources(base_path, chain), (path, cfg)]


def load_config(path: Optional[str], overrides: list[str] = (), *, need_tokenizer: bool = True) -> Config:
    """Merge the schema defaults, the YAML file at `path` (after its bases) and dotted
    `overrides`; validate. need_tokenizer=False: data.tokenizer need not exist yet (`megajepa
    plan`, which takes the vocabulary's size from --vocab-size or the model config instead)."""
    merged = OmegaConf.structured(Config)
    sources: list[tuple[str, DictConfig]] = []
    if path is not None:
        sources.extend(_file_sources(path))
    if overrides:
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"command line: {item!r} is not a dotted key=value override")
        try:
            sources.append(("command line", OmegaConf.from_dotlist(list(overrides))))
        except OmegaConfBaseException as err:
            raise ConfigError(f"command line: {err}") from None
    for name, source in sources:
        try:
            merged = OmegaConf.merge(merged, source)
        except OmegaConfBaseException as err:
            raise ConfigError(f"{name}: {_describe(err)}") from None
        except TypeError as err:  # a dotted key into a list, e.g. data.sources.1.proportion=...
            raise ConfigError(f"{name}: {err}; set a list whole, e.g. data.sources='[{{shards: a}}]'") from None
    # `key: ???` in a file asks for a value from a later file or the command line (a merge would
    # otherwise keep the schema default under it).
    for i, (name, source) in enumerate(sources):
        for key in sorted(OmegaConf.missing_keys(source)):
            if all(OmegaConf.select(later, key, default=MISSING) is MISSING for _, later in sources[i + 1:]):
                raise ConfigError(f"{name}: {key}: required (??? there): set it, e.g. {key}=... on the command line")
    try:
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ConfigError(f"{path or 'defaults'}: required key(s) not set: {', '.join(missing)}")
        cfg: Config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{path or 'defaults'}: {_describe(err)}") from None
    _validate(cfg, sources, need_tokenizer)
    return cfg


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def from_dict(data: dict[str, Any]) -> Config:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), data))


def precision(cfg: Config) -> str:
    """The resolved training precision: bf16 where the hardware supports it unless set."""
    if cfg.deepspeed.precision != "auto":
        return cfg.deepspeed.precision
    import torch

    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
