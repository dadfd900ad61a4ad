"""What may change between a checkpoint and the run that continues it.

A resumed run should be the uninterrupted run. Settings fall into four kinds:

- identity (model architecture, LoRA, tokenizer, [PRED] tokens, target, precision): refused, always;
- schedule: train.steps, the lr schedule, lambda warm-up, the EMA momentum schedule. Changing one
  changes every later step. Refused unless `train.keep_schedule=true` (train.steps may change;
  the lr and EMA schedules keep the checkpoint's length, so a longer run continues the original
  schedule up to its old end and then holds the lr at its minimum and the momentum at its end
  value, and a shorter one stops early on it) or the key is listed in `train.resume_allow` (the
  new value applies from the next step);
- data: what the loader's exact resume depends on (batch, seed, shuffle, packing). Refused unless
  listed in `train.resume_allow` (the loader then continues by sample count, not exactly);
- the training data: each source's identity (a digest of its shards' fingerprint.json, which
  names the prepared inputs by their sha256, and of streaming's index.json, which lists the shards;
  paths do not count, so moved or copied shards resume) and its mixture settings. Refused unless
  `train.resume_allow` lists data.shards or data.sources (the run then trains on the new data);
- optimizer hyper-parameters (betas, eps, weight decay): refused, always: DeepSpeed restores
  them from the optimizer state, so a new value would be silently ignored;
- the world size may change (megajepa.train.elastic) when the global batch stays the same:
  data.pairs_per_batch x world size is compared, not the per-rank value.

Everything else (logging, evaluation, checkpoint cadence, paths, workers) may change freely.
Architectures are compared key by key with the model type's defaults filled in, so an extra key
the model does not read, a key spelled out at its default, or initializer_range (used only at
initialisation) does not count.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Optional

from megajepa.config import RESUME_DATA_IDENTITY_KEYS, RESUME_DATA_KEYS, RESUME_SCHEDULE_KEYS, Config, to_dict
from megajepa.data.mixture import sources_from_config

SCHEDULE_KEYS, DATA_KEYS = RESUME_SCHEDULE_KEYS, RESUME_DATA_KEYS
OPTIMIZER_KEYS = ("optim.beta1", "optim.beta2", "optim.eps", "optim.weight_decay")
# config keys that change which parameters exist (the checkpoint could not be loaded)
PARAMETER_KEYS = ("model.lora",)
# meta.json entries besides the architecture and the config that must match exactly
IDENTITY_KEYS = ("tokenizer_hash", "vocab_size", "predictor", "k", "target", "precision")
# HF config keys that do not change a trained model's parameters or its forward pass
HARMLESS_ARCHITECTURE_KEYS = frozenset(
    {"initializer_range", "use_cache", "architectures", "output_attentions", "output_hidden_states",
     "return_dict", "_name_or_path", "transformers_version", "torch_dtype", "dtype", "vocab_size"}
)


class ResumeRefused(RuntimeError):
    """A resume the policy refuses; the message names every differing key and both values."""


def _get(tree: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part, {}) if isinstance(tree, dict) else {}
    return None if tree == {} else tree


def data_identity(cfg: Config) -> list[dict]:
    """Each training source's name (when set), mixture settings and the sha256 of its fingerprint.json and
    index.json, read where the loader found them (the shards, a mounted remote, or the local cache
    the loader filled: call after building it)."""
    identity = []
    for source in sources_from_config(cfg.data):
        directory = source.remote if source.remote is not None and os.path.isdir(source.remote) else source.shards
        digest = hashlib.sha256()
        for name in ("fingerprint.json", "index.json"):
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    digest.update(name.encode() + b"\0" + f.read())
        identity.append({"name": source.name, "proportion": source.proportion, "repeat": source.repeat,
                         "choose": source.choose, "sha256": digest.hexdigest()})
    return identity


def _data_differences(saved: list[dict], now: list[dict]) -> str:
    if len(saved) != len(now):
        return f"{len(saved)} source(s) -> {len(now)}"
    changes = []
    for i, (before, after) in enumerate(zip(saved, now)):
        where = before.get("name") or (f"source {i}" if len(saved) > 1 else "shards")
        for key in sorted(set(before) | set(after)):
            old, new = before.get(key), after.get(key)
            if old != new:
                shown = (lambda v: str(v)[:12]) if key == "sha256" else repr
                changes.append(f"{where} {key}: {shown(old)} -> {shown(new)}")
    return "; ".join(changes)


def architecture_differences(saved: dict, current: dict) -> list[str]:
    """'key: saved -> current' for each architecture key that changes the model."""
    if saved.get("model_type") != current.get("model_type"):
        return [f"model_type: {saved.get('model_type')!r} -> {current.get('model_type')!r}"]
    defaults = _as_built(current.get("model_type"), {})
    if defaults is not None:
        saved, current = _as_built(saved["model_type"], saved), _as_built(current["model_type"], current)
    differences = []
    for key in sorted(set(saved) | set(current)):
        if key in HARMLESS_ARCHITECTURE_KEYS or (defaults is not None and key not in defaults):
            continue  # the model never reads a key its config class does not define
        fallback = defaults.get(key) if defaults is not None else None
        before, after = saved.get(key, fallback), current.get(key, fallback)
        if before != after:
            differences.append(f"{key}: {before!r} -> {after!r}")
    return differences


def _as_built(model_type: Optional[str], spec: dict) -> Optional[dict]:
    """`spec` as its config class holds it (defaults filled in, legacy keys such as rope_theta moved
    where transformers 5 reads them: rope_parameters), or None for an unknown (remote-code) type."""
    try:
        from transformers import AutoConfig

        return AutoConfig.for_model(model_type, **{k: v for k, v in spec.items() if k != "model_type"}).to_dict()
    except (ValueError, KeyError, TypeError):  # unknown (remote-code) model type: every key counts
        return None


def check(saved_meta: dict, current_meta: dict, cfg: Config, where: str) -> int:
    """Refuse (ResumeRefused) what this run may not change; return the schedule length to use."""
    problems = []
    arch = architecture_differences(saved_meta.get("architecture", {}), current_meta["architecture"])
    if arch:
        problems.append("the model architecture differs (" + "; ".join(arch) + ")")
    for key in IDENTITY_KEYS:
        if saved_meta.get(key) != current_meta[key]:
            problems.append(f"{key}: {saved_meta.get(key)!r} -> {current_meta[key]!r}")

    saved_data, data = saved_meta.get("data"), current_meta.get("data")
    if saved_data is not None and data is not None and saved_data != data:
        if not set(RESUME_DATA_IDENTITY_KEYS) & set(cfg.train.resume_allow):
            key = "data.sources" if cfg.data.sources else "data.shards"
            problems.append(f"{key}: the training data differs from the checkpoint's ({_data_differences(saved_data, data)}; "
                            f"the run would continue on other data; train.resume_allow=[{key}] accepts it)")

    saved_cfg, now = saved_meta.get("config", {}), to_dict(cfg)
    for key in PARAMETER_KEYS:
        if _get(saved_cfg, key) != _get(now, key):
            problems.append(f"{key}: {_get(saved_cfg, key)!r} -> {_get(now, key)!r} (other trainable parameters)")
    changed = {k: (_get(saved_cfg, k), _get(now, k)) for k in SCHEDULE_KEYS + DATA_KEYS + OPTIMIZER_KEYS}
    changed = {k: v for k, v in changed.items() if v[0] is not None and v[0] != v[1]}
    allowed = set(cfg.train.resume_allow)
    saved_world, world = saved_meta.get("world_size"), current_meta["world_size"]
    if saved_world != world and "data.pairs_per_batch" not in allowed:
        changed.pop("data.pairs_per_batch", None)
        saved_global = _get(saved_cfg, "data.pairs_per_batch") * saved_world
        if cfg.data.pairs_per_batch * world != saved_global:
            fix = (f"set data.pairs_per_batch={saved_global // world}" if saved_global % world == 0
                   else f"no per-rank batch makes {saved_global} on {world} ranks")
            problems.append(
                f"world size {saved_world} -> {world} with data.pairs_per_batch {_get(saved_cfg, 'data.pairs_per_batch')}"
                f" -> {cfg.data.pairs_per_batch}: the global batch would be {cfg.data.pairs_per_batch * world}, "
                f"not {saved_global} (the loader continues exactly only with the same global batch; {fix})"
            )
    # the schedule length the checkpoint ran with (an extended run keeps its original one)
    schedule_steps = int(saved_meta.get("schedule_steps", _get(saved_cfg, "train.steps") or cfg.train.steps))
    if "train.steps" in changed and "train.steps" in allowed:
        schedule_steps = cfg.train.steps
    elif "train.steps" in changed and cfg.train.keep_schedule:
        changed.pop("train.steps")
    for key, (before, after) in changed.items():
        if key in allowed:
            continue
        if key in OPTIMIZER_KEYS:
            hint = "DeepSpeed restores it from the optimizer state, so a new value would be ignored"
        elif key == "train.steps":
            hint = ("the lr and EMA schedules would change; train.keep_schedule=true keeps the checkpoint's, "
                    "train.resume_allow=[train.steps] takes the new one")
        elif key in SCHEDULE_KEYS:
            hint = f"the schedule would change from here on; train.resume_allow=[{key}] accepts it"
        else:
            hint = f"the loader could no longer resume exactly; train.resume_allow=[{key}] accepts it"
        problems.append(f"{key}: {before!r} -> {after!r} ({hint})")
    if problems:
        raise ResumeRefused(
            f"{where}: this run differs from the checkpoint (saved -> now): " + "; ".join(problems)
            + ". Resume with the checkpoint's settings, or start a new train.output_dir"
        )
    return schedule_steps
