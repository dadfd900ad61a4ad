"""`megajepa plan`: its activation formula against what autograd really saves, its model state
against what `megajepa bench` measures, its budget search, and the Llama run configs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaModel

from megajepa.config import load_config
from megajepa.plan import Dims, make_plan, worst_case_tokens

REPO = Path(__file__).resolve().parent.parent
LLAMA_CONFIGS = ["llama-1b", "llama-1b-ema", "llama-8b", "llama-8b-ema"]
LLAMA3_VOCAB = 128256  # the Llama 3 tokenizer's size, given as --vocab-size (no tokenizer here)


@pytest.fixture
def llama_overrides(demo_data):
    """The configs name a Llama 3 tokenizer that is not on this machine: any tokenizer passes
    validation, and --vocab-size gives the plan Llama 3's vocabulary."""
    return [f"data.tokenizer={demo_data['tokenizer']}"]


def _saved_bytes(run) -> int:
    """Bytes of the distinct storages autograd saves for backward while `run()` executes."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return storages


def _llama(dims: Dims) -> LlamaModel:
    config = LlamaConfig(
        hidden_size=dims.hidden,
        intermediate_size=dims.intermediate,
        num_hidden_layers=dims.layers,
        num_attention_heads=dims.heads,
        num_key_value_heads=dims.kv_heads,
        head_dim=dims.head_dim,
        vocab_size=dims.vocab,
        attn_implementation="sdpa",  # on CPU a fused kernel that, like FlexAttention, keeps no L x L matrix
    )
    torch.manual_seed(0)
    return LlamaModel(config).to(torch.bfloat16).train()


@pytest.mark.parametrize(
    "dims",
    [Dims(256, 704, 3, 8, 2, 32, 97), Dims(192, 512, 2, 6, 6, 32, 97)],
    ids=["gqa", "mha"],
)
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_activation_formula_counts_what_autograd_saves(dims, checkpointing):
    """The saved tensors of a real bf16 Llama forward, counted by torch's saved-tensor hooks, against
    the plan's per-token figure, less what this base model (no LM head) does not hold at the end of
    its forward: the 4 h of residual gradient that only the backward holds, the 2 h of the final
    norm's output that the LM head keeps, and with checkpointing the one layer the backward recomputes."""
    model, tokens = _llama(dims), 128
    if checkpointing:
        model.gradient_checkpointing_enable()
    ids = torch.randint(0, dims.vocab, (1, tokens))
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = _saved_bytes(lambda: model(input_ids=ids).last_hidden_state)
    measured = sum(size for address, size in saved.items() if address not in weights) / tokens
    expected = dims.activation_bytes_per_token(checkpointing) - 4 * dims.hidden - 2 * dims.hidden
    if checkpointing:
        expected -= dims.layer_activation_bytes()
    # What the formula leaves out: the token ids (8 B per token).
    assert measured == pytest.approx(expected, rel=0.03)


def test_parameter_count_is_the_models_own(demo_data):
    """The plan's parameters against a real model built as training builds it (no ZeRO)."""
    from megajepa.model.build import build_model
    from megajepa.train.setup import run_tokenizers

    cfg = load_config(str(REPO / "configs/demo.yaml"), [f"data.tokenizer={demo_data['tokenizer']}"])
    _, tokenizer, _ = run_tokenizers(cfg)
    model = build_model(cfg.model, tokenizer)
    plan = make_plan(cfg, "demo", 1, 80)
    assert plan.num_params == sum(p.numel() for p in model.parameters())
    assert plan.dims.vocab == model.get_input_embeddings().num_embeddings


