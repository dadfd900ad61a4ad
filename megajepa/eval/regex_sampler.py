"""Random strings a Python regex matches, drawn from its syntax tree (for the regex checker's test set).

`parse` turns a pattern Python compiles into a small tree; `samples_of` walks it. The syntax read
is what the embedded data and the checker's tests use:

    literals and escaped literals, .  [...]  \\d \\w \\s \\D \\W \\S
    ( )  (?: )  (?P<name> )  (?> )  back-references \\1 (?P=name)  alternation |
    * + ? {m} {m,} {m,n} {,n}, each with a lazy ? or possessive + suffix ({ that is no quantifier
    is a literal, as in Python)
    (?= ) (?! ) (?<= ) (?<! )  whose bodies are sampled on the side (see samples_of)
    ^ $ \\A \\Z \\b \\B  zero width: nothing is sampled

Anything else (inline flags, conditionals, comments) raises UnsupportedSyntax. A one-character
atom other than a literal (a class, `.`, `\\d`...) is not interpreted: Python's own re.fullmatch
says which FILLER characters it accepts (or, where it accepts none, which printable ones), so
only its extent is parsed here.
"""

from __future__ import annotations

import random
import re
import string
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Union

FILLER = string.ascii_letters + string.digits + " .-_"  # the characters samples are drawn from
MAX_EXTRA_REPEATS = 3  # a repeat {m,n} is sampled with m .. min(n, m + 3) copies
CATEGORY_ESCAPES = frozenset("dDwWsS")
ANCHOR_ESCAPES = frozenset("AZbB")
CONTROL_ESCAPES = {"a": "\a", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}
HEX_ESCAPE_DIGITS = {"x": 2, "u": 4, "U": 8}
OCTAL = frozenset("01234567")
QUANTIFIER_BRACES = re.compile(r"\{(\d*)(,(\d*))?\}")


class UnsupportedSyntax(Exception):
    """The pattern uses syntax this parser does not read (it may still be a valid Python regex)."""


@dataclass(frozen=True)
class Chars:
    choices: str  # one character out of these; empty: the atom accepts none of those tried


@dataclass(frozen=True)
class Sequence:
    items: tuple


@dataclass(frozen=True)
class Alternation:
    branches: tuple


@dataclass(frozen=True)
class Repeat:
    body: "Node"
    low: int
    high: Optional[int]  # None: unbounded


@dataclass(frozen=True)
class Group:
    body: "Node"
    index: Optional[int]  # the capture group's number; None for (?: ) and (?> )


@dataclass(frozen=True)
class Backref:
    index: int


@dataclass(frozen=True)
class Assertion:
    body: "Node"  # a lookahead or lookbehind, positive or negative


Node = Union[Chars, Sequence, Alternation, Repeat, Group, Backref, Assertion]


@lru_cache(maxsize=4096)
def _accepted(atom: str) -> str:
    """The characters a one-character atom accepts: those of FILLER, else (an atom such as
    [^\\w .-]) those of the printable ASCII characters and of the atom's own text."""
    for pool in (FILLER, string.printable + atom):
        chosen = "".join(dict.fromkeys(c for c in pool if re.fullmatch(atom, c)))
        if chosen:
            return chosen
    return ""


