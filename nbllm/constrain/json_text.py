"""JSON's lexical pieces as IR, and the canonical text `matches` checks.

Generation and `matches` want different things from whitespace: a model must not be allowed to emit spaces
forever, a user's pretty-printed document must still match. So the grammar allows a bounded run between tokens
(`WS`: nothing, one space, or a newline and up to 20 spaces of indent), and `matches` re-encodes the parsed value
canonically (`canonical_json`: no whitespace, numbers without exponents, strings escaped as `json.dumps` does)
before running the automaton. String *content* is encoded the same way in both: `json_chars` turns a set of code
points into the bytes that spell them inside a JSON string, escaping `"`, `\\` and control characters exactly as
`canonical_json` does, so a schema `pattern` constrains the decoded string, not its escapes.
"""

from __future__ import annotations

import json
import math
from decimal import Decimal
from typing import Any

from nbllm.constrain.ir import (
    EMPTY,
    MAX_CODE_POINT,
    Node,
    Repeat,
    alt,
    char_set,
    literal,
    normalize_ranges,
    optional,
    seq,
)

INDENT_LIMIT = 20
WS = optional(alt(literal(" "), seq(literal("\n"), Repeat(literal(" "), 0, INDENT_LIMIT))))
QUOTE = literal('"')
_UNSAFE = [(0x00, 0x1F), (0x22, 0x22), (0x5C, 0x5C)]  # must be escaped inside a JSON string
SAFE_RANGES = [(0x20, 0x21), (0x23, 0x5B), (0x5D, MAX_CODE_POINT)]
_HEX = char_set([(0x30, 0x39), (0x41, 0x46), (0x61, 0x66)])
# Any one character of a JSON string body, raw or escaped (what a model may write).
STRING_CHAR = alt(char_set(SAFE_RANGES),
                  seq(literal("\\"), alt(char_set([(c, c) for c in map(ord, '"\\/bfnrt')]),
                                         seq(literal("u"), _HEX, _HEX, _HEX, _HEX))))
STRING = seq(QUOTE, Repeat(STRING_CHAR, 0, None), QUOTE)
INTEGER = seq(optional(literal("-")), alt(literal("0"), seq(char_set([(0x31, 0x39)]),
                                                             Repeat(char_set([(0x30, 0x39)]), 0, None))))
_DIGITS = Repeat(char_set([(0x30, 0x39)]), 1, None)
NUMBER = seq(INTEGER, optional(seq(literal("."), _DIGITS)),
             optional(seq(char_set([(0x45, 0x45), (0x65, 0x65)]), optional(char_set([(0x2B, 0x2B), (0x2D, 0x2D)])),
                          _DIGITS)))


def json_chars(ranges: list[tuple[int, int]]) -> Node:
    """One character from `ranges` as it is spelled inside a canonical JSON string (a regex `encode`)."""
    ranges = normalize_ranges(ranges)
    safe = [(max(lo, a), min(hi, b)) for lo, hi in ranges for a, b in SAFE_RANGES if lo <= b and hi >= a]
    escaped = [literal(_escape(chr(c))) for lo, hi in ranges for a, b in _UNSAFE
               for c in range(max(lo, a), min(hi, b) + 1)]
    return alt(char_set(safe), *escaped) if safe else alt(*escaped)


def quoted(content: Node) -> Node:
    return seq(QUOTE, content, QUOTE)


def _escape(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)[1:-1]


