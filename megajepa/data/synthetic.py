"""The embedded view-pair data: English descriptions of lines and the regular expressions they describe.

A small grammar in the spirit of the NL-RX-SYNTH benchmark. Every sampled expression is a tree

    line predicate  := simple | not simple | operand and operand | simple or simple
    operand         := simple | not simple
    simple          := contains ITEM | starts with ITEM | ends with ITEM
    ITEM            := quantified | quantified (immediately) followed by quantified
    quantified      := ATOM once | one or more | zero or more | at least N | exactly N times
    ATOM            := letter | lowercase | uppercase | vowel | digit | any character | 'word'

that renders to one regex (deterministically) and to many descriptions (several surface templates
per construct, chosen with the caller's random.Random), so each regex has paraphrases.

Regexes describe a whole line: a line matches when `re.fullmatch(regex, line)` does. As in NL-RX,
counts describe runs ("exactly 3 digits" inside "containing" is `.*[0-9]{3}.*`), "followed by"
leaves anything in between (`A.*B`) and "immediately followed by" does not (`AB`). Negation and
conjunction use lookaheads: `(?!P$).*` and `(?=P$)Q`.

Output: chat-format JSONL, one object per line, as the LLM-JEPA reference code reads it:

    {"messages": [{"role": "system", "content": SYSTEM_PROMPT},
                  {"role": "user", "content": <description>},
                  {"role": "assistant", "content": <regex>}],
     "id": "train-000000", "group": <id shared by every description of one regex>}
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from typing import Optional, Union

from megajepa.files import write_text

SYSTEM_PROMPT = "Translate the description into a regular expression."
SPLITS = ("train", "eval", "paraphrases")


@dataclass(frozen=True)
class CharClass:
    regex: str
    nouns: tuple[tuple[str, str], ...]  # (singular, plural) surface forms


CHAR_CLASSES = (
    CharClass("[A-Za-z]", (("letter", "letters"),)),
    CharClass("[a-z]", (("lowercase letter", "lowercase letters"), ("lower-case letter", "lower-case letters"),
                        ("small letter", "small letters"))),
    CharClass("[A-Z]", (("uppercase letter", "uppercase letters"), ("capital letter", "capital letters"),
                        ("upper-case letter", "upper-case letters"))),
    CharClass("[AEIOUaeiou]", (("vowel", "vowels"),)),
    CharClass("[0-9]", (("number", "numbers"), ("digit", "digits"), ("numeral", "numerals"))),
    CharClass(".", (("character", "characters"),)),
)
WORDS = (
    "dog", "truck", "ring", "lake", "bird", "tree", "sun", "moon", "road", "fish",
    "book", "rain", "star", "car", "song", "stone", "bear", "cloud", "fire", "snow",
)
NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}

QUANTIFIER_SUFFIX = {"one": "", "plus": "+", "star": "*", "at_least": "{{{n},}}", "exactly": "{{{n}}}"}
CLASS_TEMPLATES = {
    "one": ("{a} {s}", "any {s}"),
    "plus": ("one or more {p}", "at least one {s}"),
    "star": ("zero or more {p}", "any number of {p}"),
    "at_least": ("at least {n} {p}", "{n} or more {p}"),
    "exactly": ("exactly {n} {p}", "{n} {p}"),
}
WORD_TEMPLATES = {
    "one": ("the string '{w}'", "the text '{w}'", "'{w}'"),
    "plus": ("the string '{w}' one or more times", "one or more repetitions of '{w}'"),
    "star": ("the string '{w}' zero or more times", "zero or more repetitions of '{w}'"),
    "at_least": ("the string '{w}' at least {n} times", "'{w}' repeated {n} or more times"),
    "exactly": ("the string '{w}' exactly {n} times", "'{w}' repeated {n} times"),
}
SEQUENCE_TEMPLATES = {
    False: ("{a} followed by {b}", "{a} before {b}", "{b} after {a}"),
    True: ("{a} immediately followed by {b}", "{a} directly before {b}", "{b} right after {a}"),
}
# (participle style, relative-clause style): one style is kept for a whole description.
CLAUSE_TEMPLATES = {
    "contains": (
        ("containing {x}", "with {x}", "having {x}"),
        ("that contain {x}", "that have {x}", "which contain {x}"),
    ),
    "starts": (
        ("starting with {x}", "beginning with {x}"),
        ("that start with {x}", "that begin with {x}", "which start with {x}"),
    ),
    "ends": (
        ("ending with {x}", "ending in {x}"),
        ("that end with {x}", "that end in {x}", "which end with {x}"),
    ),
}
NEGATED_CLAUSE_TEMPLATES = {
    "contains": (
        ("not containing {x}", "without {x}"),
        ("that do not contain {x}", "that don't contain {x}"),
    ),
    "starts": (
        ("not starting with {x}", "not beginning with {x}"),
        ("that do not start with {x}", "that don't begin with {x}"),
    ),
    "ends": (
        ("not ending with {x}", "not ending in {x}"),
        ("that do not end with {x}", "that don't end with {x}"),
    ),
}
PREDICATE_REGEX = {"contains": ".*{x}.*", "starts": "{x}.*", "ends": ".*{x}"}
HEADS = ("lines {c}", "find lines {c}", "match lines {c}", "all lines {c}", "select lines {c}")


@dataclass(frozen=True)
class Quantified:
    atom: Union[CharClass, str]  # a character class or a literal word
    quantifier: str  # a QUANTIFIER_SUFFIX key
    n: int = 0  # the count of at_least / exactly

    def regex(self) -> str:
        if self.quantifier == "one":
            return self.atom.regex if isinstance(self.atom, CharClass) else self.atom
        base = self.atom.regex if isinstance(self.atom, CharClass) else f"({self.atom})"
        return base + QUANTIFIER_SUFFIX[self.quantifier].format(n=self.n)

    def describe(self, rng: random.Random) -> str:
        n = str(self.n) if rng.random() < 0.5 else NUMBER_WORDS.get(self.n, str(self.n))
        if isinstance(self.atom, str):
            return rng.choice(WORD_TEMPLATES[self.quantifier]).format(w=self.atom, n=n)
        singular, plural = rng.choice(self.atom.nouns)
        article = "an" if singular[0] in "aeiou" else "a"
        return rng.choice(CLASS_TEMPLATES[self.quantifier]).format(a=article, s=singular, p=plural, n=n)


@dataclass(frozen=True)
class FollowedBy:
    first: Quantified
    second: Quantified
    adjacent: bool  # "immediately followed by": nothing in between

    def regex(self) -> str:
        return self.first.regex() + ("" if self.adjacent else ".*") + self.second.regex()

    def describe(self, rng: random.Random) -> str:
        template = rng.choice(SEQUENCE_TEMPLATES[self.adjacent])
        return template.format(a=self.first.describe(rng), b=self.second.describe(rng))


Item = Union[Quantified, FollowedBy]


@dataclass(frozen=True)
class Simple:
    kind: str  # contains | starts | ends
    item: Item
    negated: bool = False

    def regex(self) -> str:
        positive = PREDICATE_REGEX[self.kind].format(x=self.item.regex())
        return f"(?!{positive}$).*" if self.negated else positive

    def describe(self, rng: random.Random, style: int) -> str:
        templates = (NEGATED_CLAUSE_TEMPLATES if self.negated else CLAUSE_TEMPLATES)[self.kind][style]
        return rng.choice(templates).format(x=self.item.describe(rng))


@dataclass(frozen=True)
class Both:
    left: Simple
    right: Simple

    def regex(self) -> str:
        return f"(?={self.left.regex()}$){self.right.regex()}"

    def describe(self, rng: random.Random, style: int) -> str:
        return f"{self.left.describe(rng, style)} and {self.right.describe(rng, style)}"


@dataclass(frozen=True)
class Either:
    left: Simple
    right: Simple

    def regex(self) -> str:
        return f"{self.left.regex()}|{self.right.regex()}"

    def describe(self, rng: random.Random, style: int) -> str:
        template = rng.choice(("{l} or {r}", "either {l} or {r}"))
        return template.format(l=self.left.describe(rng, style), r=self.right.describe(rng, style))


Predicate = Union[Simple, Both, Either]


def _sample_quantified(rng: random.Random, allow_star: bool) -> Quantified:
    atom = rng.choice(CHAR_CLASSES) if rng.random() < 0.6 else rng.choice(WORDS)
    quantifiers = ["one", "one", "plus", "at_least", "exactly"] + (["star"] if allow_star else [])
    quantifier = rng.choice(quantifiers)
    n = rng.randint(2, 5) if quantifier in ("at_least", "exactly") else 0
    return Quantified(atom, quantifier, n)


def _sample_item(rng: random.Random) -> Item:
    if rng.random() < 0.5:
        return _sample_quantified(rng, allow_star=False)
    # "zero or more" only reads sensibly next to something that must be there.
    return FollowedBy(_sample_quantified(rng, True), _sample_quantified(rng, False), adjacent=rng.random() < 0.3)


def _sample_simple(rng: random.Random, negated: bool = False) -> Simple:
    return Simple(rng.choice(("contains", "starts", "ends")), _sample_item(rng), negated)


def sample_predicate(rng: random.Random) -> Predicate:
    """One random expression tree (see the module docstring for the grammar)."""
    r = rng.random()
    if r < 0.5:
        return _sample_simple(rng)
    if r < 0.65:
        return _sample_simple(rng, negated=True)
    while True:  # two different operands
        if r < 0.85:
            pair = _sample_simple(rng, rng.random() < 0.25), _sample_simple(rng, rng.random() < 0.25)
        else:
            pair = _sample_simple(rng), _sample_simple(rng)
        if pair[0].regex() != pair[1].regex():
            return Both(*pair) if r < 0.85 else Either(*pair)


def describe(predicate: Predicate, rng: random.Random) -> str:
    """One surface form of the predicate; different rng draws give its paraphrases."""
    style = rng.randrange(2)
    return rng.choice(HEADS).format(c=predicate.describe(rng, style))


def paraphrases(predicate: Predicate, rng: random.Random, count: int, attempts: int = 20) -> list[str]:
    """Up to `count` distinct descriptions of one predicate."""
    found: list[str] = []
    for _ in range(attempts):
        text = describe(predicate, rng)
        if text not in found:
            found.append(text)
            if len(found) == count:
                break
    return found


def group_id(regex: str) -> str:
    """The paraphrase group of a regex: the same in every file and for every seed."""
    return "g" + hashlib.blake2b(regex.encode(), digest_size=6).hexdigest()


def _held_out(regex: str, seed: int, eval_fraction: float) -> bool:
    """The split of a regex is a function of the regex (and seed) alone, never of sampling order."""
    digest = hashlib.blake2b(f"{seed}:{regex}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < eval_fraction


def _record(split: str, index: int, description: str, regex: str) -> dict:
    return {
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": description},
            {"role": "assistant", "content": regex},
        ],
        "id": f"{split}-{index:06d}",
        "group": group_id(regex),
    }


def _write_jsonl(path: str, records: list[dict]) -> None:
    write_text(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))


def generate(
    out_dir: str,
    seed: int = 0,
    n_train: int = 20000,
    n_eval: int = 1000,
    n_groups: Optional[int] = None,
    max_group_size: int = 4,
) -> dict[str, str]:
    """Write train.jsonl, eval.jsonl and paraphrases.jsonl under out_dir; return their paths.

    train: n_train distinct descriptions. eval: n_eval distinct regexes, none of which appears in
    train or paraphrases (the split is decided per regex). paraphrases: n_groups (default n_eval)
    groups of 2..max_group_size distinct descriptions of one training-side regex, one line each,
    lines of a group sharing "group".
    """
    n_groups = n_eval if n_groups is None else n_groups
    rng = random.Random(seed)
    eval_fraction = n_eval / max(n_train + n_eval, 1)
    train: list[tuple[str, str]] = []
    evaluation: list[tuple[str, str]] = []
    groups: list[tuple[list[str], str]] = []
    seen_descriptions: set[str] = set()
    seen_eval: set[str] = set()
    seen_groups: set[str] = set()
    budget = 50 * (n_train + n_eval + n_groups) + 1000
    while len(train) < n_train or len(evaluation) < n_eval or len(groups) < n_groups:
        budget -= 1
        if budget < 0:
            raise RuntimeError(f"could not sample {n_train} train / {n_eval} eval pairs / {n_groups} groups")
        predicate = sample_predicate(rng)
        regex = predicate.regex()
        if _held_out(regex, seed, eval_fraction):
            if len(evaluation) < n_eval and regex not in seen_eval:
                seen_eval.add(regex)
                evaluation.append((describe(predicate, rng), regex))
        elif len(train) < n_train:
            text = describe(predicate, rng)
            if text not in seen_descriptions:
                seen_descriptions.add(text)
                train.append((text, regex))
        elif len(groups) < n_groups and regex not in seen_groups:
            texts = paraphrases(predicate, rng, rng.randint(2, max_group_size))
            if len(texts) >= 2:
                seen_groups.add(regex)
                groups.append((texts, regex))

    os.makedirs(out_dir, exist_ok=True)
    paths = {split: os.path.join(out_dir, f"{split}.jsonl") for split in SPLITS}
    _write_jsonl(paths["train"], [_record("train", i, t, r) for i, (t, r) in enumerate(train)])
    _write_jsonl(paths["eval"], [_record("eval", i, t, r) for i, (t, r) in enumerate(evaluation)])
    paraphrase_lines = [(t, r) for texts, r in groups for t in texts]
    _write_jsonl(paths["paraphrases"], [_record("para", i, t, r) for i, (t, r) in enumerate(paraphrase_lines)])
    return paths
