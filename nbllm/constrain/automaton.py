"""The grammar interface the token index and the engine use, and the one runtime behind every front-end.

Interface. A `Grammar` is a byte automaton: `initial()` gives a state, `step(state, byte)` consumes one byte of
UTF-8 output (None: no accepted string starts with what was read), `accepting(state)` says whether the output may
end. States are hashable values, canonical enough that equal states have identical futures, so the token index
can cache one token mask per state. Bytes rather than characters because a token is a byte string that may end
in the middle of a character.

Runtime. Every front-end lowers to the CFG of `ir.py`; this module flattens it into rules whose alternatives are
element sequences (a byte-set terminal or a rule reference) and runs it as a pushdown automaton in the style of
llama.cpp's grammar stacks: a state is a frozenset of stacks, a stack a tuple of positions (return addresses
below, the next terminal on top). The same runtime is the lazily built DFA for regular inputs: a regex has no
recursion, so its stacks stay bounded and `step`'s memo *is* the subset construction, built state by state as
output explores it (a class of a million code points costs a few terminals, never a million transitions).
Equivalent states are not merged (no minimization): that only costs the token index an extra cached mask.

Why it is fast enough for the trie walk (~10^5-10^6 steps per mask):
- each rule's epsilon closure is precomputed per position (`_expand`), so a step is one bit test per stack and a
  few tuple concatenations, then memoized per (state, byte) and the result interned;
- a reference in tail position pushes no return address, so right recursion (every `x*`) runs in constant stack
  and regular grammars have finitely many states;
- rules with an empty language are pruned at compile time, so every stack can still finish: a state is live iff
  it is non-empty, which is what makes `step`'s None exact and `forced_bytes` a simple walk.
Left recursion would need an unbounded closure, so it is rejected at compile time.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from typing import Protocol, runtime_checkable

from nbllm.constrain.errors import SchemaError
from nbllm.constrain.ir import Alt, Bytes, Node, Ref, Repeat, Seq

State = Hashable  # immutable, hashable, cheap to compare; equal states have identical futures


@runtime_checkable
class Grammar(Protocol):
    """A compiled constraint: a byte automaton over UTF-8 output."""

    def initial(self) -> State: ...

    def step(self, state: State, byte: int) -> State | None:
        """The state after one more byte; None when no accepted string starts with the bytes read so far."""

    def accepting(self, state: State) -> bool:
        """Whether the output may end in this state."""

    def matches(self, text: str) -> bool:
        """Whether the whole string is in the language."""

    def step_bytes(self, state: State, data: bytes) -> State | None:
        """`step` over several bytes (None as soon as one is dead)."""

    def forced_bytes(self, state: State) -> bytes:
        """The longest byte string every accepted continuation from `state` starts with (for jump-forward)."""

    @property
    def key(self) -> str:
        """A canonical content key: equal keys mean equal languages and equal states (for caches)."""


_MISSING = object()
_CACHE_STATES = 1 << 14  # memoized states before the memo is dropped (states stay valid: they are values)
_RECURSION_LIMIT = 20_000
_FORCED_LIMIT = 4096  # bytes; a forced run is finite anyway, this only bounds a pathological one
_Elem = tuple[str, int]  # ("t", byte mask) or ("r", rule id) while lowering


@contextmanager
def deep_recursion(what: str) -> Iterator[None]:
    """Compilers recurse as deep as their input nests (a 300-digit bound, a 1000-deep group); allow that, and
    turn input nested beyond even that into a `SchemaError` instead of a RecursionError."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, _RECURSION_LIMIT))
    try:
        yield
    except RecursionError:
        raise SchemaError(f"{what}: nested too deeply to compile") from None
    finally:
        sys.setrecursionlimit(limit)


def content_key(kind: str, text: str) -> str:
    """The cache key of a compiled input: its kind and a digest of its canonical text."""
    return f"{kind}:{hashlib.sha256(text.encode('utf-8')).hexdigest()}"


