"""KV store into the block pool in Triton: the GPU twin of `paged_attention.store_kv` (its torch reference).

Each of the step's T tokens writes its `[Hkv, D]` key and value rows to its slot of the pools
`[num_blocks, block_size, Hkv, D]`; slot -1 marks a padding token (a CUDA-graph batch padded to its captured
size) and writes nothing. One program per token, no host synchronisation (the torch version checks for padding
on the host), so it can be captured in a graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["store_kv"]


@triton.jit
def _store_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slots_ptr, stride_k, stride_v,
                  WIDTH: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    if slot >= 0:
        offs = tl.arange(0, BLOCK)
        ok = offs < WIDTH
        k = tl.load(k_ptr + t * stride_k + offs, mask=ok)
        v = tl.load(v_ptr + t * stride_v + offs, mask=ok)
        tl.store(k_cache_ptr + slot * WIDTH + offs, k.to(k_cache_ptr.dtype.element_ty), mask=ok)
        tl.store(v_cache_ptr + slot * WIDTH + offs, v.to(v_cache_ptr.dtype.element_ty), mask=ok)


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write `k, v: [T, Hkv, D]` (each token's `[Hkv, D]` contiguous) into the pools at `slot_mapping: [T]`."""
    tokens, hkv, d = k.shape
    for x in (k, v):
        if x.stride(2) != 1 or x.stride(1) != d:
            raise ValueError("store_kv needs each token's [Hkv, D] rows contiguous")
    if tokens == 0:
        return
    width = hkv * d
    _store_kernel[(tokens,)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), v.stride(0),
                             WIDTH=width, BLOCK=triton.next_power_of_2(width), num_warps=4)
