"""Numeric bounds compiled exactly into the grammar: the decimal spellings of numbers in a range.

`minimum: 0, maximum: 150` must not be checked after the fact: the model has to be unable to write 151. A range
of integers is a regular language over digit strings (llama.cpp's `_generate_min_max_int` builds the same thing):
split by length, then for equal-length strings compare digit by digit, which needs only the two bound strings.
Fractions compare the same way from the left, with the bounds padded by zeros. Bounded numbers are spelled
without an exponent (`canonical_json` never writes one), so the language is exactly the in-range decimals.
Negative numbers are a "-" and a magnitude range with the bounds mirrored; "-0" is left out.
"""

from __future__ import annotations

from decimal import Decimal
from math import ceil, floor

from nbllm.constrain.ir import EMPTY, NOTHING, Bytes, Node, Repeat, alt, literal, seq

_ANY_DIGIT = Bytes.range(0x30, 0x39)


def number_range(lo: Decimal | None, lo_strict: bool, hi: Decimal | None, hi_strict: bool,
                 integer: bool) -> Node:
    """JSON numbers x with lo <= x <= hi (< with `*_strict`; None: unbounded), integers only if `integer`."""
    parts = []
    if hi is None or hi > 0 or (hi == 0 and not hi_strict):
        if lo is None or lo < 0:
            parts.append(_magnitudes(Decimal(0), False, hi, hi_strict, integer))
        else:
            parts.append(_magnitudes(lo, lo_strict, hi, hi_strict, integer))
    if lo is None or lo < 0:  # x = -m
        m_lo, m_lo_strict = (-hi, hi_strict) if hi is not None and hi < 0 else (Decimal(0), True)
        m_hi = None if lo is None else -lo
        parts.append(seq(literal("-"), _magnitudes(m_lo, m_lo_strict, m_hi, lo_strict, integer)))
    return alt(*parts)


def _magnitudes(lo: Decimal, lo_strict: bool, hi: Decimal | None, hi_strict: bool, integer: bool) -> Node:
    """Unsigned decimals m (no leading zeros) with lo <= m <= hi, 0 <= lo."""
    if integer:
        first = lo + 1 if lo_strict and lo == int(lo) else Decimal(ceil(lo))
        last = None if hi is None else (hi - 1 if hi_strict and hi == int(hi) else Decimal(floor(hi)))
        return _uint_range(int(first), None if last is None else int(last))
    lo_int, lo_frac = _split(lo)
    if hi is None:
        return alt(seq(literal(str(lo_int)), _fraction(lo_frac, lo_strict, None, False)),
                   seq(_uint_range(lo_int + 1, None), _fraction(None, False, None, False)))
    hi_int, hi_frac = _split(hi)
    if lo_int == hi_int:
        return seq(literal(str(lo_int)), _fraction(lo_frac, lo_strict, hi_frac, hi_strict))
    if lo_int > hi_int:
        return NOTHING
    return alt(seq(literal(str(lo_int)), _fraction(lo_frac, lo_strict, None, False)),
               seq(_uint_range(lo_int + 1, hi_int - 1), _fraction(None, False, None, False)),
               seq(literal(str(hi_int)), _fraction(None, False, hi_frac, hi_strict)))


def _split(x: Decimal) -> tuple[int, str]:
    """Integer part and fraction digits without trailing zeros: 12.50 → (12, "5")."""
    whole = int(x)
    digits = format(x - whole, "f").partition(".")[2].rstrip("0")
    return whole, digits


def _fraction(lo: str | None, lo_strict: bool, hi: str | None, hi_strict: bool) -> Node:
    """The optional ".digits" after an integer part, keeping the fraction within [.lo, .hi]. A bound is the
    rest of its digits (padded with zeros), or None once the fraction is already strictly inside it."""
    digits = _fraction_digits(lo, lo_strict, hi, hi_strict)
    tail = [seq(literal("."), digits)] if digits != NOTHING else []
    return alt(*([EMPTY] if _may_end(lo, lo_strict, hi, hi_strict) else []), *tail)


