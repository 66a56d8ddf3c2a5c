"""The host tier of the prefix cache (`nbllm.engine.kv_offload`): evicted prefixes move to host RAM and come back.

Unit level, the radix cache runs over a real `HostKVPool` whose "device" pool is a small tensor pool holding
each slot's token id, so every offload and restore is checked by what the blocks then hold. A hypothesis state
machine drives random requests, writes, evictions and restores under a tiny device and host pool and checks the
invariants after every step. Engine level, greedy outputs with the tier equal those without it and the
unpaged reference, under forced eviction, preemption and a full host pool, with no block leaked in either pool.
"""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from nbllm import LLM, NbllmError, SamplingParams
from nbllm.engine.block_manager import BlockManager, BlockTable, NoFreeBlocks
from nbllm.engine.kv_offload import HostKVPool
from nbllm.engine.model_runner import KVPool
from nbllm.engine.radix_cache import RadixCache
from nbllm.models.reference import greedy_generate

from engine_helpers import assert_no_leak, make_llm

BS = 2


class TokenPool:
    """A stand-in for the device `KVPool`: two layers whose slots hold token ids (V = -K, to tell them apart)."""

    def __init__(self, num_blocks: int) -> None:
        self.k = [torch.full((num_blocks, BS, 1, 1), -1.0) for _ in range(2)]
        self.v = [torch.full((num_blocks, BS, 1, 1), 1.0) for _ in range(2)]

    def write(self, table: BlockTable, pos: int, tokens: list[int]) -> None:
        for p, tok in enumerate(tokens, start=pos):
            b, off = divmod(table.slot(p), BS)
            for k, v in zip(self.k, self.v):
                k[b, off] = tok
                v[b, off] = -tok

    def read(self, pool_k: list[torch.Tensor], pool_v: list[torch.Tensor], block: int) -> list[int]:
        """A block's tokens, checked identical in every layer and between K and V."""
        rows = [k[block].flatten().tolist() for k in pool_k] + [(-v[block]).flatten().tolist() for v in pool_v]
        assert all(r == rows[0] for r in rows)
        return [int(t) for t in rows[0]]


def setup(device_blocks: int, host_blocks: int) -> tuple[BlockManager, RadixCache, TokenPool, HostKVPool]:
    bm = BlockManager(device_blocks, BS)
    pool = TokenPool(device_blocks)
    host = HostKVPool(pool, host_blocks)
    return bm, RadixCache(bm, host), pool, host


def finish(bm: BlockManager, cache: RadixCache, pool: TokenPool, tokens: list[int]) -> None:
    """Compute `tokens` into a fresh table (evicting for room as the scheduler does), cache it and free the
    table, as a finished request does."""
    t = BlockTable()
    cache.evict(bm.blocks_needed(t, len(tokens)) - bm.num_free_blocks)
    bm.prepare_write(t, 0, len(tokens))
    pool.write(t, 0, tokens)
    cache.insert(tokens, t.blocks)
    bm.free(t)


def device_tokens(pool: TokenPool, blocks: tuple[int, ...]) -> list[int]:
    return [t for b in blocks for t in pool.read(pool.k, pool.v, b)]


# ---------------------------------------------------------------------------------------------------- unit level


def test_host_pool_copies_round_trip():
    pool = TokenPool(4)
    t = BlockTable()
    BlockManager(4, BS).prepare_write(t, 0, 8)
    pool.write(t, 0, list(range(10, 18)))
    host = HostKVPool(pool, 3)
    assert (host.num_free_blocks, host.num_used_blocks) == (3, 0)
    h = host.allocate(2)
    host.save([2, 0], h)
    assert [pool.read(host.k, host.v, b) for b in h] == [[14, 15], [10, 11]]
    host.load(h, [3, 1])
    assert device_tokens(pool, (3, 1)) == [14, 15, 10, 11]
    with pytest.raises(NoFreeBlocks):
        host.allocate(2)
    host.free(h)
    assert host.num_free_blocks == 3


