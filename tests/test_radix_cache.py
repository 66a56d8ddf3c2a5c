"""RadixCache: block-granular match/insert/split, reference semantics, LRU eviction, reset, dashboard views."""

from __future__ import annotations

import pytest

from nbllm.engine.block_manager import BlockManager, BlockTable
from nbllm.engine.radix_cache import RadixCache

BS = 4


def setup(num_blocks: int = 32) -> tuple[BlockManager, RadixCache]:
    bm = BlockManager(num_blocks, BS)
    return bm, RadixCache(bm)


def computed(bm: BlockManager, tokens: list[int]) -> BlockTable:
    """A table whose K/V for `tokens` has been computed (what a finished prefill leaves)."""
    t = BlockTable()
    bm.prepare_write(t, 0, len(tokens))
    return t


def finish(bm: BlockManager, cache: RadixCache, tokens: list[int]) -> list[int]:
    """Cache a sequence and free its table, as a finished request does; returns its blocks."""
    t = computed(bm, tokens)
    blocks = list(t.blocks)
    cache.insert(tokens, t.blocks)
    bm.free(t)
    return blocks


def test_insert_then_match_whole_blocks_only():
    bm, cache = setup()
    t = computed(bm, list(range(10)))  # two full blocks and a partial one
    assert cache.insert(range(10), t.blocks) == 8
    assert cache.cached_blocks() == 2
    assert [bm.refcount(b) for b in t.blocks] == [2, 2, 1]  # the tree holds one reference per cached block
    assert cache.match_prefix(range(10)) == cache.match_prefix(range(8))
    m = cache.match_prefix(range(10))
    assert m.blocks == tuple(t.blocks[:2]) and m.num_tokens == 8
    assert cache.match_prefix(range(7)).num_tokens == 4
    assert cache.match_prefix(range(3)).num_tokens == 0
    assert cache.match_prefix([9, 9, 9, 9]).blocks == ()
    assert bm.refcount(t.blocks[0]) == 2  # matching takes no references


def test_insert_needs_a_block_per_full_block():
    bm, cache = setup()
    with pytest.raises(ValueError):
        cache.insert(range(8), bm.allocate(1))
    with pytest.raises(ValueError):
        cache.insert(range(8), [bm.allocate(1)[0], 31])  # block 31 is free: nothing may change
    assert cache.cached_blocks() == 0 and bm.num_used_blocks == 2


def test_second_insert_keeps_the_trees_blocks():
    bm, cache = setup()
    first = computed(bm, list(range(8)))
    cache.insert(range(8), first.blocks)
    dup = computed(bm, list(range(12)))  # computed again without the cache: its own copies of blocks 0, 1
    assert cache.insert(range(12), dup.blocks) == 4
    assert cache.match_prefix(range(12)).blocks == (*first.blocks, dup.blocks[2])
    assert [bm.refcount(b) for b in dup.blocks] == [1, 1, 2]  # the duplicates stay only the caller's
    assert cache.insert(range(12), dup.blocks) == 0
    bm.free(first)
    bm.free(dup)
    assert bm.num_used_blocks == cache.cached_blocks() == 3


def test_split_at_block_boundary_on_divergence():
    bm, cache = setup()
    a = [1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]
    b = [1, 1, 1, 1, 2, 2, 2, 2, 4, 4, 4, 4]
    ta, tb = computed(bm, a), computed(bm, b)
    cache.insert(a, ta.blocks)
    assert cache.insert(b, tb.blocks) == 4
    views = list(cache.nodes())
    assert [(v.depth, v.prefix_len, v.token_ids) for v in views] == [
        (1, 0, tuple(a[:8])), (2, 8, tuple(a[8:])), (2, 8, tuple(b[8:]))]
    assert views[0].blocks == tuple(ta.blocks[:2]) and views[2].blocks == (tb.blocks[2],)
    assert cache.match_prefix(b).blocks == (*ta.blocks[:2], tb.blocks[2])
    # a mismatch inside the first block of an edge matches nothing of it
    assert cache.match_prefix([1, 1, 1, 1, 2, 2, 2, 9]).num_tokens == 4


def test_match_splits_a_partly_matched_edge():
    bm, cache = setup()
    tokens = list(range(16))
    blocks = finish(bm, cache, tokens)
    assert len(list(cache.nodes())) == 1
    m = cache.match_prefix(tokens[:8] + [99] * 4)
    assert m.blocks == tuple(blocks[:2])
    assert [v.token_ids for v in cache.nodes()] == [tuple(tokens[:8]), tuple(tokens[8:])]
    # a request pinning the matched part leaves the unmatched tail evictable on its own
    t = BlockTable()
    bm.append_prefix(t, m.blocks, m.num_tokens)
    assert cache.evictable_blocks() == 2
    assert cache.evict(10) == 2 and bm.num_used_blocks == 2
    assert cache.match_prefix(tokens).blocks == tuple(blocks[:2])


def test_evict_least_recently_used_leaf_first():
    bm, cache = setup()
    old = finish(bm, cache, [1] * 8)
    new = finish(bm, cache, [2] * 8)
    cache.match_prefix([1] * 8)  # touching makes [1]*8 the most recent
    assert cache.evictable_blocks() == 4
    assert cache.evict(2) == 2
    assert cache.match_prefix([2] * 8).num_tokens == 0
    assert cache.match_prefix([1] * 8).blocks == tuple(old)
    assert all(bm.refcount(b) == 0 for b in new)