def _may_end(lo: str | None, lo_strict: bool, hi: str | None, hi_strict: bool) -> bool:
    """Whether the fraction may stop here (the digits still to come are all zero)."""
    lo_ok = lo is None or (lo == "" and not lo_strict)
    hi_ok = hi is None or hi != "" or not hi_strict
    return lo_ok and hi_ok


def _fraction_digits(lo: str | None, lo_strict: bool, hi: str | None, hi_strict: bool) -> Node:
    """Non-empty digit strings continuing a fraction within the bounds."""
    if lo is None and hi is None:
        return Repeat(_ANY_DIGIT, 1, None)
    if lo == "" and hi is None:  # at the lower bound so far: any digits, but all zeros only if it is inclusive
        nonzero = seq(Repeat(literal("0"), 0, None), Bytes.range(0x31, 0x39), Repeat(_ANY_DIGIT, 0, None))
        return nonzero if lo_strict else Repeat(_ANY_DIGIT, 1, None)
    if hi == "" and (lo is None or lo == ""):  # at the upper bound: only zeros may follow
        return Repeat(literal("0"), 1, None) if not (hi_strict or (lo == "" and lo_strict)) else NOTHING
    groups: dict[tuple, int] = {}
    for d in range(10):
        nxt = (_next(lo, d, lower=True), _next(hi, d, lower=False))
        if "dead" not in nxt:
            groups[nxt] = groups.get(nxt, 0) | 1 << (0x30 + d)
    branches = []
    for (nlo, nhi), mask in groups.items():
        rest = _fraction_digits(nlo, lo_strict, nhi, hi_strict)
        ending = [EMPTY] if _may_end(nlo, lo_strict, nhi, hi_strict) else []
        branches.append(seq(Bytes(mask), alt(*ending, *([rest] if rest != NOTHING else []))))
    return alt(*branches)


def _next(bound: str | None, d: int, lower: bool) -> str | None:
    """The bound after digit d: None once strictly inside, "dead" once outside, else its remaining digits."""
    if bound is None:
        return None
    b = int(bound[0]) if bound else 0
    if d == b:
        return bound[1:]
    return None if (d > b) == lower else "dead"


def _uint_range(lo: int, hi: int | None) -> Node:
    """Unsigned integers lo..hi (hi None: unbounded) without leading zeros."""
    lo = max(lo, 0)
    if hi is not None and hi < lo:
        return NOTHING
    width_lo = len(str(lo))
    if hi is None:
        longer = seq(Bytes.range(0x31, 0x39), Repeat(_ANY_DIGIT, width_lo, None))
        return alt(_same_width(str(lo), "9" * width_lo), longer)
    parts = []
    for width in range(width_lo, len(str(hi)) + 1):
        first = lo if width == width_lo else 10 ** (width - 1)
        last = hi if width == len(str(hi)) else 10 ** width - 1
        parts.append(_same_width(str(first), str(last)))
    return alt(*parts)


def _same_width(lo: str, hi: str) -> Node:
    """Digit strings s of one width with lo <= s <= hi."""
    if not lo:
        return EMPTY
    if lo == "0" * len(lo) and hi == "9" * len(hi):
        return Repeat(_ANY_DIGIT, len(lo), len(lo))
    a, b = int(lo[0]), int(hi[0])
    if a == b:
        return seq(literal(lo[0]), _same_width(lo[1:], hi[1:]))
    rest = len(lo) - 1
    parts = [seq(literal(lo[0]), _same_width(lo[1:], "9" * rest))]
    if b - a > 1:
        parts.append(seq(Bytes.range(0x30 + a + 1, 0x30 + b - 1), Repeat(_ANY_DIGIT, rest, rest)))
    parts.append(seq(literal(hi[0]), _same_width("0" * rest, hi[1:])))
    return alt(*parts)
