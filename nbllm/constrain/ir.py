"""The one intermediate form every front-end (regex, JSON Schema, GBNF, choices) compiles to.

A grammar is a set of named rules whose bodies are trees of five node kinds: a byte set (the only terminal),
sequence, alternative, bounded or unbounded repetition, and a reference to a rule. Terminals are *byte* sets,
not character sets, because the model emits tokens that are byte strings and may end in the middle of a UTF-8
character; `char_set` turns code-point ranges into alternatives of byte-range sequences (the construction RE2
and regex-automata use) so a class like `[à-ÿ一-鿿]` stays a handful of terminals instead of thousands.

Nodes are frozen dataclasses so front-ends can share and compare subtrees freely.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_CODE_POINT = 0x10FFFF
SURROGATES = (0xD800, 0xDFFF)


@dataclass(frozen=True)
class Bytes:
    """One byte from a set: bit b of `mask` set means byte b is allowed (a 256-bit int tests in one shift)."""

    mask: int

    @staticmethod
    def range(lo: int, hi: int) -> Bytes:
        return Bytes(((1 << (hi + 1)) - 1) ^ ((1 << lo) - 1))


def _cached_hash(self: Seq | Alt | Repeat) -> int:
    """Compound nodes hash once: front-ends dedupe alternatives by equality, and a dataclass hash would walk
    the whole subtree every time."""
    cached = self.__dict__.get("_hash")
    if cached is None:
        cached = hash((type(self).__name__, *self.__dict__.values()))
        object.__setattr__(self, "_hash", cached)
    return cached


@dataclass(frozen=True)
class Seq:
    items: tuple[Node, ...]
    __hash__ = _cached_hash


@dataclass(frozen=True)
class Alt:
    items: tuple[Node, ...]
    __hash__ = _cached_hash


@dataclass(frozen=True)
class Repeat:
    """`item` at least `lo` and at most `hi` times (`hi=None`: unbounded)."""

    item: Node
    lo: int
    hi: int | None
    __hash__ = _cached_hash


@dataclass(frozen=True)
class Ref:
    name: str


Node = Bytes | Seq | Alt | Repeat | Ref

EMPTY = Seq(())  # the empty string
NOTHING = Alt(())  # the empty language


def seq(*items: Node) -> Node:
    """A sequence with nested sequences flattened and a single item unwrapped."""
    flat: list[Node] = []
    for item in items:
        flat.extend(item.items if isinstance(item, Seq) else (item,))
    return flat[0] if len(flat) == 1 else Seq(tuple(flat))


def alt(*items: Node) -> Node:
    """An alternative with nested alternatives flattened, duplicates dropped and a single item unwrapped."""
    flat: dict[Node, None] = {}
    for item in items:
        for sub in item.items if isinstance(item, Alt) else (item,):
            flat[sub] = None
    return next(iter(flat)) if len(flat) == 1 else Alt(tuple(flat))


def optional(item: Node) -> Node:
    return Repeat(item, 0, 1)


def literal(data: bytes | str) -> Node:
    """The exact byte string (a str is taken as its UTF-8 encoding)."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return seq(*(Bytes(1 << b) for b in raw)) if raw else EMPTY


def normalize_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, merged, non-overlapping code-point ranges."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def complement_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Every code point not in `ranges` (surrogates are left out: UTF-8 cannot encode them)."""
    out, nxt = [], 0
    for lo, hi in normalize_ranges(ranges):
        if lo > nxt:
            out.append((nxt, lo - 1))
        nxt = hi + 1
    if nxt <= MAX_CODE_POINT:
        out.append((nxt, MAX_CODE_POINT))
    return out


def char_set(ranges: list[tuple[int, int]]) -> Node:
    """One character from the code-point ranges, as UTF-8: alternatives of byte-range sequences."""
    branches: list[Node] = []
    for lo, hi in _without_surrogates(normalize_ranges(ranges)):
        for sequence in _utf8_sequences(lo, hi):
            branches.append(seq(*(Bytes.range(a, b) for a, b in sequence)))
    return _merge_single_bytes(branches)


def _without_surrogates(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out = []
    for lo, hi in ranges:
        if lo < SURROGATES[0]:
            out.append((lo, min(hi, SURROGATES[0] - 1)))
        if hi > SURROGATES[1]:
            out.append((max(lo, SURROGATES[1] + 1), hi))
    return out


_LENGTH_BOUNDS = ((0, 0x7F), (0x80, 0x7FF), (0x800, 0xFFFF), (0x10000, MAX_CODE_POINT))


def _utf8_sequences(lo: int, hi: int) -> list[list[tuple[int, int]]]:
    """Byte-range sequences whose concatenations are exactly the UTF-8 encodings of code points lo..hi.

    Split first by encoded length, then until every continuation byte spans a full or aligned range, at which
    point the encodings of the two ends give the byte ranges position by position."""
    out: list[list[tuple[int, int]]] = []
    for length, (a, b) in enumerate(_LENGTH_BOUNDS, start=1):
        if lo <= b and hi >= a:
            _split(max(lo, a), min(hi, b), length, out)
    return out


def _split(lo: int, hi: int, length: int, out: list[list[tuple[int, int]]]) -> None:
    for i in range(1, length):
        m = (1 << (6 * i)) - 1
        if lo & ~m != hi & ~m:
            if lo & m:
                _split(lo, lo | m, length, out)
                _split((lo | m) + 1, hi, length, out)
                return
            if hi & m != m:
                _split(lo, (hi & ~m) - 1, length, out)
                _split(hi & ~m, hi, length, out)
                return
    first, last = chr(lo).encode("utf-8"), chr(hi).encode("utf-8")
    out.append(list(zip(first, last)))


def _merge_single_bytes(branches: list[Node]) -> Node:
    """Fold all one-byte branches into one terminal so ASCII classes stay a single byte set."""
    mask, rest = 0, []
    for b in branches:
        if isinstance(b, Bytes):
            mask |= b.mask
        else:
            rest.append(b)
    return alt(*([Bytes(mask)] if mask else []), *rest)
