"""Paged prefill/extend attention in Triton: many queries per sequence over a cached prefix, causal, windowed.

The same contract as `paged_attention` (its torch reference, `nbllm.kernels.paged_attention`): the step's
queries are one flat varlen batch (`q[cu[i]:cu[i+1]]` are sequence i's last `n_i` positions), every key, this
step's included, is already in the paged pools, and a query at position t sees keys p with
`t - window < p <= t`. A prefill is the case with no cached prefix, a prefix-cache hit or a chunked prefill
the case with one, and decode rows (n_i = 1) may ride along in the same launch.

Flash attention over pages: a program owns BLOCK_M queries of one sequence and one head, walks the key tiles its
queries can see (the causal end and the window start bound the loop, so masked tiles are never loaded), gathers
each tile through the block table and keeps an online softmax in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .paged_tile import paged_softmax_tile

__all__ = ["extend_attention"]


@triton.jit
def _extend_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, cu_ptr, ctx_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_tb,
    scale, window,
    HKV: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    head = tl.program_id(1)
    tile = tl.program_id(2)
    q_start = tl.load(cu_ptr + b)
    n_q = tl.load(cu_ptr + b + 1) - q_start
    if tile * BLOCK_M < n_q:
        ctx = tl.load(ctx_ptr + b)
        kv_head = head // GROUP
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < n_q
        qpos = ctx - n_q + rows
        dims = tl.arange(0, BLOCK_D)
        dim_ok = dims < D
        q = tl.load(q_ptr + (q_start + rows)[:, None] * stride_qt + head * stride_qh + dims[None, :],
                    mask=row_ok[:, None] & dim_ok[None, :], other=0.0)

        last = ctx - n_q + tl.minimum(tile * BLOCK_M + BLOCK_M, n_q) - 1
        hi = last + 1
        lo = tl.where(window > 0, tl.maximum(ctx - n_q + tile * BLOCK_M - window + 1, 0), 0)
        m_i = tl.full([BLOCK_M], -1e30, tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start in range(lo, hi, BLOCK_N):
            m_i, l_i, acc = paged_softmax_tile(
                q, m_i, l_i, acc, k_ptr, v_ptr, tables_ptr + b * stride_tb, start, hi, kv_head, dims, dim_ok,
                qpos, scale, window, CAUSAL=True, HKV=HKV, D=D, BLOCK_N=BLOCK_N, BLOCK_SIZE=BLOCK_SIZE,
                PRECISION=PRECISION)
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + (q_start + rows)[:, None] * stride_ot + head * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


def extend_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    block_tables: torch.Tensor,
    cu_query_lens: torch.Tensor,
    context_lens: torch.Tensor,
    max_query_len: int,
    scale: float,
    sliding_window: int | None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of the varlen queries `q: [T, Hq, D]` over their paged keys -> `[T, Hq, D]`.

    Arguments as in `paged_attention`, plus `max_query_len` (the largest `n_i`, known on the host, so the
    launch needs no device read). fp32 inputs use IEEE fp32 products (no tf32).
    """
    _, hq, d = q.shape
    _, block_size, hkv, _ = k_cache.shape
    if q.stride(2) != 1 or not k_cache.is_contiguous() or not v_cache.is_contiguous():
        raise ValueError("extend_attention needs q's last dimension and the KV pools contiguous")
    out = torch.empty_like(q) if out is None else out
    block_d = triton.next_power_of_2(d)
    fp32 = q.dtype == torch.float32
    # fp32 tiles hold twice the bytes: smaller ones keep them in registers and shared memory.
    block_m = 32 if fp32 or block_d > 128 else 64
    batch = context_lens.shape[0]
    _extend_kernel[(batch, hq, triton.cdiv(max_query_len, block_m))](
        q, k_cache, v_cache, out, block_tables, cu_query_lens, context_lens,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        scale, sliding_window or 0,
        HKV=hkv, GROUP=hq // hkv, D=d, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=32 if fp32 else 64,
        BLOCK_SIZE=block_size, PRECISION="ieee" if fp32 else "tf32", num_warps=4, num_stages=2,
    )
    return out
