import json
import random
import re
from collections import defaultdict

import pytest

from megajepa.data.synthetic import (
    CHAR_CLASSES,
    SYSTEM_PROMPT,
    Both,
    Either,
    FollowedBy,
    Quantified,
    Simple,
    describe,
    generate,
    group_id,
    sample_predicate,
)

DIGIT = next(c for c in CHAR_CLASSES if c.regex == "[0-9]")
VOWEL = next(c for c in CHAR_CLASSES if c.regex == "[AEIOUaeiou]")


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def regex_of(record):
    return record["messages"][2]["content"]


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    paths = generate(str(tmp_path_factory.mktemp("synthetic")), seed=7, n_train=3000, n_eval=300)
    return {split: read(path) for split, path in paths.items()}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    first = generate(str(tmp_path / "a"), seed=3, n_train=200, n_eval=20)
    again = generate(str(tmp_path / "b"), seed=3, n_train=200, n_eval=20)
    other = generate(str(tmp_path / "c"), seed=4, n_train=200, n_eval=20)
    for split in first:
        with open(first[split], "rb") as f, open(again[split], "rb") as g, open(other[split], "rb") as h:
            data = f.read()
            assert data == g.read()
            assert data != h.read()


def test_counts_and_chat_format(generated):
    assert len(generated["train"]) == 3000
    assert len(generated["eval"]) == 300
    for split, records in generated.items():
        assert len({r["id"] for r in records}) == len(records)
        for record in records:
            roles = [m["role"] for m in record["messages"]]
            assert roles == ["system", "user", "assistant"]
            assert record["messages"][0]["content"] == SYSTEM_PROMPT
            assert record["group"] == group_id(regex_of(record))
    descriptions = [r["messages"][1]["content"] for r in generated["train"]]
    assert len(set(descriptions)) == len(descriptions)


def test_every_regex_compiles(generated):
    for records in generated.values():
        for record in records:
            re.compile(regex_of(record))


def test_eval_regexes_are_held_out(generated):
    eval_regexes = [regex_of(r) for r in generated["eval"]]
    assert len(set(eval_regexes)) == len(eval_regexes)
    seen_in_training = {regex_of(r) for r in generated["train"] + generated["paraphrases"]}
    assert not set(eval_regexes) & seen_in_training


def test_paraphrase_groups(generated):
    groups = defaultdict(list)
    for record in generated["paraphrases"]:
        groups[record["group"]].append(record)
    assert len(groups) == 300
    for members in groups.values():
        descriptions = [m["messages"][1]["content"] for m in members]
        assert len(members) >= 2
        assert len(set(descriptions)) == len(descriptions)
        assert len({regex_of(m) for m in members}) == 1


def test_simple_constructs_render_the_expected_regex():
    starts_with_digit = Simple("starts", Quantified(DIGIT, "one"))
    assert starts_with_digit.regex() == "[0-9].*"
    vowel_then_dog = Simple("contains", FollowedBy(Quantified(VOWEL, "one"), Quantified("dog", "one"), adjacent=False))
    assert vowel_then_dog.regex() == ".*[AEIOUaeiou].*dog.*"
    assert Quantified("dog", "at_least", 2).regex() == "(dog){2,}"
    assert Quantified(DIGIT, "exactly", 3).regex() == "[0-9]{3}"
    text = describe(starts_with_digit, random.Random(0))
    assert any(noun in text for noun in ("number", "digit", "numeral"))


LINES = ["", "dog", "3 dogs", "a1b2c3", "Truck 99 lake", "sun moon star", "AEIOU", "road road road", "x9", "fire7"]


def matches(regex, line):
    return re.fullmatch(regex, line) is not None


def test_negation_and_conjunction_mean_what_they_say():
    rng = random.Random(1)
    checked = 0
    while checked < 200:
        predicate = sample_predicate(rng)
        for line in LINES:
            if isinstance(predicate, Both):
                expected = matches(predicate.left.regex(), line) and matches(predicate.right.regex(), line)
            elif isinstance(predicate, Either):
                expected = matches(predicate.left.regex(), line) or matches(predicate.right.regex(), line)
            elif predicate.negated:
                expected = not matches(Simple(predicate.kind, predicate.item).regex(), line)
            else:
                continue
            assert matches(predicate.regex(), line) == expected, (predicate.regex(), line)
            checked += 1
