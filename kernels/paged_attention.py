"""Paged attention in torch: the CPU path of the engine and the reference for the Triton kernels.

The KV pool of one layer is `k_cache, v_cache: [num_blocks, block_size, Hkv, D]`; a sequence owns a list of
physical blocks (its row of `block_tables`), and its token at position p lives at slot
`block_table[p // block_size] * block_size + p % block_size` of the pool flattened to `[slots, Hkv, D]`.

A step's queries come as one flat varlen batch (vLLM/flash-attn style): sequence i owns `q[cu[i]:cu[i+1]]`,
which are its last `n_i` positions; `context_lens[i]` counts all its keys, this step's included (stored first
with `store_kv`). One call therefore serves decode (every n_i = 1), prefill, and extend over a cached prefix.

CPU strategy: every sequence goes to the C++ kernel (`cpu_paged_attention`), which reads keys through the block
table in place and computes each query the same way whether it comes alone (decode) or in a prefill chunk. Where
it cannot run (no AVX2 or compiler, non-fp32 pools) torch does it, and that path is also the kernel's reference:
sequences with a few queries (decode, speculative verification) are attended together -- the blocks they can
reach are gathered into a padded `[B, L, Hkv, D]` batch and one SDPA call with a length/window mask does them all
(in cache-sized slices of the batch), so a 64-sequence decode step costs a handful of tensor ops instead of 64
python loops; longer query runs (prefill chunks) have enough work to go one sequence at a time.
Both torch paths use SDPA's fused CPU kernel, exact to ~1e-6 against fp32 matmul + softmax and 3-4x faster than
it (it needs 4-d inputs, hence the batch dims below).

The index work (which slots, which masks) depends only on the step's batch, not on the layer, so it is split out:
`plan_paged_attention` once per step (and window size), `run_paged_attention` per layer. At batch 1 the plan is
most of the time of a call. `paged_attention` does both, for callers with a single layer or no plan at hand.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nbllm.kernels import cpu_paged_attention

__all__ = ["PagedAttentionPlan", "paged_attention", "plan_paged_attention", "run_paged_attention", "store_kv"]

# Sequences with at most this many queries share the padded batch path; beyond it, padding every sequence's
# queries to the longest would waste more than the per-sequence loop costs.
_BATCHED_MAX_QUERIES = 8
# Bytes of gathered k+v per batched SDPA call: the gather is consumed while still in cache (32 MiB L3 on these
# machines), and stays under glibc's 32 MiB mmap threshold, so its memory is reused instead of page-faulted in
# on every call (fresh large tensors are ~5x slower to fill than reused ones here).
_GATHER_BYTES = 8 << 20


def store_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write `k, v: [T, Hkv, D]` into the pools at `slot_mapping: [T]`, in place; slot -1 marks padding to skip."""
    slots = slot_mapping.long()
    keep = slots >= 0
    if not bool(keep.all()):
        k, v, slots = k[keep], v[keep], slots[keep]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v.to(v_cache.dtype))


@dataclass(frozen=True)
class _Batch:
    """Sequences with few queries, attended in one padded SDPA call."""

    blocks: torch.Tensor  # [B * M] physical blocks in reach of each sequence, padded with its last block
    stale: torch.Tensor  # key rows of the gathered [B * M * block_size] that lie past their sequence's context
    queries: torch.Tensor  # [B, N] rows of q; padding rows repeat the sequence's last query
    mask: torch.Tensor  # [B, 1, N, M * block_size] keys visible to each query
    picked: torch.Tensor  # rows of the flattened [B * N] result that are real queries...
    out_rows: torch.Tensor  # ...and the rows of the output they go to


@dataclass(frozen=True)
class _Run:
    """One sequence with many queries (a prefill chunk), attended alone."""

    start: int  # its queries are q[start:end]
    end: int
    blocks: torch.Tensor  # physical blocks in reach
    keys: slice  # its keys in reach within those blocks, flattened
    mask: torch.Tensor | None  # [n, L] visible keys; None when plain causal (keys start at the first query)


@dataclass(frozen=True)
class _Native:
    """The step's sequences, attended by the C++ kernel (its arguments, int32 and contiguous)."""

    seqs: torch.Tensor  # int64 sequence indices
    block_tables: torch.Tensor
    cu_query_lens: torch.Tensor
    context_lens: torch.Tensor
    sliding_window: int | None


