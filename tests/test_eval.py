"""`megajepa eval` end to end on a briefly trained model, and the task checkers."""

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
from megajepa.eval import checkers
from megajepa.eval.checkers import CHECKERS, checker_for, recognise
from megajepa.eval.data import data_sources, load_eval_pairs
from megajepa.eval.nlrx import difference_witness, nlrx_equivalent, parse
from megajepa.eval.regex_check import regex_equivalent, discriminating_strings
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


def test_eval_metrics_agree_with_their_records(run, demo_data, one_thread):
    loaded = load_model(str(run), torch.device("cpu"))
    pairs = load_eval_pairs(demo_data["eval_shards"], loaded.tokenizer, 40)
    result = evaluate(loaded, pairs, batch_pairs=16, max_new_tokens=12, progress=False)
    m, s, records = result["metrics"], result["settings"], result["records"]
    assert s["pairs"] == 40 and s["checkers"] == {"regex": 40}  # every pair recognised as the embedded task
    assert s["retrieval_queries"] == 32  # the last batch (8 pairs) has too few candidates
    assert [r["rank"] is None for r in records] == [False] * 32 + [True] * 8
    assert 0.0 < m["ce"] < math.log(len(loaded.tokenizer)) + 3  # near uniform after 4 steps, not above
    assert m["perplexity"] == pytest.approx(math.exp(m["ce"]))
    # the latent loss (the objective's own reduction) is 1 - the matched cosine (eval's normalised dot products)
    assert m["jepa_loss"] == pytest.approx(1.0 - m["cos_matched"], abs=1e-5)
    for record in records:
        assert 0 <= record["new_tokens"] <= 12
        assert record["stopped"] or record["new_tokens"] == 12
        assert record["exact"] <= record["task_ok"]  # an exact copy always passes the checker


