"""The inner step of paged flash attention, shared by the decode and the extend kernels.

Both kernels walk one sequence's keys tile by tile: gather the tile's K and V through the block table, score it
against a block of query rows, and fold it into an online softmax kept in fp32 (running max `m`, running sum `l`,
unnormalised output `acc`). They differ only in which keys a row may see — decode rows see every key in the
walked range, extend rows only keys up to their own position (and inside the sliding window) — so that is the
one switch, `CAUSAL`, a compile-time constant: each kernel gets exactly the code it had before. The gather and
the fold are also callable apart, so a kernel can gather its first tile before it waits for the kernel before it.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def paged_kv_tile(k_ptr, v_ptr, table_ptr, start, hi, kv_head, dims, dim_ok, HKV: tl.constexpr, D: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Keys `[start, start + BLOCK_N)` gathered through the block table: `(pos, k, v)`, rows at `hi` or past it
    zero (the decode kernel gathers a tile before it may read this step's key, and patches that row in)."""
    pos = start + tl.arange(0, BLOCK_N)
    key_ok = pos < hi
    block = tl.load(table_ptr + pos // BLOCK_SIZE, mask=key_ok, other=0)
    slot = block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
    offs = (slot[:, None] * HKV + kv_head) * D + dims[None, :]
    kv_ok = key_ok[:, None] & dim_ok[None, :]
    return pos, tl.load(k_ptr + offs, mask=kv_ok, other=0.0), tl.load(v_ptr + offs, mask=kv_ok, other=0.0)


@triton.jit
def fold_tile(q, m_i, l_i, acc, pos, k, v, hi, qpos, scale, window, CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    """Fold a gathered tile (keys at `pos`, those at `hi` or past it not seen) into `(m_i, l_i, acc)`."""
    key_ok = pos < hi
    s = tl.dot(q, tl.trans(k).to(q.dtype), input_precision=PRECISION) * scale
    if CAUSAL:
        visible = key_ok[None, :] & (pos[None, :] <= qpos[:, None])
        if window > 0:
            visible &= pos[None, :] > qpos[:, None] - window
        s = tl.where(visible, s, float("-inf"))
    else:
        s = tl.where(key_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp(s - m_new[:, None])
    alpha = tl.exp(m_i - m_new)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    l_i = l_i * alpha + tl.sum(p, 1)
    return m_new, l_i, acc


@triton.jit
def paged_softmax_tile(
    q, m_i, l_i, acc, k_ptr, v_ptr, table_ptr, start, hi, kv_head, dims, dim_ok, qpos, scale, window,
    CAUSAL: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Fold keys `[start, min(start + BLOCK_N, hi))` into `(m_i, l_i, acc)` for the query rows `q: [M, BLOCK_D]`.

    `table_ptr` points at the sequence's block-table row; pools are `[num_blocks, BLOCK_SIZE, HKV, D]`. With
    `CAUSAL`, row r sees key p only if `p <= qpos[r]` and, when `window > 0`, `p > qpos[r] - window`. A row
    that sees no key keeps `m = -1e30, l = 0`. Returns the new `(m_i, l_i, acc)`.
    """
    pos, k, v = paged_kv_tile(k_ptr, v_ptr, table_ptr, start, hi, kv_head, dims, dim_ok, HKV, D, BLOCK_N, BLOCK_SIZE)
    return fold_tile(q, m_i, l_i, acc, pos, k, v, hi, qpos, scale, window, CAUSAL, PRECISION)