@dataclass(frozen=True)
class PagedAttentionPlan:
    """The layer-independent index work of one step's paged attention (see `plan_paged_attention`)."""

    batches: tuple[_Batch, ...]
    runs: tuple[_Run, ...]
    native: _Native | None = None


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    block_tables: torch.Tensor,
    cu_query_lens: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """Causal attention of the varlen queries `q: [T, Hq, D]` over their sequences' paged keys -> `[T, Hq, D]`.

    `block_tables: int32 [B, max_blocks]` (entries past a sequence's blocks may hold anything),
    `cu_query_lens: int32 [B + 1]`, `context_lens: int32 [B]` (keys per sequence, this step's included).
    A query at position t sees key positions p with `t - sliding_window < p <= t` (HF/llama.cpp windows);
    query head h reads kv head `h // (Hq // Hkv)`. Softmax runs in fp32; the output has q's dtype.
    """
    plan = plan_paged_attention(k_cache, block_tables=block_tables, cu_query_lens=cu_query_lens,
                                context_lens=context_lens, sliding_window=sliding_window)
    return run_paged_attention(q, k_cache, v_cache, plan, scale=scale)


def plan_paged_attention(
    k_cache: torch.Tensor,
    *,
    block_tables: torch.Tensor,
    cu_query_lens: torch.Tensor,
    context_lens: torch.Tensor,
    sliding_window: int | None,
    native: bool = True,
) -> PagedAttentionPlan:
    """Slots and masks for one step's batch, valid for every layer whose pools share `k_cache`'s geometry.

    Only `k_cache`'s shape and dtype are read. Arguments as in `paged_attention`; `native=False` keeps every
    sequence on the torch path (the C++ kernel's reference).
    """
    if native and cpu_paged_attention.supports(k_cache):
        seqs = ((cu_query_lens[1:] - cu_query_lens[:-1]) > 0).nonzero().squeeze(1)
        return PagedAttentionPlan((), (), _Native(
            seqs, block_tables.to(torch.int32).contiguous(), cu_query_lens.to(torch.int32).contiguous(),
            context_lens.to(torch.int32).contiguous(), sliding_window))
    block_size, hkv, d = k_cache.shape[1:]
    block_tables, cu, ctx = block_tables.long(), cu_query_lens.long(), context_lens.long()
    num_queries = cu[1:] - cu[:-1]
    first_keys = ctx - num_queries - sliding_window + 1 if sliding_window is not None else torch.zeros_like(ctx)
    first_blocks = first_keys.clamp(min=0) // block_size
    end_blocks = (ctx + block_size - 1) // block_size

    runs = []
    for i in (num_queries > _BATCHED_MAX_QUERIES).nonzero().squeeze(1).tolist():
        start, end, length = int(cu[i]), int(cu[i + 1]), int(ctx[i])
        first_block, first_key, first_query = int(first_blocks[i]), max(0, int(first_keys[i])), length - (end - start)
        mask = None
        if first_key != first_query or (sliding_window is not None and sliding_window < end - start):
            qpos = torch.arange(first_query, length)[:, None]
            kpos = torch.arange(first_key, length)[None]
            mask = kpos <= qpos
            if sliding_window is not None:
                mask &= kpos > qpos - sliding_window
        offset = first_block * block_size
        blocks = block_tables[i, first_block : int(end_blocks[i])]
        runs.append(_Run(start, end, blocks, slice(first_key - offset, length - offset), mask))

    short = ((num_queries > 0) & (num_queries <= _BATCHED_MAX_QUERIES)).nonzero().squeeze(1)
    if not short.numel():
        return PagedAttentionPlan((), tuple(runs))
    # Most blocks first, so each SDPA call pads its sequences to similar lengths.
    spans, order = (end_blocks[short] - first_blocks[short]).sort(descending=True)
    short, spans = short[order], spans.tolist()
    n, length, first_block = num_queries[short, None], ctx[short, None], first_blocks[short, None]
    offsets = torch.minimum(torch.arange(int(n.max()))[None], n - 1)  # [S, N]
    qpos = length - n + offsets
    cols = first_block + torch.arange(spans[0])[None]  # [S, M]
    # Padding columns repeat the last block: table entries past a sequence's blocks may hold anything.
    blocks = block_tables[short[:, None], torch.minimum(cols, end_blocks[short, None] - 1)]
    kpos = (cols[:, :, None] * block_size + torch.arange(block_size)).flatten(1)  # [S, M * block_size]
    mask = kpos[:, None, :] <= qpos[:, :, None]  # [S, N, L]
    if sliding_window is not None:
        mask &= kpos[:, None, :] > qpos[:, :, None] - sliding_window
    queries = cu[short, None] + offsets
    real = offsets == torch.arange(offsets.shape[1])[None]

    batches = []
    block_bytes = 2 * block_size * hkv * d * k_cache.element_size()
    lo = 0
    while lo < len(spans):
        span = spans[lo]
        rows = slice(lo, min(len(spans), lo + max(1, _GATHER_BYTES // (span * block_bytes))))
        batches.append(_Batch(
            blocks=blocks[rows, :span].flatten(),
            stale=(kpos[rows, : span * block_size] >= length[rows]).flatten().nonzero().squeeze(1),
            queries=queries[rows],
            mask=mask[rows, None, :, : span * block_size],
            picked=real[rows].flatten().nonzero().squeeze(1),
            out_rows=queries[rows][real[rows]],
        ))
        lo = rows.stop
    return PagedAttentionPlan(tuple(batches), tuple(runs))


def run_paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: PagedAttentionPlan, *, scale: float
) -> torch.Tensor:
    """`paged_attention` of one layer with the step's index work already done by `plan_paged_attention`."""
    out = torch.empty_like(q)
    hkv, d = k_cache.shape[2:]
    group = q.shape[1] // hkv
    if plan.native is not None:
        n = plan.native
        cpu_paged_attention.paged_attention_cpu(
            q.contiguous(), k_cache, v_cache, out, seqs=n.seqs, block_tables=n.block_tables,
            cu_query_lens=n.cu_query_lens, context_lens=n.context_lens, scale=scale, sliding_window=n.sliding_window)
    for b in plan.batches:
        rows, n = b.queries.shape
        k, v = _gather(k_cache, b.blocks, b.stale), _gather(v_cache, b.blocks, b.stale)
        k, v = k.view(rows, -1, hkv, d).transpose(1, 2), v.view(rows, -1, hkv, d).transpose(1, 2)  # [B, Hkv, L, D]
        # Fold each kv head's query group into its query rows instead of enable_gqa: with few queries that
        # measured 1.5x faster in fp32 and 8x in bf16.
        queries = q[b.queries].view(rows, n, hkv, group, d).transpose(1, 2).reshape(rows, hkv, n * group, d)
        mask = b.mask[:, :, :, None].expand(-1, -1, -1, group, -1).reshape(rows, 1, n * group, -1)
        res = _sdpa(queries, k, v, mask, scale).view(rows, hkv, n, group, d).transpose(1, 2)
        out.index_copy_(0, b.out_rows, res.reshape(rows * n, -1, d).index_select(0, b.picked))
    for r in plan.runs:
        k = k_cache.index_select(0, r.blocks).view(-1, hkv, d)[r.keys].transpose(0, 1)[None]  # [1, Hkv, L, D]
        v = v_cache.index_select(0, r.blocks).view(-1, hkv, d)[r.keys].transpose(0, 1)[None]
        out[r.start : r.end] = _sdpa(q[r.start : r.end].transpose(0, 1)[None], k, v, r.mask, scale)[0].transpose(0, 1)
    return out


def _gather(cache: torch.Tensor, blocks: torch.Tensor, stale: torch.Tensor) -> torch.Tensor:
    """Whole blocks of `cache` as `[len(blocks) * block_size, Hkv, D]`, with the `stale` rows zeroed.

    Copying whole blocks is 2-4x faster than slot by slot. Rows past a context are masked, but masking cannot
    cancel a NaN left in a stale or never-written slot (NaN * 0 = NaN), so they are zeroed (as vLLM's kernel does).
    """
    keys = cache.index_select(0, blocks).flatten(0, 1)
    return keys.index_fill_(0, stale, 0) if stale.numel() else keys


def _sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """SDPA over `[B, H, N, D]` inputs with GQA; `mask=None` means causal with keys aligned to queries."""
    k, v = k.to(q.dtype), v.to(q.dtype)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=k.shape[1] != q.shape[1]
    )
