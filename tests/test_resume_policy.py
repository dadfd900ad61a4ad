"""What a resume may change (megajepa.train.resume_policy), on configs alone."""

import json
import shutil

import pytest

from megajepa.config import load_config, to_dict
from megajepa.train.resume_policy import ResumeRefused, check, data_identity

DEMO = "configs/demo.yaml"


def _meta(cfg, world=2, **extra):
    spec = json.loads(open("configs/models/tiny-llama.json").read())
    return {"architecture": spec, "tokenizer_hash": "h", "vocab_size": 100, "predictor": "tokens", "k": 1,
            "target": "online", "precision": "fp32", "world_size": world, "config": to_dict(cfg), **extra}


def _check(saved_overrides, now_overrides, saved_world=2, world=2, **saved_meta):
    saved_cfg, cfg = load_config(DEMO, saved_overrides), load_config(DEMO, now_overrides)
    return check(_meta(saved_cfg, saved_world, **saved_meta), _meta(cfg, world), cfg, "ckpt")


def test_unchanged_settings_resume_on_the_checkpoints_schedule():
    assert _check(["train.steps=30"], ["train.steps=30", "logging.log_every=5", "train.save_every=3"]) == 30
    # an extended run, resumed again, stays on its original schedule
    assert _check(["train.steps=60"], ["train.steps=60"], schedule_steps=30) == 30


def test_keep_schedule_lengthens_or_shortens_on_the_original_schedule():
    assert _check(["train.steps=30"], ["train.steps=50", "train.keep_schedule=true"]) == 30
    assert _check(["train.steps=30"], ["train.steps=20", "train.keep_schedule=true"]) == 30
    assert _check(["train.steps=30"], ["train.steps=50", "train.resume_allow=[train.steps]"]) == 50


def test_every_differing_key_is_named_with_both_values():
    with pytest.raises(ResumeRefused) as err:
        _check(["train.steps=30"], ["train.steps=50", "optim.warmup_steps=5", "data.seed=7", "optim.eps=1e-6"])
    message = str(err.value)
    for fragment in ("train.steps: 30 -> 50", "optim.warmup_steps: 20 -> 5", "data.seed: 1234 -> 7",
                     "optim.eps: 1e-08 -> 1e-06 (DeepSpeed restores it"):
        assert fragment in message
    assert _check([], ["optim.warmup_steps=5", "data.seed=7", "train.resume_allow=[optim.warmup_steps,data.seed]"])


def test_another_world_size_needs_the_same_global_batch():
    assert _check(["data.pairs_per_batch=8"], ["data.pairs_per_batch=16"], saved_world=2, world=1) == 300
    with pytest.raises(ResumeRefused, match=r"world size 2 -> 1 .* global batch would be 8, not 16 .* set data.pairs_per_batch=16"):
        _check(["data.pairs_per_batch=8"], ["data.pairs_per_batch=8"], saved_world=2, world=1)
    with pytest.raises(ResumeRefused, match="no per-rank batch makes 24 on 5 ranks"):
        _check(["data.pairs_per_batch=8"], ["data.pairs_per_batch=5"], saved_world=3, world=5)
    with pytest.raises(ResumeRefused, match=r"data.pairs_per_batch: 8 -> 16"):  # same world: per-rank compared
        _check(["data.pairs_per_batch=8"], ["data.pairs_per_batch=16"])


def test_other_training_data_is_refused_unless_allowed(tmp_path):
    """The data's identity is its shards' fingerprint.json and index.json, not their path: a copy
    resumes, one changed byte is refused by name, and train.resume_allow=[data.shards] accepts it."""
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "fingerprint.json").write_text('{"sources": {"a.jsonl": "0123"}}')
    (shards / "index.json").write_text('{"shards": [{"samples": 10}]}')
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    saved_cfg = load_config(DEMO, [f"data.shards={shards}"])
    saved = _meta(saved_cfg, data=data_identity(saved_cfg))
    moved = load_config(DEMO, [f"data.shards={copy}"])
    check(saved, _meta(moved, data=data_identity(moved)), moved, "ckpt")
    (copy / "index.json").write_text('{"shards": [{"samples": 11}]}')
    with pytest.raises(ResumeRefused, match=r"ckpt: .*data.shards: the training data differs from the checkpoint's "
                                            r"\(shards sha256: \w{12} -> \w{12}; .*train.resume_allow=\[data.shards\]"):
        check(saved, _meta(moved, data=data_identity(moved)), moved, "ckpt")
    allowed = load_config(DEMO, [f"data.shards={copy}", "train.resume_allow=[data.shards]"])
    check(saved, _meta(allowed, data=data_identity(allowed)), allowed, "ckpt")
