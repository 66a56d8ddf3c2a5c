"""Byte-level grammar → token level: which vocabulary tokens may come next in each automaton state.

A grammar (`nbllm.constrain.automaton.Grammar`) steps over *bytes*; the model picks *tokens*, each a byte string
of 1 to ~50 bytes. A token is allowed in state s when stepping its bytes from s never reaches a dead state. Checking all
262,144 Gemma tokens one by one per state costs seconds in Python, so the check walks a trie of the vocabulary
instead: tokens sharing a prefix share its steps, and a dead prefix prunes every token below it.

The walk runs one trie *level* at a time over numpy arrays (the levels' nodes are stored flat, children
contiguous), with the grammar's transitions memoized in a dense `[states, 256]` table of interned state ids, so
Python calls `grammar.step` once per distinct (state, byte) pair and numpy does the per-node work. Wide states
(inside a JSON string almost every token is allowed) touch most of the trie's 588k nodes (Gemma) and take tens of
milliseconds, not seconds; structural states touch a few hundred nodes and take one or two.

Masks are memoized per (grammar, state) in one LRU bounded in bytes (`MaskCache`), stored in whichever of three
forms is smallest (allowed ids, disallowed ids, packed bits), so a warm state costs a dict lookup plus writing
one row of the sampler's `[B, V]` bool mask.

Which tokens may appear at all: text tokens (normal, byte-fallback `<0xNN>`, user-defined ones, which always
render their text). Control, unknown and unused tokens never may; end-of-generation tokens only in accepting
states, where they end the output.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from nbllm.constrain.automaton import Grammar, State
from nbllm.tokenizer.tokenizer import Tokenizer
from nbllm.tokenizer.vocab import TokenType

_TEXT_TYPES = (TokenType.NORMAL, TokenType.BYTE, TokenType.USER_DEFINED)
_UNKNOWN, _DEAD = -2, -1  # transition-table entries besides interned state ids


# ---------------------------------------------------------------------------------------------- vocabulary trie


@dataclass(frozen=True)
class VocabTrie:
    """The text tokens of one vocabulary as a byte trie in flat arrays, nodes numbered level by level.

    Node 0 is the root (the empty prefix); the nodes of depth d follow those of depth d - 1, sorted by bytes,
    so each node's children are `first_child[n] : first_child[n] + num_children[n]`. `token_node[t]` is the
    node spelling token t, or `num_nodes` (a sentinel) for tokens never allowed inside constrained output.
    Several tokens may share a node (a byte token `<0x41>` and the normal token `A`): the tokens of node n are
    `node_tokens[node_token_start[n] : node_token_start[n + 1]]`.
    """

    vocab_size: int
    token_bytes: tuple[bytes, ...]  # every token's bytes as the tokenizer renders them
    eos_ids: np.ndarray  # int64: end-of-generation tokens
    byte: np.ndarray  # [N] uint8: the byte leading into the node (0 at the root)
    first_child: np.ndarray  # [N] int64
    num_children: np.ndarray  # [N] int64
    token_node: np.ndarray  # [V] int64
    node_tokens: np.ndarray  # [text tokens] int64, grouped by node
    node_token_start: np.ndarray  # [N + 1] int64

    @property
    def num_nodes(self) -> int:
        return len(self.byte)

    @cached_property
    def eos_set(self) -> frozenset[int]:
        return frozenset(self.eos_ids.tolist())

    def is_text(self, token_id: int) -> bool:
        """Whether the token may appear inside constrained output at all."""
        return bool(self.token_node[token_id] != self.num_nodes)

    @classmethod
    def build(cls, token_bytes: list[bytes], text: np.ndarray, eos_ids: list[int]) -> VocabTrie:
        """From every token's bytes and which tokens are text. Sorting the tokens makes each trie level a
        vectorised pass: token i starts a new node at depth d iff it is long enough and shares fewer than d
        bytes with token i - 1."""
        size = len(token_bytes)
        ids = np.flatnonzero(text)
        kept = [token_bytes[i] for i in ids]
        lengths = np.fromiter(map(len, kept), dtype=np.int64, count=len(kept))
        depth = int(lengths.max(initial=0))
        starts = np.cumsum(lengths) - lengths
        padded = np.zeros((len(ids), depth), dtype=np.uint8)
        rows = np.repeat(np.arange(len(ids)), lengths)
        padded[rows, np.arange(len(rows)) - starts[rows]] = np.frombuffer(b"".join(kept), dtype=np.uint8)
        # Zero padding sorts a token before its extensions, so fixed-width byte strings sort lexicographically.
        order = np.argsort(padded.view(f"S{depth}").ravel(), kind="stable")
        ids, lengths, padded = ids[order], lengths[order], padded[order]
        # Shared prefix length with the previous token; padding bytes compare equal, hence the min with lengths.
        lcp = np.zeros(len(ids), dtype=np.int64)
        if len(ids) > 1:
            same = padded[1:] == padded[:-1]
            lcp[1:] = np.where(same.all(axis=1), depth, same.argmin(axis=1))
            lcp[1:] = np.minimum(lcp[1:], np.minimum(lengths[1:], lengths[:-1]))
        byte_parts = [np.zeros(1, dtype=np.uint8)]
        parent_parts = [np.full(1, -1, dtype=np.int64)]
        token_node = np.zeros(len(ids), dtype=np.int64)
        node = np.zeros(len(ids), dtype=np.int64)  # each token's node at the depth reached so far
        active = np.arange(len(ids))  # tokens at least d bytes long
        offset = 1
        for d in range(1, depth + 1):
            active = active[lengths[active] >= d]
            starts = lcp[active] < d
            new = active[starts]
            byte_parts.append(padded[new, d - 1])
            parent_parts.append(node[new])
            node[active] = np.cumsum(starts) - 1 + offset
            ended = active[lengths[active] == d]
            token_node[ended] = node[ended]
            offset += len(new)
        parent = np.concatenate(parent_parts)
        num_nodes = offset
        num_children = np.bincount(parent[1:], minlength=num_nodes).astype(np.int64)
        # Parents are nondecreasing in node order, so a node's children start where its id first appears.
        first_child = np.searchsorted(parent[1:], np.arange(num_nodes)) + 1
        full_token_node = np.full(size, num_nodes, dtype=np.int64)
        full_token_node[ids] = token_node
        by_node = np.argsort(token_node, kind="stable")
        node_token_start = np.searchsorted(token_node[by_node], np.arange(num_nodes + 1))
        return cls(size, tuple(token_bytes), np.array(sorted(eos_ids), dtype=np.int64), np.concatenate(byte_parts),
                   first_child.astype(np.int64), num_children, full_token_node, ids[by_node], node_token_start)

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer) -> VocabTrie:
        """The trie of a tokenizer's vocabulary, built once per tokenizer object."""
        with _trie_lock:
            trie = _tries.get(tokenizer)
            if trie is None:
                size = tokenizer.vocab_size
                token_bytes = [tokenizer.token_bytes(i) for i in range(size)]
                eos = sorted(tokenizer.eos_token_ids)
                text = np.isin(np.asarray(tokenizer.vocab.token_types), [int(t) for t in _TEXT_TYPES])
                text &= np.array([len(b) > 0 for b in token_bytes])
                text[eos] = False
                trie = _tries[tokenizer] = cls.build(token_bytes, text, eos)
            return trie


