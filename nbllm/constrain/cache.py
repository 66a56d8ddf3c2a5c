"""Compiled constraints cached by content, so a schema used by many requests (or cells) compiles once.

Two levels: the constraint text → its `Grammar` (compiling a large schema takes tens of milliseconds), and the
grammar's content key + the vocabulary → its `TokenIndex`, whose memoized masks and transitions are what make
a warm state cheap. Two spellings of one language (the same schema with different whitespace) share an index.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

from nbllm.constrain.automaton import Grammar
from nbllm.constrain.token_index import TokenIndex, VocabTrie

Kind = str  # "json_schema", "regex", "choices" or "grammar"

_V = TypeVar("_V")


class _LRU:
    """A small thread-safe LRU; `get_or_make` builds a missing value outside no lock, as compiles may be slow
    and a duplicate compile is harmless."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get_or_make(self, key: Hashable, make: Callable[[], _V]) -> _V:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        value = make()
        with self._lock:
            self._entries[key] = value
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


_grammars = _LRU(128)
_indexes = _LRU(64)


def compile_constraint(kind: Kind, spec: Any) -> Grammar:
    """The grammar of one constraint (`SamplingParams` field name and value), compiled once per content.
    Raises `SchemaError` for invalid, unsupported or unsatisfiable input."""
    from nbllm import constrain  # the front-ends import this module's package: bind at call time

    if kind == "json_schema":
        text = spec if isinstance(spec, str) else json.dumps(spec)  # key order kept: it fixes property order
        return _grammars.get_or_make((kind, text), lambda: constrain.compile_json_schema(spec))
    if kind == "regex":
        return _grammars.get_or_make((kind, spec), lambda: constrain.compile_regex(spec))
    if kind == "choices":
        return _grammars.get_or_make((kind, tuple(spec)), lambda: constrain.compile_choices(list(spec)))
    if kind == "grammar":
        return _grammars.get_or_make((kind, spec), lambda: constrain.compile_grammar(spec))
    raise ValueError(f"unknown constraint kind {kind!r}")


def token_index(grammar: Grammar, trie: VocabTrie) -> TokenIndex:
    """The token index of `grammar` over `trie`'s vocabulary, shared by every request using that language."""
    return _indexes.get_or_make((grammar.key, id(trie)), lambda: TokenIndex(grammar, trie))


def clear() -> None:
    """Forget every compiled grammar and index (their masks age out of `token_index.MASKS` on their own)."""
    _grammars.clear()
    _indexes.clear()