def test_evicted_prefix_moves_to_host_and_comes_back():
    bm, cache, pool, host = setup(8, 8)
    tokens = list(range(1, 9))  # four blocks
    finish(bm, cache, pool, tokens)
    assert cache.evict(3) == 3
    assert bm.num_used_blocks == 1 and host.num_used_blocks == 3  # the tail went to host RAM
    m = cache.match_prefix(tokens)
    assert (m.num_tokens, m.host_tokens, len(m.blocks)) == (2, 6, 1)
    restored = cache.load_prefix(tokens + [99])
    assert (restored.num_tokens, restored.host_tokens) == (8, 0)
    assert device_tokens(pool, restored.blocks) == tokens
    assert host.num_used_blocks == 0 and cache.restored_blocks == 3 and cache.offloaded_blocks == 3
    cache.reset()
    assert bm.num_used_blocks == 0


def test_restore_evicts_other_prefixes_to_host_for_room():
    bm, cache, pool, host = setup(4, 8)
    a, b = [1, 1, 2, 2, 3, 3, 4, 4], [5, 5, 6, 6, 7, 7, 8, 8]
    finish(bm, cache, pool, a)
    finish(bm, cache, pool, b)  # needs the whole pool: a goes to host
    assert cache.match_prefix(a).host_tokens == 8 and cache.match_prefix(b).num_tokens == 8
    m = cache.load_prefix(a)  # brings a back, pushing b out
    assert device_tokens(pool, m.blocks) == a and m.host_tokens == 0
    assert cache.match_prefix(b).host_tokens == 8
    assert device_tokens(pool, cache.load_prefix(b).blocks) == b


def test_restore_stops_at_what_fits_and_keeps_the_matched_path():
    bm, cache, pool, host = setup(5, 8)
    shared, tail = [1, 1, 2, 2], [3, 3, 4, 4, 5, 5]
    finish(bm, cache, pool, shared + tail)
    cache.evict(3)  # the tail goes to host
    live = BlockTable()
    bm.append_prefix(live, cache.match_prefix(shared).blocks, 4)  # a request pins the shared part
    bm.prepare_write(live, 4, 4)  # and takes two more blocks: one device block left free
    m = cache.load_prefix(shared + tail)
    assert (m.num_tokens, m.host_tokens) == (6, 4)  # one of three tail blocks fits
    assert device_tokens(pool, m.blocks) == (shared + tail)[:6]
    bm.free(live)
    m = cache.load_prefix(shared + tail)
    assert (m.num_tokens, m.host_tokens) == (10, 0) and device_tokens(pool, m.blocks) == shared + tail


def test_full_host_pool_evicts_its_least_recent_leaf():
    bm, cache, pool, host = setup(2, 2)
    a, b, c = [1, 1, 2, 2], [3, 3, 4, 4], [5, 5, 6, 6]
    finish(bm, cache, pool, a)
    finish(bm, cache, pool, b)  # a -> host
    finish(bm, cache, pool, c)  # b -> host: the host pool is full, so a (least recent) is deleted
    assert cache.match_prefix(a).num_tokens + cache.match_prefix(a).host_tokens == 0
    assert cache.match_prefix(b).host_tokens == 4 and cache.match_prefix(c).num_tokens == 4
    assert host.num_used_blocks == 2


def test_leaf_larger_than_host_pool_is_dropped():
    bm, cache, pool, host = setup(4, 1)
    finish(bm, cache, pool, list(range(1, 9)))
    assert cache.evict(4) == 4
    assert bm.num_used_blocks == 0 and host.num_used_blocks == 1  # the head block went to host, the rest dropped
    m = cache.match_prefix(list(range(1, 9)))
    assert (m.num_tokens, m.host_tokens) == (0, 2)
    assert device_tokens(pool, cache.load_prefix(list(range(1, 9))).blocks) == [1, 2]


