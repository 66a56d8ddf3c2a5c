"""Paged attention against the dense reference the models are validated with (`causal_attention`).

Every batch is written into a pool the way the engine would: shuffled, non-contiguous physical blocks, prefix
blocks shared between sequences, padding slots in `store_kv`, garbage in unused block-table entries, and NaN in
every slot never written (so reading one shows up in the output).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from nbllm.kernels.paged_attention import (
    paged_attention,
    plan_paged_attention,
    run_paged_attention,
    store_kv,
)

from nbllm.models.attention import causal_attention


@dataclass
class Batch:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    cu_query_lens: torch.Tensor
    context_lens: torch.Tensor
    keys: list[torch.Tensor]  # each sequence's k, contiguous
    values: list[torch.Tensor]

    def paged(self, scale: float, window: int | None) -> torch.Tensor:
        return paged_attention(self.q, self.k_cache, self.v_cache, block_tables=self.block_tables,
                               cu_query_lens=self.cu_query_lens, context_lens=self.context_lens, scale=scale,
                               sliding_window=window)

    def dense(self, scale: float, window: int | None) -> torch.Tensor:
        """The reference in fp32 on the same (possibly bf16-rounded) values."""
        outs = []
        for i, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
            q = self.q[self.cu_query_lens[i] : self.cu_query_lens[i + 1]].float()
            outs.append(causal_attention(q, k.float(), v.float(), past=k.shape[0] - q.shape[0], scale=scale,
                                         sliding_window=window))
        return torch.cat(outs)


def make_batch(
    seqs: list[tuple[int, int]],
    *,
    block_size: int,
    heads: int,
    kv_heads: int,
    head_dim: int = 16,
    shared_blocks: int = 0,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Batch:
    """A pool holding `seqs` = [(context_len, num_queries)], stored through `store_kv` as an engine would.

    The first `shared_blocks` full blocks of every sequence long enough are one physical copy of a common
    prefix (as the radix cache shares them); the rest are shuffled over a pool with spare blocks.
    """
    gen = torch.Generator().manual_seed(seed)
    prefix_len = shared_blocks * block_size
    prefix_k = torch.randn(prefix_len, kv_heads, head_dim, generator=gen).to(dtype)
    prefix_v = torch.randn(prefix_len, kv_heads, head_dim, generator=gen).to(dtype)
    own_blocks = [-(-ctx // block_size) - (shared_blocks if ctx > prefix_len else 0) for ctx, _ in seqs]
    num_blocks = shared_blocks + sum(own_blocks) + 3
    physical = torch.randperm(num_blocks, generator=gen).tolist()
    shared, physical = physical[:shared_blocks], physical[shared_blocks:]
    max_blocks = max(-(-ctx // block_size) for ctx, _ in seqs) + 2
    # Unused entries hold garbage, including out-of-range ids: the kernel must never read them.
    block_tables = torch.randint(-5, num_blocks + 100, (len(seqs), max_blocks), generator=gen, dtype=torch.int32)
    k_cache = torch.full((num_blocks, block_size, kv_heads, head_dim), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))

    keys, values, new_k, new_v, slots = [], [], [], [], []
    for i, ((ctx, _), own) in enumerate(zip(seqs, own_blocks, strict=True)):
        share = ctx > prefix_len
        table = (shared if share else []) + physical[:own]
        physical = physical[own:]
        block_tables[i, : len(table)] = torch.tensor(table, dtype=torch.int32)
        k = torch.randn(ctx, kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(ctx, kv_heads, head_dim, generator=gen).to(dtype)
        start = prefix_len if share else 0
        if share:
            k[:prefix_len], v[:prefix_len] = prefix_k, prefix_v
        keys.append(k)
        values.append(v)
        pos = torch.arange(start, ctx)
        new_k.append(k[start:])
        new_v.append(v[start:])
        slots.append(torch.tensor(table)[pos // block_size] * block_size + pos % block_size)
    if shared_blocks:
        pos = torch.arange(prefix_len)
        new_k.append(prefix_k)
        new_v.append(prefix_v)
        slots.append(torch.tensor(shared)[pos // block_size] * block_size + pos % block_size)
    # Padding tokens (slot -1) interleaved with the real ones; their values must land nowhere.
    k_all, v_all, slot_all = torch.cat(new_k), torch.cat(new_v), torch.cat(slots)
    pad = torch.rand(k_all.shape[0], generator=gen) < 0.2
    order = torch.randperm(k_all.shape[0] + int(pad.sum()), generator=gen)
    junk = torch.full((int(pad.sum()), kv_heads, head_dim), 1e4, dtype=dtype)
    store_kv(k_cache, v_cache, torch.cat((k_all, junk))[order], torch.cat((v_all, junk))[order],
             torch.cat((slot_all, torch.full((int(pad.sum()),), -1)))[order].int())

    num_queries = [nq for _, nq in seqs]
    q = torch.randn(sum(num_queries), heads, head_dim, generator=gen).to(dtype)
    cu = torch.tensor([0, *torch.tensor(num_queries).cumsum(0).tolist()], dtype=torch.int32)
    context_lens = torch.tensor([ctx for ctx, _ in seqs], dtype=torch.int32)
    return Batch(q, k_cache, v_cache, block_tables, cu, context_lens, keys, values)


def test_store_kv_writes_slots_in_place_and_skips_padding() -> None:
    k_cache = torch.zeros(4, 2, 1, 3)
    v_cache = torch.zeros(4, 2, 1, 3)
    k = torch.arange(1, 10, dtype=torch.float32).view(3, 1, 3)
    store_kv(k_cache, v_cache, k, -k, torch.tensor([5, -1, 0], dtype=torch.int32))
    flat_k, flat_v = k_cache.view(8, 1, 3), v_cache.view(8, 1, 3)
    assert torch.equal(flat_k[5], k[0]) and torch.equal(flat_k[0], k[2]) and torch.equal(flat_v[5], -k[0])
    untouched = [1, 2, 3, 4, 6, 7]
    assert not flat_k[untouched].any() and not flat_v[untouched].any()


@pytest.mark.parametrize("block_size", [1, 16, 32])
@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("window", [None, 5, 40])
def test_mixed_batch_matches_dense(block_size: int, group: int, window: int | None) -> None:
    """Decode, speculative-sized, prefill and extend sequences together, some sharing a prefix."""
    seqs = [(70, 1), (1, 1), (33, 33), (90, 20), (64, 3), (17, 1), (50, 9), (40, 8)]
    kv_heads = 2 if group < 8 else 1
    batch = make_batch(seqs, block_size=block_size, heads=kv_heads * group, kv_heads=kv_heads,
                       shared_blocks=32 // block_size, seed=block_size * 10 + group)
    out = batch.paged(0.3, window)
    torch.testing.assert_close(out, batch.dense(0.3, window), rtol=1e-5, atol=1e-5)


def test_plan_is_reusable_across_layers() -> None:
    """One plan per step serves every layer: same block tables, each layer its own pools, queries and scale."""
    batch = make_batch([(45, 1), (20, 12), (9, 2)], block_size=4, heads=4, kv_heads=2)
    plan = plan_paged_attention(batch.k_cache, block_tables=batch.block_tables, cu_query_lens=batch.cu_query_lens,
                                context_lens=batch.context_lens, sliding_window=7)
    for layer in range(3):
        shift = float(layer)
        other = Batch(torch.randn_like(batch.q), batch.k_cache * 2 - shift, batch.v_cache + shift,
                      batch.block_tables, batch.cu_query_lens, batch.context_lens,
                      [k * 2 - shift for k in batch.keys], [v + shift for v in batch.values])
        out = run_paged_attention(other.q, other.k_cache, other.v_cache, plan, scale=0.1 + layer)
        torch.testing.assert_close(out, other.dense(0.1 + layer, 7), rtol=1e-5, atol=1e-5)


def test_large_decode_batch_gemma_shape() -> None:
    """Gemma 3 270M's shape (Hq=4, Hkv=1, D=256) with enough sequences to split into several SDPA calls."""
    seqs = [(700 + 37 * i, 1) for i in range(12)]
    batch = make_batch(seqs, block_size=16, heads=4, kv_heads=1, head_dim=256, shared_blocks=8)
    for window in (None, 512):
        torch.testing.assert_close(batch.paged(256**-0.5, window), batch.dense(256**-0.5, window),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_fp32(dtype: torch.dtype) -> None:
    batch = make_batch([(60, 1), (48, 16), (80, 5)], block_size=16, heads=4, kv_heads=1, head_dim=32,
                       shared_blocks=2, dtype=dtype)
    for window in (None, 24):
        out = batch.paged(32**-0.5, window)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), batch.dense(32**-0.5, window), rtol=0, atol=2e-2)