_tries: weakref.WeakKeyDictionary[Tokenizer, VocabTrie] = weakref.WeakKeyDictionary()
_trie_lock = threading.Lock()


# ---------------------------------------------------------------------------------------------- masks


@dataclass(frozen=True)
class TokenMask:
    """One state's allowed tokens in the smallest of three forms: the allowed ids, the disallowed ids, or the
    bitset packed eight tokens a byte (a structural state stores a few hundred ids, a string-content state a
    few thousand disallowed ones, a mixed state 32 KiB for Gemma)."""

    vocab_size: int
    form: str  # "allowed", "disallowed" or "bits"
    data: np.ndarray
    num_text: int  # allowed tokens other than end-of-generation ones
    eos: bool  # whether end-of-generation tokens are allowed (the state accepts)

    @classmethod
    def from_ids(cls, ids: np.ndarray, size: int, num_text: int, eos: bool) -> TokenMask:
        """From the distinct allowed token ids (end-of-generation ones included when `eos`)."""
        bits_bytes = (size + 7) // 8
        if 4 * len(ids) <= bits_bytes:  # the common structural state: no pass over the vocabulary
            return cls(size, "allowed", np.sort(ids).astype(np.int32), num_text, eos)
        allowed = np.zeros(size, dtype=np.bool_)
        allowed[ids] = True
        if 4 * (size - len(ids)) <= bits_bytes:
            return cls(size, "disallowed", np.flatnonzero(~allowed).astype(np.int32), num_text, eos)
        return cls(size, "bits", np.packbits(allowed), num_text, eos)

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def write(self, row: np.ndarray) -> None:
        """Write the mask into a bool row of length `vocab_size` (a row of the sampler's `[B, V]` mask)."""
        if self.form == "allowed":
            row.fill(False)
            row[self.data] = True
        elif self.form == "disallowed":
            row.fill(True)
            row[self.data] = False
        else:
            np.copyto(row, np.unpackbits(self.data, count=self.vocab_size).view(np.bool_))

    def to_numpy(self) -> np.ndarray:
        row = np.empty(self.vocab_size, dtype=np.bool_)
        self.write(row)
        return row

    def __contains__(self, token_id: int) -> bool:
        if self.form == "bits":
            return bool(self.data[token_id >> 3] >> (7 - (token_id & 7)) & 1)
        found = bool(np.any(self.data == token_id))
        return found if self.form == "allowed" else not found