def test_insert_over_a_host_span_adopts_the_callers_blocks():
    bm, cache, pool, host = setup(6, 4)
    tokens = [1, 1, 2, 2, 3, 3]
    finish(bm, cache, pool, tokens)
    cache.evict(3)
    assert host.num_used_blocks == 3
    t = BlockTable()
    bm.prepare_write(t, 0, 8)  # the same tokens computed again, plus one more block
    pool.write(t, 0, tokens + [4, 4])
    assert cache.insert(tokens + [4, 4], t.blocks) == 8
    assert host.num_used_blocks == 0
    m = cache.match_prefix(tokens + [4, 4])
    assert m.blocks == tuple(t.blocks) and m.host_tokens == 0
    bm.free(t)
    cache.reset()
    assert bm.num_used_blocks == 0


# ---------------------------------------------------------------------------------------------------- state machine

DEVICE_BLOCKS, HOST_BLOCKS, MAX_SEQS = 12, 5, 4
tokens_st = st.lists(st.integers(0, 1), max_size=9)


class OffloadMachine(RuleBasedStateMachine):
    """Requests start from cached prefixes (restoring host-resident parts), write, finish into the cache and free;
    evictions push leaves to the small host pool. The KV each block holds is checked against the tree."""

    def __init__(self) -> None:
        super().__init__()
        self.bm, self.radix, self.pool, self.host = setup(DEVICE_BLOCKS, HOST_BLOCKS)
        self.seqs: list[tuple[BlockTable, list[int]]] = []

    def write(self, table: BlockTable, tokens: list[int], new: list[int]) -> bool:
        try:
            copies = self.bm.prepare_write(table, len(tokens), len(new))
        except NoFreeBlocks:
            return False
        for src, dst in copies:
            for cache in (*self.pool.k, *self.pool.v):
                cache[dst] = cache[src]
        self.pool.write(table, len(tokens), new)
        tokens.extend(new)
        return True

    def paths(self) -> list[tuple[tuple[int, ...], object]]:
        """Every node with the full token path down to the end of its edge."""
        out, stack = [], [()]
        for v in self.radix.nodes():
            del stack[v.depth :]
            stack.append(stack[-1] + v.token_ids)
            out.append((stack[-1], v))
        return out

    def expected_match(self, prompt: list[int]) -> int:
        """Tokens of the longest cached (either tier) block-aligned prefix of `prompt`."""
        best = 0
        for path, v in self.paths():
            for j in range(len(v.token_ids) // BS):
                end = v.prefix_len + (j + 1) * BS
                if tuple(prompt[:end]) == path[:end]:
                    best = max(best, end)
        return best

    @precondition(lambda self: len(self.seqs) < MAX_SEQS)
    @rule(prompt=tokens_st, base=st.integers(0, 50), restore=st.booleans())
    def start(self, prompt: list[int], base: int, restore: bool) -> None:
        paths = self.paths()
        if paths and base % 3:
            prompt = list(paths[base % len(paths)][0]) + prompt
        expected = self.expected_match(prompt)
        m = self.radix.load_prefix(prompt) if restore else self.radix.match_prefix(prompt)
        assert m.num_tokens + m.host_tokens == expected
        assert m.num_tokens == len(m.blocks) * BS
        assert device_tokens(self.pool, m.blocks) == prompt[: m.num_tokens]
        table = BlockTable()
        self.bm.append_prefix(table, m.blocks, m.num_tokens)
        tokens = prompt[: m.num_tokens]
        self.seqs.append((table, tokens))
        self.write(table, tokens, prompt[m.num_tokens :])

    @precondition(lambda self: self.seqs)
    @rule(i=st.integers(0, MAX_SEQS), new=st.lists(st.integers(0, 1), min_size=1, max_size=4))
    def decode(self, i: int, new: list[int]) -> None:
        table, tokens = self.seqs[i % len(self.seqs)]
        self.write(table, tokens, new)

    @precondition(lambda self: self.seqs)
    @rule(i=st.integers(0, MAX_SEQS), keep=st.booleans())
    def finish(self, i: int, keep: bool) -> None:
        table, tokens = self.seqs.pop(i % len(self.seqs))
        if keep:
            self.radix.insert(tokens, table.blocks)
        self.bm.free(table)

    @rule(n=st.integers(0, 6))
    def evict(self, n: int) -> None:
        evictable = self.radix.evictable_blocks()
        assert self.radix.evict(n) == min(n, evictable)

    @rule(dice=st.integers(0, 9))
    def reset(self, dice: int) -> None:
        if not dice:
            self.radix.reset()
            assert self.host.num_used_blocks == 0 and list(self.radix.nodes()) == []

    @invariant()
    def blocks_are_accounted(self) -> None:
        holders = [0] * DEVICE_BLOCKS
        for table, tokens in self.seqs:
            assert device_tokens(self.pool, tuple(table.blocks))[: len(tokens)] == tokens
            for b in table.blocks:
                holders[b] += 1
        host_blocks = []
        for _, v in self.paths():
            for b in v.blocks:
                holders[b] += 1
            host_blocks += v.host_blocks
        assert [self.bm.refcount(b) for b in range(DEVICE_BLOCKS)] == holders
        assert self.bm.num_used_blocks == sum(1 for h in holders if h)
        assert len(set(host_blocks)) == len(host_blocks) == self.host.num_used_blocks
        assert self.radix.host_cached_blocks() == len(host_blocks)

    @invariant()
    def tree_holds_its_paths_in_either_tier(self) -> None:
        views = self.paths()
        evictable = 0
        for i, (path, v) in enumerate(views):
            on_host = bool(v.host_blocks)
            assert (len(v.host_blocks) if on_host else len(v.blocks)) * BS == len(v.token_ids)
            own = [self.pool.read(self.host.k, self.host.v, b) for b in v.host_blocks] if on_host else \
                [self.pool.read(self.pool.k, self.pool.v, b) for b in v.blocks]
            assert [t for block in own for t in block] == list(path[v.prefix_len :])
            subtree = [v]
            for _, w in views[i + 1 :]:
                if w.depth <= v.depth:
                    break
                subtree.append(w)
                assert w.host_blocks or not on_host  # below a host-resident node, everything is on host
            if not on_host and all(rc == 1 for w in subtree for rc in w.refcounts):
                evictable += len(v.blocks)
        assert self.radix.evictable_blocks() == evictable

    def teardown(self) -> None:
        for table, _ in self.seqs:
            self.bm.free(table)
        self.radix.reset()
        assert self.bm.num_used_blocks == 0 and self.host.num_used_blocks == 0


TestOffloadMachine = OffloadMachine.TestCase
TestOffloadMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


# ---------------------------------------------------------------------------------------------------- engine level

MAX_NEW = 8
GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)


