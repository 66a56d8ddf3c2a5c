"""BlockManager and BlockTable: allocation, sharing, copy-on-write, truncation, all-or-nothing failures."""

from __future__ import annotations

import pytest

from nbllm.engine.block_manager import BlockManager, BlockTable, NoFreeBlocks


def state(bm: BlockManager, *tables: BlockTable) -> tuple:
    return (bm.num_free_blocks, [bm.refcount(b) for b in range(bm.num_blocks)],
            [(list(t.blocks), t.num_tokens) for t in tables])


def test_allocate_and_release():
    bm = BlockManager(4, 16)
    assert (bm.num_free_blocks, bm.num_used_blocks) == (4, 0)
    blocks = bm.allocate(3)
    assert blocks == [0, 1, 2] and all(bm.refcount(b) == 1 for b in blocks)
    assert (bm.num_free_blocks, bm.num_used_blocks) == (1, 3)
    bm.incref(1)
    bm.decref(1)
    assert bm.refcount(1) == 1
    for b in blocks:
        bm.decref(b)
    assert bm.num_used_blocks == 0 and bm.allocate(0) == []


def test_allocate_is_all_or_nothing():
    bm = BlockManager(3, 4)
    bm.allocate(2)
    before = state(bm)
    with pytest.raises(NoFreeBlocks) as err:
        bm.allocate(2)
    assert (err.value.needed, err.value.available) == (2, 1)
    assert state(bm) == before


def test_refcount_misuse_is_loud():
    bm = BlockManager(2, 4)
    with pytest.raises(ValueError):
        bm.decref(0)
    with pytest.raises(ValueError):
        bm.incref(0)
    with pytest.raises(ValueError):
        bm.allocate(-1)


def test_reserve_and_slots():
    bm = BlockManager(8, 4)
    t = BlockTable()
    assert bm.blocks_needed(t, 9) == 3 and bm.can_reserve(t, 9)
    bm.reserve(t, 9)
    assert t.block_size == 4 and len(t.blocks) == 3 and t.num_tokens == 0 and t.capacity == 12
    assert bm.blocks_needed(t, 12) == 0 and bm.blocks_needed(t, 13) == 1
    bm.reserve(t, 5)  # already enough: nothing changes
    assert len(t.blocks) == 3
    assert [t.slot(p) for p in (0, 3, 4, 11)] == [t.blocks[0] * 4, t.blocks[0] * 4 + 3, t.blocks[1] * 4,
                                                  t.blocks[2] * 4 + 3]
    with pytest.raises(IndexError):
        t.slot(12)


def test_reserve_is_all_or_nothing():
    bm = BlockManager(4, 4)
    t = BlockTable()
    bm.prepare_write(t, 0, 6)
    before = state(bm, t)
    assert not bm.can_reserve(t, 6 + 4 * 3)
    with pytest.raises(NoFreeBlocks):
        bm.reserve(t, 6 + 4 * 3)
    assert state(bm, t) == before


def test_table_bound_to_one_block_size():
    t = BlockTable()
    BlockManager(4, 4).reserve(t, 1)
    with pytest.raises(ValueError):
        BlockManager(4, 8).reserve(t, 1)


def test_fork_shares_every_block():
    bm = BlockManager(8, 4)
    t = BlockTable()
    bm.prepare_write(t, 0, 6)
    child = bm.fork(t)
    assert child.blocks == t.blocks and child.blocks is not t.blocks and child.num_tokens == 6
    assert all(bm.refcount(b) == 2 for b in t.blocks)
    assert bm.num_used_blocks == 2


def test_cow_copies_only_the_shared_partial_block():
    bm = BlockManager(8, 4)
    parent = BlockTable()
    bm.prepare_write(parent, 0, 6)  # blocks: one full, one holding 2 tokens
    full, partial = parent.blocks
    child = bm.fork(parent)
    copies = bm.prepare_write(child, 6, 1)  # decode one token into the shared partial block
    assert copies == [(partial, child.blocks[1])] and child.blocks[1] != partial
    assert child.blocks[0] == full and bm.refcount(full) == 2  # the full block stays shared
    assert bm.refcount(partial) == 1 and bm.refcount(child.blocks[1]) == 1
    assert child.num_tokens == 7 and parent.num_tokens == 6
    # the parent's block is now its own: writing into it copies nothing
    assert bm.prepare_write(parent, 6, 1) == [] and parent.blocks[1] == partial
    # the child's next block is fresh, so crossing into it copies nothing either
    assert bm.prepare_write(child, 7, 2) == [] and len(child.blocks) == 3


