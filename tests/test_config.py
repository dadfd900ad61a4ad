import json

import pytest
import torch

from megajepa.cli import main
from megajepa.config import ConfigError, check_run_data, load_config, to_yaml
from megajepa.train.deepspeed_json import online_config

DEMO = "configs/demo.yaml"


def write(tmp_path, text: str, name: str = "c.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_demo_config_loads_with_overrides():
    cfg = load_config(DEMO, ["jepa.lambda_=2", "train.steps=50", "jepa.target=ema", "jepa.k=3", "data.row_length=1024"])
    assert cfg.jepa.lambda_ == 2.0 and cfg.train.steps == 50 and cfg.jepa.target == "ema"
    assert cfg.jepa.k == 3 and cfg.data.row_length == 1024
    assert cfg.train.output_dir == "runs/demo" and cfg.train.resume == "none"
    assert "lambda_: 2.0" in to_yaml(cfg)


BASE = "data:\n  shards: s\n  tokenizer: t\n"


@pytest.mark.parametrize(
    "text, fragment",
    [
        (BASE + "jepa:\n  k: -1\n", "jepa.k: must be >= 0"),
        (BASE + "jepa:\n  lambda_: -0.5\n", "jepa.lambda_: must be >= 0"),
        (BASE + "jepa:\n  predictor: transformer\n", "jepa.predictor: 'transformer' is not one of"),
        (BASE + "jepa:\n  distance: kl\n", "jepa.distance"),
        (BASE + "jepa:\n  dropout: 1.5\n", "jepa.dropout: must be in [0, 1]"),
        (BASE + "jepa:\n  readout: offset\n  last_token: 0\n", "jepa.last_token: an offset from the end of each view must be negative"),
        (BASE + "train:\n  steps: 0\n", "train.steps: must be > 0"),
        (BASE + "train:\n  stepz: 3\n", "stepz"),
        (BASE + "optim:\n  lr: fast\n", "optim.lr"),
    ],
)
def test_bad_value_names_key_and_file(tmp_path, text, fragment):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(path + ": ")
    assert fragment in str(err.value)


@pytest.mark.parametrize("text, fragment", [("- a list\n", "top level must be a mapping"), ("jepa: [x\n", "not valid YAML")])
def test_malformed_file_is_named(tmp_path, text, fragment):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=fragment) as err:
        load_config(path)
    assert path in str(err.value)


def test_override_error_names_command_line():
    with pytest.raises(ConfigError, match=r"^command line: jepa.k: must be >= 0"):
        load_config(DEMO, ["jepa.k=-2"])
    with pytest.raises(ConfigError, match="command line.*not a dotted key=value"):
        load_config(DEMO, ["jepa.k"])


def test_missing_required_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="required key"):
        load_config(write(tmp_path, "train:\n  steps: 3\n"))
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(str(tmp_path / "nope.yaml"))


def test_deepspeed_json_is_derived_or_the_users(tmp_path):
    cfg = load_config(DEMO, ["optim.grad_accum=4", "data.pairs_per_batch=8"])
    ds = online_config(cfg, world_size=2, cuda=False)
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["overlap_comm"] is False
    assert ds["train_batch_size"] == 8 * 4 * 2
    assert ds["optimizer"]["type"] == "AdamW"
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 8}))
    cfg = load_config(DEMO, [f"deepspeed.config_file={user}"])
    assert online_config(cfg, world_size=1)["zero_optimization"]["stage"] == 2
    with pytest.raises(ConfigError, match="deepspeed.config_file: no such file"):
        load_config(DEMO, [f"deepspeed.config_file={tmp_path}/missing.json"])


def test_cli_config_prints_resolved_and_fails_cleanly(capsys):
    assert main(["config", DEMO, "jepa.k=2"]) == 0
    assert "k: 2" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["config", DEMO, "jepa.distance=dot"])
    assert exit_info.value.code == 2
    assert "jepa.distance" in capsys.readouterr().err


