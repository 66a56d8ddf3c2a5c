"""`y = x @ W^T` in Triton with W kept in its GGUF quantized bits (Q4_K, Q5_0, Q6_K, Q8_0).

Why: batch-1 decode reads every weight once per token, so its time is the weight bytes over memory bandwidth.
Dequantizing to bf16 quadruples those bytes (Q4_K: 4.5 bits a weight against 16); reading the packed bits keeps
decode at the quantized size.

Layout (`pack`): a GGUF tensor is rows of back-to-back blocks whose byte sizes (22, 34, 144, 210) leave fields
unaligned, so the blocks are split once into planes, one per field, each row-major over the weight rows: the
packed codes as int32 words (4-byte aligned, 16-byte vector loads), the 5th/high bits, the sub-block scales as the
file stores them (Q4_K's 12-byte 6-bit field stays packed) and the f16 super-scales. The same bits, the same byte
count: nothing is decoded ahead of time. `nbllm.gguf.quants` documents the block formats.

Two paths:

* GEMV (`quant_gemv`, few input rows: decode). Like llama.cpp's CUDA `mmvq`, each program quantizes its input
  row to int8 in groups of 32 (`x ≈ dx * xq`, `dx = max|x| / 127`) and takes the dot products of 4 codes at a
  time with `dp4a` (one instruction for 4 multiply-adds) in int32; the group scales multiply the integer sums.
  Unpacking and converting every weight to float instead costs ~4 instructions a weight, which at HBM3 rates is
  more than the SMs can issue. The price is the input's 8-bit rounding: the error of one output is at most
  `sum_k |s_g q_k| * dx_g / 2` (code term `s_g q_k` of each weight, `dx_g` of its input group), the bound the
  tests check. Q4_K's minimum term uses the exact fp32 sum of x instead.
* GEMM (`quant_gemm`, prefill): each program dequantizes a [BLOCK_K, BLOCK_N] weight tile in registers, element
  by element as `nbllm.gguf.quants` decodes it (fp32, same operation order), rounds it to the input's dtype and
  feeds `tl.dot`; the tile's bytes are reused by BLOCK_M input rows. fp32 inputs use exact fp32 dots.

The torch reference is the dequantized weight times x in fp32 (`nbllm.models.gpu_quant_linear` builds it from
the GGUF dequantizer, which this package must not import). Under `TRITON_INTERPRET=1` the dp4a instruction
(inline PTX) is emulated with byte shifts, so the same kernels run on the CPU for tests.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["BLOCK_BYTES", "GEMV_MAX_ROWS", "PackedWeight", "pack", "quant_gemm", "quant_gemv", "quant_matmul",
           "random_blocks"]

#: Weights and bytes of one block of each supported type (GGML_QUANT_SIZES).
BLOCK_BYTES: dict[str, tuple[int, int]] = {"q4_k": (256, 144), "q5_0": (32, 22), "q6_k": (256, 210), "q8_0": (32, 34)}
#: Input rows up to which `quant_matmul` takes the GEMV path (each row re-reads the weights, mostly from L2).
GEMV_MAX_ROWS = 8

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class PackedWeight:
    """One GGUF weight `[n, k]` split into per-field planes (see the module docstring), on one device."""

    kind: str  # a key of BLOCK_BYTES
    n: int
    k: int
    planes: tuple[torch.Tensor, ...]

    @property
    def nbytes(self) -> int:
        """Bytes a full pass reads: the GGUF size of the tensor."""
        return sum(p.numel() * p.element_size() for p in self.planes)

    def to(self, device: torch.device | str) -> PackedWeight:
        return PackedWeight(self.kind, self.n, self.k, tuple(p.to(device) for p in self.planes))


def pack(blocks: torch.Tensor, kind: str, k: int) -> PackedWeight:
    """Split a GGUF tensor's bytes (`blocks`: uint8 `[n, row_bytes]` or flat) of `kind` with rows of `k` weights.

    Runs where `blocks` is (pack on the GPU: a few slicing copies). Row permutations (llama.cpp's q/k order) are
    best applied to `blocks` before: rows are whole blocks.
    """
    if kind not in BLOCK_BYTES:
        raise ValueError(f"unsupported kind {kind!r}; expected one of {sorted(BLOCK_BYTES)}")
    qk, size = BLOCK_BYTES[kind]
    if k % qk or blocks.dtype != torch.uint8 or blocks.numel() % (k // qk * size):
        raise ValueError(f"{kind} rows of {k} weights need uint8 blocks of {k // qk * size} bytes a row")
    n = blocks.numel() // (k // qk * size)
    b = blocks.reshape(n, k // qk, size)

    def field(a: int, z: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
        return b[:, :, a:z].contiguous().view(dtype).reshape(n, -1)

    if kind == "q8_0":  # d | qs[32]
        planes = (field(2, 34, torch.int32), field(0, 2, torch.float16))
    elif kind == "q5_0":  # d | qh[4] | qs[16]
        planes = (field(6, 22, torch.int32), field(2, 6, torch.int32), field(0, 2, torch.float16))
    elif kind == "q4_k":  # d | dmin | scales[12] | qs[128]
        planes = (field(16, 144, torch.int32), field(4, 16), field(0, 4, torch.float16))
    else:  # q6_k: ql[128] | qh[64] | scales[16] (int8) | d
        planes = (field(0, 128, torch.int32), field(128, 192, torch.int32), field(192, 208, torch.int8),
                  field(208, 210, torch.float16))
    return PackedWeight(kind, n, k, planes)


# Where each block's f16 scale fields sit, and a typical magnitude for them (weights of ~0.02-0.1).
_F16_FIELDS: dict[str, tuple[tuple[int, float], ...]] = {
    "q8_0": ((0, 2e-4),), "q5_0": ((0, 2e-3),), "q4_k": ((0, 1e-4), (2, 1e-4)), "q6_k": ((208, 2e-5),)}


def random_blocks(kind: str, n: int, k: int, *, generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Valid GGUF bytes (uint8 `[n, row_bytes]`) of a random `[n, k]` weight: random codes and sub-block scales,
    f16 super-scales in a realistic range. For tests and for benchmarks of model-sized weights (quantizing real
    values with gguf-py takes minutes at 8B)."""
    qk, size = BLOCK_BYTES[kind]
    b = torch.randint(0, 256, (n, k // qk, size), dtype=torch.uint8, generator=generator, device=device)
    for offset, scale in _F16_FIELDS[kind]:
        d = torch.rand((n, k // qk, 1), generator=generator, device=device).add_(0.5).mul_(scale)
        b[:, :, offset : offset + 2] = d.to(torch.float16).view(torch.uint8)
    return b.view(n, -1)


# --------------------------------------------------------------------------------------------------- shared parts


@triton.jit
def _dot4(a, b, SIGNED_A: tl.constexpr, ASM: tl.constexpr):
    """Per int32 lane: the sum of the 4 byte products of `a` (signed or unsigned bytes) and `b` (signed bytes)."""
    a, b = tl.broadcast(a, b)
    if ASM:
        if SIGNED_A:
            return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, tl.zeros_like(a)],
                                             dtype=tl.int32, is_pure=True, pack=1)
        return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, tl.zeros_like(a)],
                                         dtype=tl.int32, is_pure=True, pack=1)
    acc = tl.zeros_like(a)
    for i in tl.static_range(4):
        if SIGNED_A:
            ai = (a << (24 - 8 * i)) >> 24
        else:
            ai = (a >> (8 * i)) & 0xFF
        acc += ai * ((b << (24 - 8 * i)) >> 24)
    return acc


@triton.jit
def _pack4(q, AXIS: tl.constexpr):
    """int32 [..., 4] (AXIS: the last) of values in -128..255 -> int32 [...] holding them as little-endian bytes."""
    shift = 8 * tl.arange(0, 4)
    return tl.sum((q & 0xFF) << shift, axis=AXIS)


@triton.jit
def _int8_codes(x, amax, AXIS: tl.constexpr):
    """x [..., W] (AXIS: the last) in groups of max |x| `amax` [...] -> (int32 codes round(x * 127 / amax),
    their scale amax / 127); all-zero groups give zero codes."""
    inv = 127.0 / tl.maximum(amax, 1e-30)
    q = tl.floor(x * tl.expand_dims(inv, AXIS) + 0.5).to(tl.int32)
    return q, amax / 127.0


@triton.jit
def _int8_words(x, R: tl.constexpr):
    """x [..., 8, 4] of rank R (groups of 32 as 8 words of 4 bytes) -> (codes as int32 words [..., 8], their int32
    values [..., 8, 4], scales [...]). x arrives in the weight words' shape so the packing stays in each thread."""
    amax = tl.max(tl.max(tl.abs(x), axis=R - 1), axis=R - 2)
    q, dx = _int8_codes(x, tl.expand_dims(amax, R - 2), R - 1)
    return _pack4(q, R - 1), q, tl.reshape(dx, amax.shape)


@triton.jit
def _k_scale_min(base, j):
    """Q4_K's 6-bit scale and min of sub-block `j` (0..7) from the 12-byte field at `base` (as quants._k_scale_min)."""
    a = tl.load(base + j).to(tl.int32)
    b = tl.load(base + j + 4).to(tl.int32)
    c = tl.load(base + (j % 4)).to(tl.int32)
    low = j < 4
    sc = tl.where(low, a & 63, (b & 15) | ((c >> 6) << 4))
    mn = tl.where(low, b & 63, (b >> 4) | ((a >> 6) << 4))
    return sc.to(tl.float32), mn.to(tl.float32)


@triton.jit
def _spread_bits(nib):
    """int32 of 4 bits b0..b3 -> bit i moved to bit 0 of byte i (copies at offsets 0, 7, 14, 21 never carry)."""
    return (nib * 0x00204081) & 0x01010101


# --------------------------------------------------------------------------------------------------- GEMV kernels
# Grid (M, cdiv(N, BLOCK_N)): the M programs of one row tile run side by side, so extra input rows read the
# tile's weights from L2. Each program first rounds its whole input row to int8 (`_quantize_row`) into a scratch
# row that every program of that input row writes with the same bytes, then reads it back in the weight tile's
# shape: computed in the loop instead, the rounding moved values between threads through shared memory at every
# step and cost more instructions than the weights. Each iteration covers S super-blocks (256 weights each);
# their index is clamped for weight loads and masked for input loads (input 0 contributes nothing). The blocks a
# row (NSB, NB) are compile-time constants: a model has two or three distinct K, and Triton's interpreter cannot
# loop up to a run-time argument (numpy 2.4).


@triton.jit
def _quantize_row(x_row, xi_row, xf_row, K: tl.constexpr):
    """x_row [K] -> scratch: xi_row = int8 codes as K/4 words, then code sums per 16 [K/16]; xf_row = scales per 32
    [K/32], then exact fp32 sums per 32 [K/32]. Ends with a barrier: the program reads it back next."""
    G: tl.constexpr = 32
    g = tl.arange(0, G)
    t = tl.arange(0, 8)
    i = tl.arange(0, 4)
    for g0 in tl.static_range(0, K // 32, G):  # unrolled: the chunks' loads go out together
        grp = g0 + g
        ok = grp < K // 32
        x = tl.load(x_row + (grp * 32)[:, None, None] + (4 * t)[None, :, None] + i[None, None, :],
                    mask=ok[:, None, None], other=0.0).to(tl.float32)
        words, q, dx = _int8_words(x, 3)
        tl.store(xi_row + (grp * 8)[:, None] + t[None, :], words, mask=ok[:, None])
        sums16 = tl.sum(tl.reshape(tl.sum(q, axis=2), (G, 2, 4)), axis=2)
        tl.store(xi_row + K // 4 + (grp * 2)[:, None] + tl.arange(0, 2)[None, :], sums16, mask=ok[:, None])
        tl.store(xf_row + grp, dx, mask=ok)
        tl.store(xf_row + K // 32 + grp, tl.sum(tl.sum(x, axis=2), axis=1), mask=ok)
    tl.debug_barrier()


@triton.jit
def _rows(N, BLOCK_N: tl.constexpr):
    """This program's output rows, their store mask, and the rows to read (clamped: loads need no mask)."""
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return rows, rows < N, tl.minimum(rows, N - 1).to(tl.int64)


@triton.jit
def _scratch(x_ptr, xi_ptr, xf_ptr, stride_x, stride_xi, stride_xf, K: tl.constexpr):
    """This program's input row's scratch, filled (after the first weight tile's loads are issued)."""
    m = tl.program_id(0).to(tl.int64)
    xi_row = xi_ptr + m * stride_xi
    xf_row = xf_ptr + m * stride_xf
    _quantize_row(x_ptr + m * stride_x, xi_row, xf_row, K)
    return xi_row, xf_row


@triton.jit
def _gemv_q4_k(x_ptr, xi_ptr, xf_ptr, qs_ptr, sc_ptr, dm_ptr, y_ptr, N, NSB: tl.constexpr, stride_x, stride_xi,
               stride_xf, stride_y, BLOCK_N: tl.constexpr, S: tl.constexpr, ASM: tl.constexpr):
    # 64-weight chunk c of a super-block: qs words 8c..8c+7, low nibbles sub-block 2c, high nibbles 2c + 1.
    # The next iteration's code words are loaded before this one's math (by hand: Triton pipelines only dots).
    rows, ok, r = _rows(N, BLOCK_N)
    c = tl.arange(0, 4)
    t = tl.arange(0, 8)
    ss = tl.arange(0, S)
    w_ptr = qs_ptr + r[:, None, None, None] * (NSB * 32) + (8 * c)[None, None, :, None] + t[None, None, None, :]
    w = tl.load(w_ptr + (tl.minimum(ss, NSB - 1) * 32)[None, :, None, None])  # [BN, S, 4, 8]
    xi, xf = _scratch(x_ptr, xi_ptr, xf_ptr, stride_x, stride_xi, stride_xf, NSB * 256)
    acc = tl.zeros([BLOCK_N], tl.float32)
    for sb0 in range(0, NSB, S):
        sb = sb0 + ss
        sbc = tl.minimum(sb, NSB - 1)
        w_next = tl.load(w_ptr + (tl.minimum(sb + S, NSB - 1) * 32)[None, :, None, None])
        x_ok = (sb < NSB)[:, None]
        xword = (sb * 64)[:, None, None] + (16 * c)[None, :, None] + t[None, None, :]  # [S, 4, 8]
        xe = tl.load(xi + xword, mask=x_ok[:, :, None], other=0)
        xo = tl.load(xi + xword + 8, mask=x_ok[:, :, None], other=0)
        grp = (sb * 8)[:, None] + (2 * c)[None, :]  # [S, 4]: the even sub-blocks' input groups
        dxe = tl.load(xf + grp, mask=x_ok, other=0.0)
        dxo = tl.load(xf + grp + 1, mask=x_ok, other=0.0)
        sxe = tl.load(xf + NSB * 8 + grp, mask=x_ok, other=0.0)
        sxo = tl.load(xf + NSB * 8 + grp + 1, mask=x_ok, other=0.0)
        de = tl.sum(_dot4(w & 0x0F0F0F0F, xe[None], False, ASM), axis=3).to(tl.float32)
        do = tl.sum(_dot4((w >> 4) & 0x0F0F0F0F, xo[None], False, ASM), axis=3).to(tl.float32)
        sc_base = sc_ptr + r[:, None, None] * (NSB * 12) + (sbc * 12)[None, :, None]
        sce, mne = _k_scale_min(sc_base, (2 * c)[None, None, :])
        sco, mno = _k_scale_min(sc_base, (2 * c + 1)[None, None, :])
        dm = dm_ptr + r[:, None] * (NSB * 2) + (sbc * 2)[None, :]
        d = tl.load(dm).to(tl.float32)
        dmin = tl.load(dm + 1).to(tl.float32)
        codes = tl.sum(sce * dxe[None] * de + sco * dxo[None] * do, axis=2)
        mins = tl.sum(mne * sxe[None] + mno * sxo[None], axis=2)
        acc += tl.sum(d * codes - dmin * mins, axis=1)
        w = w_next
    tl.store(y_ptr + tl.program_id(0).to(tl.int64) * stride_y + rows, acc.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _gemv_q6_k(x_ptr, xi_ptr, xf_ptr, ql_ptr, qh_ptr, sc_ptr, d_ptr, y_ptr, N, NSB: tl.constexpr, stride_x,
               stride_xi, stride_xf, stride_y, BLOCK_N: tl.constexpr, S: tl.constexpr, ASM: tl.constexpr):
    # Weight 128h + 32c + 4t + i (h: half, c: 0..3, t: word, i: byte) has its low 4 bits in ql word
    # 16h + 8(c % 2) + t, nibble c // 2, and its high 2 bits in qh word 8h + t, bits 2c; scale (w // 16).
    # Tiles are [BN, F, 4]: f = (super-block, h, t // 4) flattened, then t % 4, so a 16-weight scale group
    # is one f. Next iteration's code words are loaded before this one's math, as in _gemv_q4_k.
    rows, ok, r = _rows(N, BLOCK_N)
    f = tl.arange(0, S * 4)
    tt = tl.arange(0, 4)
    s_f = f // 4
    h_f = (f // 2) % 2
    half = f % 2
    ql_ptrs = ql_ptr + r[:, None, None] * (NSB * 32) + (16 * h_f + 4 * half)[None, :, None] + tt[None, None, :]
    qh_ptrs = qh_ptr + r[:, None, None] * (NSB * 16) + (8 * h_f + 4 * half)[None, :, None] + tt[None, None, :]
    sb_f = tl.minimum(s_f, NSB - 1)
    ql_a = tl.load(ql_ptrs + (sb_f * 32)[None, :, None])  # c even
    ql_b = tl.load(ql_ptrs + (sb_f * 32 + 8)[None, :, None])  # c odd
    qh = tl.load(qh_ptrs + (sb_f * 16)[None, :, None])
    xi, xf = _scratch(x_ptr, xi_ptr, xf_ptr, stride_x, stride_xi, stride_xf, NSB * 256)
    acc = tl.zeros([BLOCK_N], tl.float32)
    for sb0 in range(0, NSB, S):
        f_ok = sb0 + s_f < NSB
        sb_f = tl.minimum(sb0 + s_f, NSB - 1)
        nx = tl.minimum(sb0 + S + s_f, NSB - 1)
        ql_a_next = tl.load(ql_ptrs + (nx * 32)[None, :, None])
        ql_b_next = tl.load(ql_ptrs + (nx * 32 + 8)[None, :, None])
        qh_next = tl.load(qh_ptrs + (nx * 16)[None, :, None])
        d = tl.load(d_ptr + r[:, None] * NSB + sb_f[None, :]).to(tl.float32)  # [BN, F]
        for c in tl.static_range(4):
            xw = tl.load(xi + (sb_f * 64 + 32 * h_f + 8 * c + 4 * half)[:, None] + tt[None, :],
                         mask=f_ok[:, None], other=0)  # [F, 4]
            dx = tl.load(xf + sb_f * 8 + 4 * h_f + c, mask=f_ok, other=0.0)
            g16 = sb_f * 16 + 8 * h_f + 2 * c + half
            xsum = tl.load(xi + NSB * 64 + g16, mask=f_ok, other=0)
            if c % 2 == 0:
                lo = ql_a
            else:
                lo = ql_b
            lo = (lo >> (4 * (c // 2))) & 0x0F0F0F0F
            codes = lo | (((qh >> (2 * c)) & 0x03030303) << 4)
            dots = tl.sum(_dot4(codes, xw[None], False, ASM), axis=2)  # [BN, F]
            sc = tl.load(sc_ptr + r[:, None] * (NSB * 16) + g16[None, :]).to(tl.float32)
            acc += tl.sum(d * sc * dx[None] * (dots - 32 * xsum[None]).to(tl.float32), axis=1)
        ql_a = ql_a_next
        ql_b = ql_b_next
        qh = qh_next
    tl.store(y_ptr + tl.program_id(0).to(tl.int64) * stride_y + rows, acc.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _gemv_q5_0(x_ptr, xi_ptr, xf_ptr, qs_ptr, qh_ptr, d_ptr, y_ptr, N, NB: tl.constexpr, stride_x, stride_xi,
               stride_xf, stride_y, BLOCK_N: tl.constexpr, S: tl.constexpr, ASM: tl.constexpr):
    # Block of 32: qs word t holds weights 4t..4t+3 (low nibbles) and 16+4t.. (high); qh bit i is weight i's 5th.
    G: tl.constexpr = 8 * S
    rows, ok, r = _rows(N, BLOCK_N)
    xi, xf = _scratch(x_ptr, xi_ptr, xf_ptr, stride_x, stride_xi, stride_xf, NB * 32)
    t = tl.arange(0, 4)
    acc = tl.zeros([BLOCK_N], tl.float32)
    for b0 in range(0, NB, G):
        blk = b0 + tl.arange(0, G)
        bc = tl.minimum(blk, NB - 1)
        x_ok = blk < NB
        xl = tl.load(xi + (blk * 8)[:, None] + t[None, :], mask=x_ok[:, None], other=0)  # [G, 4]
        xh = tl.load(xi + (blk * 8 + 4)[:, None] + t[None, :], mask=x_ok[:, None], other=0)
        xsum = (tl.load(xi + NB * 8 + 2 * blk, mask=x_ok, other=0)
                + tl.load(xi + NB * 8 + 2 * blk + 1, mask=x_ok, other=0))
        dx = tl.load(xf + blk, mask=x_ok, other=0.0)
        w = tl.load(qs_ptr + r[:, None, None] * (NB * 4) + (bc * 4)[None, :, None] + t[None, None, :])  # [BN, G, 4]
        hb = tl.load(qh_ptr + r[:, None] * NB + bc[None, :])[:, :, None]
        lo = (w & 0x0F0F0F0F) | (_spread_bits((hb >> (4 * t)) & 15) << 4)
        hi = ((w >> 4) & 0x0F0F0F0F) | (_spread_bits((hb >> (16 + 4 * t)) & 15) << 4)
        dots = tl.sum(_dot4(lo, xl[None], False, ASM) + _dot4(hi, xh[None], False, ASM), axis=2)
        d = tl.load(d_ptr + r[:, None] * NB + bc[None, :]).to(tl.float32)
        acc += tl.sum(d * dx[None] * (dots - 16 * xsum[None]).to(tl.float32), axis=1)
    tl.store(y_ptr + tl.program_id(0).to(tl.int64) * stride_y + rows, acc.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _gemv_q8_0(x_ptr, xi_ptr, xf_ptr, qs_ptr, d_ptr, y_ptr, N, NB: tl.constexpr, stride_x, stride_xi, stride_xf,
               stride_y, BLOCK_N: tl.constexpr, S: tl.constexpr, ASM: tl.constexpr):
    G: tl.constexpr = 8 * S
    rows, ok, r = _rows(N, BLOCK_N)
    xi, xf = _scratch(x_ptr, xi_ptr, xf_ptr, stride_x, stride_xi, stride_xf, NB * 32)
    t = tl.arange(0, 8)
    acc = tl.zeros([BLOCK_N], tl.float32)
    for b0 in range(0, NB, G):
        blk = b0 + tl.arange(0, G)
        bc = tl.minimum(blk, NB - 1)
        x_ok = blk < NB
        xw = tl.load(xi + (blk * 8)[:, None] + t[None, :], mask=x_ok[:, None], other=0)  # [G, 8]
        dx = tl.load(xf + blk, mask=x_ok, other=0.0)
        w = tl.load(qs_ptr + r[:, None, None] * (NB * 8) + (bc * 8)[None, :, None] + t[None, None, :])  # [BN, G, 8]
        dots = tl.sum(_dot4(w, xw[None], True, ASM), axis=2)
        d = tl.load(d_ptr + r[:, None] * NB + bc[None, :]).to(tl.float32)
        acc += tl.sum(d * dx[None] * dots.to(tl.float32), axis=1)
    tl.store(y_ptr + tl.program_id(0).to(tl.int64) * stride_y + rows, acc.to(y_ptr.dtype.element_ty), mask=ok)


_GEMV = {"q4_k": _gemv_q4_k, "q5_0": _gemv_q5_0, "q6_k": _gemv_q6_k, "q8_0": _gemv_q8_0}


# --------------------------------------------------------------------------------------------------- GEMM kernel


@triton.jit
def _dequant(p0, p1, p2, p3, r, k, K, KIND: tl.constexpr):
    """fp32 weights W[r, k] (r: [1, BN] int64 rows, k: [BK, 1] columns), decoded as nbllm.gguf.quants does."""
    if KIND == "q8_0":  # p0: codes int8 [N, K], p1: d [N, K/32]
        q = tl.load(p0 + r * K + k).to(tl.float32)
        return q * tl.load(p1 + r * (K // 32) + k // 32).to(tl.float32)
    elif KIND == "q5_0":  # p0: qs bytes [N, K/2], p1: qh int32 [N, K/32], p2: d
        blk = k // 32
        i = k % 32
        nib = (tl.load(p0 + r * (K // 2) + blk * 16 + i % 16).to(tl.int32) >> (4 * (i // 16))) & 15
        hb = (tl.load(p1 + r * (K // 32) + blk) >> i) & 1
        d = tl.load(p2 + r * (K // 32) + blk).to(tl.float32)
        return d * ((nib | (hb << 4)) - 16).to(tl.float32)
    elif KIND == "q4_k":  # p0: qs bytes [N, K/2], p1: scales [N, K/256*12], p2: (d, dmin) [N, K/256*2]
        sb = k // 256
        i = k % 256
        q = (tl.load(p0 + r * (K // 2) + sb * 128 + 32 * (i // 64) + i % 32).to(tl.int32) >> (4 * ((i // 32) % 2))) & 15
        sc, mn = _k_scale_min(p1 + r * (K // 256 * 12) + sb * 12, i // 32)
        d = tl.load(p2 + r * (K // 128) + sb * 2).to(tl.float32)
        dmin = tl.load(p2 + r * (K // 128) + sb * 2 + 1).to(tl.float32)
        return (d * sc) * q.to(tl.float32) - (dmin * mn)
    else:  # q6_k, p0: ql bytes [N, K/2], p1: qh bytes [N, K/4], p2: scales int8 [N, K/16], p3: d [N, K/256]
        sb = k // 256
        i = k % 256
        h = i // 128
        c = (i % 128) // 32
        lo = (tl.load(p0 + r * (K // 2) + sb * 128 + 64 * h + 32 * (c % 2) + i % 32).to(tl.int32) >> (4 * (c // 2))) & 15
        hi = (tl.load(p1 + r * (K // 4) + sb * 64 + 32 * h + i % 32).to(tl.int32) >> (2 * c)) & 3
        sc = tl.load(p2 + r * (K // 16) + k // 16).to(tl.float32)
        d = tl.load(p3 + r * (K // 256) + sb).to(tl.float32)
        return (d * sc) * ((lo | (hi << 4)) - 32).to(tl.float32)


@triton.jit
def _gemm(x_ptr, p0, p1, p2, p3, y_ptr, M, N, K: tl.constexpr, stride_x, stride_y, KIND: tl.constexpr,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    # Grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)): the row-block programs of one weight tile run together (L2 reuse).
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    r = tl.minimum(n, N - 1).to(tl.int64)[None, :]
    x_rows = x_ptr + tl.minimum(m, M - 1).to(tl.int64)[:, None] * stride_x
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + kk
        x = tl.load(x_rows + k[None, :], mask=(k < K)[None, :], other=0.0)
        w = _dequant(p0, p1, p2, p3, r, tl.minimum(k, K - 1)[:, None], K, KIND)
        acc = tl.dot(x, w.to(x.dtype), acc, input_precision=PRECISION)
    ok = (m < M)[:, None] & (n < N)[None, :]
    tl.store(y_ptr + m.to(tl.int64)[:, None] * stride_y + n[None, :], acc.to(y_ptr.dtype.element_ty), mask=ok)


# --------------------------------------------------------------------------------------------------- host side


def _flat(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    if x.shape[-1] != w.k:
        raise ValueError(f"input has {x.shape[-1]} features, the weight {w.k}")
    rows = x.reshape(-1, w.k)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def gemv_config(w: PackedWeight, device: torch.device) -> dict[str, int]:
    """Launch shape: S * 256 weights a row per iteration over BLOCK_N rows, the best of a sweep on an H200 over
    Llama-3-8B's matrices (`benchmarks/gpu_quant_gemv.py --sweep`). The CPU interpreter runs one program at a
    time: one wide tile a row."""
    if device.type != "cuda":
        return {"BLOCK_N": 64, "S": 2, "num_warps": 4}
    return {"BLOCK_N": 32 if w.n >= 8192 else 16, "S": 2 if w.n >= 8192 else 4, "num_warps": 4}


def quant_gemv(x: torch.Tensor, w: PackedWeight, *, config: dict[str, int] | None = None) -> torch.Tensor:
    """`x @ W^T` for a few rows of `x` (`[..., k]`, any float dtype; output in x's dtype) on the GEMV path."""
    rows = _flat(x, w)
    y = torch.empty((rows.shape[0], w.n), dtype=x.dtype, device=x.device)
    if rows.shape[0] and w.n:
        cfg = config or gemv_config(w, x.device)
        qk = BLOCK_BYTES[w.kind][0]
        grid = (rows.shape[0], triton.cdiv(w.n, cfg["BLOCK_N"]))
        xi = torch.empty((rows.shape[0], w.k // 4 + w.k // 16), dtype=torch.int32, device=x.device)
        xf = torch.empty((rows.shape[0], w.k // 16), dtype=torch.float32, device=x.device)
        _GEMV[w.kind][grid](rows, xi, xf, *w.planes, y, w.n, w.k // qk, rows.stride(0), xi.stride(0), xf.stride(0),
                            y.stride(0), BLOCK_N=cfg["BLOCK_N"], S=cfg["S"], ASM=not _INTERPRET,
                            num_warps=cfg["num_warps"])
    return y.view(*x.shape[:-1], w.n)


def quant_gemm(x: torch.Tensor, w: PackedWeight, *, block_m: int = 128, block_n: int = 64, block_k: int = 32,
               num_warps: int = 8) -> torch.Tensor:
    """`x @ W^T` on the GEMM path (prefill): bf16/fp16 inputs multiply W rounded to their dtype, fp32 exactly.

    The default tile is the largest whose element-wise decode fits the registers without spilling on sm_90."""
    rows = _flat(x, w)
    y = torch.empty((rows.shape[0], w.n), dtype=x.dtype, device=x.device)
    if rows.shape[0] and w.n:
        planes = list(w.planes)  # the code planes as bytes: the GEMM decodes element by element
        planes[0] = planes[0].view(torch.int8 if w.kind == "q8_0" else torch.uint8)
        if w.kind == "q6_k":
            planes[1] = planes[1].view(torch.uint8)
        planes += [planes[0]] * (4 - len(planes))
        grid = (triton.cdiv(rows.shape[0], block_m), triton.cdiv(w.n, block_n))
        _gemm[grid](rows, *planes, y, rows.shape[0], w.n, w.k, rows.stride(0), y.stride(0), KIND=w.kind,
                    BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                    PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=num_warps)
    return y.view(*x.shape[:-1], w.n)


def quant_matmul(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """`x @ W^T`: the GEMV path up to `GEMV_MAX_ROWS` input rows, the GEMM path beyond."""
    rows = x.numel() // max(x.shape[-1], 1)
    return quant_gemv(x, w) if rows <= GEMV_MAX_ROWS else quant_gemm(x, w)
