"""Paged decode attention in Triton: one query per sequence, GQA-packed, split-K (flash-decoding).

Same contract as `paged_attention` (its torch reference, `nbllm.kernels.paged_attention`) restricted to one
query per sequence: `q: [B, Hq, D]` is each sequence's query at position `context_lens[b] - 1`, and its keys
(this step's already stored, unless `DecodeRope` below) live in the paged pools `[num_blocks, block_size, Hkv, D]`.

Decode is a pass over the KV cache: its time is the bytes of K and V read. So each program reads one KV head's
keys once for the whole query group that shares it (the G = Hq / Hkv query heads become the rows of one `tl.dot`),
and a long context is cut into `num_splits` slices attended by separate programs (flash-decoding). Without splits
a batch-1 decode would run Hkv programs on a 132-SM chip. Each split stores its partial result (output and
log-sum-exp) and the last split of a (sequence, KV head) to finish merges them (`arrival`): one launch, not a
split kernel and a merge kernel. `num_splits` is a launch constant, not derived from the context lengths, so a
CUDA graph captured once serves every later step; each split takes `ceil(keys / num_splits)` of its sequence's
keys, rounded up to whole tiles (so a short sequence leaves its last splits empty; the merge gives those no
weight). With one split the program writes its output directly. On Hopper the launch is programmatic-dependent
(`pdl`).

A decode step's q/k norms, rotary and K/V store can ride in the same launch (`DecodeRope`): each program
normalises and rotates its query group itself (a few hundred bytes), and the split whose slice ends at the new
token writes that token's key and value into the pools before reading them. One launch a layer fewer, and the
same bits as `rotary_qk` followed by this kernel (both rotate through `rotary.norm_rope`). It also lets each
program gather its first K/V tile before the programmatic-dependent wait, while the q/k/v projection still runs:
the tile then lacks only the new key and value, which the split that stores them patches in from registers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .arrival import counters, last_arrival
from .paged_tile import fold_tile, paged_kv_tile, paged_softmax_tile
from .pdl import enabled as pdl_enabled
from .rotary import norm_halves, norm_rope, rotation

__all__ = ["DecodeRope", "decode_attention", "default_num_splits"]

_BLOCK_N = 64  # keys per tile: four 16-token blocks


@dataclass
class DecodeRope:
    """What `rotary_qk` would do before the attention, done inside its launch: `q` is then the step's projection,
    whose heads the kernel normalises (`q_weight`, `eps`) and rotates by `positions`, and the step's new keys
    `k: [B, Hkv, D]` (normalised with `k_weight`, rotated) and values `v` are written into the pools at `slots`
    (-1: none) by the split that reads them. Same bits as the two launches."""

    k: torch.Tensor
    v: torch.Tensor
    positions: torch.Tensor  # [B]
    cos: torch.Tensor  # [max_positions, D / 2] fp32
    sin: torch.Tensor
    slots: torch.Tensor  # [B]
    q_weight: torch.Tensor | None = None
    k_weight: torch.Tensor | None = None
    eps: float = 0.0

    @staticmethod
    def supports(head_dim: int) -> bool:
        """The fused path handles power-of-two head sizes (the rotated halves are joined in registers)."""
        return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def default_num_splits(batch: int, num_kv_heads: int, num_sms: int) -> int:
    """Enough splits that `batch * Hkv * splits` programs fill the chip about twice, at most 16.

    Measured on an H100 at batch 256 with contexts of 100-1024 tokens (benchmarks/gpu_throughput.py (d)): 1 or
    2 splits read K/V at 73% of the copy bandwidth, 4 at 68%, 8 at 55%; small batches need the splits to use
    the chip at all.
    """
    return max(1, min(16, -(-2 * num_sms // (batch * num_kv_heads))))


@triton.jit
def _joined(y1, y2, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rotated halves `[ROWS, D / 2]` each as whole rows `[ROWS, D]`."""
    return tl.reshape(tl.permute(tl.join(y1, y2), (0, 2, 1)), (ROWS, BLOCK_D))


