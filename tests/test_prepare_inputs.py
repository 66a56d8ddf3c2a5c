"""`prepare_inputs`: the decode fast path builds exactly the general path's arrays, and `BlockTable.array` (the
cached block ids it reads) follows every change the block manager makes to a table."""

from __future__ import annotations

import random

import numpy as np
import pytest

from nbllm import SamplingParams
from nbllm.engine.block_manager import BlockManager, BlockTable
from nbllm.engine.model_runner import StepInputs, _prepare_decode, _prepare_general, prepare_inputs
from nbllm.engine.outputs import RequestMetrics
from nbllm.engine.scheduler import ScheduledBatch
from nbllm.engine.sequence import Request, Sequence

BLOCK = 4


def sequence(manager: BlockManager, length: int, rng: random.Random, *, fork_of: Sequence | None = None) -> Sequence:
    """A sequence of `length` tokens whose first `length - 1` have K/V, with its next slot reserved (a decode's
    state after scheduling); a fork shares its parent's blocks, as n > 1 requests do."""
    tokens = [rng.randrange(320) for _ in range(length)]
    table = BlockTable()
    if fork_of is not None:
        table = manager.fork(fork_of.table)
        tokens = fork_of.token_ids[:-1] + [-1 - rng.randrange(8)]  # an overlap placeholder as its last id
        length = len(tokens)
    else:
        manager.prepare_write(table, 0, length - 1)
    request = Request("r", None, tokens[:1], SamplingParams(), RequestMetrics(arrival_time=0.0, prompt_tokens=1))
    seq = Sequence(request=request, index=0, token_ids=tokens, table=table, generator=None, detokenizer=None,
                   stop_checker=None, num_computed=length - 1)
    manager.prepare_write(seq.table, length - 1, 1)
    return seq


def assert_same(got: StepInputs, want: StepInputs) -> None:
    for name in ("ids", "positions", "slots", "cu_query_lens", "context_lens", "block_tables"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        np.testing.assert_array_equal(a, b, err_msg=name)
    assert got.logit_rows == want.logit_rows
    assert [id(s) for s in got.ready] == [id(s) for s in want.ready]


@pytest.mark.parametrize("batch_size", [1, 2, 7, 64])
def test_decode_path_equals_the_general_path(batch_size: int) -> None:
    rng = random.Random(batch_size)
    manager = BlockManager(4096, BLOCK)
    seqs: list[Sequence] = []
    for _ in range(batch_size):  # lengths on and around block edges, some forks sharing blocks
        parent = seqs[-1] if seqs and rng.random() < 0.3 else None
        seqs.append(sequence(manager, rng.choice([1, 2, BLOCK, BLOCK + 1, rng.randint(2, 60)]), rng,
                             fork_of=parent))
    batch = ScheduledBatch(seqs=[(s, 1) for s in seqs])
    want = _prepare_general(batch, BLOCK)
    assert want.is_decode
    assert_same(_prepare_decode(batch, BLOCK), want)
    assert_same(prepare_inputs(batch, BLOCK), want)


def test_steps_that_are_not_all_decodes_take_the_general_path() -> None:
    rng = random.Random(0)
    manager = BlockManager(256, BLOCK)
    decode = sequence(manager, 9, rng)
    prefill = sequence(manager, 12, rng)
    prefill.num_computed = 5  # a prompt chunk of 7 tokens still to compute
    drafted = sequence(manager, 6, rng)
    drafted.spec_token_ids = [3, 4]
    manager.prepare_write(drafted.table, 6, 2)
    for batch in (ScheduledBatch(seqs=[(decode, 1), (prefill, 7)]), ScheduledBatch(seqs=[(drafted, 3), (decode, 1)])):
        assert_same(prepare_inputs(batch, BLOCK), _prepare_general(batch, BLOCK))
        assert not prepare_inputs(batch, BLOCK).is_decode


def test_block_table_array_follows_every_change() -> None:
    """Growth, copy-on-write replacement, truncation and freeing all show in the next `array()`."""
    manager = BlockManager(64, BLOCK)
    table = BlockTable()

    def check() -> None:
        np.testing.assert_array_equal(table.array(), np.asarray(table.blocks, dtype=np.int32))
        assert table.array().dtype == np.int32

    check()
    manager.prepare_write(table, 0, 6)
    check()
    child = manager.fork(table)
    manager.prepare_write(table, 6, 1)  # the shared partial block is copied: same length, another id
    assert table.blocks != child.blocks
    check()
    manager.prepare_write(table, 7, 5)
    check()
    manager.truncate(table, 3)
    check()
    manager.free(table)
    check()
    assert table.array().shape == (0,)