def _hf_auto_buckets(model_config) -> dict:
    """The bucket sizes Hugging Face's DeepSpeed integration fills in for "auto" from a model's config."""
    from types import SimpleNamespace

    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig, unset_hf_deepspeed_config

    keys = ("reduce_bucket_size", "stage3_prefetch_bucket_size")
    hf = HfTrainerDeepSpeedConfig({"zero_optimization": {"stage": 3, **{k: "auto" for k in keys}}})
    try:  # it registers itself globally, which from_pretrained would read
        hf.trainer_config_finalize(SimpleNamespace(get_warmup_steps=lambda steps: 0), SimpleNamespace(config=model_config), 1)
    finally:
        unset_hf_deepspeed_config()
    return {k: hf.config["zero_optimization"][k] for k in keys}


@pytest.mark.parametrize("family", ["demo", "gemma3"])
def test_deepspeed_json_overlaps_communication_on_gpus(family, tmp_path):
    """On CUDA: overlap_comm, with buckets sized as Hugging Face's DeepSpeed integration sizes them
    for the same model (a composite through its text config); the typed config can turn overlap off."""
    from transformers import AutoConfig

    overrides = ["data.pairs_per_batch=8"]
    if family != "demo":
        from _families import FAMILIES

        (tmp_path / "model.json").write_text(json.dumps(FAMILIES[family]))
        overrides.append(f"model.config={tmp_path / 'model.json'}")
    cfg = load_config(DEMO, overrides)
    spec = json.load(open(cfg.model.config))
    zero = online_config(cfg, world_size=8, cuda=True)["zero_optimization"]
    assert zero["overlap_comm"] is True
    assert {k: zero[k] for k in ("reduce_bucket_size", "stage3_prefetch_bucket_size")} == _hf_auto_buckets(
        AutoConfig.for_model(**spec)
    )
    off = load_config(DEMO, ["deepspeed.overlap_comm=false"])
    assert online_config(off, world_size=8, cuda=True)["zero_optimization"]["overlap_comm"] is False


@pytest.mark.parametrize("cuda", [True, False])
def test_deepspeed_builds_torchs_adamw_from_the_derived_json_never_its_own_ops(cuda):
    """DeepSpeed's FusedAdam JIT-compiles with nvcc at the first engine build (and refuses a CUDA
    major mismatch), its CPU Adam with g++: from the JSON this config derives, DeepSpeed's own
    choice (with an engine that has nothing to say, so no path that asks it about CPU offload or
    its ops) is torch's AdamW, fused on CUDA, and one step of it is torch's plain AdamW step."""
    from types import SimpleNamespace

    from deepspeed.runtime.engine import DeepSpeedEngine

    params = dict(online_config(load_config(DEMO), world_size=8, cuda=cuda)["optimizer"]["params"])
    chosen, extra = DeepSpeedEngine.get_optimizer_configuration(SimpleNamespace(), params, adam_w_mode=True)
    assert chosen is torch.optim.AdamW
    weights = [torch.randn(33, requires_grad=True) for _ in range(2)]
    twins = [w.detach().clone().requires_grad_() for w in weights]
    optimizer = chosen(weights, **params, **extra)
    assert bool(optimizer.defaults["fused"]) is cuda
    plain = torch.optim.AdamW(twins, **{k: params[k] for k in ("lr", "betas", "eps", "weight_decay")})
    for opt, ws in ((optimizer, weights), (plain, twins)):
        sum((w * w).sum() for w in ws).backward()
        opt.step()
    for ours, theirs in zip(weights, twins):
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("optim.beta1=2", "optim.beta1: must be in [0, 1), got 2.0"),
        ("optim.beta2=1.0", "optim.beta2: must be in [0, 1), got 1.0"),
        ("optim.eps=-1", "optim.eps: must be > 0.0, got -1.0"),
        ("optim.eps=0", "optim.eps: must be > 0.0, got 0.0"),
        ("data.seed=-3", "data.seed: must be in [0, 4.29497e+09], got -3"),
        ("train.seed=-1", "train.seed: must be >= 0, got -1"),
        ("train.max_skipped_steps=-1", "train.max_skipped_steps: must be >= 0"),
        ("model.config=configs/models/nope.json", "model.config: no such file: configs/models/nope.json"),
        ("model.pretrained=/nonexistent/model", "model.pretrained: /nonexistent/model: no such directory"),
        ("train.resume=/nonexistent/step1", "train.resume: '/nonexistent/step1' is neither none, auto, restart"),
        ("train.resume_allow=[train.output_dir]", "train.resume_allow: 'train.output_dir' cannot be allowed"),
        ("jepa.k=100000", "jepa.k: 100000 [PRED] tokens fill a view cut at data.max_length=160 tokens"),
        ("jepa.k=160", "jepa.k: 160 [PRED] tokens fill a view cut at data.max_length=160 tokens"),
    ],
)
def test_values_that_used_to_fail_inside_training_fail_at_config_time(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, [override])
    assert str(err.value).startswith("command line: ")
    assert fragment in str(err.value)