class Automaton:
    """A compiled grammar: flattened rules, precomputed closures, memoized steps. Implements `Grammar`.

    `rules` maps names to IR bodies, `root` names the start rule; `what` prefixes compile errors (e.g. "regex",
    "gbnf") and `key` is the content key the front-end derived from its input.
    """

    def __init__(self, rules: dict[str, Node], root: str, *, key: str, what: str) -> None:
        self._key = key
        self._what = what
        with deep_recursion(what):  # lowering and closures recurse as deep as the IR
            self._build(rules, root)
        self._trans: dict[State, dict[int, State | None]] = {}
        self._forced: dict[State, bytes] = {}

    def _build(self, rules: dict[str, Node], root: str) -> None:
        lowered = _Lowering(rules, self._what)
        alternatives = _prune(lowered, lowered.index[root], self._what)
        self._names = lowered.names
        # Flat layout: every alternative's elements, then an end marker. term[p] is a byte mask (0: not a
        # terminal), ref[p] a rule id (-1: not a reference); both empty marks the end of an alternative.
        self._term: list[int] = []
        self._ref: list[int] = []
        self._starts: list[list[int]] = []
        for alts in alternatives:
            starts = []
            for elements in alts:
                starts.append(len(self._term))
                for kind, value in elements:
                    self._term.append(value if kind == "t" else 0)
                    self._ref.append(value if kind == "r" else -1)
                self._term.append(0)
                self._ref.append(-1)
            self._starts.append(starts)
        self._closures: dict[int, tuple[tuple[tuple[int, ...], ...], bool]] = {}
        # Every closure up front, so left recursion is found now and never while generating.
        self._closure_at = [self._closure(q) for q in range(len(self._term))]
        self._initial = self._advance([((), q) for q in self._starts[lowered.index[root]]])

    # ------------------------------------------------------------------------------------------ Grammar

    @property
    def key(self) -> str:
        return self._key

    def initial(self) -> State:
        return self._initial

    def accepting(self, state: State) -> bool:
        return () in state  # type: ignore[operator]

    def step(self, state: State, byte: int) -> State | None:
        row = self._trans.get(state)
        if row is None:
            if len(self._trans) >= _CACHE_STATES:
                self._trans.clear()
                self._forced.clear()
            row = self._trans[state] = {}
        nxt = row.get(byte, _MISSING)
        if nxt is _MISSING:
            nxt = row[byte] = self._step(state, byte)
        return nxt  # type: ignore[return-value]

    def step_bytes(self, state: State, data: bytes) -> State | None:
        for byte in data:
            state = self.step(state, byte)
            if state is None:
                return None
        return state

    def matches(self, text: str) -> bool:
        state = self.step_bytes(self._initial, text.encode("utf-8"))
        return state is not None and self.accepting(state)

    def forced_bytes(self, state: State) -> bytes:
        cached = self._forced.get(state)
        if cached is not None:
            return cached
        start, out = state, bytearray()
        while not self.accepting(state) and len(out) < _FORCED_LIMIT:
            mask = self.next_bytes(state)
            if mask & (mask - 1):
                break
            byte = mask.bit_length() - 1
            out.append(byte)
            state = self.step(state, byte)
        result = self._forced[start] = bytes(out)
        return result

    def next_bytes(self, state: State) -> int:
        """The bytes `step` accepts from `state`, as a 256-bit mask (bit b: byte b)."""
        mask = 0
        for stack in state:  # type: ignore[attr-defined]
            if stack:
                mask |= self._term[stack[-1]]
        return mask

    # ------------------------------------------------------------------------------------------ runtime

    def _step(self, state: State, byte: int) -> State | None:
        bit, term = 1 << byte, self._term
        frames = [(stack[:-1], stack[-1] + 1) for stack in state if stack and term[stack[-1]] & bit]  # type: ignore
        return self._advance(frames) if frames else None

    def _advance(self, frames: list[tuple[tuple[int, ...], int]]) -> State:
        """The state of every stack reachable without input from (stack below, position to go on at) pairs:
        each frame's closure replaces its top, and a frame that can end pops into the one below."""
        closure_at = self._closure_at
        out: set[tuple[int, ...]] = set()
        for prefix, q in frames:
            while True:
                suffixes, ends = closure_at[q]
                for s in suffixes:
                    out.add(prefix + s)
                if not ends:
                    break
                if not prefix:
                    out.add(())
                    break
                prefix, q = prefix[:-1], prefix[-1]
        return frozenset(out)

    # ------------------------------------------------------------------------------------------ closures

    def _closure(self, q: int) -> tuple[tuple[tuple[int, ...], ...], bool]:
        """From position q in some frame, without consuming input: the stack suffixes that replace the frame's
        top (each ends at a terminal) and whether the frame can end (pop)."""
        cached = self._closures.get(q)
        if cached is None:
            suffixes, ends, _ = self._expand(q, 0, {})
            cached = self._closures[q] = (tuple(suffixes), ends)
        return cached

    def _expand(self, q: int, depth: int, busy: dict[int, int]) -> tuple[dict, bool, set[int]]:
        """Depth-first closure. `busy` holds the positions on the current path with their push depth: meeting
        one again at the same depth is a harmless epsilon cycle (`(a*)*`), at a greater depth it is left
        recursion. Results that skipped a busy position are incomplete and not cached."""
        cached = self._closures.get(q)
        if cached is not None:
            return dict.fromkeys(cached[0]), cached[1], set()
        if q in busy:
            if busy[q] < depth:
                rule = self._names[self._rule_of(q)]
                raise SchemaError(f"{self._what}: rule {rule!r} is left-recursive (it can reach itself before "
                                  "reading anything); rewrite it with repetition")
            return {}, False, {q}
        if self._term[q]:
            return {(q,): None}, False, set()
        rule = self._ref[q]
        if rule < 0:
            return {}, True, set()
        busy[q] = depth
        suffixes: dict[tuple[int, ...], None] = {}
        ends, loops = False, set()
        nxt = q + 1
        tail = not self._term[nxt] and self._ref[nxt] < 0
        for a in self._starts[rule]:
            sub, sub_ends, sub_loops = self._expand(a, depth if tail else depth + 1, busy)
            loops |= sub_loops
            if tail:
                suffixes.update(sub)
                ends |= sub_ends
                continue
            suffixes.update(dict.fromkeys((nxt,) + s for s in sub))
            if sub_ends:
                rest, rest_ends, rest_loops = self._expand(nxt, depth, busy)
                suffixes.update(rest)
                ends |= rest_ends
                loops |= rest_loops
        del busy[q]
        loops.discard(q)
        if not loops:
            self._closures[q] = (tuple(suffixes), ends)
        return suffixes, ends, loops

    def _rule_of(self, q: int) -> int:
        return max(r for r, starts in enumerate(self._starts) if starts and starts[0] <= q)


