"""Rotary embedding (NeoX rotate-half) in Triton, with the torch reference beside it.

Each token's heads are rotated by the cos/sin of its position, read from the model's fp32 tables
`[max_positions, D / 2]`. The rotation runs in fp32 and rounds once to the input's type; the reference (the
model's `RotaryEmbedding`) rounds cos and sin to the input's type first, so in bf16 the two differ by a rounding.
One program per token covers all of its heads.

`rotary_qk` is what attention layers call on a GPU: q and k in one launch, each head first RMS-normalised when
the model has per-head q/k norms (Qwen3, Gemma 3), the normalised value rounded to the input's type as the
separate norm would. A decode step of a 28-layer model launches 28 of these instead of 28 x 6 kernels. Given the
paged KV pools and the step's slots, the same launch also writes the rotated keys and the values there
(`store_kv`'s job: slot -1 writes nothing), one launch a layer fewer. On Hopper it launches programmatic-dependent
(`pdl`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import enabled as pdl_enabled

__all__ = ["norm_halves", "norm_rope", "rotary_embedding", "rotary_qk", "rotary_reference", "rotation"]


def rotary_reference(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    c = cos[positions].float()[:, None, :]
    s = sin[positions].float()[:, None, :]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


@triton.jit
def _rotary_kernel(x_ptr, out_ptr, pos_ptr, cos_ptr, sin_ptr, stride_xt, stride_xh, stride_ot, stride_oh,
                   stride_c, HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    ok = (heads < HEADS)[:, None] & (dims < HALF)[None, :]
    c = tl.load(cos_ptr + pos * stride_c + dims, mask=dims < HALF, other=0.0)[None, :]
    s = tl.load(sin_ptr + pos * stride_c + dims, mask=dims < HALF, other=0.0)[None, :]
    src = x_ptr + t * stride_xt + heads[:, None] * stride_xh + dims[None, :]
    x1 = tl.load(src, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=ok, other=0.0).to(tl.float32)
    dst = out_ptr + t * stride_ot + heads[:, None] * stride_oh + dims[None, :]
    tl.store(dst, (x1 * c - x2 * s).to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(dst + HALF, (x2 * c + x1 * s).to(out_ptr.dtype.element_ty), mask=ok)


def rotary_embedding(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x: [T, heads, D]` (last dimension contiguous) by `positions: [T]` -> a new contiguous tensor."""
    tokens, heads, d = x.shape
    if x.stride(2) != 1 or cos.stride(1) != 1 or sin.stride() != cos.stride():
        raise ValueError("rotary_embedding needs x's last dimension and the cos/sin tables contiguous")
    out = torch.empty((tokens, heads, d), dtype=x.dtype, device=x.device)
    if tokens:
        half = d // 2
        _rotary_kernel[(tokens,)](x, out, positions, cos, sin, x.stride(0), x.stride(1), out.stride(0),
                                  out.stride(1), cos.stride(0), HEADS=heads, HALF=half,
                                  BLOCK_H=triton.next_power_of_2(heads), BLOCK_D=triton.next_power_of_2(half),
                                  num_warps=4)
    return out


@triton.jit
def rotation(pos_ptr, cos_ptr, sin_ptr, t, stride_c, HALF: tl.constexpr, BLOCK_D: tl.constexpr):
    """Token `t`'s rotary row: `(dims, cos, sin)`, `dims = arange(BLOCK_D)`, cos/sin `[1, BLOCK_D]` (0 past HALF)."""
    dims = tl.arange(0, BLOCK_D)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    c = tl.load(cos_ptr + pos * stride_c + dims, mask=dims < HALF, other=0.0)[None, :]
    s = tl.load(sin_ptr + pos * stride_c + dims, mask=dims < HALF, other=0.0)[None, :]
    return dims, c, s


@triton.jit
def norm_halves(w_ptr, dims, HALF: tl.constexpr, NORM: tl.constexpr):
    """A head norm's weight as fp32 halves `(w1, w2)` over `dims` for `norm_rope` (zeros without `NORM`): constants,
    which a kernel loads before it waits for the one before."""
    w1 = tl.zeros(dims.shape, tl.float32)
    w2 = tl.zeros(dims.shape, tl.float32)
    if NORM:
        w1 = tl.load(w_ptr + dims, mask=dims < HALF, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + dims, mask=dims < HALF, other=0.0).to(tl.float32)
    return w1, w2


@triton.jit
def norm_rope(x1, x2, c, s, w1, w2, eps, HALF: tl.constexpr, NORM: tl.constexpr, DTYPE: tl.constexpr):
    """Heads given as fp32 halves `x1, x2: [heads, BLOCK_D]` -> their rotated halves in `DTYPE`, each head
    RMS-normalised with the weight halves `w1, w2` (`norm_halves`) first when `NORM` (rounded to `DTYPE` as the
    separate norm would). One definition for every kernel that rotates, so they all give the same bits."""
    if NORM:
        rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)
        x1 = (x1 * rstd[:, None] * w1[None, :]).to(DTYPE).to(tl.float32)
        x2 = (x2 * rstd[:, None] * w2[None, :]).to(DTYPE).to(tl.float32)
    return (x1 * c - x2 * s).to(DTYPE), (x2 * c + x1 * s).to(DTYPE)


