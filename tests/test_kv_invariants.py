"""The DESIGN block invariants under random operation sequences (hypothesis stateful testing).

The machine drives a BlockManager and a RadixCache the way a scheduler and runner would, and keeps a model of
the truth beside them: each sequence's logical tokens, and a simulated KV store (`kv[block]` = the token held
in each slot) that copy-on-write copies and writes fill. After every step it checks:

- free + used == total; a block is free exactly when nothing holds it;
- refcount(b) == tables holding b + loose allocations of b + (1 if the radix tree stores b);
- every sequence reads back through its blocks exactly the tokens it wrote (no one sees another's tokens);
- every cached block holds exactly the tokens of its tree path, no block is cached twice, and the cache's
  evictable count equals a brute-force count; a match returns exactly the longest cached prefix;
- allocation failures change nothing; when every table is freed and the cache reset, used == 0.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from nbllm.engine.block_manager import BlockManager, BlockTable, NoFreeBlocks
from nbllm.engine.radix_cache import RadixCache

BS = 2
NUM_BLOCKS = 20
MAX_SEQS = 6
tokens_st = st.lists(st.integers(0, 1), max_size=9)  # a tiny alphabet so prefixes collide often


class KVMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.bm = BlockManager(NUM_BLOCKS, BS)
        self.radix = RadixCache(self.bm)
        self.kv: dict[int, list[int | None]] = {}
        self.seqs: list[tuple[BlockTable, list[int]]] = []
        self.loose: list[int] = []
        self.copies: list[tuple[int, int]] = []  # those asked for by the latest successful write

    # ------------------------------------------------------------------ model helpers

    def snapshot(self) -> tuple:
        return (self.bm.num_free_blocks, [self.bm.refcount(b) for b in range(NUM_BLOCKS)],
                [(list(t.blocks), t.num_tokens) for t, _ in self.seqs], list(self.radix.nodes()))

    def write(self, table: BlockTable, tokens: list[int], pos: int, new: list[int]) -> bool:
        """Write `new` at `pos` as the runner would: CoW copies first, then the slots. False if out of blocks."""
        before = self.snapshot()
        try:
            copies = self.bm.prepare_write(table, pos, len(new))
        except NoFreeBlocks:
            assert self.snapshot() == before
            return False
        self.copies = copies
        for src, dst in copies:
            assert self.bm.refcount(src) >= 1 and self.bm.refcount(dst) == 1
            self.kv[dst] = list(self.kv[src])
        for p, tok in enumerate(new, start=pos):
            self.kv.setdefault(table.blocks[p // BS], [None] * BS)[p % BS] = tok
        tokens[pos : pos + len(new)] = new
        return True

    def cached_prefixes(self) -> dict[tuple[int, ...], int]:
        """Every block-aligned prefix the tree caches -> the block holding its last block of tokens."""
        out: dict[tuple[int, ...], int] = {}
        path: list[tuple[int, ...]] = [()]
        for v in self.radix.nodes():
            del path[v.depth :]
            full = path[-1] + v.token_ids
            path.append(full)
            for j, b in enumerate(v.blocks):
                out[full[: v.prefix_len + (j + 1) * BS]] = b
        return out

    def pick(self, i: int) -> tuple[BlockTable, list[int]]:
        return self.seqs[i % len(self.seqs)]

    # ------------------------------------------------------------------ rules

    @precondition(lambda self: len(self.seqs) < MAX_SEQS)
    @rule(prompt=tokens_st, reuse=st.booleans(), base=st.sampled_from(["none", "seq", "cache"]),
          pick=st.integers(0, 50), cut=st.integers(0, 12))
    def start(self, prompt: list[int], reuse: bool, base: str, pick: int, cut: int) -> None:
        """A new request. Its prompt may extend part of a live sequence (a follow-up turn) or a cached prefix."""
        cached = self.cached_prefixes()
        if base == "seq" and self.seqs:
            prompt = self.pick(pick)[1][:cut] + prompt
        elif base == "cache" and cached:
            prompt = list(sorted(cached)[pick % len(cached)]) + prompt
        table, tokens = BlockTable(), []
        m = self.radix.match_prefix(prompt)
        k = 0
        while tuple(prompt[: (k + 1) * BS]) in cached and (k + 1) * BS <= len(prompt):
            k += 1
        assert m.num_tokens == k * BS
        assert list(m.blocks) == [cached[tuple(prompt[: (j + 1) * BS])] for j in range(k)]
        if reuse:
            self.bm.append_prefix(table, m.blocks, m.num_tokens)
            tokens = prompt[: m.num_tokens]
        self.seqs.append((table, tokens))
        self.write(table, tokens, len(tokens), prompt[len(tokens) :])

    @precondition(lambda self: self.seqs)
    @rule(i=st.integers(0, MAX_SEQS), pos=st.integers(0, 12), new=st.lists(st.integers(0, 1), min_size=1, max_size=5))
    def write_tokens(self, i: int, pos: int, new: list[int]) -> None:
        table, tokens = self.pick(i)
        self.write(table, tokens, min(pos, len(tokens)), new)

    @precondition(lambda self: self.seqs)
    @rule(i=st.integers(0, MAX_SEQS), extra=st.integers(0, 8))
    def reserve(self, i: int, extra: int) -> None:
        table, _ = self.pick(i)
        before = self.snapshot()
        needed = self.bm.blocks_needed(table, table.num_tokens + extra)
        assert self.bm.can_reserve(table, table.num_tokens + extra) == (needed <= self.bm.num_free_blocks)
        try:
            self.bm.reserve(table, table.num_tokens + extra)
        except NoFreeBlocks:
            assert self.snapshot() == before
        else:
            assert self.bm.num_free_blocks == before[0] - needed
            assert table.capacity >= table.num_tokens + extra

    @precondition(lambda self: self.seqs and len(self.seqs) < MAX_SEQS)
    @rule(i=st.integers(0, MAX_SEQS))
    def fork(self, i: int) -> None:
        table, tokens = self.pick(i)
        self.seqs.append((self.bm.fork(table), list(tokens)))

    @precondition(lambda self: self.seqs and len(self.seqs) < MAX_SEQS)
    @rule(i=st.integers(0, MAX_SEQS), tok=st.integers(0, 1))
    def fork_and_decode(self, i: int, tok: int) -> None:
        """Parallel sampling: a fork appends one token; only a shared partial last block gets copied."""
        table, tokens = self.pick(i)
        child, child_tokens = self.bm.fork(table), list(tokens)
        self.seqs.append((child, child_tokens))
        k = len(tokens) // BS  # the block the token goes to; partial (so shared and filled) if len % BS
        partial = child.blocks[k] if len(tokens) % BS else None
        if self.write(child, child_tokens, len(child_tokens), [tok]):
            assert self.copies == ([] if partial is None else [(partial, child.blocks[k])])

    @precondition(lambda self: self.seqs)
    @rule(i=st.integers(0, MAX_SEQS), n=st.integers(0, 12))
    def truncate(self, i: int, n: int) -> None:
        table, tokens = self.pick(i)
        n = min(n, len(tokens))
        self.bm.truncate(table, n)
        del tokens[n:]
        assert len(table.blocks) == -(-n // BS)

    @precondition(lambda self: self.seqs)
    @rule(i=st.integers(0, MAX_SEQS))
    def free(self, i: int) -> None:
        table, _ = self.seqs.pop(i % len(self.seqs))
        self.bm.free(table)
        assert table.blocks == [] and table.num_tokens == 0

    @precondition(lambda self: self.seqs)
    @rule(i=st.integers(0, MAX_SEQS))
    def insert(self, i: int) -> None:
        table, tokens = self.pick(i)
        cached = self.cached_prefixes()
        owned = set(cached.values())
        expected = 0
        for k in range(len(tokens) // BS):
            if tuple(tokens[: (k + 1) * BS]) in cached:
                continue
            if table.blocks[k] in owned:
                break
            expected += BS
        assert self.radix.insert(tokens, table.blocks) == expected

    @precondition(lambda self: self.seqs)
    @rule(i=st.integers(0, MAX_SEQS))
    def finish(self, i: int) -> None:
        """What a finished request does: offer its blocks to the cache, then free its table."""
        self.insert(i)
        self.free(i)

    @rule(n=st.integers(0, 6))
    def evict(self, n: int) -> None:
        evictable, used = self.radix.evictable_blocks(), self.bm.num_used_blocks
        freed = self.radix.evict(n)
        assert freed == min(n, evictable)
        assert self.bm.num_used_blocks == used - freed

    @rule(dice=st.integers(0, 7))
    def reset(self, dice: int) -> None:
        if dice:  # rarely: a reset empties the cache the other rules build up
            return
        self.radix.reset()
        assert self.radix.cached_blocks() == 0 and list(self.radix.nodes()) == []

    @rule(n=st.integers(0, 4))
    def allocate_loose(self, n: int) -> None:
        before = self.snapshot()
        try:
            self.loose.extend(self.bm.allocate(n))
        except NoFreeBlocks:
            assert self.snapshot() == before

    @precondition(lambda self: self.loose)
    @rule()
    def release_loose(self) -> None:
        self.bm.decref(self.loose.pop())

    # ------------------------------------------------------------------ invariants

    @invariant()
    def blocks_are_accounted(self) -> None:
        bm = self.bm
        assert bm.num_free_blocks + bm.num_used_blocks == bm.num_blocks
        holders = [0] * NUM_BLOCKS
        for table, _ in self.seqs:
            for b in table.blocks:
                holders[b] += 1
        for b in self.loose:
            holders[b] += 1
        for b in self.cached_prefixes().values():
            holders[b] += 1
        assert [bm.refcount(b) for b in range(NUM_BLOCKS)] == holders
        assert bm.num_used_blocks == sum(1 for h in holders if h)

    @invariant()
    def sequences_read_their_own_tokens(self) -> None:
        for table, tokens in self.seqs:
            assert table.num_tokens == len(tokens)
            assert table.capacity >= len(tokens)
            read = [self.kv[table.blocks[p // BS]][p % BS] for p in range(len(tokens))]
            assert read == tokens
            assert [table.slot(p) for p in range(len(tokens))] == \
                [table.blocks[p // BS] * BS + p % BS for p in range(len(tokens))]

    @invariant()
    def cache_holds_its_paths(self) -> None:
        cached = self.cached_prefixes()
        assert len(set(cached.values())) == len(cached) == self.radix.cached_blocks()
        for prefix, b in cached.items():
            assert self.kv[b] == list(prefix[-BS:])
        views = list(self.radix.nodes())
        evictable = 0
        for i, v in enumerate(views):
            subtree = [v]
            for w in views[i + 1 :]:
                if w.depth <= v.depth:
                    break
                subtree.append(w)
            free = all(rc == 1 for w in subtree for rc in w.refcounts)
            assert v.evictable == free
            evictable += len(v.blocks) if free else 0
        assert self.radix.evictable_blocks() == evictable

    def teardown(self) -> None:
        for table, _ in self.seqs:
            self.bm.free(table)
        for b in self.loose:
            self.bm.decref(b)
        self.radix.reset()
        assert self.bm.num_used_blocks == 0 and self.bm.num_free_blocks == NUM_BLOCKS


KVMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=50, deadline=None)
TestKVInvariants = KVMachine.TestCase
