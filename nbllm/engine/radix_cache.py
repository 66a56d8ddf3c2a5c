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

With a host tier (`kv_offload.HostKVPool`), eviction moves a leaf's K/V to host RAM instead of dropping it: the
node stays in the tree, *host-resident*, and a later match reaching it (`load_prefix`) copies it back into
fresh device blocks instead of recomputing it. A node's blocks live in exactly one tier, and host-resident
nodes have only host-resident descendants: the device part of the tree is a top subtree, so device eviction
still takes leaves of that subtree (nodes without device children). The host tier has its own LRU over
host-resident leaves; evicting there deletes the node. When host RAM cannot take a leaf, it is dropped as
without a host tier.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nbllm.engine.block_manager import BlockManager

if TYPE_CHECKING:
    from nbllm.engine.kv_offload import HostKVPool


@dataclass(frozen=True)
class PrefixMatch:
    """The longest cached block-aligned prefix of a query: its device blocks in order and the tokens they hold,
    and how many tokens after those are cached in host RAM (restored by `RadixCache.load_prefix`)."""

    blocks: tuple[int, ...]
    num_tokens: int
    host_tokens: int = 0


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
    host_blocks: tuple[int, ...] = ()  # a host-resident node's blocks in the host pool (`blocks` is empty then)


class _Node:
    __slots__ = ("blocks", "busy", "children", "device_children", "host_blocks", "key", "last_access", "lock",
                 "parent", "pinned", "queued", "uid")

    def __init__(self, key: tuple[int, ...], blocks: list[int], parent: _Node | None, uid: int) -> None:
        self.key = key
        self.blocks = blocks  # device blocks; empty while host-resident
        self.host_blocks: list[int] = []  # host blocks; non-empty exactly while host-resident
        self.parent = parent  # None for the root and for removed nodes
        self.children: dict[tuple[int, ...], _Node] = {}
        self.device_children = 0  # children that are device-resident
        self.busy = False  # host-resident and being restored: host eviction must leave it
        self.last_access = 0
        self.pinned = 0  # own blocks with refcount > 1
        self.lock = 0  # pinned blocks in the subtree, own included
        self.queued = False  # an entry with the current last_access exists in its tier's eviction heap
        self.uid = uid  # heap tie-break, so nodes need no ordering


