"""The NL-RX task checker: do two regexes of the NL-RX dialect describe the same language?

NL-RX (Locascio et al., 2016; the reference's synth and turk data) writes regexes in the syntax of
the dk.brics.automaton library, in which its DFA-equality metric is computed:

    union   := inter ('|' inter)*          lowest precedence
    inter   := concat ('&' concat)*        intersection
    concat  := repeat*                     (nothing: the empty string)
    repeat  := compl ('*' | '+' | '?' | '{n}' | '{n,}' | '{n,m}')*
    compl   := '~' compl | atom            complement (against all strings)
    atom    := '(' union ')' | '()' | '[' '^'? items ']' | '.' | '\\' char | char

A regex describes whole lines (the language itself, no search). A backslash makes the next
character literal, as brics reads it: `\\b` is the letter b, not a word boundary (how the original
jar treated `\\b` is not public; both sides are read the same way, so equal regexes stay equal).

Equivalence is decided exactly, not sampled: Brzozowski derivatives of both regexes are explored
pairwise over the characters that tell the regexes' character sets apart; the languages differ
iff some reachable pair disagrees on accepting the empty string, and the path to it is a string
in one language and not the other. Derivatives are kept in a normal form (unions and
intersections flattened, deduplicated and unordered), which keeps their number finite.
"""

from __future__ import annotations

from collections import deque
from functools import lru_cache
from typing import Optional

MAX_CHAR = 0x10FFFF
MAX_PAIRS = 20_000  # pairs of derivatives explored before giving up (judged not equivalent)

# Nodes are hashable tuples: ("empty",) ("eps",) ("set", intervals) ("cat", a, b) ("star", a)
# ("or", frozenset) ("and", frozenset) ("not", a); intervals: sorted, merged (lo, hi) code points.
EMPTY, EPS = ("empty",), ("eps",)
ALL_STRINGS = ("not", EMPTY)


class RegexSyntaxError(ValueError):
    pass


class Undecided(RuntimeError):
    pass


# ------------------------------------------------------------------------------ constructors


def _merge(intervals) -> tuple:
    merged: list[list[int]] = []
    for lo, hi in sorted(intervals):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return tuple((lo, hi) for lo, hi in merged)


def charset(intervals, negate: bool = False) -> tuple:
    merged = _merge(intervals)
    if negate:
        edges, start = [], 0
        for lo, hi in merged:
            if lo > start:
                edges.append((start, lo - 1))
            start = hi + 1
        if start <= MAX_CHAR:
            edges.append((start, MAX_CHAR))
        merged = tuple(edges)
    return ("set", merged) if merged else EMPTY


def cat(a: tuple, b: tuple) -> tuple:
    if a == EMPTY or b == EMPTY:
        return EMPTY
    if a == EPS:
        return b
    if b == EPS:
        return a
    if a[0] == "cat":  # right-nested, so that (ab)c and a(bc) are one node
        return cat(a[1], cat(a[2], b))
    return ("cat", a, b)


def star(a: tuple) -> tuple:
    if a in (EMPTY, EPS):
        return EPS
    return a if a[0] == "star" else ("star", a)


def _flat(kind: str, items) -> set:
    out = set()
    for item in items:
        out |= item[1] if item[0] == kind else {item}
    return out


def union(*items: tuple) -> tuple:
    parts = _flat("or", items) - {EMPTY}
    if ALL_STRINGS in parts:
        return ALL_STRINGS
    if not parts:
        return EMPTY
    return next(iter(parts)) if len(parts) == 1 else ("or", frozenset(parts))


def intersection(*items: tuple) -> tuple:
    parts = _flat("and", items) - {ALL_STRINGS}
    if EMPTY in parts:
        return EMPTY
    if not parts:
        return ALL_STRINGS
    return next(iter(parts)) if len(parts) == 1 else ("and", frozenset(parts))


def complement(a: tuple) -> tuple:
    return a[1] if a[0] == "not" else ("not", a)


def repeat(a: tuple, low: int, high: Optional[int]) -> tuple:
    """a{low,high}; high None: unbounded."""
    required = EPS
    for _ in range(low):
        required = cat(required, a)
    if high is None:
        return cat(required, star(a))
    optional = EPS
    for _ in range(high - low):
        optional = union(EPS, cat(a, optional))
    return cat(required, optional)


# ------------------------------------------------------------------------------------ parser


SPECIAL = set("|&()[].*+?{}~\\")
UNSUPPORTED = set('#@"<>')  # brics' empty-language, any-string, quoted-string and interval syntax