class _Lowering:
    """IR trees → rules of alternatives of element lists; nested alternatives and repetitions become
    anonymous rules (shared when the same node object or the same repeated element recurs)."""

    def __init__(self, rules: dict[str, Node], what: str) -> None:
        self.what = what
        self.names: list[str] = list(rules)
        self.index = {name: i for i, name in enumerate(self.names)}
        self.alternatives: list[list[list[_Elem]]] = [[] for _ in self.names]
        self._memo: dict[int, list[_Elem]] = {}
        self._keep: list[Node] = []  # keeps memo keys (ids) alive
        self._stars: dict[_Elem, int] = {}
        self._optionals: dict[_Elem, list[int]] = {}
        for name, body in rules.items():
            self.alternatives[self.index[name]] = self._rule_body(body)

    def _new_rule(self, name: str, alternatives: list[list[_Elem]]) -> int:
        self.names.append(name)
        self.alternatives.append(alternatives)
        return len(self.names) - 1

    def _rule_body(self, node: Node) -> list[list[_Elem]]:
        if isinstance(node, Alt):
            return [self._elements(item) for item in node.items]
        return [self._elements(node)]

    def _elements(self, node: Node) -> list[_Elem]:
        if isinstance(node, Bytes):
            return [("t", node.mask)]
        if isinstance(node, Seq):
            return [e for item in node.items for e in self._elements(item)]
        if isinstance(node, Ref):
            if node.name not in self.index:
                raise SchemaError(f"{self.what}: undefined rule {node.name!r}")
            return [("r", self.index[node.name])]
        memo = self._memo.get(id(node))
        if memo is None:
            self._keep.append(node)
            memo = self._memo[id(node)] = self._compound(node)
        return memo

    def _compound(self, node: Node) -> list[_Elem]:
        if isinstance(node, Alt):
            if len(node.items) == 1:
                return self._elements(node.items[0])
            if not node.items:
                return [("t", 0)]  # the empty language: pruned as unproductive
            return [("r", self._new_rule(f"alt{len(self.names)}", self._rule_body(node)))]
        assert isinstance(node, Repeat)
        one = self._elements(node.item)
        if len(one) != 1:
            one = [("r", self._new_rule(f"item{len(self.names)}", [one]))]
        x = one[0]
        if node.hi is None:
            return one * node.lo + [("r", self._star(x))]
        if node.hi < node.lo:
            return [("t", 0)]
        return one * node.lo + ([("r", self._optional(x, node.hi - node.lo))] if node.hi > node.lo else [])

    def _star(self, x: _Elem) -> int:
        """S ::= x S | ε — right recursion, constant stack thanks to the tail call."""
        if x not in self._stars:
            rule = self._stars[x] = self._new_rule(f"star{len(self.names)}", [])
            self.alternatives[rule] = [[x, ("r", rule)], []]
        return self._stars[x]

    def _optional(self, x: _Elem, count: int) -> int:
        """O_k ::= x O_{k-1} | ε: up to k copies of x, O_1 ::= x | ε; chains for one x are shared."""
        chain = self._optionals.setdefault(x, [])
        while len(chain) < count:
            tail = [("r", chain[-1])] if chain else []
            chain.append(self._new_rule(f"opt{len(self.names)}", [[x, *tail], []]))
        return chain[count - 1]


def _prune(lowered: _Lowering, root: int, what: str) -> list[list[list[_Elem]]]:
    """Drop alternatives that can derive no string; fail if the root is left with none."""
    rules = lowered.alternatives
    productive = [False] * len(rules)
    changed = True
    while changed:
        changed = False
        for r, alts in enumerate(rules):
            if not productive[r] and any(all(v if k == "t" else productive[v] for k, v in a) for a in alts):
                productive[r] = changed = True
    if not productive[root]:
        named = [lowered.names[r] for r in range(len(lowered.index)) if not productive[r]]
        culprit = max(named, key=len)
        detail = "" if culprit == lowered.names[root] else f" (nothing matches {culprit!r})"
        raise SchemaError(f"{what}: no string satisfies it{detail}")
    return [[a for a in alts if all(v if k == "t" else productive[v] for k, v in a)] if productive[r] else []
            for r, alts in enumerate(rules)]
