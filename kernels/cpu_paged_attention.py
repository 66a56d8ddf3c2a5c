"""Paged attention on the CPU in C++ (`cpu_paged_attention.cpp`): decode, speculative verification and prefill.

Why not torch's SDPA: at decode sizes its work is a few microseconds and its OpenMP region, the gather of whole
blocks and the padding masks cost far more (measured 1.2 ms a layer at batch 1, half of a decode step, much of it
OpenMP's threads and the int8 kernels' pool taking turns on two cores). This kernel reads keys through the block
table where they lie, runs on the same pool as the int8 matmuls, and gives a query the same bits whether it is
computed alone or inside a prefill chunk (fixed key tiles and chunks), so chunking never changes a greedy token.
"""

from __future__ import annotations

import ctypes

import torch

from nbllm.kernels.cpu_library import I, P, function, num_threads, unavailable_reason

__all__ = ["paged_attention_cpu", "supports"]


def supports(k_cache: torch.Tensor) -> bool:
    """Whether this kernel can serve attention over pools like `k_cache` here (queries of the pools' dtype)."""
    return (k_cache.device.type == "cpu" and k_cache.dtype == torch.float32 and k_cache.shape[-1] % 8 == 0
            and unavailable_reason() is None)


def paged_attention_cpu(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    *,
    seqs: torch.Tensor,
    block_tables: torch.Tensor,
    cu_query_lens: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None,
) -> None:
    """Write into `out` the attention of the queries of sequences `seqs` (int64), as `paged_attention` defines it.

    `q, out: [T, Hq, D]`, pools `[blocks, block_size, Hkv, D]`, all contiguous fp32; `block_tables`,
    `cu_query_lens`, `context_lens` contiguous int32 (see `paged_attention`). Rows of other sequences are untouched.
    """
    for t in (q, out, k_cache, v_cache, seqs, block_tables, cu_query_lens, context_lens):
        if not t.is_contiguous():
            raise ValueError("paged_attention_cpu needs contiguous tensors")
    if not (q.dtype == out.dtype == k_cache.dtype == v_cache.dtype == torch.float32):
        raise ValueError(f"paged_attention_cpu computes in fp32, got q {q.dtype} and pools {k_cache.dtype}")
    _, block_size, hkv, d = k_cache.shape
    kernel = function("nbllm_paged_attention",
                      P, P, P, P, I, I, I, I, P, I, P, P, P, I, ctypes.c_float, I, ctypes.c_int)
    kernel(q.data_ptr(), out.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_size, q.shape[1], hkv, d,
           block_tables.data_ptr(), block_tables.shape[1], cu_query_lens.data_ptr(), context_lens.data_ptr(),
           seqs.data_ptr(), seqs.numel(), scale, sliding_window or 0, num_threads())
