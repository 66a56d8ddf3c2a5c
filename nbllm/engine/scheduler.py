"""Which sequences run this step, and with how many tokens: continuous batching over a paged KV cache.

Every step has a token budget (`max_num_batched_tokens`). Running sequences go first (decode first: each needs
one token, plus its speculative draft tokens if any; a sequence still in chunked prefill takes what is left of
the budget), then waiting sequences are admitted while budget, sequence slots and KV blocks last. A sequence's
prompt may be split over several steps (chunked prefill), so a long prompt never stalls the decoding of others
for long.

Admission is cache-aware, as in SGLang: the waiting sequence with the longest cached prefix goes first (its
prefill is cheapest and its blocks are at risk of eviction), plus an aging term of `aging_tokens_per_step` per
step waited, so a sequence with no cache hit waits at most `max_model_len / aging_tokens_per_step` steps
behind newcomers.

When blocks run out, the radix cache evicts least-recently-used unreferenced prefixes first (to host RAM when it
has a host tier: an admitted sequence whose prefix waits there gets it copied back instead of prefilled, and
ranks as if it were cached); if that is not enough, the most recently admitted running sequence is preempted by recompute: its blocks are released and it
goes back to waiting with all its tokens, to be prefilled again (mostly from the prefix cache) later.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from nbllm.engine.block_manager import BlockManager, NoFreeBlocks
from nbllm.engine.radix_cache import PrefixMatch, RadixCache
from nbllm.engine.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    max_model_len: int = 8192
    enable_prefix_caching: bool = True
    aging_tokens_per_step: int = 64


@dataclass
class ScheduledBatch:
    """The work of one step: `(sequence, number of new tokens)` in batch order, and KV block copies to do first.

    A sequence's new tokens are its pending ones followed by all of its `spec_token_ids` (the scheduler trims
    drafts that do not fit, so a scheduled sequence always computes its whole remaining draft).
    """

    seqs: list[tuple[Sequence, int]] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)
    num_preempted: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.seqs)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, radix: RadixCache | None) -> None:
        self.config = config
        self.blocks = block_manager
        self.radix = radix
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.step_count = 0
        self.num_preemptions = 0

    # ------------------------------------------------------------------ queues

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        seq.waiting_since_step = self.step_count
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A sequence forked from a running one (n > 1, beams): it already holds blocks."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def finish(self, seq: Sequence) -> None:
        """Release a finished or aborted sequence; its full blocks stay in the prefix cache."""
        self.cache_computed(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.table)
        seq.status = SequenceStatus.FINISHED

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ one step

    def schedule(self) -> ScheduledBatch:
        self.step_count += 1
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        running = SequenceStatus.RUNNING  # looked up once: an enum member lookup costs ~0.1 us on Python 3.11
        for seq in list(self.running):
            if budget == 0:
                break
            pending = len(seq.token_ids) - seq.num_computed
            if seq.status is not running or pending == 0:
                continue  # preempted earlier in this loop, or nothing to compute (a beam waiting for its siblings)
            drafts = seq.spec_token_ids
            n = min(pending + len(drafts), budget)
            if drafts:
                del drafts[max(0, n - pending) :]  # drafts that do not fit the budget
            while not self._reserve(seq, n, batch.copies):
                if seq.spec_token_ids:  # drop a guess before preempting anyone for it
                    n -= len(seq.spec_token_ids)
                    seq.spec_token_ids.clear()
                    continue
                victim = self._preemption_victim(exclude=seq, scheduled=batch.seqs)
                self._preempt(victim)
                batch.num_preempted += 1
                if victim is seq:
                    break
            if seq.status is running:
                batch.seqs.append((seq, n))
                budget -= n
        if batch.num_preempted == 0 and self.waiting:
            self._admit(batch, budget)
        return batch

    def _admit(self, batch: ScheduledBatch, budget: int) -> None:
        for seq in self._by_priority():
            if budget == 0 or len(self.running) >= self.config.max_num_seqs:
                break
            # Matched again here: admitting an earlier candidate may have evicted what ranking saw cached.
            match = self._cached_prefix(seq, restore=True)
            cached_tokens = match.num_tokens
            if match.blocks:
                self.blocks.append_prefix(seq.table, match.blocks, cached_tokens)
                seq.num_computed = cached_tokens
            n = min(seq.num_pending, budget)
            if not self._reserve(seq, n, batch.copies):
                self.blocks.free(seq.table)
                seq.num_computed = seq.num_offered_blocks = 0
                break
            if seq.request.metrics.first_scheduled_time is None:
                seq.request.metrics.cached_prompt_tokens = cached_tokens
            self.waiting.remove(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append((seq, n))
            budget -= n

    def _by_priority(self) -> list[Sequence]:
        """Waiting sequences, best first: cached prefix tokens + aging, then arrival order."""
        def priority(item: tuple[int, Sequence]) -> tuple[int, int]:
            order, seq = item
            waited = self.step_count - seq.waiting_since_step
            match = self._cached_prefix(seq, restore=False)
            return -(match.num_tokens + match.host_tokens + waited * self.config.aging_tokens_per_step), order

        return [seq for _, seq in sorted(enumerate(self.waiting), key=priority)]

    def _cached_prefix(self, seq: Sequence, *, restore: bool) -> PrefixMatch:
        """`seq`'s cached prefix; with `restore`, its host-resident part is first copied back to the device."""
        if self.radix is None:
            return PrefixMatch((), 0)
        # At least one token must be computed this step: it yields the logits of the next token.
        query = seq.token_ids[: seq.num_tokens - 1]
        return self.radix.load_prefix(query) if restore else self.radix.match_prefix(query)

    def _reserve(self, seq: Sequence, n: int, copies: list[tuple[int, int]]) -> bool:
        """Blocks for `seq`'s next `n` tokens, copying shared ones first; evicts cached prefixes if needed."""
        table, pos = seq.table, seq.num_computed
        if n == 1 and table.num_tokens == pos < table.capacity and \
                self.blocks.refcount(table.blocks[pos // table.block_size]) == 1:
            table.num_tokens += 1  # a decode token into a block of its own: `prepare_write` would do only this
            return True
        needed = self.blocks.write_blocks_needed(seq.table, seq.num_computed, n)
        shortfall = needed - self.blocks.num_free_blocks
        if shortfall > 0 and self.radix is not None:
            self.radix.evict(shortfall)
        try:
            copies.extend(self.blocks.prepare_write(seq.table, seq.num_computed, n))
        except NoFreeBlocks:
            return False
        return True

    def _preemption_victim(self, exclude: Sequence, scheduled: Iterable[tuple[Sequence, int]]) -> Sequence:
        """The most recently admitted running sequence not yet in this batch; `exclude` itself as a last resort."""
        in_batch = {id(s) for s, _ in scheduled}
        for seq in reversed(self.running):
            if seq is not exclude and id(seq) not in in_batch and seq.status is SequenceStatus.RUNNING:
                return seq
        return exclude

    def _preempt(self, seq: Sequence) -> None:
        self.cache_computed(seq)
        seq.spec_token_ids.clear()
        self.running.remove(seq)
        self.blocks.free(seq.table)
        seq.num_computed = seq.num_offered_blocks = 0
        self.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        seq.waiting_since_step = self.step_count - self.config.max_model_len  # first in line when it returns
        self.waiting.insert(0, seq)

    # ------------------------------------------------------------------ prefix cache

    def cache_computed(self, seq: Sequence) -> None:
        """Offer the full blocks whose K/V are computed to the prefix cache, once each block fills: inserting
        walks the whole prefix, which every decode step would otherwise pay for every sequence."""
        if self.radix is None:
            return
        full = seq.num_computed // self.blocks.block_size
        if full > seq.num_offered_blocks:
            self.radix.insert(seq.token_ids[: full * self.blocks.block_size], seq.table.blocks[:full])
            seq.num_offered_blocks = full