@st.composite
def batches(draw):
    block_size = draw(st.sampled_from([1, 2, 16, 32]))
    seqs = []
    for _ in range(draw(st.integers(1, 6))):
        ctx = draw(st.integers(1, 100))
        kind = draw(st.sampled_from(["decode", "few", "many"]))
        num_queries = {"decode": 1, "few": min(ctx, draw(st.integers(1, 8)))}.get(kind) or draw(st.integers(1, ctx))
        seqs.append((ctx, num_queries))
    kv_heads = draw(st.sampled_from([1, 2]))
    group = draw(st.sampled_from([1, 2, 4, 8]))
    window = draw(st.one_of(st.none(), st.integers(1, 80)))
    shared = draw(st.integers(0, 64 // block_size))
    seed = draw(st.integers(0, 2**16))
    return seqs, block_size, kv_heads, group, window, shared, seed


@settings(max_examples=40, deadline=None)
@given(batches())
def test_random_batches_match_dense(case) -> None:
    seqs, block_size, kv_heads, group, window, shared, seed = case
    batch = make_batch(seqs, block_size=block_size, heads=kv_heads * group, kv_heads=kv_heads, head_dim=8,
                       shared_blocks=shared, seed=seed)
    torch.testing.assert_close(batch.paged(0.4, window), batch.dense(0.4, window), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [None, 7, 600])
def test_cpp_kernel_matches_the_torch_path(window: int | None) -> None:
    """Few-query sequences go to the C++ kernel (`cpu_paged_attention`) on CPUs that run it; the torch path is its
    reference: long contexts (split over work items and merged), GQA, several queries, windows, shared blocks."""
    from nbllm.kernels import cpu_paged_attention

    batch = make_batch([(1, 1), (37, 1), (1300, 3), (700, 8), (16, 2), (2100, 1)], block_size=16, heads=8,
                       kv_heads=2, head_dim=64, shared_blocks=1)
    if not cpu_paged_attention.supports(batch.k_cache):
        pytest.skip("the CPU kernels cannot run here")
    args = dict(block_tables=batch.block_tables, cu_query_lens=batch.cu_query_lens, context_lens=batch.context_lens,
                sliding_window=window)
    native = plan_paged_attention(batch.k_cache, **args)
    reference = plan_paged_attention(batch.k_cache, **args, native=False)
    assert native.native is not None and reference.native is None
    got = run_paged_attention(batch.q, batch.k_cache, batch.v_cache, native, scale=0.125)
    want = run_paged_attention(batch.q, batch.k_cache, batch.v_cache, reference, scale=0.125)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(got, batch.dense(0.125, window), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 100])
def test_cpp_kernel_gives_a_query_the_same_bits_alone_or_in_a_prefill_chunk(window: int | None) -> None:
    """A query's attention does not depend on how many queries of its sequence share the step: the greedy-output
    invariant under chunked prefill, prefix caching and preemption, exact even where activations are rounded."""
    from nbllm.kernels import cpu_paged_attention

    ctx = 1100
    batch = make_batch([(ctx, ctx)], block_size=16, heads=4, kv_heads=1, head_dim=64)
    if not cpu_paged_attention.supports(batch.k_cache):
        pytest.skip("the CPU kernels cannot run here")

    def attend(q, cu, context):
        plan = plan_paged_attention(batch.k_cache, block_tables=batch.block_tables, cu_query_lens=cu,
                                    context_lens=context, sliding_window=window)
        return run_paged_attention(q, batch.k_cache, batch.v_cache, plan, scale=0.125)

    whole = attend(batch.q, batch.cu_query_lens, batch.context_lens)
    for t in (0, 15, 16, 511, 512, 700, ctx - 1):  # tile and chunk edges
        one = torch.tensor([t + 1], dtype=torch.int32)
        alone = attend(batch.q[t : t + 1], torch.tensor([0, 1], dtype=torch.int32), one)
        assert torch.equal(alone[0], whole[t]), t
        mid = attend(batch.q[max(0, t - 3) : t + 1], torch.tensor([0, min(4, t + 1)], dtype=torch.int32), one)
        assert torch.equal(mid[-1], whole[t]), t
