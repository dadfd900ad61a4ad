"""The Python-regex task checker (the embedded data): does a generated regex describe the same lines?

Two regexes are judged equal when `re.fullmatch` agrees on every string of a test set built to
tell them apart: strings sampled from each regex's own syntax tree (megajepa.eval.regex_sampler,
so both have positives), one mutation of each (a character dropped, doubled, added or changed:
near misses on counts and adjacency), and random strings of the task's pieces (letters, digits,
vowels and the literal words of both regexes). The set is seeded by the pair, so a judgement is
reproducible.

Agreement on a finite set is evidence, not proof: a candidate that differs only on strings the
set never reaches passes. A candidate that does not compile, or that backtracks for longer than
a time budget (nested unbounded repeats), is judged wrong.
"""

from __future__ import annotations

import hashlib
import random
import re
import signal
import string
import threading
from contextlib import contextmanager
from typing import Iterator, Optional

from megajepa.eval.regex_sampler import FILLER, samples_of

CLASSES = (string.ascii_lowercase, string.ascii_uppercase, string.digits, "AEIOUaeiou")
MATCH_SECONDS = 1.0  # budget for one candidate over the whole test set


def _mutate(text: str, rng: random.Random) -> str:
    char = rng.choice(FILLER + "".join(CLASSES))
    if not text:
        return char
    i = rng.randrange(len(text))
    edit = rng.randrange(4)
    if edit == 0:
        return text[:i] + text[i + 1:]  # drop
    if edit == 1:
        return text[:i] + text[i] + text[i:]  # double
    if edit == 2:
        return text[:i] + char + text[i:]  # add
    return text[:i] + char + text[i + 1:]  # change


def task_words(*regexes: str) -> list[str]:
    """The literal words of the regexes (outside character classes and escapes)."""
    words = set()
    for regex in regexes:
        words.update(re.findall(r"[A-Za-z]{2,}", re.sub(r"\[[^\]]*\]|\\.", " ", regex)))
    return sorted(words) or ["word"]


def _random_piece(words: list[str], rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        return rng.choice(words)
    if kind == 1:
        return rng.choice(rng.choice(CLASSES)) * rng.randint(1, 6)  # a run of one class
    if kind == 2:
        return "".join(rng.choice(rng.choice(CLASSES)) for _ in range(rng.randint(1, 3)))
    return rng.choice(" .-")


def discriminating_strings(reference: str, candidate: Optional[str] = None, count: int = 60) -> list[str]:
    """The discriminating test set for judging `candidate` against `reference` (see the module)."""
    seed = hashlib.blake2b(f"{reference}\0{candidate}".encode(), digest_size=8).digest()
    rng = random.Random(seed)
    sampled = samples_of(reference, rng, count)
    if candidate is not None:
        sampled += samples_of(candidate, rng, count)
    words = task_words(reference, *([candidate] if candidate is not None else []))
    pieces = ["".join(_random_piece(words, rng) for _ in range(rng.randint(0, 5))) for _ in range(count)]
    singles = [c for chars in CLASSES for c in rng.sample(chars, 2)]
    strings = sampled + [_mutate(s, rng) for s in sampled] + pieces + singles + [""]
    return list(dict.fromkeys(strings))  # unique, order kept


@contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise TimeoutError in the block after `seconds` (SIGALRM; re checks signals while it
    backtracks). Outside the main thread there is no alarm and no limit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise TimeoutError

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def same_matches(candidate: str, reference: str, strings: list[str]) -> bool:
    """Whether fullmatch of the two regexes agrees on every string; False if the candidate does
    not compile or runs out of time."""
    expected = re.compile(reference)
    try:
        pattern = re.compile(candidate)
        with _time_limit(MATCH_SECONDS):
            return all(bool(pattern.fullmatch(s)) == bool(expected.fullmatch(s)) for s in strings)
    except (re.error, TimeoutError, RecursionError, OverflowError, ValueError):
        return False


def regex_equivalent(candidate: str, reference: str) -> bool:
    """The task checker: `candidate` matches exactly the lines `reference` matches, on the test set."""
    return same_matches(candidate, reference, discriminating_strings(reference, candidate))