@pytest.fixture(scope="module")
def tiny_llama(tiny_model):
    path, _ = tiny_model("llama", "f32")
    return path


@pytest.fixture(scope="module")
def roomy(tiny_llama):
    """An engine with room for everything: the reference outputs and the model's block size in bytes."""
    return make_llm(tiny_llama)


def host_gb(llm, blocks: int) -> float:
    """`kv_offload_gb` for a host tier of exactly `blocks` blocks."""
    per_block = KVPool.bytes_per_block(llm.model.config, 16, torch.float32)
    return (blocks + 0.5) * per_block / 2**30


def conversations(n: int, turns: int, *, seed: int) -> list[list[list[int]]]:
    """`n` conversations of `turns` user turns each (token ids), to be continued with the model's answers."""
    rng = random.Random(seed)
    return [[[rng.randrange(3, 320) for _ in range(rng.randint(20, 40))] for _ in range(turns)] for _ in range(n)]


def chat(llm, convs: list[list[list[int]]]) -> list[list[int]]:
    """Run the conversations turn by turn, all conversations' turn t in one batch; each prompt is the whole
    history. Returns every answer in order."""
    history = [[1] for _ in convs]
    answers = []
    for t in range(len(convs[0])):
        for h, conv in zip(history, convs):
            h.extend(conv[t])
        outs = llm.generate([list(h) for h in history], GREEDY)
        for h, out in zip(history, outs):
            h.extend(out.outputs[0].token_ids)
            answers.append(out.outputs[0].token_ids)
    return answers