@triton.jit
def _split_kernel(
    q_ptr, k_ptr, v_ptr, tables_ptr, ctx_ptr, mid_o_ptr, mid_lse_ptr, out_ptr, counter_ptr,
    new_k_ptr, new_v_ptr, pos_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr, slots_ptr,
    stride_qb, stride_qh, stride_tb, stride_ob, stride_oh, stride_kb, stride_kh, stride_vb, stride_vh, stride_c,
    scale, window, eps,
    HQ: tl.constexpr, HKV: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, SPLITS: tl.constexpr,
    PRECISION: tl.constexpr, PDL: tl.constexpr, ROPE: tl.constexpr, NORM: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    # Until the wait: only what the host copied in before the step (lengths, positions, block tables), the rotary
    # tables and K/V of earlier steps; never what this step's kernels write.
    ctx = tl.load(ctx_ptr + b)
    first = tl.where(window > 0, tl.maximum(ctx - window, 0), 0)
    # Whole tiles per split, at least one: a short sequence fills its first splits and leaves the rest empty.
    per_split = tl.maximum(tl.cdiv(tl.cdiv(ctx - first, SPLITS), BLOCK_N), 1) * BLOCK_N
    lo = first + split * per_split
    hi = tl.minimum(lo + per_split, ctx)

    rows = tl.arange(0, BLOCK_H)
    heads = kv_head * GROUP + rows
    row_ok = rows < GROUP
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    table = tables_ptr + b * stride_tb
    m_i = tl.full([BLOCK_H], -1e30, tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    if ROPE:  # q is this step's projection: normalise and rotate it here, and store the new key and value
        halves, c, s = rotation(pos_ptr, cos_ptr, sin_ptr, b, stride_c, D // 2, D // 2)
        qw1, qw2 = norm_halves(qw_ptr, halves, D // 2, NORM)
        kw1, kw2 = norm_halves(kw_ptr, halves, D // 2, NORM)
        slot = tl.load(slots_ptr + b).to(tl.int64)  # -1: a padding row, nothing to store
        new = ctx - 1
        # The first tile now, all but the new key (its row comes from registers below): the gather overlaps the
        # kernel before instead of following it.
        pos, k, v = paged_kv_tile(k_ptr, v_ptr, table, lo, tl.minimum(hi, new), kv_head, dims, dim_ok, HKV, D,
                                  BLOCK_N, BLOCK_SIZE)
        if PDL:
            tl.extra.cuda.gdc_wait()  # q and this step's keys come from the kernel before
        # This step's q, k and v, all asked for at once before any arithmetic on them.
        q_src = q_ptr + b * stride_qb + heads[:, None] * stride_qh + halves[None, :]
        q1 = tl.load(q_src, mask=row_ok[:, None], other=0.0).to(tl.float32)
        q2 = tl.load(q_src + D // 2, mask=row_ok[:, None], other=0.0).to(tl.float32)
        k_src = new_k_ptr + b * stride_kb + kv_head * stride_kh + halves[None, :]
        k1 = tl.load(k_src).to(tl.float32)
        k2 = tl.load(k_src + D // 2).to(tl.float32)
        value = tl.load(new_v_ptr + b * stride_vb + kv_head * stride_vh + dims)[None, :].to(v_ptr.dtype.element_ty)
        y1, y2 = norm_rope(q1, q2, c, s, qw1, qw2, eps, D // 2, NORM, q_ptr.dtype.element_ty)
        q = _joined(y1, y2, BLOCK_H, BLOCK_D)
        if split == (new - first) // per_split:  # the split that reads the new key stores it first
            r1, r2 = norm_rope(k1, k2, c, s, kw1, kw2, eps, D // 2, NORM, new_k_ptr.dtype.element_ty)
            key = _joined(r1, r2, 1, BLOCK_D).to(k_ptr.dtype.element_ty)
            if slot >= 0:
                row = (slot * HKV + kv_head) * D + dims[None, :]
                tl.store(k_ptr + row, key)
                tl.store(v_ptr + row, value)
            tl.debug_barrier()  # the stores land before any thread of this program reads a later tile holding them
            mine = (pos == new)[:, None] & (slot >= 0)
            k = tl.where(mine, key, k)
            v = tl.where(mine, value, v)
        if lo < hi:
            m_i, l_i, acc = fold_tile(q, m_i, l_i, acc, pos, k, v, hi, m_i, scale, window, CAUSAL=False,
                                      PRECISION=PRECISION)
        rest = lo + BLOCK_N
    else:
        if PDL:
            tl.extra.cuda.gdc_wait()  # q and this step's keys come from the kernel before
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + dims[None, :],
                    mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        rest = lo
    for start in range(rest, hi, BLOCK_N):
        m_i, l_i, acc = paged_softmax_tile(
            q, m_i, l_i, acc, k_ptr, v_ptr, table, start, hi, kv_head, dims, dim_ok, m_i,
            scale, window, CAUSAL=False, HKV=HKV, D=D, BLOCK_N=BLOCK_N, BLOCK_SIZE=BLOCK_SIZE, PRECISION=PRECISION)

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    out_rows = out_ptr + b * stride_ob + heads[:, None] * stride_oh + dims[None, :]
    if SPLITS == 1:
        tl.store(out_rows, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
    else:
        lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
        base = (b * HQ + heads) * SPLITS
        tl.store(mid_o_ptr + (base + split)[:, None] * BLOCK_D + dims[None, :], out, mask=row_ok[:, None])
        tl.store(mid_lse_ptr + base + split, lse, mask=row_ok)
        if last_arrival(counter_ptr + b * HKV + kv_head, SPLITS):
            _merge_splits(mid_o_ptr, mid_lse_ptr, out_rows, base, row_ok, dims, dim_ok, BLOCK_H, BLOCK_D, SPLITS)


@triton.jit
def _merge_splits(mid_o_ptr, mid_lse_ptr, out_rows, base, row_ok, dims, dim_ok, BLOCK_H: tl.constexpr,
                  BLOCK_D: tl.constexpr, SPLITS: tl.constexpr):
    """The split partials of a query group, weighted by their share of the softmax mass, in split order."""
    top = tl.full([BLOCK_H], float("-inf"), tl.float32)
    for s in tl.static_range(SPLITS):
        top = tl.maximum(top, tl.load(mid_lse_ptr + base + s, mask=row_ok, other=float("-inf"),
                                      cache_modifier=".cg"))
    top = tl.where(top == float("-inf"), 0.0, top)  # a padding row: no keys in any split
    total = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for s in tl.static_range(SPLITS):
        w = tl.exp(tl.load(mid_lse_ptr + base + s, mask=row_ok, other=float("-inf"), cache_modifier=".cg") - top)
        o = tl.load(mid_o_ptr + (base + s)[:, None] * BLOCK_D + dims[None, :], mask=row_ok[:, None], other=0.0,
                    cache_modifier=".cg")
        acc += o * w[:, None]
        total += w
    out = acc / tl.where(total == 0.0, 1.0, total)[:, None]
    tl.store(out_rows, out.to(out_rows.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None,
    num_splits: int,
    out: torch.Tensor | None = None,
    rope: DecodeRope | None = None,
    block_n: int = _BLOCK_N,
    num_warps: int = 4,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Attention of each sequence's single query `q: [B, Hq, D]` over its paged keys -> `[B, Hq, D]`.

    `block_tables: int32 [B, max_blocks]`, `context_lens: int32 [B]` (keys per sequence, this step's included;
    a padding row of a captured batch may have 0 and then gets zeros). Launches only: no host synchronisation,
    so it can be captured in a CUDA graph. fp32 inputs use IEEE fp32 products (no tf32). `block_n` (keys per
    tile), `num_warps` and `num_stages` are the split kernel's launch settings (the benchmark sweeps them). By
    default a split kernel (`num_splits > 1`: a small batch, a split walks few tiles) runs one stage: with no
    shared-memory ring to allocate its programs start sooner beside the kernel before (an H200, Qwen3-0.6B
    batch 1: 0.594 -> 0.575 ms a step); an unsplit one (large batches, long walks) pipelines two.
    `rope`: `q` is not yet normalised and rotated and this step's K/V not yet stored (`DecodeRope`).
    """
    batch, hq, d = q.shape
    _, block_size, hkv, _ = k_cache.shape
    group = hq // hkv
    block_d = triton.next_power_of_2(d)
    if q.stride(2) != 1 or not k_cache.is_contiguous() or not v_cache.is_contiguous():
        raise ValueError("decode_attention needs q's last dimension and the KV pools contiguous")
    if rope is not None and (not DecodeRope.supports(d) or rope.k.stride(2) != 1 or rope.v.stride(2) != 1
                             or rope.cos.stride(1) != 1 or rope.sin.stride() != rope.cos.stride()):
        raise ValueError("decode_attention's rope needs a power-of-two head size, k's and v's last dimension and "
                         "the cos/sin tables contiguous")
    r = rope if rope is not None else DecodeRope(q, q, context_lens, q, q, context_lens)  # unused pointers
    norm = rope is not None and rope.q_weight is not None
    out = torch.empty_like(q) if out is None else out
    mid_o = mid_lse = out  # one split writes `out` itself: no partials
    if num_splits > 1:
        mid_o = torch.empty((batch, hq, num_splits, block_d), dtype=torch.float32, device=q.device)
        mid_lse = torch.empty((batch, hq, num_splits), dtype=torch.float32, device=q.device)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    pdl = pdl_enabled(q.device)
    num_stages = num_stages or (1 if num_splits > 1 else 2)
    _split_kernel[(batch, hkv, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, mid_o, mid_lse, out, counters(q.device, batch * hkv),
        r.k, r.v, r.positions, r.cos, r.sin, r.q_weight if norm else q, r.k_weight if norm else q, r.slots,
        q.stride(0), q.stride(1), block_tables.stride(0), out.stride(0), out.stride(1), r.k.stride(0),
        r.k.stride(1), r.v.stride(0), r.v.stride(1), r.cos.stride(0),
        scale, sliding_window or 0, r.eps,
        HQ=hq, HKV=hkv, GROUP=group, D=d, BLOCK_D=block_d, BLOCK_H=max(16, triton.next_power_of_2(group)),
        BLOCK_N=block_n, BLOCK_SIZE=block_size, SPLITS=num_splits, PRECISION=precision, PDL=pdl,
        ROPE=rope is not None, NORM=norm,
        num_warps=num_warps, num_stages=num_stages, launch_pdl=pdl,
    )
    return out