def _chat_jsonl(path, system: str, pairs: list) -> str:
    with open(path, "w") as f:
        for user, answer in pairs:
            messages = [{"role": "system", "content": system}, {"role": "user", "content": user},
                        {"role": "assistant", "content": answer}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return str(path)


def test_eval_picks_each_files_checker(run, tmp_path, one_thread):
    """Reference-format files through `megajepa eval`: the NL-RX system message gives nlrx, a
    gsm8k file name gives gsm8k, --checker overrides both."""
    synth = _chat_jsonl(tmp_path / "anything.jsonl", "Convert natural language to regular expression.",
                        [("lines with a number", ".*[0-9].*"), ("lines ending with dog", "(.*)(dog)")])
    gsm8k = _chat_jsonl(tmp_path / "gsm8k_test.jsonl", "You are helpful.", [("1 + 1?", "1 + 1 = 2\n#### 2")])
    for data, checker, expected in ((synth, "auto", "nlrx"), (gsm8k, "auto", "gsm8k"), (synth, "exact", "exact")):
        out = tmp_path / f"{expected}.jsonl"
        args = ["eval", str(run), "--data", data, "--batch-pairs", "2", "--max-new-tokens", "4", "--no-progress"]
        assert cli([*args, "--checker", checker, "--generations", str(out)]) == 0
        records = [json.loads(line) for line in out.read_text().splitlines()]
        assert records and {r["checker"] for r in records} == {expected}
        assert all(isinstance(r["task_ok"], bool) and isinstance(r["startswith"], bool) for r in records)


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


def test_embedded_data_gets_the_regex_checker(demo_data):
    from transformers import AutoTokenizer

    from megajepa.data.synthetic import SYSTEM_PROMPT

    tokenizer = AutoTokenizer.from_pretrained(demo_data["tokenizer"])
    pairs = load_eval_pairs(demo_data["eval_shards"], tokenizer, 2)
    sources = data_sources(demo_data["eval_shards"])
    assert sources and all(s.endswith(".jsonl") for s in sources)  # what fingerprint.json records
    assert all(recognise(p.prompt, sources) == "regex" for p in pairs)
    assert ("Translate the description into a regular expression.", "regex") in checkers.PROMPT_RULES
    assert SYSTEM_PROMPT == "Translate the description into a regular expression."  # the rule tracks the data
    assert recognise("<|system|>\nYou are a helpful assistant.<|end|>\n") == "exact"


# ------------------------------------------------------------------------------ checker choice

REFERENCE_PROMPT = "<|start_header_id|>system<|end_header_id|>\n\n{}<|eot_id|><|start_header_id|>user..."


@pytest.mark.parametrize(
    "system, sources, expected",
    [
        ("Convert natural language to regular expression.", [], "nlrx"),  # synth and turk records
        ("Answer the math question, show steps.", [], "gsm8k"),
        ("You are helpful.", ["datasets/gsm8k_test.jsonl"], "gsm8k"),  # the reference's file names
        ("You are helpful.", ["/x/turk_test.jsonl"], "nlrx"),
        ("You are helpful.", ["/x/synth_train.jsonl"], "nlrx"),
        ("You are helpful.", ["/x/nq_open_test.jsonl"], "nq_open"),
        ("You are helpful.", ["/x/spider_test.jsonl"], "exact"),
        ("You are helpful.", ["a/gsm8k_test.jsonl", "a/synth_test.jsonl"], "exact"),  # a mixture: no single rule
        ("Convert natural language to regular expression.", ["a/gsm8k_test.jsonl"], "nlrx"),  # the prompt wins
    ],
)
def test_the_data_chooses_the_checker(system, sources, expected):
    prompt = REFERENCE_PROMPT.format(system)
    assert recognise(prompt, sources) == expected
    assert checker_for("auto", prompt, sources) is CHECKERS[expected]


def test_a_named_checker_overrides_the_data():
    prompt = REFERENCE_PROMPT.format("Answer the math question, show steps.")
    assert checker_for("exact", prompt) is CHECKERS["exact"]
    assert checker_for("none", prompt) is None
    with pytest.raises(ValueError, match="--checker: 'sql'"):
        checker_for("sql", prompt)


# ------------------------------------------------------------------------------ simple checkers


@pytest.mark.parametrize(
    "name, generated, reference, expected",
    [
        ("exact", " (dog).*\n", "(dog).*", True),  # ends stripped, as the reference strips generations
        ("exact", "(dog) .*", "(dog).*", False),
        ("gsm8k", "So 3 + 4 = 7.\n#### 7", "Steps...\n#### 7", True),
        ("gsm8k", "So 3 + 4 = 7.\n#### 7.0", "Steps...\n#### 7", False),  # compared as text
        ("gsm8k", "The answer is 7", "Steps...\n#### 7", False),  # no answer line
        ("gsm8k", "#### 7", "Steps...\n#### 7", False),  # the answer line must follow a newline
        ("gsm8k", "a\n#### 7\nand more", "Steps...\n#### 7", False),  # it must end the text
        ("gsm8k", "no answer", "no answer either", True),  # as the reference: None == None
        ("nq_open", "Paris; Lyon", "the capital is Paris", True),
        ("nq_open", "Lyon; Nice", "the capital is Paris", False),
    ],
)
def test_simple_checkers(name, generated, reference, expected):
    assert CHECKERS[name].check(generated, reference) is expected


@pytest.mark.parametrize(
    "generated, reference, expected",
    [("positive, I think", "positive", True), (" positive", "positive", True), ("negative", "positive", False),
     ("pos", "positive", False)],
)
def test_startswith_score(generated, reference, expected):
    assert checkers.startswith(generated, reference) is expected


# ------------------------------------------------------------------------------ NL-RX checker


@pytest.mark.parametrize(
    "candidate, reference",
    [
        (r"(dog)|(truck)", r"(truck)|(dog)"),
        (r"(.*)(dog)", r".*dog"),
        (r"([AEIOUaeiou])|([A-Za-z])", r"[A-Za-z]"),  # vowels are letters
        (r"(dog){2,}", r"dogdog(dog)*"),
        (r"(dog){1,3}", r"dog|dogdog|dogdogdog"),
        (r"~(~(dog))", r"dog"),
        (r"([0-9])&([a-z])", r"([A-Z])&([a-z])"),  # both empty: no character is in both classes
        (r"~(([A-Z])&([0-9].*dog.*))", r".*"),  # the intersection is empty, its complement everything
        (r"((.*)(.*..*))*", r".*"),
        (r"(([AEIOUaeiou]){7,}).*([0-9]).*", r"[AEIOUaeiou]{7,}.*[0-9].*"),
        (r"[^0-9]", r"~([0-9])&."),  # one character that is not a digit
        (r"\bdog\b", r"bdogb"),  # brics: a backslash makes the next character literal
        (r"([0-9]", r"([0-9]"),  # identical texts are equal even when neither parses
    ],
)
def test_nlrx_accepts_equivalent_regexes(candidate, reference):
    assert nlrx_equivalent(candidate, reference)


# (candidate, reference, a string in exactly one of them, worked out by hand)
NLRX_DIFFERENT = [
    (r"[0-9]", r"[0-9]+", "00"),
    (r"(dog).*(truck)", r"(truck).*(dog)", "dogtruck"),
    (r"~(dog)", r"dog", ""),
    # & binds tighter than concatenation's neighbours: (.*dog) & (truck.*) holds "truckdog"
    (r".*(dog)&(truck).*", r".*((dog)&(truck)).*", "truckdog"),
    # | binds loosest: \b([0-9]) | (dog\b) against \b(([0-9])|(dog))\b
    (r"\b([0-9])|(dog)\b", r"\b(([0-9])|(dog))\b", "b0"),
    (r"([A-Za-z]).*", r"([a-z]).*", "A"),
    (r"(dog){3,}", r"(dog){2,}", "dogdog"),
    (r"dog?", r"dog", "do"),
]


@pytest.mark.parametrize("candidate, reference, witness", NLRX_DIFFERENT)
def test_nlrx_rejects_different_regexes_with_a_shortest_witness(candidate, reference, witness):
    assert not nlrx_equivalent(candidate, reference)
    found = difference_witness(parse(candidate), parse(reference))
    assert len(found) == len(witness)  # breadth first: a shortest one
    # without & and ~ the dialect is Python's, so Python's re is an independent judge of the witness
    python = lambda regex: regex.replace("\\b", "b")  # noqa: E731
    if "&" not in candidate + reference and "~" not in candidate + reference:
        assert bool(re.fullmatch(python(candidate), found)) != bool(re.fullmatch(python(reference), found))


@pytest.mark.parametrize("candidate", [r"([0-9]", r"[0-9]{3,2}", r"a#b", r"(dog))", r"[z-a]"])
def test_nlrx_judges_unparsable_candidates_wrong(candidate):
    assert not nlrx_equivalent(candidate, r"[0-9]")


def test_nlrx_checker_is_fast_on_reference_records():
    # the shapes of synth_test / turk_test answers: nested repeats, intersections, complements
    references = [
        r"~((dog.*[0-9].*){3,})", r"(\b([a-z])&(dog)\b){7,}", r"((.*)(.*dog.*)){7,}",
        r"\b((dog)(.*)){4,}\b", r"~((([A-Z])+)(.*))", r"(([A-Za-z]){7,}).*(dog).*",
    ]  # pairwise different languages (the second is empty: no [a-z] is "dog")
    start = time.perf_counter()
    for a in references:
        for b in references:
            assert nlrx_equivalent(a, b) == (a == b)
    assert time.perf_counter() - start < 10.0