def assert_no_leak_in_either_pool(llm) -> None:
    assert_no_leak(llm)
    assert llm.stats()["kv_host_blocks_used"] == 0


def test_multi_turn_restores_instead_of_prefilling(tiny_llama, roomy) -> None:
    convs = conversations(6, 3, seed=0)
    reference = chat(roomy, convs)
    runs = {}
    for on in (False, True):
        # 24 blocks: each turn's batch fits, but earlier conversations' histories do not stay on the device.
        llm = make_llm(tiny_llama, kv_cache_tokens=16 * 24, kv_offload_gb=host_gb(roomy, 64) if on else 0)
        assert chat(llm, convs) == reference
        runs[on] = llm.stats()
        if on:
            assert_no_leak_in_either_pool(llm)
    off, on = runs[False], runs[True]
    assert on["kv_host_blocks_offloaded"] > 0 and on["kv_host_blocks_restored"] > 0
    assert on["kv_host_tokens_restored"] == 16 * on["kv_host_blocks_restored"]
    saved = off["prompt_tokens"] - off["cached_prompt_tokens"] - (on["prompt_tokens"] - on["cached_prompt_tokens"])
    assert saved >= on["kv_host_tokens_restored"] // 2 > 0
    assert off["kv_host_blocks_total"] == 0 and on["kv_host_blocks_total"] == 64


def test_preemption_with_host_tier_keeps_outputs(tiny_llama, roomy) -> None:
    rng = random.Random(3)
    batch = [[1] + [rng.randrange(3, 320) for _ in range(rng.randint(20, 60))] for _ in range(16)]
    llm = make_llm(tiny_llama, kv_cache_tokens=16 * 12, kv_offload_gb=host_gb(roomy, 16))
    outs = llm.generate(batch, GREEDY)
    assert llm.stats()["preemptions"] > 0
    assert [o.outputs[0].token_ids for o in outs] == \
        [greedy_generate(roomy.model, p, MAX_NEW, roomy.tokenizer.eos_token_ids) for p in batch]
    assert_no_leak_in_either_pool(llm)


def test_tiny_host_pool_keeps_outputs(tiny_llama, roomy) -> None:
    convs = conversations(4, 3, seed=1)
    llm = make_llm(tiny_llama, kv_cache_tokens=16 * 20, kv_offload_gb=host_gb(roomy, 2))
    assert chat(llm, convs) == chat(roomy, convs)
    stats = llm.stats()
    assert stats["kv_host_blocks_total"] == 2 and stats["kv_host_blocks_offloaded"] > 2
    assert_no_leak_in_either_pool(llm)


@pytest.mark.parametrize("options", [dict(kv_offload_gb=-1.0),
                                     dict(kv_offload_gb=0.1, enable_prefix_caching=False),
                                     dict(kv_offload_gb=0.1, tensor_parallel_size=2)],
                         ids=["negative", "no-prefix-cache", "tensor-parallel"])
def test_bad_offload_options_are_clear_errors(tiny_llama, options) -> None:
    with pytest.raises(NbllmError, match="kv_offload_gb"):
        make_llm(tiny_llama, **options)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_host_tier_pins_and_keeps_outputs(tiny_llama) -> None:
    """On CUDA the host pool is pinned and copies cross the bus (with overlap scheduling on); greedy answers equal
    a CUDA engine whose pool holds everything."""
    roomy = LLM(tiny_llama, device="cuda", dtype=torch.float32, kv_cache_tokens=4096)
    llm = LLM(tiny_llama, device="cuda", dtype=torch.float32, kv_cache_tokens=16 * 24,
              kv_offload_gb=host_gb(roomy, 64))
    assert llm.engine.host_kv.k[0].is_pinned()
    convs = conversations(6, 3, seed=0)
    assert chat(llm, convs) == chat(roomy, convs)
    assert llm.stats()["kv_host_blocks_restored"] > 0
    assert_no_leak_in_either_pool(llm)
