"""Task checkers for `megajepa eval`: is a generated answer right? Chosen per pair from the data.

    exact     the generation equals the reference, ends stripped (the reference's evaluate.py default)
    regex     a Python regex with the same whole-line matches on a discriminating test set (the
              embedded data; megajepa.eval.regex_check)
    nlrx      an NL-RX regex (dk.brics syntax) with the same language, decided exactly (the
              reference's synth and turk data; megajepa.eval.nlrx). This is the NL-RX papers'
              DFA-equality accuracy; the reference's evaluate.py scores these data by exact
              match, which `megajepa eval` reports beside it
    gsm8k     the same final answer: the text after "\\n#### " at the end, as the reference's
              evaluate.py and finetune.py compare it
    nq_open   one of the generation's "; "-separated answers occurs in the reference, as the
              reference's evaluate.py (its training-time callback uses exact match instead)

The reference's spider checker runs the SQL on its databases and is not here.

Which checker: the one named (`megajepa eval --checker NAME`); else the first rule below that
recognises the pair: its prompt's system message, then the name of the file it came from (for
shards, the sources their fingerprint.json records), as the reference keys on file names; else
`exact`. Besides the checker, every generation is scored by `startswith`, the reference's
`--startswith` score: the generation begins with the reference.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

from megajepa.eval.nlrx import nlrx_equivalent
from megajepa.eval.regex_check import regex_equivalent


def exact(generated: str, reference: str) -> bool:
    return generated.strip() == reference.strip()


def startswith(generated: str, reference: str) -> bool:
    return generated.strip().startswith(reference.strip())


GSM8K_ANSWER = re.compile(r"\n#### (.+)$")


def gsm8k_answer(text: str) -> Optional[str]:
    match = GSM8K_ANSWER.search(text)
    return match.group(1) if match else None


def gsm8k_same_answer(generated: str, reference: str) -> bool:
    """As the reference: the extracted answers are equal (so two texts without one are too)."""
    return gsm8k_answer(generated.strip()) == gsm8k_answer(reference)


def nq_open_contains(generated: str, reference: str) -> bool:
    return any(answer in reference for answer in generated.strip().split("; "))


@dataclass(frozen=True)
class Checker:
    name: str
    check: Callable[[str, str], bool]  # (generated, reference) -> correct


CHECKERS = {
    c.name: c
    for c in (
        Checker("exact", exact),
        Checker("regex", lambda generated, reference: regex_equivalent(generated.strip(), reference.strip())),
        Checker("nlrx", lambda generated, reference: nlrx_equivalent(generated.strip(), reference.strip())),
        Checker("gsm8k", gsm8k_same_answer),
        Checker("nq_open", nq_open_contains),
    )
}
AUTO, NONE = "auto", "none"
CHOICES = (AUTO, *CHECKERS, NONE)

# A system message the data's prompts carry -> the checker of its task.
PROMPT_RULES = (
    ("Convert natural language to regular expression.", "nlrx"),  # the reference's synth, turk
    ("Answer the math question, show steps.", "gsm8k"),  # the reference's gsm8k
    ("Translate the description into a regular expression.", "regex"),  # megajepa.data.synthetic
)


def _source_rule(path: str) -> Optional[str]:
    """The reference's file-name conventions (datasets/<name>_{train,test}.jsonl)."""
    name = os.path.basename(path)
    if "gsm8k" in name:
        return "gsm8k"
    if name.startswith("nq_open"):
        return "nq_open"
    if name.startswith(("synth", "turk")):
        return "nlrx"
    return None


def recognise(prompt: str, sources: Iterable[str] = ()) -> str:
    """The checker for a pair whose rendered prompt (view A) is `prompt`, from data files `sources`."""
    for system, name in PROMPT_RULES:
        if system in prompt:
            return name
    names = {_source_rule(path) for path in sources} - {None}
    return names.pop() if len(names) == 1 else "exact"


def checker_for(requested: str, prompt: str, sources: Iterable[str] = ()) -> Optional[Checker]:
    """The checker `requested` (a name, `auto` or `none`: no checker) for one pair."""
    if requested == NONE:
        return None
    if requested == AUTO:
        return CHECKERS[recognise(prompt, sources)]
    if requested not in CHECKERS:
        raise ValueError(f"--checker: {requested!r} is not one of {', '.join(CHOICES)}")
    return CHECKERS[requested]