class _Parser:
    def __init__(self, text: str):
        self.text, self.i = text, 0

    def peek(self) -> Optional[str]:
        return self.text[self.i] if self.i < len(self.text) else None

    def take(self) -> str:
        if self.i >= len(self.text):
            raise RegexSyntaxError(f"unexpected end of {self.text!r}")
        char = self.text[self.i]
        self.i += 1
        return char

    def expect(self, char: str) -> None:
        if self.peek() != char:
            raise RegexSyntaxError(f"expected {char!r} at {self.i} in {self.text!r}")
        self.i += 1

    def parse(self) -> tuple:
        node = self.union()
        if self.i != len(self.text):
            raise RegexSyntaxError(f"unexpected {self.text[self.i]!r} at {self.i} in {self.text!r}")
        return node

    def union(self) -> tuple:
        node = self.inter()
        while self.peek() == "|":
            self.i += 1
            node = union(node, self.inter())
        return node

    def inter(self) -> tuple:
        node = self.concat()
        while self.peek() == "&":
            self.i += 1
            node = intersection(node, self.concat())
        return node

    def concat(self) -> tuple:
        node = EPS
        while self.peek() is not None and self.peek() not in "|&)":
            node = cat(node, self.repeated())
        return node

    def number(self) -> int:
        start = self.i
        while self.peek() is not None and self.peek().isdigit():
            self.i += 1
        if start == self.i:
            raise RegexSyntaxError(f"expected a number at {self.i} in {self.text!r}")
        return int(self.text[start:self.i])

    def repeated(self) -> tuple:
        node = self.complemented()
        while self.peek() in ("*", "+", "?", "{"):
            op = self.take()
            if op == "*":
                node = star(node)
            elif op == "+":
                node = repeat(node, 1, None)
            elif op == "?":
                node = repeat(node, 0, 1)
            else:
                low = self.number()
                high: Optional[int] = low
                if self.peek() == ",":
                    self.i += 1
                    high = None if self.peek() == "}" else self.number()
                self.expect("}")
                if high is not None and high < low:
                    raise RegexSyntaxError(f"{{{low},{high}}}: bounds out of order in {self.text!r}")
                node = repeat(node, low, high)
        return node

    def complemented(self) -> tuple:
        if self.peek() == "~":
            self.i += 1
            return complement(self.complemented())
        return self.atom()

    def atom(self) -> tuple:
        char = self.take()
        if char == "(":
            if self.peek() == ")":
                self.i += 1
                return EPS
            node = self.union()
            self.expect(")")
            return node
        if char == "[":
            return self.char_class()
        if char == ".":
            return charset([(0, MAX_CHAR)])
        if char == "\\":
            char = self.take()
        elif char in SPECIAL or char in UNSUPPORTED:
            raise RegexSyntaxError(f"unexpected {char!r} at {self.i - 1} in {self.text!r}")
        return charset([(ord(char), ord(char))])

    def char_class(self) -> tuple:
        negate = self.peek() == "^"
        if negate:
            self.i += 1
        intervals = []
        while self.peek() != "]":
            low = self.class_char()
            if self.peek() == "-" and self.text[self.i + 1 : self.i + 2] not in ("]", ""):
                self.i += 1
                high = self.class_char()
                if high < low:
                    raise RegexSyntaxError(f"range out of order in {self.text!r}")
                intervals.append((low, high))
            else:
                intervals.append((low, low))
        self.expect("]")
        return charset(intervals, negate)

    def class_char(self) -> int:
        char = self.take()
        return ord(self.take() if char == "\\" else char)


def parse(text: str) -> tuple:
    """The regex as a node (see the module); RegexSyntaxError if it is not NL-RX syntax."""
    return _Parser(text).parse()


# ------------------------------------------------------------------------------- derivatives


@lru_cache(maxsize=1 << 16)
def nullable(r: tuple) -> bool:
    kind = r[0]
    if kind in ("eps", "star"):
        return True
    if kind in ("empty", "set"):
        return False
    if kind == "cat":
        return nullable(r[1]) and nullable(r[2])
    if kind == "or":
        return any(nullable(x) for x in r[1])
    if kind == "and":
        return all(nullable(x) for x in r[1])
    return not nullable(r[1])  # not


@lru_cache(maxsize=1 << 18)
def derivative(r: tuple, char: int) -> tuple:
    """The strings s such that chr(char) + s is in r."""
    kind = r[0]
    if kind in ("empty", "eps"):
        return EMPTY
    if kind == "set":
        return EPS if any(lo <= char <= hi for lo, hi in r[1]) else EMPTY
    if kind == "cat":
        head = cat(derivative(r[1], char), r[2])
        return union(head, derivative(r[2], char)) if nullable(r[1]) else head
    if kind == "star":
        return cat(derivative(r[1], char), r)
    if kind == "or":
        return union(*(derivative(x, char) for x in r[1]))
    if kind == "and":
        return intersection(*(derivative(x, char) for x in r[1]))
    return complement(derivative(r[1], char))


def _intervals(r: tuple, out: set) -> set:
    if r[0] == "set":
        out.update(r[1])
    elif r[0] in ("cat",):
        _intervals(r[1], out)
        _intervals(r[2], out)
    elif r[0] in ("star", "not"):
        _intervals(r[1], out)
    elif r[0] in ("or", "and"):
        for x in r[1]:
            _intervals(x, out)
    return out


def alphabet(*regexes: tuple) -> list[int]:
    """One character per class of characters that every character set treats alike."""
    cuts = {0}
    for r in regexes:
        for lo, hi in _intervals(r, set()):
            cuts.add(lo)
            if hi < MAX_CHAR:
                cuts.add(hi + 1)
    return sorted(cuts)


def difference_witness(a: tuple, b: tuple, max_pairs: int = MAX_PAIRS) -> Optional[str]:
    """A shortest string in exactly one of the two languages; None if they are equal.
    Raises Undecided after `max_pairs` pairs of derivatives."""
    chars = alphabet(a, b)
    seen = {(a, b)}
    queue = deque([(a, b, "")])
    while queue:
        r, s, path = queue.popleft()
        if nullable(r) != nullable(s):
            return path
        for char in chars:
            pair = (derivative(r, char), derivative(s, char))
            if pair not in seen:
                if len(seen) >= max_pairs:
                    raise Undecided(f"more than {max_pairs} pairs of derivatives")
                seen.add(pair)
                queue.append((*pair, path + chr(char)))
    return None


def nlrx_equivalent(candidate: str, reference: str) -> bool:
    """Whether `candidate` describes the same lines as `reference`. Identical texts are equal
    (as in the NL-RX tooling, even if neither parses); a candidate that does not parse, or whose
    comparison exceeds the budget, is wrong."""
    if candidate == reference:
        return True
    try:
        return difference_witness(parse(candidate), parse(reference)) is None
    except (RegexSyntaxError, Undecided, RecursionError):
        return False
