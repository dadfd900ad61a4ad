"""`megajepa eval` end to end on a briefly trained model, and the task checkers."""

import json
import math
import os
import random
import re
import subprocess
import time

import pytest
import torch

from _train_utils import BIN, REPO, demo_overrides, free_port, run_train
from megajepa.cli import main as cli
from megajepa.eval import checkers
from megajepa.eval.checkers import CHECKERS, checker_for, recognise
from megajepa.eval.data import EvalPair, data_sources, load_eval_pairs
from megajepa.eval.nlrx import difference_witness, nlrx_equivalent, parse
from megajepa.eval.regex_check import regex_equivalent, discriminating_strings
from megajepa.eval.regex_sampler import FILLER, UnsupportedSyntax, samples_of
from megajepa.eval.regex_sampler import parse as parse_python_regex
from megajepa.eval.latent import similarity_ranks
from megajepa.eval.run import default_max_new_tokens, evaluate, load_model
from megajepa.export import export
from megajepa.jepa.collapse import verdict

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
    printed = capsys.readouterr().out
    assert "| held-out CE (view B) |" in printed
    metrics = json.loads(report.read_text())["metrics"]
    summary = json.loads((run / "summary.json").read_text())  # the same first batch of 8 pairs
    assert metrics["ce"] == pytest.approx(summary["eval_ce"], rel=1e-5)
    assert metrics["jepa_loss"] == pytest.approx(summary["eval_jepa"], rel=1e-4, abs=1e-6)
    # the collapse figures of the same pairs, through the trainer's sums and through eval's batches
    for key in ("z_a_std", "z_b_std", "cos_matched", "cos_mismatched", "collapsed"):
        assert metrics[key] == pytest.approx(summary[f"eval_{key}"], rel=1e-4, abs=1e-6), key
    assert f"collapse: {verdict(metrics)}" in printed
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