@triton.jit
def _norm_rope_heads(x_ptr, out_ptr, w_ptr, cache_ptr, slot, t, c, s, stride_xt, stride_xh, stride_ot, stride_oh,
                     eps, HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                     NORM: tl.constexpr, STORE: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    ok = (heads < HEADS)[:, None] & (dims < HALF)[None, :]
    w1, w2 = norm_halves(w_ptr, dims, HALF, NORM)
    src = x_ptr + t * stride_xt + heads[:, None] * stride_xh + dims[None, :]
    x1 = tl.load(src, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=ok, other=0.0).to(tl.float32)
    y1, y2 = norm_rope(x1, x2, c, s, w1, w2, eps, HALF, NORM, out_ptr.dtype.element_ty)
    dst = out_ptr + t * stride_ot + heads[:, None] * stride_oh + dims[None, :]
    tl.store(dst, y1, mask=ok)
    tl.store(dst + HALF, y2, mask=ok)
    if STORE:
        if slot >= 0:  # the pool's slot rows are [HEADS, 2 * HALF], contiguous
            row = cache_ptr + slot * (HEADS * 2 * HALF) + heads[:, None] * (2 * HALF) + dims[None, :]
            tl.store(row, y1.to(cache_ptr.dtype.element_ty), mask=ok)
            tl.store(row + HALF, y2.to(cache_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _qk_kernel(q_ptr, k_ptr, q_out_ptr, k_out_ptr, qw_ptr, kw_ptr, pos_ptr, cos_ptr, sin_ptr,
               v_ptr, k_cache_ptr, v_cache_ptr, slots_ptr,
               stride_qt, stride_qh, stride_kt, stride_kh, stride_qot, stride_qoh, stride_kot, stride_koh,
               stride_vt, stride_vh, stride_c, eps, HQ: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr,
               BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, NORM: tl.constexpr,
               STORE: tl.constexpr, PDL: tl.constexpr):
    t = tl.program_id(0)
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    _, c, s = rotation(pos_ptr, cos_ptr, sin_ptr, t, stride_c, HALF, BLOCK_D)  # host inputs and constants
    if PDL:
        tl.extra.cuda.gdc_wait()  # q, k and v come from the projection before
    if tl.program_id(1) == 0:
        _norm_rope_heads(q_ptr, q_out_ptr, qw_ptr, q_out_ptr, -1, t, c, s, stride_qt, stride_qh, stride_qot,
                         stride_qoh, eps, HQ, HALF, BLOCK_Q, BLOCK_D, NORM, False)
    else:
        slot = -1
        if STORE:
            slot = tl.load(slots_ptr + t).to(tl.int64)
        _norm_rope_heads(k_ptr, k_out_ptr, kw_ptr, k_cache_ptr, slot, t, c, s, stride_kt, stride_kh, stride_kot,
                         stride_koh, eps, HKV, HALF, BLOCK_K, BLOCK_D, NORM, STORE)
        if STORE:
            if slot >= 0:  # the values ride along: copied as they are
                heads = tl.arange(0, BLOCK_K)[:, None]
                cols = tl.arange(0, 2 * BLOCK_D)[None, :]
                ok = (heads < HKV) & (cols < 2 * HALF)
                v = tl.load(v_ptr + t * stride_vt + heads * stride_vh + cols, mask=ok)
                tl.store(v_cache_ptr + slot * (HKV * 2 * HALF) + heads * (2 * HALF) + cols,
                         v.to(v_cache_ptr.dtype.element_ty), mask=ok)


def rotary_qk(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
              q_weight: torch.Tensor | None = None, k_weight: torch.Tensor | None = None, eps: float = 0.0,
              store: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate `q: [T, Hq, D]` and `k: [T, Hkv, D]` (each head RMS-normalised first with `q_weight`/`k_weight`
    when given) -> new contiguous `(q, k)`. `store = (v, k_cache, v_cache, slot_mapping)` also writes the rotated
    keys and `v: [T, Hkv, D]` into the pools `[num_blocks, block_size, Hkv, D]` (as `store_kv` does)."""
    tokens, hq, d = q.shape
    hkv = k.shape[1]
    if q.stride(2) != 1 or k.stride(2) != 1 or cos.stride(1) != 1 or sin.stride() != cos.stride():
        raise ValueError("rotary_qk needs q's and k's last dimension and the cos/sin tables contiguous")
    if store is not None and (store[0].stride(2) != 1 or not store[1].is_contiguous()
                              or not store[2].is_contiguous()):
        raise ValueError("rotary_qk's store needs v's last dimension and the KV pools contiguous")
    v, k_cache, v_cache, slots = store if store is not None else (k, k, k, positions)
    norm = q_weight is not None
    q_out = torch.empty((tokens, hq, d), dtype=q.dtype, device=q.device)
    k_out = torch.empty((tokens, hkv, d), dtype=k.dtype, device=k.device)
    if tokens:
        half = d // 2
        pdl = pdl_enabled(q.device)
        _qk_kernel[(tokens, 2)](
            q, k, q_out, k_out, q_weight if norm else q, k_weight if norm else k, positions, cos, sin,
            v, k_cache, v_cache, slots,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), q_out.stride(0), q_out.stride(1),
            k_out.stride(0), k_out.stride(1), v.stride(0), v.stride(1), cos.stride(0), eps, HQ=hq, HKV=hkv,
            HALF=half, BLOCK_Q=triton.next_power_of_2(hq), BLOCK_K=triton.next_power_of_2(hkv),
            BLOCK_D=triton.next_power_of_2(half), NORM=norm, STORE=store is not None, PDL=pdl, num_warps=4,
            launch_pdl=pdl)
    return q_out, k_out