def test_a_composite_config_is_planned_as_its_text_only_model(demo_data, tmp_path):
    """Gemma3Config (image-text): the plan reads sizes through its text config, as build_model
    builds Gemma3ForCausalLM from it (before: a crash on vocab_size / hidden_size)."""
    from _families import FAMILIES
    from megajepa.model.build import build_model
    from megajepa.train.setup import run_tokenizers

    (tmp_path / "gemma3.json").write_text(json.dumps(FAMILIES["gemma3"]))
    cfg = load_config(str(REPO / "configs/demo.yaml"),
                      [f"data.tokenizer={demo_data['tokenizer']}", f"model.config={tmp_path / 'gemma3.json'}"])
    _, tokenizer, _ = run_tokenizers(cfg)
    model = build_model(cfg.model, tokenizer)
    plan = make_plan(cfg, "gemma3", 1, 80)
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert plan.num_params == sum(p.numel() for p in model.parameters())
    assert (plan.dims.vocab, plan.dims.hidden) == (model.get_input_embeddings().num_embeddings, model.config.hidden_size)


@pytest.mark.parametrize("name", LLAMA_CONFIGS)
def test_budget_is_the_largest_that_fits(name, llama_overrides):
    cfg = load_config(str(REPO / "configs" / f"{name}.yaml"), llama_overrides)
    plan = make_plan(cfg, name, 8, 80, vocab_size=LLAMA3_VOCAB)
    for checkpointing in (True, False):
        for chunked in (True, False):
            tokens = plan.max_tokens(checkpointing, chunked)
            assert tokens > 0
            assert plan.peak_bytes(tokens, checkpointing, chunked) <= plan.usable()
            assert plan.peak_bytes(tokens + 1, checkpointing, chunked) > plan.usable()
        # a chunked CE never needs more memory than the full logits
        assert plan.max_tokens(checkpointing, True) >= plan.max_tokens(checkpointing, False)
    assert plan.max_tokens(True, False) > plan.max_tokens(False, False)
    # ZeRO-3: the partitioned state shrinks with the ranks, the persistent copies do not
    wide = make_plan(cfg, name, 16, 80, vocab_size=LLAMA3_VOCAB)
    assert wide.state["optimizer"] == pytest.approx(plan.state["optimizer"] / 2, rel=1e-6)
    assert wide.state["persistent"] == plan.state["persistent"]


@pytest.mark.parametrize("name", LLAMA_CONFIGS)
def test_llama_configs_validate_and_their_micro_batch_fits(name, llama_overrides):
    """Each run config loads and validates as `megajepa config` does, asks for what the issue asks
    (bf16, FlexAttention, checkpointing, the EMA target in the -ema variants), and its worst-case
    micro-batch fits the memory plan of 8 x 80 GB with today's full-logit CE."""
    path = REPO / "configs" / f"{name}.yaml"
    cfg = load_config(str(path), llama_overrides)
    assert (cfg.deepspeed.precision, cfg.model.attention, cfg.model.gradient_checkpointing) == ("bf16", "flex", True)
    assert cfg.deepspeed.zero_stage == 3 and os.path.isfile(REPO / cfg.model.config)
    assert cfg.jepa.target == ("ema" if name.endswith("-ema") else "online")
    plan = make_plan(cfg, name, 8, 80, vocab_size=LLAMA3_VOCAB)
    how, tokens = worst_case_tokens(cfg)
    assert how.startswith("data.tokens_per_batch=")
    # the plan is checked against autograd and the bench above; the config's budget is chosen by hand
    assert tokens <= plan.max_tokens(checkpointing=True, chunked=False)