def test_evict_trims_a_leaf_from_its_tail():
    bm, cache = setup()
    blocks = finish(bm, cache, list(range(16)))
    assert cache.evict(1) == 1
    assert cache.match_prefix(range(16)).blocks == tuple(blocks[:3])
    assert bm.refcount(blocks[3]) == 0 and cache.cached_blocks() == cache.evictable_blocks() == 3


def test_evict_cascades_to_parents_and_skips_pinned():
    bm, cache = setup()
    shared = list(range(8))
    finish(bm, cache, shared + [1] * 4)
    pinned = computed(bm, shared + [2] * 4)
    cache.insert(shared + [2] * 4, pinned.blocks)
    # the shared prefix is in use by `pinned`'s table (its own blocks 0, 1 are duplicates; the tree's are not
    # pinned), yet the prefix node has a pinned child, so only the unpinned [1]*4 leaf can go
    assert cache.evictable_blocks() == 1
    assert cache.evict(5) == 1
    bm.free(pinned)
    assert cache.evictable_blocks() == 3
    assert cache.evict(5) == 3  # leaf first, then its parent as it becomes a leaf
    assert cache.cached_blocks() == 0 and bm.num_used_blocks == 0


def test_reused_prefix_is_pinned_until_the_request_ends():
    bm, cache = setup()
    blocks = finish(bm, cache, list(range(8)))
    m = cache.match_prefix(range(8))
    t = BlockTable()
    bm.append_prefix(t, m.blocks, m.num_tokens)
    assert cache.evictable_blocks() == 0 and cache.evict(4) == 0
    assert [v.evictable for v in cache.nodes()] == [False]
    bm.free(t)
    assert cache.evictable_blocks() == 2 and cache.evict(4) == 2
    assert all(bm.refcount(b) == 0 for b in blocks)


def test_evict_nothing_and_empty():
    bm, cache = setup()
    assert cache.evict(3) == 0
    finish(bm, cache, list(range(4)))
    assert cache.evict(0) == 0 and cache.cached_blocks() == 1


def test_reset_keeps_blocks_requests_still_hold():
    bm, cache = setup()
    finish(bm, cache, [5] * 8)
    live = computed(bm, [6] * 8)
    cache.insert([6] * 8, live.blocks)
    cache.reset()
    assert cache.cached_blocks() == cache.evictable_blocks() == 0 and list(cache.nodes()) == []
    assert [bm.refcount(b) for b in live.blocks] == [1, 1] and bm.num_used_blocks == 2
    assert cache.match_prefix([6] * 8).num_tokens == 0
    bm.free(live)
    assert bm.num_used_blocks == 0
    assert cache.insert([6] * 8, computed(bm, [6] * 8).blocks) == 8  # usable after a reset


def test_insert_stops_at_a_block_cached_under_another_path():
    bm, cache = setup()
    t = computed(bm, list(range(8)))
    cache.insert(range(8), t.blocks)
    bm.prepare_write(t, 0, 1)  # rewrite token 0: CoW gives block 0 a private copy; block 1 is still cached
    assert cache.insert([7] + list(range(1, 8)), t.blocks) == 4
    assert cache.cached_blocks() == 3


def test_node_views_report_refcounts_and_access():
    bm, cache = setup()
    t = computed(bm, list(range(8)))
    cache.insert(range(8), t.blocks)
    (v,) = cache.nodes()
    assert v.depth == 1 and v.refcounts == (2, 2) and not v.evictable
    cache.match_prefix(range(4))
    upper, lower = cache.nodes()
    assert upper.last_access > lower.last_access == v.last_access


def test_a_decoding_sequence_grows_one_edge_and_a_sibling_splits_it():
    """Offering a sequence block by block (as decoding does) extends its leaf instead of chaining a node per
    block; a sequence that shares only the start splits that edge, and matching, pinning and eviction see the
    same blocks as with separate nodes."""
    bm, cache = setup()
    tokens = list(range(100, 124))
    table = computed(bm, tokens)
    for full in range(1, 7):
        cache.insert(tokens[: full * BS], table.blocks[:full])
        assert [v.blocks for v in cache.nodes()] == [tuple(table.blocks[:full])]
    assert cache.evictable_blocks() == 0  # every block is pinned by the table
    sibling = tokens[:8] + [7] * 8  # its first two blocks come from the cache, as an admitted request's do
    other = BlockTable()
    bm.append_prefix(other, cache.match_prefix(sibling).blocks, 8)
    bm.prepare_write(other, 8, 8)
    cache.insert(sibling, other.blocks)
    assert sorted(v.blocks for v in cache.nodes()) == sorted(
        [tuple(table.blocks[:2]), tuple(table.blocks[2:6]), tuple(other.blocks[2:4])])
    assert cache.match_prefix(tokens).blocks == tuple(table.blocks[:6])
    assert cache.match_prefix(sibling).blocks == tuple(other.blocks)
    bm.free(table)
    assert cache.evictable_blocks() == 4 and cache.evict(4) == 4  # the first sequence's own tail goes
    assert cache.match_prefix(tokens).blocks == tuple(other.blocks[:2])
    bm.free(other)
    cache.reset()
    assert bm.num_used_blocks == 0
