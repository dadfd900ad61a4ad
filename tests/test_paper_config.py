"""configs/paper: the paper's fine-tuning presets load, validate and build; YAML `base:` merging."""

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from megajepa.config import ConfigError, load_config
from megajepa.model.build import architecture_spec, build_model
from test_build import save_pretrained_tiny

REPO = Path(__file__).resolve().parent.parent
PRESETS = sorted(p for p in (REPO / "configs" / "paper").glob("*.yaml") if p.name != "base.yaml")
SEEDS = (82, 23, 37, 84, 4)


@pytest.fixture(scope="module")
def tiny_dir(demo_data, tmp_path_factory):
    """A tiny Llama saved as a local pretrained directory, with a tokenizer beside it."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(demo_data["tokenizer"])
    save_pretrained_tiny(path, len(tokenizer))
    tokenizer.save_pretrained(path)
    return path


def load_preset(path: Path, tiny_dir, *extra: str):
    steps = [] if "gsm8k" in path.name else ["train.steps=10"]  # the NL-RX presets leave it to the user
    return load_config(str(path), [f"model.pretrained={tiny_dir}", f"data.tokenizer={tiny_dir}", *steps, *extra])


def test_there_is_a_preset_per_dataset():
    assert {p.stem for p in PRESETS} >= {"synth", "turk", "gsm8k"}


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_is_the_papers_protocol(path, tiny_dir):
    cfg = load_preset(path, tiny_dir)
    assert (cfg.jepa.views, cfg.jepa.readout, cfg.jepa.last_token) == ("reference", "offset", -2)
    assert (cfg.jepa.k, cfg.jepa.predictor, cfg.jepa.distance, cfg.jepa.target) == (1, "tokens", "cosine", "online")
    assert not cfg.jepa.stop_grad and cfg.jepa.dropout == 0.0
    assert cfg.deepspeed.precision == "bf16" and cfg.deepspeed.zero_stage == 3
    assert cfg.model.lora.rank == 0 and cfg.model.gradient_checkpointing
    assert cfg.data.max_length == 512
    # the published finetune.py's DataCollatorForLanguageModeling(mlm=False): every non-pad token
    assert cfg.data.labels == "conversation"
    assert cfg.data.pairs_per_batch * cfg.optim.grad_accum == 128  # the scripts' records per update, 1 rank
    assert cfg.train.seed == SEEDS[0] and cfg.data.seed == cfg.train.seed
    expected = {"gsm8k": (0.5, 1e-5)}.get(path.stem, (1.0, 2e-5))  # gsm8k: its script's --lbd, --learning_rate
    assert (cfg.jepa.lambda_, cfg.optim.lr) == expected
    assert path.stem in cfg.data.shards and path.stem in cfg.train.output_dir


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_each_seed_moves_the_data_order_with_it(path, tiny_dir):
    for seed in SEEDS:
        cfg = load_preset(path, tiny_dir, f"train.seed={seed}")
        assert cfg.train.seed == seed and cfg.data.seed == seed


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_model_builds_from_a_local_directory(path, tiny_dir):
    cfg = load_preset(path, tiny_dir)
    assert architecture_spec(cfg.model)["model_type"] == "llama"
    tokenizer = AutoTokenizer.from_pretrained(cfg.data.tokenizer)
    model = build_model(cfg.model, tokenizer)
    assert model.is_gradient_checkpointing
    assert all(p.requires_grad for p in model.parameters())  # full fine-tuning: nothing frozen


def test_nlrx_presets_ask_for_their_step_count(tiny_dir):
    with pytest.raises(ConfigError, match=r"synth\.yaml: train\.steps: required"):
        load_config(str(REPO / "configs/paper/synth.yaml"), [f"model.pretrained={tiny_dir}"])


# ------------------------------------------------------------------------------ base: merging


def write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def test_a_file_merges_over_its_base_chain(tmp_path):
    write(tmp_path / "a.yaml", "data: {shards: s, tokenizer: " + str(tmp_path) + "}\n" + "jepa: {k: 3, lambda_: 2.0}\ntrain: {steps: 7}\n")
    write(tmp_path / "sub" / "b.yaml", "base: ../a.yaml\njepa: {k: 2}\n")
    cfg = load_config(write(tmp_path / "sub" / "c.yaml", "base: b.yaml\ntrain: {steps: 9}\n"), ["jepa.lambda_=4"])
    assert (cfg.jepa.k, cfg.train.steps, cfg.data.shards) == (2, 9, "s")  # nearest file wins
    assert cfg.jepa.lambda_ == 4.0  # the command line over every file


def test_errors_name_the_file_that_set_the_key(tmp_path):
    write(tmp_path / "a.yaml", "data: {shards: s, tokenizer: " + str(tmp_path) + "}\n" + "jepa: {k: -1}\n")
    child = write(tmp_path / "b.yaml", "base: a.yaml\ntrain: {steps: 3}\n")
    with pytest.raises(ConfigError, match=r"a\.yaml: jepa\.k: must be >= 0, got -1"):
        load_config(child)


def test_a_required_key_must_be_set_later(tmp_path):
    base = write(tmp_path / "a.yaml", "data: {shards: s, tokenizer: " + str(tmp_path) + "}\n" + "train:\n  steps: ???\n")
    with pytest.raises(ConfigError, match=r"a\.yaml: train\.steps: required"):
        load_config(base)
    assert load_config(base, ["train.steps=5"]).train.steps == 5
    assert load_config(write(tmp_path / "b.yaml", "base: a.yaml\ntrain: {steps: 6}\n")).train.steps == 6


def test_bad_bases_are_config_errors(tmp_path):
    missing = write(tmp_path / "m.yaml", "base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"m\.yaml: base: no such config file: .*nowhere\.yaml"):
        load_config(missing)
    write(tmp_path / "x.yaml", "base: y.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(write(tmp_path / "y.yaml", "base: x.yaml\n"))
    with pytest.raises(ConfigError, match="base: must be the path of a YAML file"):
        load_config(write(tmp_path / "n.yaml", "base: {a: 1}\n"))