def test_config_and_plan_commands_on_a_llama_config(tmp_path, capsys, monkeypatch, llama_overrides):
    from megajepa.cli import main

    monkeypatch.chdir(REPO)
    assert main(["config", "configs/llama-8b-ema.yaml", *llama_overrides]) == 0
    shown = capsys.readouterr().out
    assert "target: ema" in shown and "gradient_checkpointing: true" in shown
    out = tmp_path / "plan.json"
    argv = ["plan", "configs/llama-8b-ema.yaml", *llama_overrides, "--gpus", "8", "--gpu-memory", "80",
            "--vocab-size", str(LLAMA3_VOCAB)]
    assert main([*argv, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| ema |" in printed and "| teacher |" in printed and "This config:" in printed
    figures = json.loads(out.read_text())
    cfg = load_config("configs/llama-8b-ema.yaml", llama_overrides)
    plan = make_plan(cfg, "llama-8b-ema", 8, 80, vocab_size=LLAMA3_VOCAB)
    assert figures["state_bytes"] == plan.state and figures["max_tokens"]["checkpointing/full_logits"] > 0


def test_plan_errors_name_the_key(capsys, monkeypatch):
    from megajepa.cli import main

    monkeypatch.chdir(REPO)
    assert main(["plan", "configs/llama-1b.yaml", "--gpus", "8", "--gpu-memory", "80"]) == 2
    assert "data.tokenizer" in capsys.readouterr().err  # the configs' Llama 3 tokenizer is not here
    argv = ["plan", "configs/demo.yaml", "--gpus", "0", "--gpu-memory", "80", "--vocab-size", "10"]
    assert main(argv) == 2
    assert "--gpus" in capsys.readouterr().err


def _megajepa(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    command = [str(Path(sys.executable).parent / "megajepa"), *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)


@pytest.mark.slow
def test_model_state_matches_what_the_bench_measures(demo_data, tmp_path):
    """`megajepa bench` measures the model state per rank of the tiny Llama (jepa-ema, fp32 on CPU,
    one optimizer step so that Adam's moments exist) at world sizes 1, 2 and 4; the plan for the same
    config must give the same bytes. Tolerance: exact for parameters, persistent copies, EMA and
    teacher; the optimizer may differ by 8 bytes per parameter group (Adam's step counters, fp32
    scalars, which the plan leaves out) — within 1e-5 relative here."""
    overrides = [
        f"data.embedded={demo_data['root']}",
        f"data.shards={demo_data['train_shards']}",
        f"data.eval_shards={demo_data['eval_shards']}",
        f"data.tokenizer={demo_data['tokenizer']}",
        "data.pairs_per_batch=4",
    ]
    out = tmp_path / "bench"
    result = _megajepa(
        "bench", "configs/demo.yaml", *overrides, "--modes", "jepa-ema", "--steps", "1", "--warmup", "0",
        "--nproc", "2", "--scaling", "1,2,4", "--loader-batches", "0", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    measured = json.loads((out / "bench.json").read_text())["scaling"]
    cfg = load_config(str(REPO / "configs/demo.yaml"), [*overrides, "jepa.target=ema"])
    assert cfg.deepspeed.precision == "auto" and not torch.cuda.is_available()
    cfg.deepspeed.precision = "fp32"  # what `auto` resolved to on this CPU machine
    for world in (1, 2, 4):
        plan = make_plan(cfg, "demo", world, 80)
        got = measured[str(world)]
        for name in ("parameters", "persistent", "ema", "teacher"):
            assert plan.state[name] == got[name], (world, name, plan.state[name], got[name])
        assert plan.state["optimizer"] == pytest.approx(got["optimizer"], rel=1e-5, abs=16)


def test_plan_states_the_host_memory_of_an_elastic_resume(llama_overrides, capsys):
    """8B from 32 saved ranks to 16: a rank reads the few saved EMA shards its partitions fall in,
    not the whole fp32 EMA (32 GB) every rank used to build; the conversion's workers each hold
    one saved rank's optimizer state, or one parameter whole."""
    from megajepa.plan import render

    cfg = load_config(str(REPO / "configs" / "llama-8b-ema.yaml"), llama_overrides)
    plan = make_plan(cfg, "llama-8b-ema", 16, 80, vocab_size=LLAMA3_VOCAB, resume_from=32, gpus_per_node=8,
                     conversion_workers=4)  # fmt: skip
    p, host = plan.num_params, plan.elastic_host
    embedding = plan.dims.vocab * plan.dims.hidden  # the largest parameter (untied head the same size)
    # ceil(32 / 16) + 1 saved shards of 4 B x P / 32, one twice while flattened, and its own 4 B x P / 16
    assert host["EMA reshard per rank"] == pytest.approx(4 * p * (4 / 32 + 1 / 16), rel=1e-4)
    assert host["EMA reshard per rank"] < 4 * p / 5
    assert host["conversion, extract"] == pytest.approx(4 * 12 * p / 32, rel=1e-4)
    assert host["conversion, merge"] == 4 * 24 * embedding
    assert host["universal load per rank"] == 12 * embedding
    loading = 8 * (12 * embedding + host["EMA reshard per rank"])
    assert plan.node_host_bytes() == max(loading, host["conversion, extract"], host["conversion, merge"])
    shown = render(plan)
    assert "Host memory at an elastic resume from 32 saved ranks to 16" in shown
    assert f"{plan.node_host_bytes() / 1024**3:,.2f}" in shown
    online = make_plan(load_config(str(REPO / "configs" / "llama-8b.yaml"), llama_overrides), "llama-8b", 16, 80,
                       vocab_size=LLAMA3_VOCAB)  # fmt: skip
    assert online.elastic_host["EMA reshard per rank"] == 0  # no teacher


def test_the_teachers_one_forward_per_step_counts_with_deep_accumulation(llama_overrides):
    """The teacher encodes all of a step's micro-batches in one forward: its share of the peak grows
    by the same amount with each accumulated micro-batch, where the online model's (one micro-batch
    alive at a time) does not grow at all."""

    def peak(name: str, grad_accum: int) -> float:
        cfg = load_config(str(REPO / "configs" / f"{name}.yaml"), llama_overrides)
        cfg.optim.grad_accum = grad_accum
        return make_plan(cfg, name, 8, 80, vocab_size=LLAMA3_VOCAB).peak_bytes(8192, True, True)

    ema = [peak("llama-8b-ema", accum) for accum in (16, 32, 48)]
    assert ema[2] - ema[1] == ema[1] - ema[0] > 0
    assert peak("llama-8b", 16) == peak("llama-8b", 48)


def test_plan_needs_no_tokenizer_directory_with_vocab_size(capsys, monkeypatch, llama_overrides):
    """The configs' Llama 3 tokenizer is not here: --vocab-size alone plans as a run with one would."""
    from megajepa.cli import main

    monkeypatch.chdir(REPO)
    argv = ["plan", "configs/llama-1b.yaml", "--gpus", "8", "--gpu-memory", "80", "--vocab-size", str(LLAMA3_VOCAB)]
    assert main(argv) == 0
    without = capsys.readouterr().out
    assert main([*argv, *llama_overrides]) == 0
    plan = capsys.readouterr().out
    # the first plan in a process may follow DeepSpeed's "Setting accelerator to CPU" line
    assert without[without.index("# Memory plan"):] == plan[plan.index("# Memory plan"):]


def test_readme_and_config_figures_are_the_plans():
    """README's table of the Llama configs and their "Token budget" comments are what `megajepa
    plan` prints now (scripts/plan_figures.py writes them; --check compares)."""
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "plan_figures.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize(
    "overrides",
    [
        ["jepa.predictor=linear"],
        ["jepa.predictor=mlp"],
        ["jepa.objective=stp", "jepa.lambda_=0.02", "jepa.predictor=linear", "jepa.stp.linear_predictor=false"],
        ["jepa.objective=stp", "jepa.lambda_=0.02", "jepa.stp.linear_predictor=true"],
    ],
)
def test_planned_predictor_is_the_one_the_objective_trains(overrides):
    from transformers import LlamaForCausalLM

    from megajepa.jepa.objective import JepaModel
    from megajepa.plan import parameter_numels

    cfg = load_config("configs/demo.yaml", overrides)
    arch = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
    planned = sum(sum(v) for k, v in parameter_numels(arch, cfg.jepa).items() if k.startswith("predictor"))
    trained = sum(p.numel() for p in JepaModel(LlamaForCausalLM(arch), cfg.jepa).predictor.parameters())
    assert planned == trained