def test_cow_on_block_boundary_needs_no_copy():
    bm = BlockManager(8, 4)
    parent = BlockTable()
    bm.prepare_write(parent, 0, 8)
    child = bm.fork(parent)
    assert bm.prepare_write(child, 8, 3) == []
    assert child.blocks[:2] == parent.blocks and len(child.blocks) == 3


def test_cow_replaces_shared_empty_reserved_block_without_copy():
    bm = BlockManager(8, 4)
    parent = BlockTable()
    bm.prepare_write(parent, 0, 4)
    bm.reserve(parent, 8)  # a spare block, shared by the fork below though it holds nothing
    child = bm.fork(parent)
    spare = parent.blocks[1]
    assert bm.prepare_write(child, 4, 1) == []
    assert child.blocks[1] != spare and bm.refcount(spare) == 1


def test_cow_overwrite_inside_shared_blocks():
    bm = BlockManager(8, 4)
    parent = BlockTable()
    bm.prepare_write(parent, 0, 10)
    child = bm.fork(parent)
    old = list(child.blocks)
    # overwrite positions 2..5: blocks 0 and 1 are shared and keep other filled slots -> both copied
    copies = bm.prepare_write(child, 2, 4)
    assert copies == [(old[0], child.blocks[0]), (old[1], child.blocks[1])]
    assert child.blocks[2] == old[2] and child.num_tokens == 10
    # a write covering all of a shared block's filled slots replaces it without a copy
    grand = bm.fork(child)
    assert bm.prepare_write(grand, 4, 6) == [] and grand.blocks[1] != child.blocks[1]


def test_prepare_write_is_all_or_nothing():
    bm = BlockManager(4, 4)
    parent = BlockTable()
    bm.prepare_write(parent, 0, 6)
    child = bm.fork(parent)
    bm.allocate(2)  # one free block left; writing 6..9 needs a CoW copy and a new block
    assert bm.write_blocks_needed(child, 6, 4) == 2
    before = state(bm, parent, child)
    with pytest.raises(NoFreeBlocks):
        bm.prepare_write(child, 6, 4)
    assert state(bm, parent, child) == before


def test_prepare_write_rejects_holes():
    bm = BlockManager(4, 4)
    t = BlockTable()
    with pytest.raises(ValueError):
        bm.prepare_write(t, 1, 1)
    assert bm.prepare_write(t, 0, 0) == [] and t.blocks == []


def test_truncate_releases_trailing_blocks():
    bm = BlockManager(8, 4)
    t = BlockTable()
    bm.prepare_write(t, 0, 10)
    bm.reserve(t, 16)
    child = bm.fork(t)
    bm.truncate(t, 5)
    assert len(t.blocks) == 2 and t.num_tokens == 5
    assert [bm.refcount(b) for b in child.blocks] == [2, 2, 1, 1]  # the fork still holds the tail
    bm.truncate(t, 0)
    assert t.blocks == [] and bm.num_used_blocks == 4
    with pytest.raises(ValueError):
        bm.truncate(child, 11)


def test_free_empties_the_table():
    bm = BlockManager(8, 4)
    t = BlockTable()
    bm.prepare_write(t, 0, 9)
    bm.free(t)
    assert t.blocks == [] and t.num_tokens == 0 and bm.num_used_blocks == 0
    bm.prepare_write(t, 0, 1)  # reusable
    assert t.num_tokens == 1


def test_append_prefix_takes_references():
    bm = BlockManager(8, 4)
    owner = BlockTable()
    bm.prepare_write(owner, 0, 8)
    t = BlockTable()
    bm.append_prefix(t, owner.blocks, 8)
    assert t.blocks == owner.blocks and t.num_tokens == 8 and all(bm.refcount(b) == 2 for b in t.blocks)
    bm.append_prefix(t, [], 0)
    with pytest.raises(ValueError):
        bm.append_prefix(BlockTable(), owner.blocks, 4)  # 4 tokens do not reach the second block
    with pytest.raises(ValueError):
        bm.append_prefix(BlockTable(), [], 3)
    partial = BlockTable()
    bm.prepare_write(partial, 0, 3)
    with pytest.raises(ValueError):
        bm.append_prefix(partial, owner.blocks, 8)  # would leave a gap inside the partial block


def test_share_listener_sees_one_two_crossings():
    bm = BlockManager(4, 4)
    events = []
    bm.set_share_listener(lambda b, shared: events.append((b, shared)))
    (b,) = bm.allocate(1)
    bm.incref(b)
    bm.incref(b)
    bm.decref(b)
    bm.decref(b)
    bm.decref(b)
    assert events == [(b, True), (b, False)]