class MaskCache:
    """LRU of computed masks keyed by (token index, state), bounded in bytes, shared by every grammar so that
    memory stays bounded however many schemas a session compiles."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._entries: OrderedDict[tuple[int, State], TokenMask] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[int, State]) -> TokenMask | None:
        with self._lock:
            mask = self._entries.get(key)
            if mask is not None:
                self._entries.move_to_end(key)
            return mask

    def put(self, key: tuple[int, State], mask: TokenMask) -> None:
        with self._lock:
            old = self._entries.pop(key, None)
            self.nbytes += mask.nbytes - (old.nbytes if old is not None else 0)
            self._entries[key] = mask
            while self.nbytes > self.max_bytes and len(self._entries) > 1:
                self.nbytes -= self._entries.popitem(last=False)[1].nbytes

    def __len__(self) -> int:
        return len(self._entries)


#: Process-wide mask memo: 64 MiB holds ~2,000 dense Gemma masks or tens of thousands of structural ones.
MASKS = MaskCache(64 << 20)


# ---------------------------------------------------------------------------------------------- token index


class TokenIndex:
    """One grammar over one vocabulary: each state's allowed-token mask (computed on first use, memoized), and
    token-level steps. Not thread-safe (the engine's step loop is its only user)."""

    #: Interned states before the transition table starts afresh (1 KiB each): pushdown grammars can meet an
    #: unbounded number of distinct stacks, and the table is only a memo.
    max_states = 1 << 15

    _uids = itertools.count()

    def __init__(self, grammar: Grammar, trie: VocabTrie, masks: MaskCache = MASKS) -> None:
        self.grammar, self.trie, self.masks = grammar, trie, masks
        self.uid = next(self._uids)
        self._reset_table()

    def _reset_table(self) -> None:
        self._ids: dict[State, int] = {}
        self._states: list[State] = []
        self._table = np.full((64, 256), _UNKNOWN, dtype=np.int32)

    def initial(self) -> State:
        return self.grammar.initial()

    # -- masks -----------------------------------------------------------------------------------------

    def mask(self, state: State) -> TokenMask:
        """The tokens allowed in `state`: those whose bytes keep the grammar alive, plus end-of-generation
        tokens when the state accepts."""
        key = (self.uid, state)
        mask = self.masks.get(key)
        if mask is None:
            mask = self._compute(state)
            self.masks.put(key, mask)
        return mask

    def _compute(self, state: State) -> TokenMask:
        if len(self._states) > self.max_states:
            self._reset_table()
        trie = self.trie
        alive = []  # the live nodes, level by level
        frontier = np.zeros(1, dtype=np.int64)
        states = np.array([self._intern(state)], dtype=np.int64)
        while frontier.size:
            counts = trie.num_children[frontier]
            children = _ranges(trie.first_child[frontier], counts)
            if not children.size:
                break
            parent_states = np.repeat(states, counts)
            byte = trie.byte[children]
            nxt = self._table[parent_states, byte]
            unknown = nxt == _UNKNOWN
            if unknown.any():
                self._fill(parent_states[unknown], byte[unknown])
                nxt = self._table[parent_states, byte]
            live = nxt >= 0
            frontier, states = children[live], nxt[live].astype(np.int64)
            alive.append(frontier)
        nodes = np.concatenate(alive) if alive else frontier
        starts = trie.node_token_start[nodes]
        tokens = trie.node_tokens[_ranges(starts, trie.node_token_start[nodes + 1] - starts)]
        eos = bool(self.grammar.accepting(state))
        ids = np.concatenate([tokens, trie.eos_ids]) if eos else tokens
        return TokenMask.from_ids(ids, trie.vocab_size, len(tokens), eos)

    # -- byte and token steps ---------------------------------------------------------------------------

    def _intern(self, state: State) -> int:
        sid = self._ids.get(state)
        if sid is None:
            sid = self._ids[state] = len(self._states)
            self._states.append(state)
            if sid == len(self._table):
                grown = np.full((2 * sid, 256), _UNKNOWN, dtype=np.int32)
                grown[:sid] = self._table
                self._table = grown
        return sid

    def _fill(self, sids: np.ndarray, byte: np.ndarray) -> None:
        """Compute the transitions of the distinct (state id, byte) pairs among the given ones."""
        for pair in np.unique(sids * 256 + byte):
            sid, b = divmod(int(pair), 256)
            nxt = self.grammar.step(self._states[sid], b)
            self._table[sid, b] = _DEAD if nxt is None else self._intern(nxt)

    def _step_id(self, sid: int, byte: int) -> int:
        nxt = int(self._table[sid, byte])
        if nxt == _UNKNOWN:
            step = self.grammar.step(self._states[sid], byte)
            nxt = _DEAD if step is None else self._intern(step)
            self._table[sid, byte] = nxt
        return nxt

    def step_bytes(self, state: State, data: bytes) -> State | None:
        """The state after `data`, or None if the grammar rejects it."""
        sid = self._intern(state)
        for b in data:
            sid = self._step_id(sid, b)
            if sid < 0:
                return None
        return self._states[sid]

    def advance(self, state: State, token_id: int) -> State | None:
        """The state after token `token_id`, or None if it is not allowed there (end-of-generation tokens and
        special tokens have no bytes to step: they are None here; see `mask` for where EOS may go)."""
        if not self.trie.is_text(token_id):
            return None
        return self.step_bytes(state, self.trie.token_bytes[token_id])


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The concatenation of `arange(start, start + count)` for each pair, without a Python loop."""
    ends = np.cumsum(counts)
    return np.repeat(starts - (ends - counts), counts) + np.arange(int(ends[-1]) if len(ends) else 0)
