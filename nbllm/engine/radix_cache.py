"""Prefix cache: a radix tree from token ids to KV blocks (SGLang's RadixAttention at block granularity).

Every edge is a whole number of blocks -- only full blocks are cached, so a cached block's K/V never changes --
and a node stores its edge's token ids and block ids. Children are keyed by the token tuple of their first
block, so a lookup costs one dict probe per branch point plus one comparison of the tokens themselves.

The tree holds one reference on every block it stores (the DESIGN refcount invariant counts it). A request
that reuses a prefix takes its own references through `BlockManager.append_prefix`, which is what protects
those blocks: a block is *pinned* when its refcount exceeds the tree's single reference. The block manager
reports every 1 <-> 2 refcount crossing, so each node knows how many pinned blocks its subtree holds (`lock`)
without rescanning. Nodes with `lock == 0` are what eviction can free; the least recently used unpinned leaf
goes first (a logical clock orders accesses, so behaviour is deterministic), trimmed from its tail when only a
few blocks are wanted, and a parent whose last child goes becomes a candidate in turn.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from nbllm.engine.block_manager import BlockManager


@dataclass(frozen=True)
class PrefixMatch:
    """The longest cached block-aligned prefix of a query: its blocks in order and the tokens they hold."""

    blocks: tuple[int, ...]
    num_tokens: int


@dataclass(frozen=True)
class NodeView:
    """A read-only snapshot of one tree node, for the notebook dashboard."""

    depth: int  # edges from the root (the root itself is not listed)
    prefix_len: int  # tokens on the path above this node's edge
    token_ids: tuple[int, ...]
    blocks: tuple[int, ...]
    refcounts: tuple[int, ...]
    last_access: int
    evictable: bool  # no block in this subtree is used by a request


class _Node:
    __slots__ = ("blocks", "children", "key", "last_access", "lock", "parent", "pinned", "queued", "uid")

    def __init__(self, key: tuple[int, ...], blocks: list[int], parent: _Node | None, uid: int) -> None:
        self.key = key
        self.blocks = blocks
        self.parent = parent  # None for the root and for removed nodes
        self.children: dict[tuple[int, ...], _Node] = {}
        self.last_access = 0
        self.pinned = 0  # own blocks with refcount > 1
        self.lock = 0  # pinned blocks in the subtree, own included
        self.queued = False  # an eviction-heap entry with the current last_access exists
        self.uid = uid  # heap tie-break, so nodes need no ordering


class RadixCache:
    """Token-id prefixes -> cached KV blocks, with LRU eviction of unpinned leaves."""

    def __init__(self, block_manager: BlockManager) -> None:
        self.block_manager = block_manager
        self.block_size = block_manager.block_size
        self._uids = itertools.count()
        self._root = _Node((), [], None, next(self._uids))
        self._owner: dict[int, _Node] = {}  # cached block -> the node storing it
        self._heap: list[tuple[int, int, _Node]] = []  # (last_access, uid, node) of unpinned leaves, lazily
        self._num_nodes = 0
        self._evictable = 0
        self._clock = 0
        block_manager.set_share_listener(self._on_share_change)

    # ------------------------------------------------------------------ queries

    def match_prefix(self, token_ids: Sequence[int]) -> PrefixMatch:
        """The longest cached prefix of `token_ids` in whole blocks; marks its path recently used.

        Takes no references: call `BlockManager.append_prefix` with the blocks before anything can evict
        (an `evict` call, or `reset`), or they may be freed under you. A match ending inside an edge splits it,
        so the unmatched tail stays evictable on its own once the matched part is pinned.
        """
        node, n = self._walk(tuple(token_ids), self._tick())
        blocks: list[int] = []
        while node is not self._root:
            blocks[:0] = node.blocks
            node = node.parent
        return PrefixMatch(tuple(blocks), n)

    def evictable_blocks(self) -> int:
        """Blocks that repeated eviction could free now (those in subtrees no request uses)."""
        return self._evictable

    def cached_blocks(self) -> int:
        return len(self._owner)

    def nodes(self) -> Iterator[NodeView]:
        """Every node in depth-first order (children in insertion order), as snapshots."""
        rc = self.block_manager.refcount
        stack = [(child, 1, 0) for child in reversed(self._root.children.values())]
        while stack:
            node, depth, prefix_len = stack.pop()
            yield NodeView(depth, prefix_len, node.key, tuple(node.blocks), tuple(rc(b) for b in node.blocks),
                           node.last_access, node.lock == 0)
            below = prefix_len + len(node.key)
            stack.extend((child, depth + 1, below) for child in reversed(node.children.values()))

    # ------------------------------------------------------------------ updates

    def insert(self, token_ids: Sequence[int], blocks: Sequence[int]) -> int:
        """Cache the full-block part of a sequence whose K/V lives in `blocks`; returns the newly cached tokens.

        The tree takes a reference on each block it newly stores. Where it already caches a span it keeps its
        own blocks: the caller's duplicates stay only the caller's, released when its table is freed. A block
        the tree already stores under another path (its table rewrote earlier tokens) ends what is cached.
        """
        bs = self.block_size
        tokens = tuple(token_ids)
        n_full = len(tokens) // bs
        if len(blocks) < n_full:
            raise ValueError(f"{len(tokens)} tokens need {n_full} blocks, got {len(blocks)}")
        tokens = tokens[: n_full * bs]
        parent, n = self._walk(tokens, self._tick())
        if n == len(tokens):
            return 0
        new_blocks = list(blocks[n // bs : n_full])
        if any(self.block_manager.refcount(b) == 0 for b in new_blocks):
            raise ValueError("cannot cache a free block")
        for i, b in enumerate(new_blocks):
            if b in self._owner:
                del new_blocks[i:]
                break
        if not new_blocks:
            return 0
        tokens = tokens[: n + len(new_blocks) * bs]
        for b in new_blocks:
            self.block_manager.incref(b)  # not yet owned, so the share listener ignores these
        node = _Node(tokens[n:], new_blocks, parent, next(self._uids))
        node.last_access = self._clock
        parent.children[tokens[n : n + bs]] = node
        self._num_nodes += 1
        for b in new_blocks:
            self._owner[b] = node
        pinned = sum(1 for b in new_blocks if self.block_manager.refcount(b) > 1)
        node.pinned = pinned
        self._evictable += len(new_blocks)
        if pinned:
            self._add_lock(node, pinned)
        else:
            self._queue(node)
        return len(tokens) - n

    def evict(self, num_blocks: int) -> int:
        """Free up to `num_blocks` blocks from least recently used unpinned leaves; returns how many were freed."""
        freed = 0
        while freed < num_blocks and self._heap:
            access, _, node = heapq.heappop(self._heap)
            if access != node.last_access:
                continue  # stale: the node was touched after this entry was pushed
            node.queued = False
            if node.parent is None or node.children or node.lock:
                continue  # removed, no longer a leaf, or pinned since; re-queued when that changes
            take = min(num_blocks - freed, len(node.blocks))
            freed += take
            self._evictable -= take
            if take < len(node.blocks):
                self._drop_blocks(node.blocks[-take:])
                del node.blocks[-take:]
                node.key = node.key[: len(node.blocks) * self.block_size]
                self._queue(node)
            else:
                self._drop_blocks(node.blocks)
                parent = node.parent
                del parent.children[node.key[: self.block_size]]
                node.parent = None
                self._num_nodes -= 1
                self._queue(parent)
        if len(self._heap) > 2 * self._num_nodes + 64:
            self._heap = [e for e in self._heap if e[0] == e[2].last_access and e[2].parent is not None]
            heapq.heapify(self._heap)
        return freed

    def reset(self) -> None:
        """Drop everything the tree holds (`llm.reset_prefix_cache()`); blocks requests still use stay theirs."""
        owned = list(self._owner)
        self._owner.clear()  # first, so the share listener ignores the decrefs below
        for b in owned:
            self.block_manager.decref(b)
        self._root = _Node((), [], None, next(self._uids))
        self._heap.clear()
        self._num_nodes = 0
        self._evictable = 0

    # ------------------------------------------------------------------ internals

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _walk(self, tokens: tuple[int, ...], now: int) -> tuple[_Node, int]:
        """Descend along `tokens` in whole blocks, stamping each node passed with `now`; splits an edge matched
        only in part. Returns the deepest node reached and the number of tokens matched."""
        bs = self.block_size
        node, pos = self._root, 0
        while pos + bs <= len(tokens):
            child = node.children.get(tokens[pos : pos + bs])
            if child is None:
                break
            edge = len(child.key)
            if tokens[pos : pos + edge] != child.key:
                k = 1  # the first block matched through the dict key
                while (k + 1) * bs <= len(tokens) - pos and tokens[pos + k * bs : pos + (k + 1) * bs] == \
                        child.key[k * bs : (k + 1) * bs]:
                    k += 1
                child = self._split(child, k)
                self._touch(child, now)
                return child, pos + k * bs
            self._touch(child, now)
            node, pos = child, pos + edge
        return node, pos

    def _split(self, node: _Node, k: int) -> _Node:
        """Cut `node`'s edge after `k` blocks; returns the new upper node (the old one keeps the tail)."""
        bs = self.block_size
        parent = node.parent
        upper = _Node(node.key[: k * bs], node.blocks[:k], parent, next(self._uids))
        upper.last_access = node.last_access
        parent.children[node.key[:bs]] = upper
        node.key, node.blocks, node.parent = node.key[k * bs :], node.blocks[k:], upper
        upper.children[node.key[:bs]] = node
        self._num_nodes += 1
        for b in upper.blocks:
            self._owner[b] = upper
        upper.pinned = sum(1 for b in upper.blocks if self.block_manager.refcount(b) > 1)
        upper.lock = node.lock
        node.pinned -= upper.pinned
        node.lock -= upper.pinned
        if upper.lock and not node.lock:  # the tail alone was unpinned: it becomes evictable by itself
            self._evictable += len(node.blocks)
            self._queue(node)
        return upper

    def _touch(self, node: _Node, now: int) -> None:
        node.last_access = now
        node.queued = False  # older heap entries are stale now
        self._queue(node)

    def _queue(self, node: _Node) -> None:
        """Offer `node` for eviction if it is an unpinned leaf not already offered at its current access time."""
        if node.parent is not None and not node.children and not node.lock and not node.queued:
            heapq.heappush(self._heap, (node.last_access, node.uid, node))
            node.queued = True

    def _add_lock(self, node: _Node, delta: int) -> None:
        """Add `delta` pinned blocks to the subtree counts of `node` and its ancestors."""
        while node is not self._root:
            before = node.lock
            node.lock += delta
            if not before:
                self._evictable -= len(node.blocks)
            elif not node.lock:
                self._evictable += len(node.blocks)
                self._queue(node)
            node = node.parent

    def _on_share_change(self, block: int, shared: bool) -> None:
        node = self._owner.get(block)
        if node is not None:
            node.pinned += 1 if shared else -1
            self._add_lock(node, 1 if shared else -1)

    def _drop_blocks(self, blocks: list[int]) -> None:
        for b in blocks:
            del self._owner[b]
            self.block_manager.decref(b)
