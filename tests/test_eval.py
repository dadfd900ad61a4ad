"""`megajepa eval` end to end on a briefly trained model, and the regex task's checker."""

import json
import math
import os
import re
import subprocess
import time

import pytest
import torch

from _train_utils import BIN, REPO, demo_overrides, free_port, run_train
from megajepa.cli import main as cli
from megajepa.eval.data import load_eval_pairs
from megajepa.eval.latent import similarity_ranks
from megajepa.eval.regex_check import is_regex_task, regex_equivalent, discriminating_strings
from megajepa.eval.run import evaluate, load_model
from megajepa.export import export

PAIRS = 8


@pytest.fixture(scope="module")
def run(demo_data, tmp_path_factory):
    """4 steps of the demo config (tokens predictor, online target); the trainer evaluates 1 batch."""
    out = tmp_path_factory.mktemp("run")
    extra = {"train.steps": 4, "data.pairs_per_batch": PAIRS, "train.eval_batches": 1}
    result = run_train(demo_overrides(demo_data, out, **extra), tmpdir=tmp_path_factory.mktemp("tmp"))
    assert result.returncode == 0, result.stderr[-5000:]
    return out


@pytest.fixture
def one_thread():
    """Tiny models on a shared CPU: a second thread only waits on the other developers' jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_eval_cli_reproduces_the_trainers_held_out_numbers(run, demo_data, tmp_path, one_thread, capsys):
    report, generations = tmp_path / "eval.json", tmp_path / "generations.jsonl"
    args = ["eval", str(run), "--data", demo_data["eval_shards"], "--limit", str(PAIRS), "--batch-pairs", str(PAIRS)]
    assert cli([*args, "--json", str(report), "--generations", str(generations), "--no-progress"]) == 0
    assert "| held-out CE (view B) |" in capsys.readouterr().out
    metrics = json.loads(report.read_text())["metrics"]
    summary = json.loads((run / "summary.json").read_text())  # the same first batch of 8 pairs
    assert metrics["ce"] == pytest.approx(summary["eval_ce"], rel=1e-5)
    assert metrics["jepa_loss"] == pytest.approx(summary["eval_jepa"], rel=1e-4, abs=1e-6)
    records = [json.loads(line) for line in generations.read_text().splitlines()]
    assert [r["sample_id"] for r in records] == list(range(PAIRS))


def test_eval_metrics_agree_with_each_other(run, demo_data, one_thread):
    loaded = load_model(str(run), torch.device("cpu"))
    pairs = load_eval_pairs(demo_data["eval_shards"], loaded.tokenizer, 40)
    result = evaluate(loaded, pairs, batch_pairs=16, max_new_tokens=12, progress=False)
    m, s = result["metrics"], result["settings"]
    assert s["pairs"] == 40 and s["task_checked"] == 40  # every pair is the regex task
    assert s["retrieval_queries"] == 32  # the last batch (8 pairs) has too few candidates
    assert 0.0 < m["ce"] < math.log(len(loaded.tokenizer)) + 3  # near uniform after 4 steps, not above
    assert m["perplexity"] == pytest.approx(math.exp(m["ce"]))
    # two computations of one number: the latent loss (kernels.latent_loss) and the eval's cosines
    assert m["jepa_loss"] == pytest.approx(1.0 - m["cos_matched"], abs=1e-5)
    for record in result["records"]:
        assert record["stopped"] or record["new_tokens"] == 12
        assert record["exact"] <= record["task_ok"]  # an exact copy always passes the checker


def test_similarity_ranks_against_a_loop():
    g = torch.Generator().manual_seed(0)
    z_a, z_b = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    matched, mismatched, ranks = similarity_ranks(z_a, z_b)
    cos = lambda u, v: float(u @ v / (u.norm() * v.norm()))  # noqa: E731
    for i in range(6):
        own = cos(z_a[i], z_b[i])
        others = [cos(z_a[i], z_b[j]) for j in range(6) if j != i]
        assert matched[i].item() == pytest.approx(own, abs=1e-6)
        assert mismatched[i].item() == pytest.approx(sum(others) / 5, abs=1e-6)
        assert ranks[i].item() == 1 + sum(c > own + 1e-6 for c in others)
    # the identity matching ranks every pair first
    assert similarity_ranks(z_b, z_b)[2].tolist() == [1] * 6


@pytest.mark.slow
def test_two_ranks_give_the_one_rank_numbers(run, demo_data, tmp_path, one_thread):
    hf_dir = export(str(run), str(tmp_path / "hf"))
    args = [hf_dir, "--data", demo_data["eval_shards"], "--limit", "40", "--batch-pairs", "16", "--no-progress"]
    assert cli(["eval", *args, "--json", str(tmp_path / "one.json")]) == 0
    command = [
        str(BIN / "torchrun"), "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
        "-m", "megajepa.cli", "eval", *args, "--json", str(tmp_path / "two.json"),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-5000:]
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert two["settings"]["ranks"] == 2
    assert two["metrics"] == pytest.approx(one["metrics"], rel=1e-5)


# ------------------------------------------------------------------------------ regex checker


@pytest.mark.parametrize(
    "candidate, reference",
    [
        (r"\d+", r"[0-9]+"),
        (r".*(dog).*", r".*dog.*"),
        (r"[0-9][0-9][0-9].*", r"[0-9]{3}.*"),
        (r"[0-9]{3,}.*", r"[0-9]{3}.*"),  # "starts with at least 3 digits" is "starts with 3 digits"
        (r".*[aeiouAEIOU][aeiouAEIOU]+.*", r".*[AEIOUaeiou]{2,}.*"),
        (r".*[0-9]|[A-Za-z].*", r"[A-Za-z].*|.*[0-9]"),
        (r"(?!.*(dog).*$).*", r"(?!.*dog.*$).*"),
        (r"(?=.*cloud.*$)truck[a-zA-Z]+.*", r"(?=.*cloud.*$)truck[A-Za-z]+.*"),
    ],
)
def test_checker_accepts_equivalent_regexes(candidate, reference):
    assert regex_equivalent(candidate, reference)


@pytest.mark.parametrize(
    "candidate, reference",
    [
        (r".*dogbird.*", r".*dog.*bird.*"),  # adjacency
        (r"[a-z].*", r"[A-Za-z].*"),  # letter class
        (r".*[aeiou].*", r".*[AEIOUaeiou].*"),  # vowels in both cases
        (r".*[0-9]{4}.*", r".*[0-9]{3}.*"),  # counts
        (r".*(dog){2,}.*", r".*(dog)+.*"),
        (r".*[0-9]", r"(?=.*dog.*$).*[0-9]"),  # a missing conjunct
        (r".+", r".*"),  # the empty line
        (r" .*bird.* ", r".*bird.*"),  # spaces are characters too
        (r"(?!.*(road)+.*bear)+.*", r"(?!.*(ring)+.*moon.*$).*"),  # a negation of other words
        (r"([a-z]", r"[a-z]"),  # does not compile: wrong, not a crash
        (r"", r".*tree.*"),
    ],
)
def test_checker_rejects_different_regexes(candidate, reference):
    assert not regex_equivalent(candidate, reference)


def test_checker_gives_up_on_catastrophic_backtracking():
    start = time.perf_counter()
    assert not regex_equivalent(r"(.*)*(.*)*(.*)*(.*)*y", r".*y")  # equal in theory, exponential in practice
    assert time.perf_counter() - start < 5.0


def test_test_strings_are_reproducible_and_cover_both_answers():
    reference = r"(?=.*cloud.*$)truck[A-Za-z]+.*"
    strings = discriminating_strings(reference, r"truck.*")
    assert strings == discriminating_strings(reference, r"truck.*")
    matches = sum(bool(re.fullmatch(reference, s)) for s in strings)
    assert 0 < matches < len(strings)


def test_regex_task_is_recognised(demo_data):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_data["tokenizer"])
    pairs = load_eval_pairs(demo_data["eval_shards"], tokenizer, 2)
    assert all(is_regex_task(p.prompt) for p in pairs)
    assert not is_regex_task("<|system|>\nYou are a helpful assistant.<|end|>\n")
