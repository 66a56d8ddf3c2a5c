"""Regex → byte automaton, for the syntax JSON Schema `pattern`s and `SamplingParams(regex=...)` use.

Supported: literals and escapes (`\\n \\t \\r \\f \\v \\0 \\xHH \\uHHHH \\UHHHHHHHH`, escaped punctuation), `.`,
classes `[...]` with ranges, negation and the shorthands `\\d \\w \\s \\D \\W \\S`, groups `(...)`, `(?:...)`,
`(?P<name>...)`, `(?<name>...)`, alternation, quantifiers `* + ? {m} {m,} {m,n} {,n}` (lazy forms too: they
match the same strings), and anchors `^`/`$` at the start/end of the pattern or of a top-level alternative.
Lookarounds, backreferences, word boundaries, inline flags, possessive quantifiers and anchors elsewhere change
what "the language" means in ways an automaton cannot follow, so they raise `SchemaError`.

Semantics follow Python's `re` (so tests can use it as the reference): `.` is any character but `\\n`, and
`\\d \\w \\s` are ASCII (`[0-9]`, `[A-Za-z0-9_]`, `[ \\t\\n\\r\\f\\v]`), which for `\\d` and `\\w` is also
what ECMA-262, and so JSON Schema, means. `$` means the end of the text (Python's `\\Z`).

Characters reach the automaton through an `encode` callback from code-point ranges to IR: plain UTF-8 for
`compile_regex`, JSON-string escaping for a schema's `pattern` (a `"` in the pattern is `\\"` in the output).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from nbllm.constrain.automaton import Automaton, content_key, deep_recursion
from nbllm.constrain.errors import SchemaError
from nbllm.constrain.ir import (
    EMPTY,
    MAX_CODE_POINT,
    Node,
    Repeat,
    alt,
    char_set,
    complement_ranges,
    normalize_ranges,
    seq,
)

Ranges = list[tuple[int, int]]
Encoder = Callable[[Ranges], Node]

DIGIT: Ranges = [(0x30, 0x39)]
WORD: Ranges = [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)]
SPACE: Ranges = [(0x09, 0x0D), (0x20, 0x20)]
ANY: Ranges = [(0, MAX_CODE_POINT)]
_SHORTHANDS = {"d": DIGIT, "w": WORD, "s": SPACE}
_CONTROL = {"n": 0x0A, "t": 0x09, "r": 0x0D, "f": 0x0C, "v": 0x0B, "0": 0x00, "a": 0x07}
_HEX_ESCAPES = {"x": 2, "u": 4, "U": 8}
_MAX_REPEAT = 10_000
_BRACES = re.compile(r"\{(\d*)(,?)(\d*)\}")  # {m} {m,} {m,n} {,n} {,}; '{}' is a literal


def compile_regex(pattern: str) -> Automaton:
    """A grammar matching exactly the strings `re.fullmatch(pattern, s)` matches (in the supported syntax)."""
    if not isinstance(pattern, str):
        raise SchemaError(f"regex: expected a string pattern, got {type(pattern).__name__}")
    with deep_recursion("regex"):
        body = parse_regex(pattern, char_set, where="regex", search=False)
    return Automaton({"regex": body}, "regex", key=content_key("regex", pattern), what=f"regex {pattern!r}")


def parse_regex(pattern: str, encode: Encoder, *, where: str, search: bool) -> Node:
    """The pattern as IR. `search=True` gives JSON Schema's meaning (the pattern may match anywhere: a side
    without an anchor gets any text around it), `search=False` the whole-string one."""
    parser = _Parser(pattern, encode, where)
    branches = parser.top()
    if not search:
        return alt(*(body for _, body, _ in branches))
    anything = Repeat(encode(ANY), 0, None)
    return alt(*(seq(EMPTY if start else anything, body, EMPTY if end else anything)
                 for start, body, end in branches))


class _Parser:
    """Recursive descent over the pattern, building IR as it goes."""

    def __init__(self, pattern: str, encode: Encoder, where: str) -> None:
        self.s, self.i, self.encode, self.where = pattern, 0, encode, where

    def error(self, message: str, at: int | None = None) -> SchemaError:
        return SchemaError(f"{self.where}: {message} at position {self.i if at is None else at} of {self.s!r}")

    def peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def eat(self, text: str) -> bool:
        if self.s.startswith(text, self.i):
            self.i += len(text)
            return True
        return False

    def top(self) -> list[tuple[bool, Node, bool]]:
        """Top-level alternatives as (anchored at start, body, anchored at end)."""
        branches = [self.branch(top=True)]
        while self.eat("|"):
            branches.append(self.branch(top=True))
        if self.i < len(self.s):
            raise self.error("unbalanced ')'")
        return branches  # type: ignore[return-value]

    def alternation(self) -> Node:
        options = [self.branch(top=False)]
        while self.eat("|"):
            options.append(self.branch(top=False))
        return alt(*options)  # type: ignore[arg-type]

    def branch(self, top: bool) -> Node | tuple[bool, Node, bool]:
        items: list[Node] = []
        start = end = False
        while self.peek() not in ("", "|", ")"):
            c = self.peek()
            if c in "^$":
                if not top or (c == "^" and (items or end)):
                    raise self.error(f"anchor {c!r} is supported only at the start/end of the pattern or of a "
                                     "top-level alternative")
                self.i += 1
                start, end = start or c == "^", end or c == "$"
                continue
            if end:
                raise self.error("text after the end anchor '$'")
            items.append(self.quantified())
        body = seq(*items) if items else EMPTY
        return (start, body, end) if top else body

    def quantified(self) -> Node:
        node = self.atom()
        quantified = False
        while True:
            at = self.i
            bounds = self.quantifier()
            if bounds is None:
                return node
            if quantified:
                raise self.error("multiple repeat", at)
            lo, hi = bounds
            if self.eat("+"):
                raise self.error("possessive quantifiers are not supported")
            self.eat("?")  # lazy: the same strings match a whole-string pattern
            node, quantified = Repeat(node, lo, hi), True

    def quantifier(self) -> tuple[int, int | None] | None:
        c = self.peek()
        if c and c in "*+?":
            self.i += 1
            return {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
        if c != "{":
            return None
        m = _BRACES.match(self.s, self.i)
        if m is None or m.group(0) == "{}":
            return None  # not a quantifier: a literal '{', as in Python
        lo_text, comma, hi_text = m.groups()
        lo = int(lo_text) if lo_text else 0
        hi = (int(hi_text) if hi_text else None) if comma else lo
        if hi is not None and hi < lo:
            raise self.error("min repeat greater than max repeat")
        if max(lo, hi or 0) > _MAX_REPEAT:
            raise self.error(f"repetition count above {_MAX_REPEAT}")
        self.i = m.end()
        return lo, hi

    def atom(self) -> Node:
        at, c = self.i, self.peek()
        self.i += 1
        if c == "(":
            return self.group(at)
        if c == "[":
            return self.encode(self.char_class())
        if c == ".":
            return self.encode(complement_ranges([(0x0A, 0x0A)]))
        if c == "\\":
            ranges = self.escape(in_class=False)
            return self.encode(ranges)
        if c in "*+?" or (c == "{" and self.quantifier_at(at)):
            raise self.error("nothing to repeat", at)
        return self.encode([(ord(c), ord(c))])

    def quantifier_at(self, at: int) -> bool:
        saved, self.i = self.i, at
        try:
            return self.quantifier() is not None
        finally:
            self.i = saved

    def group(self, at: int) -> Node:
        if self.eat("?"):
            if self.eat(":"):
                pass
            elif self.eat("P<") or (self.peek() == "<" and self.s[self.i + 1:self.i + 2] not in ("=", "!")
                                    and self.eat("<")):
                close = self.s.find(">", self.i)
                if close < 0 or not self.s[self.i:close].isidentifier():
                    raise self.error("bad group name", at)
                self.i = close + 1
            elif self.peek() in ("=", "!") or self.s.startswith(("<=", "<!"), self.i):
                raise self.error("lookaround assertions are not supported", at)
            elif self.eat("P="):
                raise self.error("backreferences are not supported", at)
            else:
                raise self.error("inline flags and other (?...) groups are not supported", at)
        node = self.alternation()
        if not self.eat(")"):
            raise self.error("missing ')'", at)
        return node

    def escape(self, in_class: bool) -> Ranges:
        """The ranges of the escape after a backslash (a shorthand class or one code point)."""
        at = self.i - 1
        c = self.peek()
        if not c:
            raise self.error("dangling backslash", at)
        self.i += 1
        if c.lower() in _SHORTHANDS:
            ranges = _SHORTHANDS[c.lower()]
            return complement_ranges(ranges) if c.isupper() else ranges
        if c in _HEX_ESCAPES:
            digits = self.s[self.i:self.i + _HEX_ESCAPES[c]]
            if len(digits) != _HEX_ESCAPES[c] or any(d not in "0123456789abcdefABCDEF" for d in digits):
                raise self.error(f"bad \\{c} escape", at)
            self.i += len(digits)
            code = int(digits, 16)
            if code > MAX_CODE_POINT:
                raise self.error("code point out of range", at)
            return [(code, code)]
        if c == "b" and in_class:
            return [(0x08, 0x08)]
        if c in _CONTROL and not (c == "0" and self.peek().isdigit()):
            return [(_CONTROL[c], _CONTROL[c])]
        if c.isdigit() or c == "k":
            raise self.error("backreferences are not supported", at)
        if c in "bBAZz":
            raise self.error(f"the assertion \\{c} is not supported", at)
        if c.isascii() and c.isalnum():
            raise self.error(f"bad escape \\{c}", at)
        return [(ord(c), ord(c))]

    def char_class(self) -> Ranges:
        at = self.i - 1
        negate = self.eat("^")
        ranges: Ranges = []
        first = True
        while True:
            c = self.peek()
            if not c:
                raise self.error("unterminated character set", at)
            if c == "]" and not first:
                self.i += 1
                break
            first = False
            lo = self.class_item()
            if self.peek() == "-" and self.s[self.i + 1:self.i + 2] not in ("]", ""):
                self.i += 1
                hi = self.class_item()
                if len(lo) != 1 or len(hi) != 1 or lo[0][0] != lo[0][1] or hi[0][0] != hi[0][1]:
                    raise self.error("bad character range", at)
                if hi[0][0] < lo[0][0]:
                    raise self.error("bad character range (reversed)", at)
                ranges.append((lo[0][0], hi[0][0]))
            else:
                ranges.extend(lo)
        return complement_ranges(ranges) if negate else normalize_ranges(ranges)

    def class_item(self) -> Ranges:
        c = self.peek()
        self.i += 1
        if c == "\\":
            return self.escape(in_class=True)
        return [(ord(c), ord(c))]