def test_k_is_bounded_by_max_length_only_where_the_views_carry_pred_tokens():
    assert load_config(DEMO, ["jepa.k=159"]).jepa.k == 159  # one content token left in a view of 160
    assert load_config(DEMO, ["jepa.k=100000", "data.max_length=0"]).jepa.k == 100000  # rows checked against the data
    assert load_config(DEMO, ["jepa.k=100000", "jepa.lambda_=0"]).jepa.k == 100000  # no views: k unused


def test_missing_tokenizer_is_named_unless_embedded_data_builds_it(tmp_path):
    with pytest.raises(ConfigError, match=f"data.tokenizer: no such directory: {tmp_path}/tok"):
        load_config(DEMO, ["data.embedded=null", f"data.tokenizer={tmp_path}/tok"])
    built = f"data.tokenizer={tmp_path}/demo/tokenizer"  # what data.embedded={tmp_path}/demo generates
    assert load_config(DEMO, [f"data.embedded={tmp_path}/demo", built]).data.tokenizer == f"{tmp_path}/demo/tokenizer"
    with pytest.raises(ConfigError, match=f"data.tokenizer: no such directory: {tmp_path}/tok "
                                          f"\\(data.embedded={tmp_path}/demo builds only its own\\)"):
        load_config(DEMO, [f"data.embedded={tmp_path}/demo", f"data.tokenizer={tmp_path}/tok"])


def test_missing_shards_are_named_unless_embedded_data_builds_them(tmp_path):
    demo = [f"data.embedded={tmp_path}/demo", f"data.tokenizer={tmp_path}/demo/tokenizer",
            f"data.eval_shards={tmp_path}/demo/shards/eval"]
    check_run_data(load_config(DEMO, demo + [f"data.shards={tmp_path}/demo/shards/train"]))
    with pytest.raises(ConfigError, match=f"data.shards: no such directory: {tmp_path}/elsewhere"):
        check_run_data(load_config(DEMO, demo + [f"data.shards={tmp_path}/elsewhere"]))


FIXTURE = "tests/fixtures/streaming-0.13"  # 48 records prepared with its tokenizer: fingerprint.json


def _fixture_run(*overrides):
    return load_config(DEMO, ["data.embedded=null", f"data.shards={FIXTURE}/shards", "data.eval_shards=null",
                              f"data.tokenizer={FIXTURE}/tokenizer", *overrides])


def test_a_row_shorter_than_one_record_is_refused_before_the_run(tmp_path):
    fingerprint = json.load(open(f"{FIXTURE}/shards/fingerprint.json"))["token_lengths"]
    # the reference layout's row holds the conversation, the user view with k=1 [PRED] and the assistant view
    needed = fingerprint["full"]["max"] + fingerprint["user"]["max"] + 1 + fingerprint["assistant"]["max"]
    check_run_data(_fixture_run("data.max_length=0", f"data.row_length={needed}"))
    with pytest.raises(ConfigError, match=f"^{FIXTURE}/shards/fingerprint.json: data.row_length={needed - 1} "
                                          f"cannot hold .* up to {needed} tokens"):
        check_run_data(_fixture_run("data.max_length=0", f"data.row_length={needed - 1}"))


def test_shards_of_another_tokenizer_are_refused_before_the_run(tmp_path, capsys):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"<unk>": 0, "</s>": 1}, unk_token="<unk>")),
                                    unk_token="<unk>", eos_token="</s>")
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(SystemExit) as code:
        main(["train", DEMO, "data.embedded=null", f"data.shards={FIXTURE}/shards", "data.eval_shards=null",
              f"data.tokenizer={tmp_path}/other"])
    err = capsys.readouterr().err
    assert code.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"megajepa: config error: data.shards: {FIXTURE}/shards/fingerprint.json: shards were "
                          f"tokenized with tokenizer")