def _chat_jsonl(path, system: str, pairs: list) -> str:
    with open(path, "w") as f:
        for user, answer in pairs:
            messages = [{"role": "system", "content": system}, {"role": "user", "content": user},
                        {"role": "assistant", "content": answer}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return str(path)


def test_eval_picks_each_files_checker(run, tmp_path, one_thread, capsys):
    """Reference-format files through `megajepa eval`: the NL-RX system message gives nlrx, a
    gsm8k file name gives gsm8k, --checker overrides both; the table names the checker, and a
    retrieval without a full batch (gsm8k's one pair) says why it is n/a."""
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
        printed = capsys.readouterr().out
        assert f"| task checker ({expected} on {len(records)}) |" in printed
        no_retrieval = "retrieval n/a: no batch of --batch-pairs 2 among 1 pairs (pass --batch-pairs 1 or fewer)"
        assert (no_retrieval in printed) == (len(records) < 2)


def test_default_generation_cap_fits_the_models_positions():
    def pair(prompt: int, reply: int) -> EvalPair:
        return EvalPair(0, {}, [1] * prompt, [2] * reply, "", "")

    pairs = [pair(10, 40), pair(1000, 5)]
    assert default_max_new_tokens(pairs) == 80  # twice the longest reference
    assert default_max_new_tokens(pairs, positions=1024) == 1024 - 1000  # the longest prompt's room
    assert default_max_new_tokens([pair(3, 4)], positions=1024) == 32


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


# Regexes without lookaround, one or more per construct the sampler reads; each can match a
# non-empty line, and every string its tree gives must be a match (anchors are placed where they
# hold, possessive repeats where they give up nothing).
SAMPLED_REGEXES = [
    r"dog", r"a\.b\-c\\d", r"tab\there", r"\x41\u0042\101\0", r"\N{LATIN SMALL LETTER A}b",
    r"\(\)\[\]\{\}\*\+\?\|\^\$", r"d.g", r"...",
    r"[a-z]", r"[A-Za-z0-9_]", r"[^a-z0-9]", r"[\d_]", r"[\]\-x]", r"[]a]", r"[^]a]", r"[a\-z]", r"[.*+?]",
    r"[^\w .-]",  # accepts no FILLER character
    r"\d\w\s\D\W\S",
    r"(ab)+", r"()x", r"(?:ab|cd){2}", r"(?>ab|cd)+e", r"(?P<word>[a-z]+)-(?P=word)", r"(?P<x>a|b)(?P=x)\1",
    r"((a)|b)c", r"(a)(b)(c)(d)(e)(f)(g)(h)(i)(j)\10",
    r"dog|cat|", r"a(b|c|d)e",
    r"a*b+c?", r"[0-9]{3}", r"x{2,}", r"x{2,4}", r"x{,3}", r"x{,}", r"a*?b+?c??d{2,3}?", r"[0-9]++x", r"(ab){2}+c",
    r"a{x}", r"a{}", r"{", r"a{1,x}", r"x{ 2}", r"}{2}", r"a{{2}",  # a { that is no quantifier is a literal
    r"^dog$", r"\Adog\Z", r"\bdog\b", r"[a-z]\B[a-z]", r"^(a|b)*$",
    r".*[0-9]{3}.*", r"[A-Za-z].*|.*[0-9]", r".*(dog){2,}.*[AEIOUaeiou]+",
]


@pytest.mark.parametrize("regex", SAMPLED_REGEXES)
def test_samples_of_a_regex_match_it(regex):
    samples = samples_of(regex, random.Random(0), 40)
    assert samples and any(samples)
    assert [s for s in samples if not re.fullmatch(regex, s)] == []


@pytest.mark.parametrize("atom", [r".", r"[^a-z0-9]", r"[\d_]", r"\W", r"\S", r"[]aeiou-]"])
def test_a_character_atom_draws_every_filler_character_it_accepts(atom):
    accepted = {c for c in FILLER if re.fullmatch(atom, c)}
    assert set(samples_of(atom, random.Random(0), 3000)) == accepted  # missing one: odds below 1e-17


def test_a_back_reference_repeats_the_group():
    samples = samples_of(r"(a|b)\1", random.Random(0), 40)
    assert set(samples) == {"aa", "bb"}
    named = samples_of(r"(?P<w>[a-z]{1,3})\d(?P=w)", random.Random(0), 40)
    assert all(s[:len(s) // 2] == s[len(s) // 2 + 1:] for s in named) and len(set(named)) > 1


@pytest.mark.parametrize("regex", [r"(?i)dog", r"(?i:dog)", r"(a)?(?(1)b|c)", r"(?#note)x", r"(?s).*"])
def test_unsupported_syntax_gives_no_samples(regex):
    re.compile(regex)  # valid Python: the sampler, not the regex, gives up
    with pytest.raises(UnsupportedSyntax):
        parse_python_regex(regex)
    assert samples_of(regex, random.Random(0), 10) == []


@pytest.mark.parametrize("regex", [r"([a-z]", r"a**", r"[z-a]", r"(?P=w)(?P<w>a)"])
def test_a_regex_python_rejects_gives_no_samples(regex):
    assert samples_of(regex, random.Random(0), 10) == []


def _without_lookarounds(regex: str) -> tuple[str, list[str]]:
    """The regex with its (?=...) and (?!...) groups cut out, and their bodies (cut likewise).
    Parentheses are counted as they stand: the embedded data escapes none and has none in a class."""
    kept, bodies, i = "", [], 0
    while i < len(regex):
        if not regex.startswith(("(?=", "(?!"), i):
            kept, i = kept + regex[i], i + 1
            continue
        depth, end = 0, i
        while depth or end == i:
            depth += {"(": 1, ")": -1}.get(regex[end], 0)
            end += 1
        body, nested = _without_lookarounds(regex[i + 3:end - 1])
        bodies += [body, *nested]
        i = end
    return kept, bodies


def test_samples_of_the_embedded_eval_regexes(demo_data):
    """Per draw (samples_of with count 1): the sample S matches the regex without its lookarounds,
    and each lookaround body, sampled as L, comes as S + L and L + S (samples_of's docstring)."""
    with open(demo_data["eval_jsonl"]) as f:
        regexes = [json.loads(line)["messages"][-1]["content"] for line in f]
    assert len(regexes) == 200 and sum("(?" in r for r in regexes) > 20
    rng = random.Random(0)
    for regex in regexes:
        kept, bodies = _without_lookarounds(regex)
        texts = []
        for _ in range(10):
            text, *extras = samples_of(regex, rng, 1)
            assert re.fullmatch(kept, text), (regex, text)
            assert len(extras) == 2 * len(bodies)  # no lookaround of this data sits under a repeat or branch
            for after, before in zip(extras[::2], extras[1::2]):
                body_sample = after[len(text):]
                assert after == text + body_sample and before == body_sample + text
                assert any(re.fullmatch(body, body_sample) for body in bodies), (regex, body_sample)
            texts.append(text)
        assert any(texts), regex


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
