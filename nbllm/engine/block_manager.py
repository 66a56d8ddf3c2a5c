"""Paged KV accounting: fixed-size blocks, per-sequence block tables, reference counts, copy-on-write.

The KV cache is a pool of `num_blocks` blocks of `block_size` token slots each. This module only does the
bookkeeping -- which block ids a sequence uses and who else holds them; the model runner moves the tensors
(it performs the `(src, dst)` block copies that `prepare_write` returns before it writes new K/V).

A block's refcount is the number of holders: block tables that list it plus the radix cache (one reference per
block it stores). Sharing is how forks (parallel sampling, beam search) and cached prompt prefixes avoid
copying; copy-on-write keeps sharing invisible: before a table writes into a block someone else also holds, the
table gets a private copy. Every operation that allocates is all-or-nothing: it either succeeds or raises
`NoFreeBlocks` with no state changed, so the scheduler can evict or preempt and simply retry.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np


class NoFreeBlocks(Exception):
    """Not enough free blocks for an allocation; a signal to the scheduler (evict, preempt, wait), never a user
    error. Nothing was changed by the call that raised it."""

    def __init__(self, needed: int, available: int) -> None:
        super().__init__(f"need {needed} free KV blocks, {available} available")
        self.needed = needed
        self.available = available


@dataclass
class BlockTable:
    """One sequence's view of the KV cache: its block ids in position order and how many slots hold tokens.

    Capacity (`len(blocks) * block_size`) may exceed `num_tokens` after `reserve`. `block_size` is bound by the
    first `BlockManager` operation on the table, so a scheduler can create empty tables without the manager.
    """

    blocks: list[int] = field(default_factory=list)
    num_tokens: int = 0
    block_size: int = 0  # 0 until a BlockManager first touches this table
    # `array()`'s cache: the block ids it last converted, and the result.
    _array_of: list[int] = field(default_factory=list, repr=False, compare=False)
    _array: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32), repr=False, compare=False)

    @property
    def capacity(self) -> int:
        return len(self.blocks) * self.block_size

    def array(self) -> np.ndarray:
        """The block ids as an int32 array for the model runner, converted again only when they changed: a
        decode step reads every running table, but a table gains a block once every `block_size` tokens.
        (Comparing two lists of ints is a C loop; converting them costs ~30 ns an id.)"""
        if self._array_of != self.blocks:
            self._array_of = list(self.blocks)
            self._array = np.array(self._array_of, dtype=np.int32)
        return self._array

    def slot(self, pos: int) -> int:
        """Physical slot (`block * block_size + offset`) where the K/V of token position `pos` lives."""
        if not 0 <= pos < self.capacity:
            raise IndexError(f"position {pos} outside the table's {self.capacity} reserved slots")
        return self.blocks[pos // self.block_size] * self.block_size + pos % self.block_size


class BlockManager:
    """The pool of KV blocks: a free list plus a refcount per block, and the table operations built on them."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 0 or block_size < 1:
            raise ValueError(f"bad KV pool shape: {num_blocks} blocks of {block_size} tokens")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._refcount = [0] * num_blocks
        # A stack popped from the end; reversed so a fresh pool hands out 0, 1, 2, ... (readable in dashboards).
        self._free = list(range(num_blocks - 1, -1, -1))
        self._share_listener: Callable[[int, bool], None] | None = None

    # ------------------------------------------------------------------ the pool

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def refcount(self, block: int) -> int:
        return self._refcount[block]

    def set_share_listener(self, listener: Callable[[int, bool], None] | None) -> None:
        """Call `listener(block, shared)` whenever a block's refcount crosses between 1 and 2.

        The radix cache holds one reference on each block it stores, so for those blocks "shared" means "a
        block table is using it": the cache tracks what it may evict from these events instead of rescanning.
        """
        self._share_listener = listener

    def allocate(self, n: int) -> list[int]:
        """`n` fresh blocks with refcount 1; all or nothing."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > len(self._free):
            raise NoFreeBlocks(n, len(self._free))
        blocks = [self._free.pop() for _ in range(n)]
        for b in blocks:
            self._refcount[b] = 1
        return blocks

    def incref(self, block: int) -> None:
        """Take another reference on a block in use (a table or the radix cache starts sharing it)."""
        rc = self._refcount[block]
        if rc == 0:
            raise ValueError(f"incref of free block {block}")
        self._refcount[block] = rc + 1
        if rc == 1 and self._share_listener is not None:
            self._share_listener(block, True)

    def decref(self, block: int) -> None:
        """Drop a reference; the last one returns the block to the free list."""
        rc = self._refcount[block]
        if rc == 0:
            raise ValueError(f"decref of free block {block}")
        self._refcount[block] = rc - 1
        if rc == 1:
            self._free.append(block)
        elif rc == 2 and self._share_listener is not None:
            self._share_listener(block, False)

    # ------------------------------------------------------------------ block tables

    def blocks_needed(self, table: BlockTable, num_tokens_total: int) -> int:
        """Blocks `reserve(table, num_tokens_total)` would allocate."""
        self._bind(table)
        return max(0, -(-num_tokens_total // self.block_size) - len(table.blocks))

    def can_reserve(self, table: BlockTable, num_tokens_total: int) -> bool:
        return self.blocks_needed(table, num_tokens_total) <= len(self._free)

    def reserve(self, table: BlockTable, num_tokens_total: int) -> None:
        """Grow the table's capacity to `num_tokens_total` tokens; all or nothing."""
        table.blocks.extend(self.allocate(self.blocks_needed(table, num_tokens_total)))

    def append_prefix(self, table: BlockTable, blocks: Sequence[int], num_tokens: int) -> None:
        """Extend a block-aligned table (typically an empty one) with cached prefix blocks, taking a reference
        on each; `num_tokens` is how many tokens those blocks hold (the last one may be partial)."""
        self._bind(table)
        if table.num_tokens != table.capacity:
            raise ValueError("append_prefix needs a table whose blocks are exactly full")
        fits = (len(blocks) - 1) * self.block_size < num_tokens <= len(blocks) * self.block_size
        if not (fits if blocks else num_tokens == 0):
            raise ValueError(f"{num_tokens} tokens do not fill exactly {len(blocks)} blocks")
        for b in blocks:
            self.incref(b)
        table.blocks.extend(blocks)
        table.num_tokens += num_tokens

    def fork(self, table: BlockTable) -> BlockTable:
        """A new table sharing every block of `table` (parallel sampling, beam search); writes copy on demand."""
        self._bind(table)
        for b in table.blocks:
            self.incref(b)
        return BlockTable(list(table.blocks), table.num_tokens, self.block_size)

    def write_blocks_needed(self, table: BlockTable, start_pos: int, num_tokens: int) -> int:
        """Blocks `prepare_write(table, start_pos, num_tokens)` would allocate (growth plus private copies)."""
        end = start_pos + num_tokens
        return self.blocks_needed(table, end) + len(self._shared_in_range(table, start_pos, end))

    def prepare_write(self, table: BlockTable, start_pos: int, num_tokens: int) -> list[tuple[int, int]]:
        """Make positions [start_pos, start_pos + num_tokens) writable by this table alone; all or nothing.

        Reserves missing capacity, and replaces every block in the range that is shared (refcount > 1) with a
        fresh private one, dropping this table's reference on the old. Returns the `(src, dst)` block copies the
        runner must perform before writing: only for replaced blocks holding tokens outside the written range
        (a shared block that the write fully covers, or that holds nothing yet, is replaced without a copy).
        Marks the range as filled (`num_tokens` grows to its end).
        """
        self._bind(table)
        if not 0 <= start_pos <= table.num_tokens:
            raise ValueError(f"write at {start_pos} would leave a hole after {table.num_tokens} tokens")
        if num_tokens <= 0:
            return []
        end = start_pos + num_tokens
        grow = self.blocks_needed(table, end)
        shared = self._shared_in_range(table, start_pos, end)
        fresh = self.allocate(grow + len(shared))
        table.blocks.extend(fresh[:grow])
        copies = []
        bs = self.block_size
        for i, dst in zip(shared, fresh[grow:]):
            src = table.blocks[i]
            lo, hi = i * bs, min((i + 1) * bs, table.num_tokens)  # filled slots of block i
            if lo < start_pos or hi > end:  # some filled slot survives the write
                copies.append((src, dst))
            table.blocks[i] = dst
            self.decref(src)
        table.num_tokens = max(table.num_tokens, end)
        return copies

    def truncate(self, table: BlockTable, num_tokens: int) -> None:
        """Forget tokens from `num_tokens` on (speculative-decoding rollback, beam pruning) and release the
        blocks no longer needed, reserved spare capacity included."""
        self._bind(table)
        if not 0 <= num_tokens <= table.num_tokens:
            raise ValueError(f"cannot truncate {table.num_tokens} tokens to {num_tokens}")
        keep = -(-num_tokens // self.block_size)
        for b in table.blocks[keep:]:
            self.decref(b)
        del table.blocks[keep:]
        table.num_tokens = num_tokens

    def free(self, table: BlockTable) -> None:
        """Release every block of the table and leave it empty (reusable)."""
        self.truncate(table, 0)

    # ------------------------------------------------------------------ helpers

    def _bind(self, table: BlockTable) -> None:
        if table.block_size != self.block_size:
            if table.block_size:
                raise ValueError(f"table of block size {table.block_size} used with a {self.block_size} pool")
            table.block_size = self.block_size

    def _shared_in_range(self, table: BlockTable, start: int, end: int) -> list[int]:
        """Indices of the table's existing blocks overlapping [start, end) that someone else also holds."""
        if end <= start:
            return []
        first, last = start // self.block_size, min((end - 1) // self.block_size, len(table.blocks) - 1)
        return [i for i in range(first, last + 1) if self._refcount[table.blocks[i]] > 1]
