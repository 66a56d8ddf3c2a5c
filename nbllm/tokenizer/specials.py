"""Split text at special-token texts before the subword model runs, as llama.cpp's `tokenizer_st_partition`.

Chat templates render control tokens (`<start_of_turn>`) as text, and some vocabularies declare user-defined
tokens (Gemma's runs of spaces and newlines) that must win over subword merges. llama.cpp takes the special
tokens longest first (by UTF-8 length, ties by id) and cuts every remaining text fragment at each occurrence;
the result differs from a leftmost-longest scan where matches overlap, so the order is kept exactly.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

# C's isspace() on bytes, which llama.cpp's lstrip/rstrip use (not Unicode whitespace).
_C_SPACE = " \t\n\v\f\r"


class SpecialTokens:
    """The special texts of one vocabulary, indexed by first character so absent ones cost nothing per call."""

    def __init__(self, entries: Iterable[tuple[str, int, bool, bool]]) -> None:
        """`entries`: (text, id, is_control, rstrip); control/unknown tokens are matched only when parsing specials."""
        ordered = sorted((e for e in entries if e[0]), key=lambda e: (-len(e[0].encode("utf-8", "surrogatepass")), e[1]))
        self._rank = {text: rank for rank, (text, *_) in enumerate(ordered)}
        self._info = {text: (tid, control, rstrip) for text, tid, control, rstrip in ordered}
        self._by_first: dict[str, list[str]] = defaultdict(list)
        for text, *_ in ordered:
            self._by_first[text[0]].append(text)

    def partition(self, text: str, parse_special: bool) -> list[str | int]:
        """`text` as a list of raw-text fragments (str) and special token ids (int), in order."""
        present = [s for c in set(text).intersection(self._by_first) for s in self._by_first[c] if s in text]
        if not parse_special:
            present = [s for s in present if not self._info[s][1]]
        fragments: list[str | int] = [text] if text else []
        for special in sorted(present, key=self._rank.__getitem__):
            tid, _, rstrip = self._info[special]
            fragments = [piece for fragment in fragments for piece in _cut(fragment, special, tid, rstrip)]
        return fragments


def _cut(fragment: str | int, special: str, tid: int, rstrip: bool) -> list[str | int]:
    """One fragment cut at every occurrence of `special`; stripped or empty text pieces are dropped."""
    if isinstance(fragment, int) or special not in fragment:
        return [fragment]
    out: list[str | int] = []
    parts = fragment.split(special)
    for i, part in enumerate(parts):
        if i > 0:
            out.append(tid)
            if rstrip:
                part = part.lstrip(_C_SPACE)
        if part:
            out.append(part)
    return out