class _Parser:
    """Recursive descent over a pattern re.compile accepted, so errors need no reporting here."""

    def __init__(self, pattern: str):
        self.text = pattern
        self.pos = 0
        self.groups = 0
        self.names: dict[str, int] = {}

    def peek(self, ahead: int = 0) -> str:
        i = self.pos + ahead
        return self.text[i] if i < len(self.text) else ""

    def take(self, prefix: str) -> bool:
        if self.text.startswith(prefix, self.pos):
            self.pos += len(prefix)
            return True
        return False

    def until(self, end: str) -> str:
        stop = self.text.index(end, self.pos)
        found, self.pos = self.text[self.pos:stop], stop + len(end)
        return found

    def alternation(self) -> Node:
        branches = [self.sequence()]
        while self.take("|"):
            branches.append(self.sequence())
        return branches[0] if len(branches) == 1 else Alternation(tuple(branches))

    def sequence(self) -> Node:
        items: list = []
        while self.peek() not in ("", "|", ")"):
            atom = self.atom()
            if self.quantifier_here():
                if atom is None:
                    raise UnsupportedSyntax("a repeated anchor")
                atom = self.quantifier(atom)
            if atom is not None:
                items.append(atom)
        return items[0] if len(items) == 1 else Sequence(tuple(items))

    def quantifier_here(self) -> bool:
        braces = QUANTIFIER_BRACES.match(self.text, self.pos)
        return self.peek() in ("*", "+", "?") or bool(braces and (braces[1] or braces[2]))

    def quantifier(self, body: Node) -> Repeat:
        char = self.peek()
        if char in ("*", "+", "?"):
            self.pos += 1
            low, high = {"*": (0, None), "+": (1, None), "?": (0, 1)}[char]
        else:
            braces = QUANTIFIER_BRACES.match(self.text, self.pos)
            self.pos = braces.end()
            low = int(braces[1]) if braces[1] else 0
            if braces[2] is None:
                high = low
            else:
                high = int(braces[3]) if braces[3] else None
        # lazy ? and possessive + are sampled as the greedy repeat (a possessive one may then
        # reject a sample: a*+a matches nothing)
        if not self.take("?"):
            self.take("+")
        return Repeat(body, low, high)

    def atom(self) -> Optional[Node]:
        """The next atom; None for an anchor (zero width)."""
        char = self.peek()
        if char == "(":
            return self.group()
        if char == "[":
            return Chars(_accepted(self.class_text()))
        if char == "\\":
            return self.escape()
        self.pos += 1
        if char in ("^", "$"):
            return None
        return Chars(_accepted(".")) if char == "." else Chars(char)

    def class_text(self) -> str:
        """The text of the character class starting here: up to the first unescaped ] that is
        not the class's first character (Python reads []a] and [^]a] as classes holding ])."""
        start = self.pos
        self.pos += 1
        self.take("^")
        self.take("]")
        while self.peek() != "]":
            self.pos += 2 if self.peek() == "\\" else 1
        self.pos += 1
        return self.text[start:self.pos]

    def group(self) -> Node:
        self.pos += 1
        if self.take("?P<"):
            name = self.until(">")
            self.groups += 1
            self.names[name] = index = self.groups
            return self.closing(Group(self.alternation(), index))
        if self.take("?P="):
            return Backref(self.names[self.until(")")])
        if self.take("?:") or self.take("?>"):
            return self.closing(Group(self.alternation(), None))
        if self.take("?=") or self.take("?!") or self.take("?<=") or self.take("?<!"):
            return self.closing(Assertion(self.alternation()))
        if self.peek() == "?":
            raise UnsupportedSyntax(f"the group syntax at {self.text[self.pos - 1:self.pos + 3]!r}...")
        self.groups += 1
        index = self.groups
        return self.closing(Group(self.alternation(), index))

    def closing(self, node: Node) -> Node:
        self.take(")")
        return node

    def escape(self) -> Optional[Node]:
        """The escape starting here, outside a class: a back-reference, an anchor (None), a
        category (\\d...) or one literal character."""
        char = self.peek(1)
        self.pos += 2
        if char in ANCHOR_ESCAPES:
            return None
        if char in CATEGORY_ESCAPES:
            return Chars(_accepted("\\" + char))
        if char in CONTROL_ESCAPES:
            return Chars(CONTROL_ESCAPES[char])
        if char in HEX_ESCAPE_DIGITS:
            digits = self.text[self.pos:self.pos + HEX_ESCAPE_DIGITS[char]]
            self.pos += len(digits)
            return Chars(chr(int(digits, 16)))
        if char == "N":
            self.pos += 1  # the {
            return Chars(unicodedata.lookup(self.until("}")))
        if char == "0":
            return Chars(chr(int("0" + self.octal_digits(2), 8)))
        if char.isdigit():
            # Python's rule: three octal digits are a character, else one or two digits a group
            if char in OCTAL and self.peek() in OCTAL and self.peek(1) in OCTAL:
                self.pos += 2
                return Chars(chr(int(self.text[self.pos - 3:self.pos], 8)))
            if self.peek().isdigit():
                self.pos += 1
                return Backref(int(self.text[self.pos - 2:self.pos]))
            return Backref(int(char))
        return Chars(char)  # an escaped punctuation character stands for itself

    def octal_digits(self, most: int) -> str:
        start = self.pos
        while self.pos - start < most and self.peek() in OCTAL:
            self.pos += 1
        return self.text[start:self.pos]


@lru_cache(maxsize=4096)
def parse(pattern: str) -> Node:
    """The syntax tree of a Python regex; re.error if Python does not compile it, UnsupportedSyntax
    if it uses syntax not read here (see the module docstring)."""
    re.compile(pattern)
    return _Parser(pattern).alternation()


class _NoString(Exception):
    """This draw cannot match: a character atom that accepts nothing, or a back-reference to a
    group the draw did not take."""


def _sample(node: Node, rng: random.Random, groups: dict, lookaheads: list) -> str:
    """One random string the tree matches, zero-width assertions left out; the bodies of
    assertions are sampled into `lookaheads` (see samples_of)."""
    if isinstance(node, Chars):
        if not node.choices:
            raise _NoString
        return rng.choice(node.choices)
    if isinstance(node, Sequence):
        return "".join(_sample(item, rng, groups, lookaheads) for item in node.items)
    if isinstance(node, Alternation):
        return _sample(rng.choice(node.branches), rng, groups, lookaheads)
    if isinstance(node, Repeat):
        most = node.low + MAX_EXTRA_REPEATS if node.high is None else min(node.high, node.low + MAX_EXTRA_REPEATS)
        return "".join(_sample(node.body, rng, groups, lookaheads) for _ in range(rng.randint(node.low, most)))
    if isinstance(node, Group):
        text = _sample(node.body, rng, groups, lookaheads)
        if node.index is not None:
            groups[node.index] = text
        return text
    if isinstance(node, Backref):
        if node.index not in groups:
            raise _NoString
        return groups[node.index]
    try:  # an Assertion: a body that cannot match adds no string
        lookaheads.append(_sample(node.body, rng, groups, lookaheads))
    except _NoString:
        pass
    return ""


def samples_of(regex: str, rng: random.Random, count: int) -> list[str]:
    """Strings sampled from the regex's syntax tree, `count` draws (none if it does not parse, or
    uses syntax `parse` does not read; a draw that cannot match gives nothing).

    A draw gives the sample S of the pattern without its assertions and, for each assertion
    body sampled as L, also S + L and L + S: `(?=.*dog.*$)bird.*` describes lines starting with
    'bird' that contain 'dog', which S alone rarely is, and `(?!.*dog.*$).*` rejects the lines
    that contain 'dog', which random lines rarely do."""
    try:
        tree = parse(regex)
    except (re.error, UnsupportedSyntax, RecursionError, OverflowError, ValueError):
        return []
    strings = []
    for _ in range(count):
        lookaheads: list[str] = []
        try:
            text = _sample(tree, rng, {}, lookaheads)
        except (_NoString, RecursionError):
            continue
        strings.append(text)
        for extra in lookaheads:
            strings += [text + extra, extra + text]
    return strings
