"""Scheduler policy without a model: cache-aware admission order, the aging bound on waiting, token budgets."""

from __future__ import annotations

import time

from nbllm.engine.block_manager import BlockManager, BlockTable
from nbllm.engine.outputs import RequestMetrics
from nbllm.engine.radix_cache import RadixCache
from nbllm.engine.sampling_params import SamplingParams
from nbllm.engine.scheduler import Scheduler, SchedulerConfig
from nbllm.engine.sequence import Request, Sequence
from nbllm.engine.stop import StopChecker

BLOCK = 4
PREFIX = list(range(100, 132))  # 32 tokens = 8 full blocks, cached before the test starts


def make_seq(tokens: list[int], name: str) -> Sequence:
    request = Request(name, None, tokens, SamplingParams(max_tokens=1), RequestMetrics(time.perf_counter()))
    seq = Sequence(request, 0, list(tokens), BlockTable(), None, None, StopChecker([], False))  # type: ignore[arg-type]
    request.seqs.append(seq)
    return seq


def make_scheduler(aging: int) -> Scheduler:
    blocks = BlockManager(256, BLOCK)
    radix = RadixCache(blocks)
    seeded = BlockTable()
    blocks.reserve(seeded, len(PREFIX))
    radix.insert(PREFIX, seeded.blocks)
    blocks.free(seeded)
    config = SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=64, max_model_len=64, aging_tokens_per_step=aging)
    return Scheduler(config, blocks, radix)


def run_flood(scheduler: Scheduler, steps: int) -> int | None:
    """Each step, two newcomers sharing the cached prefix arrive; returns the step the uncached request is admitted."""
    victim = make_seq(list(range(500, 520)), "victim")
    scheduler.add(victim)
    counter = 0
    for step in range(1, steps + 1):
        for _ in range(2):
            counter += 1
            scheduler.add(make_seq(PREFIX + [1000 + counter, 7, 7, 7], f"r{counter}"))
        batch = scheduler.schedule()
        admitted = None
        for seq, n in batch.seqs:
            seq.num_computed += n
            if seq is victim:
                admitted = step
            if seq.num_computed == seq.num_tokens:  # max_tokens=1: done after its prompt
                scheduler.finish(seq)
        if admitted is not None:
            return admitted
    return None


def test_cached_prefix_goes_first() -> None:
    scheduler = make_scheduler(aging=8)
    cold = make_seq(list(range(500, 520)), "cold")
    warm = make_seq(PREFIX + [1, 2, 3], "warm")
    scheduler.add(cold)
    scheduler.add(warm)
    scheduler.config.max_num_seqs = 1
    batch = scheduler.schedule()
    assert [s.request.request_id for s, _ in batch.seqs] == ["warm"]
    (seq, n), = batch.seqs
    assert seq.num_computed == 32 and n == 3  # only the uncached tail is computed


def test_aging_bounds_the_wait_of_an_uncached_request() -> None:
    aging, hit = 8, len(PREFIX)
    admitted = run_flood(make_scheduler(aging), steps=60)
    # A newcomer outranks the victim only if it arrived less than hit / aging steps after it, and two arrive
    # per step while two are admitted per step: the victim waits at most hit / aging + 1 steps.
    assert admitted is not None and admitted <= hit // aging + 1, admitted


def test_without_aging_the_flood_starves_it() -> None:
    assert run_flood(make_scheduler(aging=0), steps=60) is None


def test_token_budget_splits_a_long_prompt_into_chunks() -> None:
    scheduler = make_scheduler(aging=8)
    scheduler.config.max_num_batched_tokens = 16
    seq = make_seq(list(range(600, 650)), "long")
    scheduler.add(seq)
    chunks = []
    while seq.num_computed < seq.num_tokens:
        batch = scheduler.schedule()
        (s, n), = batch.seqs
        chunks.append(n)
        s.num_computed += n
    assert chunks == [16, 16, 16, 2]