def canonical_json(value: Any, sort_keys: bool = False) -> str:
    """The one spelling of a JSON value the grammars are checked against: compact, keys in the given order (or
    sorted, for equality), integral numbers as integers, other numbers in plain decimal notation. Raises
    ValueError for values JSON cannot carry (NaN, infinities, non-string keys, other types)."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return canonical_number(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(canonical_json(v, sort_keys) for v in value) + "]"
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise ValueError("object keys must be strings")
        items = sorted(value.items()) if sort_keys else value.items()
        return "{" + ",".join(json.dumps(k, ensure_ascii=False) + ":" + canonical_json(v, sort_keys)
                              for k, v in items) + "}"
    raise ValueError(f"{type(value).__name__} is not a JSON value")


def canonical_number(x: float) -> str:
    if isinstance(x, int):
        return str(x)
    if not math.isfinite(x):
        raise ValueError(f"{x} is not a JSON number")
    return str(int(x)) if x.is_integer() else format(Decimal(repr(x)), "f")


def as_decimal(x: float) -> Decimal:
    """A JSON number as the decimal it is written as (0.1 → Decimal('0.1'), not the binary float's value)."""
    return Decimal(canonical_number(x))



def string_except(words: list[str]) -> Node:
    """The body of a JSON string that is none of `words`, written without escapes (a name for an additional
    property must not spell a declared one; without escapes there is one spelling to exclude)."""
    trie: dict = {}
    for word in words:
        if all(any(a <= ord(c) <= b for a, b in SAFE_RANGES) for c in word):
            node = trie
            for c in word:
                node = node.setdefault(c, {})
            node[None] = True
    return _except_from(trie)


_SAFE_CHAR = char_set(SAFE_RANGES)


def _except_from(trie: dict) -> Node:
    children = [c for c in trie if c is not None]
    others = [(max(lo, a), min(hi, b)) for lo, hi in _complement([ord(c) for c in children])
              for a, b in SAFE_RANGES if lo <= b and hi >= a]
    parts = [seq(literal(c), _except_from(trie[c])) for c in children]
    parts.append(seq(char_set(others), Repeat(_SAFE_CHAR, 0, None)))
    return alt(*([] if None in trie else [EMPTY]), *parts)


def _complement(points: list[int]) -> list[tuple[int, int]]:
    out, nxt = [], 0
    for p in sorted(points):
        if p > nxt:
            out.append((nxt, p - 1))
        nxt = p + 1
    return out + [(nxt, MAX_CODE_POINT)]


# String formats as whole-string regexes (the same text drives the grammar and `matches`' validator). Dates are
# exact (days per month, February 29 only in leap years, no year 0), as Python's date and RFC 3339 checks are;
# email and uri are practical subsets of their RFCs, so everything generated passes a strict checker.
_YEAR = r"(?:[1-9]\d{3}|0[1-9]\d{2}|00[1-9]\d|000[1-9])"
_LEAP_YEAR = r"(?:\d\d(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]|[13579][26])00)"
_MONTH_DAY = (r"(?:(?:0[13578]|1[02])-(?:0[1-9]|[12]\d|3[01])|(?:0[469]|11)-(?:0[1-9]|[12]\d|30)"
              r"|02-(?:0[1-9]|1\d|2[0-8]))")
_DATE = rf"(?:{_YEAR}-{_MONTH_DAY}|{_LEAP_YEAR}-02-29)"
_TIME = r"(?:[01]\d|2[0-3]):[0-5]\d:[0-5]\d(?:\.\d+)?(?:[Zz]|[+-](?:[01]\d|2[0-3]):[0-5]\d)"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
# RFC 3986: scheme ":" ("//" authority path-abempty | path-absolute | path-rootless | empty) ["?" q] ["#" f]
_PCT = r"%[0-9A-Fa-f]{2}"
_REGNAME = rf"[A-Za-z0-9\-._~!$&'()*+,;=]|{_PCT}"
_USERINFO = rf"{_REGNAME}|:"
_PCHAR = rf"(?:{_REGNAME}|[:@])"
FORMATS = {
    "date": _DATE,
    "time": _TIME,
    "date-time": rf"{_DATE}[Tt]{_TIME}",
    "uuid": r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
    "email": rf"[A-Za-z0-9_+-]+(?:\.[A-Za-z0-9_+-]+)*@{_LABEL}(?:\.{_LABEL})+",
    "uri": rf"[A-Za-z][A-Za-z0-9+.-]*:(?://(?:(?:{_USERINFO})*@)?(?:{_REGNAME})*(?::\d*)?(?:/{_PCHAR}*)*"
           rf"|/?(?:{_PCHAR}+(?:/{_PCHAR}*)*)?)(?:\?(?:{_PCHAR}|[/?])*)?(?:#(?:{_PCHAR}|[/?])*)?",
}