class RadixCache:
    """Token-id prefixes -> cached KV blocks, with LRU eviction of unpinned leaves (to `host`, a host-RAM tier,
    when given)."""

    def __init__(self, block_manager: BlockManager, host: HostKVPool | None = None) -> None:
        self.block_manager = block_manager
        self.block_size = block_manager.block_size
        self.host = host
        self._uids = itertools.count()
        self._root = _Node((), [], None, next(self._uids))
        self._owner: dict[int, _Node] = {}  # cached device block -> the node storing it
        self._heap: list[tuple[int, int, _Node]] = []  # (last_access, uid, node) of unpinned device leaves, lazily
        self._host_heap: list[tuple[int, int, _Node]] = []  # the same for host-resident leaves
        self.offloaded_blocks = 0  # blocks moved device -> host, ever
        self.restored_blocks = 0  # blocks moved host -> device, ever
        self._num_nodes = 0
        self._evictable = 0
        self._clock = 0
        block_manager.set_share_listener(self._on_share_change)

    # ------------------------------------------------------------------ queries

    def match_prefix(self, token_ids: Sequence[int]) -> PrefixMatch:
        """The longest cached prefix of `token_ids` in whole blocks (its device blocks, and the tokens after
        them that wait in host RAM); marks its path recently used.

        Takes no references: call `BlockManager.append_prefix` with the blocks before anything can evict
        (an `evict` call, or `reset`), or they may be freed under you. A match ending inside an edge splits it,
        so the unmatched tail stays evictable on its own once the matched part is pinned.
        """
        return self._match(self._walk(tuple(token_ids), self._tick())[0])

    def load_prefix(self, token_ids: Sequence[int]) -> PrefixMatch:
        """`match_prefix`, after copying the host-resident part of the match back into device blocks.

        Device blocks for it come from the free list, evicting other unpinned prefixes (to host) if needed; as
        much of the host part is restored as then fits, in prefix order. Takes no references, like
        `match_prefix`.
        """
        deepest, _ = self._walk(tuple(token_ids), self._tick())
        host_path = []
        node = deepest
        while node.host_blocks:
            host_path.append(node)
            node = node.parent
        if host_path:
            self._restore(node, host_path[::-1])
        return self._match(deepest)

    def evictable_blocks(self) -> int:
        """Blocks that repeated eviction could free now (those in subtrees no request uses)."""
        return self._evictable

    def cached_blocks(self) -> int:
        """Device blocks the tree stores."""
        return len(self._owner)

    def host_cached_blocks(self) -> int:
        """Host blocks the tree stores (all the host pool's used blocks)."""
        return self.host.num_used_blocks if self.host is not None else 0

    def nodes(self) -> Iterator[NodeView]:
        """Every node in depth-first order (children in insertion order), as snapshots."""
        rc = self.block_manager.refcount
        stack = [(child, 1, 0) for child in reversed(self._root.children.values())]
        while stack:
            node, depth, prefix_len = stack.pop()
            yield NodeView(depth, prefix_len, node.key, tuple(node.blocks), tuple(rc(b) for b in node.blocks),
                           node.last_access, node.lock == 0, tuple(node.host_blocks))
            below = prefix_len + len(node.key)
            stack.extend((child, depth + 1, below) for child in reversed(node.children.values()))

    # ------------------------------------------------------------------ updates

    def insert(self, token_ids: Sequence[int], blocks: Sequence[int]) -> int:
        """Cache the full-block part of a sequence whose K/V lives in `blocks`; returns the tokens newly cached
        in device blocks.

        The tree takes a reference on each block it newly stores. Where it already caches a span on the device
        it keeps its own blocks: the caller's duplicates stay only the caller's, released when its table is
        freed. Where it caches a span in host RAM it adopts the caller's blocks instead and frees the host
        copy. A block the tree already stores under another path (its table rewrote earlier tokens) ends what
        is cached.
        """
        bs = self.block_size
        tokens = tuple(token_ids)
        n_full = len(tokens) // bs
        if len(blocks) < n_full:
            raise ValueError(f"{len(tokens)} tokens need {n_full} blocks, got {len(blocks)}")
        if any(self.block_manager.refcount(b) == 0 for b in blocks[:n_full]):
            raise ValueError("cannot cache a free block")
        tokens = tokens[: n_full * bs]
        parent, n = self._walk(tokens, self._tick())
        adopted = self._adopt_host_path(parent, n, blocks)
        if n == len(tokens) or parent.host_blocks:  # nothing new, or nothing may hang below a host-resident node
            return adopted
        new_blocks = list(blocks[n // bs : n_full])
        for i, b in enumerate(new_blocks):
            if b in self._owner:
                del new_blocks[i:]
                break
        if not new_blocks:
            return adopted
        tokens = tokens[: n + len(new_blocks) * bs]
        for b in new_blocks:
            self.block_manager.incref(b)  # not yet owned, so the share listener ignores these
        if parent is not self._root and not parent.children:
            # A leaf's edge grows in place: a decoding sequence offers its blocks one at a time, and a child per
            # block would make its path, walked at every offer, as many nodes long as it has blocks.
            node = parent
            node.key += tokens[n:]
            node.blocks.extend(new_blocks)
        else:
            node = _Node(tokens[n:], new_blocks, parent, next(self._uids))
            node.last_access = self._clock
            parent.children[tokens[n : n + bs]] = node
            parent.device_children += 1
            self._num_nodes += 1
        for b in new_blocks:
            self._owner[b] = node
        pinned = sum(1 for b in new_blocks if self.block_manager.refcount(b) > 1)
        node.pinned += pinned
        if not node.lock:
            self._evictable += len(new_blocks)
        if pinned:
            self._add_lock(node, pinned)
        else:
            self._queue(node)
        return adopted + len(tokens) - n

    def evict(self, num_blocks: int) -> int:
        """Free up to `num_blocks` device blocks from least recently used unpinned leaves, moving their K/V to
        the host tier when there is one and it has room; returns how many were freed."""
        freed = 0
        while freed < num_blocks and self._heap:
            access, _, node = heapq.heappop(self._heap)
            if access != node.last_access:
                continue  # stale: the node was touched after this entry was pushed
            node.queued = False
            if node.parent is None or node.host_blocks or node.device_children or node.lock:
                continue  # removed, offloaded, no longer a leaf, or pinned since; re-queued when that changes
            take = min(num_blocks - freed, len(node.blocks))
            if take < len(node.blocks):
                self._split(node, len(node.blocks) - take)  # `node` keeps the tail, which alone goes
            freed += take
            self._evictable -= take
            self._offload_or_drop(node)
        self._heap = self._compacted(self._heap)
        return freed

    def reset(self) -> None:
        """Drop everything the tree holds (`llm.reset_prefix_cache()`); blocks requests still use stay theirs."""
        owned = list(self._owner)
        self._owner.clear()  # first, so the share listener ignores the decrefs below
        for b in owned:
            self.block_manager.decref(b)
        if self.host is not None:
            stack = [self._root]
            while stack:
                node = stack.pop()
                self.host.free(node.host_blocks)
                stack.extend(node.children.values())
        self._root = _Node((), [], None, next(self._uids))
        self._heap.clear()
        self._host_heap.clear()
        self._num_nodes = 0
        self._evictable = 0

    # ------------------------------------------------------------------ internals

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _match(self, node: _Node) -> PrefixMatch:
        """The match ending at `node`: device blocks on the path, and the tokens of its host-resident tail."""
        blocks: list[int] = []
        device_tokens = host_tokens = 0
        while node is not self._root:
            if node.host_blocks:
                host_tokens += len(node.key)
            else:
                blocks[:0] = node.blocks
                device_tokens += len(node.key)
            node = node.parent
        return PrefixMatch(tuple(blocks), device_tokens, host_tokens)

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
        upper.host_blocks = node.host_blocks[:k]
        upper.device_children = 0 if node.host_blocks else 1
        upper.busy = node.busy
        upper.last_access = node.last_access
        parent.children[node.key[:bs]] = upper
        node.key, node.parent = node.key[k * bs :], upper
        node.blocks, node.host_blocks = node.blocks[k:], node.host_blocks[k:]
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
        """Offer `node` to its tier's eviction heap if it is a leaf there (an unpinned device node without device
        children, or a host-resident node without children) not already offered at its current access time."""
        if node.parent is None or node.queued:
            return
        if node.host_blocks:
            if node.children or node.busy:
                return
            heap = self._host_heap
        elif node.device_children or node.lock:
            return
        else:
            heap = self._heap
        heapq.heappush(heap, (node.last_access, node.uid, node))
        node.queued = True

    def _compacted(self, heap: list[tuple[int, int, _Node]]) -> list[tuple[int, int, _Node]]:
        """`heap` without its stale entries once they outnumber the nodes (lazy deletion keeps them)."""
        if len(heap) <= 2 * self._num_nodes + 64:
            return heap
        heap = [e for e in heap if e[0] == e[2].last_access and e[2].parent is not None]
        heapq.heapify(heap)
        return heap

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

    def _remove(self, node: _Node) -> None:
        """Take a childless node out of the tree, releasing its blocks in whichever tier holds them."""
        parent = node.parent
        if node.host_blocks:
            self.host.free(node.host_blocks)
        else:
            self._drop_blocks(node.blocks)
            parent.device_children -= 1
        del parent.children[node.key[: self.block_size]]
        node.parent = None
        self._num_nodes -= 1
        self._queue(parent)

    # ------------------------------------------------------------------ the host tier

    def _offload_or_drop(self, node: _Node) -> None:
        """Move an evicted device leaf's K/V to host blocks, evicting host leaves for room; the tail that host
        RAM cannot take (all of it without a host tier) leaves the tree."""
        host, n = self.host, len(node.blocks)
        if host is not None and host.num_free_blocks < n:
            self._evict_host(n - host.num_free_blocks)
        keep = min(n, host.num_free_blocks) if host is not None else 0
        if keep < n:  # every host leaf is gone (this node's children with them), so the tail is a leaf
            tail = node
            node = self._split(node, keep) if keep else None
            self._remove(tail)
            if node is None:
                return
            n = keep
        host_blocks = host.allocate(n)
        host.save(node.blocks, host_blocks)
        self._drop_blocks(node.blocks)
        node.blocks, node.host_blocks = [], host_blocks
        node.parent.device_children -= 1
        node.queued = False  # its entry, if any, is in the device heap
        self._queue(node)
        self._queue(node.parent)
        self.offloaded_blocks += n

    def _evict_host(self, num_blocks: int) -> None:
        """Delete up to `num_blocks` host blocks' worth of least recently used host-resident leaves."""
        freed = 0
        while freed < num_blocks and self._host_heap:
            access, _, node = heapq.heappop(self._host_heap)
            if access != node.last_access:
                continue
            node.queued = False
            if node.parent is None or not node.host_blocks or node.children or node.busy:
                continue  # removed, restored, no longer a leaf, or being restored; re-queued when that changes
            take = min(num_blocks - freed, len(node.host_blocks))
            if take < len(node.host_blocks):
                self._split(node, len(node.host_blocks) - take)
            freed += take
            self._remove(node)
        self._host_heap = self._compacted(self._host_heap)

    def _restore(self, device_node: _Node, host_path: list[_Node]) -> None:
        """Copy the host-resident nodes `host_path` (top down, below `device_node`) back into device blocks, as
        many as fit after evicting for room, with one batched copy."""
        bm = self.block_manager
        for node in host_path:
            node.busy = True  # host eviction (an offload making room) must not take them
        need = sum(len(node.host_blocks) for node in host_path)
        # One reference on the deepest matched device block pins the whole matched device path meanwhile.
        anchor = device_node.blocks[-1] if device_node is not self._root else None
        if anchor is not None:
            bm.incref(anchor)
        if need > bm.num_free_blocks:
            self.evict(need - bm.num_free_blocks)
        if anchor is not None:
            bm.decref(anchor)
        restored, room = [], bm.num_free_blocks
        for node in host_path:
            if room == 0:
                break
            if len(node.host_blocks) > room:
                node = self._split(node, room)
            restored.append(node)
            room -= len(node.host_blocks)
        if restored:
            src = [b for node in restored for b in node.host_blocks]
            dst = bm.allocate(len(src))
            self.host.load(src, dst)
            at = 0
            for node in restored:
                k = len(node.host_blocks)
                self._to_device(node, dst[at : at + k])
                at += k
            self.restored_blocks += len(src)
        for node in host_path:
            node.busy = False
            self._queue(node)  # host leaves skipped while busy go back on the heap

    def _adopt_host_path(self, deepest: _Node, n: int, blocks: Sequence[int]) -> int:
        """Give the host-resident tail of the path ending at `deepest` (matched up to token `n`) the caller's
        device blocks for the same tokens, top down; stops at a block the tree already stores elsewhere.
        Returns the tokens adopted."""
        path, end = [], n
        while deepest.host_blocks:
            end -= len(deepest.key)
            path.append((deepest, end))
            deepest = deepest.parent
        adopted = 0
        for node, start in reversed(path):
            first = start // self.block_size
            span = list(blocks[first : first + len(node.host_blocks)])
            if any(b in self._owner for b in span):
                break
            for b in span:
                self.block_manager.incref(b)  # not yet owned, so the share listener ignores these
            self._to_device(node, span)
            adopted += len(node.key)
        return adopted

    def _to_device(self, node: _Node, blocks: list[int]) -> None:
        """A host-resident node takes device `blocks` holding its K/V (the tree's reference already taken on
        each) and releases its host blocks."""
        self.host.free(node.host_blocks)
        node.host_blocks, node.blocks = [], blocks
        for b in blocks:
            self._owner[b] = node
        node.parent.device_children += 1
        node.busy = node.queued = False
        self._evictable += len(blocks)
        node.pinned = sum(1 for b in blocks if self.block_manager.refcount(b) > 1)
        if node.pinned:
            self._add_lock(node, node.pinned)
        else:
            self._queue(node)


def host_tier_stats(cache: RadixCache | None) -> dict[str, int]:
    """The host tier's counts for `llm.stats()` (zeros without one): blocks in host RAM, blocks moved each way,
    and the prompt tokens restored instead of recomputed."""
    on = cache is not None and cache.host is not None
    return {
        "kv_host_blocks_total": cache.host.num_blocks if on else 0,
        "kv_host_blocks_used": cache.host.num_used_blocks if on else 0,
        "kv_host_blocks_offloaded": cache.offloaded_blocks if on else 0,
        "kv_host_blocks_restored": cache.restored_blocks if on else 0,
        "kv_host_tokens_restored": cache.restored_blocks * cache.block_size if on else 0,
    }
