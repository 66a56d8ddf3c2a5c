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
  to int8 in groups of 32 or 16 (`INPUT_GROUP`: one per weight scale; `x ≈ dx * xq`, `dx = max|x| / 127`) and
  takes the dot products of 4 codes at a time with `dp4a` (one instruction for 4 multiply-adds) in int32; the
  group scales multiply the integer sums.
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

__all__ = ["BLOCK_BYTES", "GEMV_MAX_ROWS", "INPUT_GROUP", "PackedWeight", "pack", "quant_gemm", "quant_gemv",
           "quant_matmul", "random_blocks"]

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
def _k_scale_min_words(w0, w1, w2, j):
    """`_k_scale_min` from the field's three int32 words: bytes j, j + 4 (and j % 4) are byte j % 4 of w0..w2."""
    shift = 8 * (j % 4)
    b0 = (w0 >> shift) & 0xFF
    b1 = (w1 >> shift) & 0xFF
    b2 = (w2 >> shift) & 0xFF
    low = j < 4
    sc = tl.where(low, b0 & 63, (b2 & 15) | ((b0 >> 6) << 4))
    mn = tl.where(low, b1 & 63, (b2 >> 4) | ((b1 >> 6) << 4))
    return sc.to(tl.float32), mn.to(tl.float32)


@triton.jit
def _spread_bits(nib):
    """int32 of 4 bits b0..b3 -> bit i moved to bit 0 of byte i (copies at offsets 0, 7, 14, 21 never carry)."""
    return (nib * 0x00204081) & 0x01010101


# --------------------------------------------------------------------------------------------------- GEMV kernel
# One body for every type. A row's weights are walked in pairs of units: pair v has a "lo" and a "hi" unit whose
# codes come from the same words (the low and high nibbles of Q4_K/Q5_0/Q6_K; two blocks of Q8_0), so each
# weight byte is loaded once. A unit is H 16-byte vectors of byte codes with one scale: 32 weights (H = 2) for
# Q4_K (a sub-block) and Q8_0 (a block), 16 (H = 1) for Q5_0 (half a block: its nibbles split it so) and Q6_K (a
# scale's 16). Per type (`_pair_words`, `_pair_codes`, `_pair_offsets`, `_pair_scales`): which words hold pair v,
# how they decode to the units' code words, where each unit's inputs sit in x, and each unit's scale `a` (code
# term) and `b` (Q4_K's minimum). A unit contributes `a * dx * (sum_k q_k xq_k - Z * sum_k xq_k) - b * sum_k x_k`
# (Z: the type's code offset; xq: the unit's inputs rounded to int8 with step dx).
#
# Grid (M, cdiv(N, BLOCK_N)): the M programs of one row tile run side by side, so extra input rows read the
# tile's weights from L2. Each program walks K in chunks of CHUNK weights (all of K at once where it fits): the
# next chunk's code words are loaded before this chunk's math (by hand: Triton pipelines only loads that feed
# `tl.dot`), and the chunk's inputs are rounded to int8 in registers (`_quantize_units`) while the weights are in
# flight. Tiles are [pairs, rows, vectors, words]: Triton then spreads the pairs over the threads (the warps
# beyond a chunk's pairs split the rows) and keeps a thread's rows and vectors in its registers, so each thread
# rounds the inputs of its own pair and reuses them for its rows (no shuffles). Pairs past the row are masked
# (a zero input contributes nothing; their scale loads are clamped). K is a compile-time constant: a model has
# two or three distinct K, and Triton's interpreter cannot loop up to a run-time argument (numpy 2.4).

#: Inputs per int8 rounding group on the GEMV path, by type: one group per weight unit.
INPUT_GROUP: dict[str, int] = {"q4_k": 32, "q8_0": 32, "q5_0": 16, "q6_k": 16}


@triton.jit
def _pair_words(p0, p1, r, v, ok, K: tl.constexpr, KIND: tl.constexpr, H: tl.constexpr):
    """Raw words of pairs `v` [V, 1, 1, 1] of rows `r` [1, BN, 1, 1], loads masked by `ok` (pairs past the row):
    (a, b), words w = 4h + j along the last two axes [H, 4]."""
    w = 4 * tl.arange(0, H)[None, None, :, None] + tl.arange(0, 4)[None, None, None, :]
    if KIND == "q8_0":  # qs int32 [N, K/4]: lo = block 2v, hi = block 2v + 1 (absent past an odd block count)
        a = tl.load(p0 + r * (K // 4) + 16 * v + w, mask=ok, other=0)
        b = tl.load(p0 + r * (K // 4) + 16 * v + 8 + w, mask=ok & (64 * v + 32 < K), other=0)
    elif KIND == "q5_0":  # qs int32 [N, K/8] (4 words a block), qh int32 [N, K/32]
        a = tl.load(p0 + r * (K // 8) + 4 * v + w, mask=ok, other=0)
        b = tl.load(p1 + r * (K // 32) + v, mask=ok, other=0)
    elif KIND == "q4_k":  # qs int32 [N, K/8]: v = 4 sb + c, 8 words: lo nibbles sub-block 2c, hi nibbles 2c + 1
        a = tl.load(p0 + r * (K // 8) + 8 * v + w, mask=ok, other=0)
        b = tl.zeros([1, 1, 1, 1], tl.int32)
    else:  # q6_k: ql int32 [N, K/8] (4 words a pair), qh int32 [N, K/16]: v = 8 sb + 4 hh + 2 e + h
        a = tl.load(p0 + r * (K // 8) + 4 * v + w, mask=ok, other=0)
        b = tl.load(p1 + r * (K // 16) + 16 * (v // 8) + 8 * ((v // 4) % 2) + 4 * (v % 2) + w, mask=ok, other=0)
    return a, b


@triton.jit
def _pair_codes(a, b, v, KIND: tl.constexpr):
    """Raw words -> (lo, hi) [V, BN, H, 4]: each unit's codes as 4H words of bytes (unsigned but for Q8_0)."""
    if KIND == "q8_0":
        return a, b
    lo = a & 0x0F0F0F0F
    hi = (a >> 4) & 0x0F0F0F0F
    if KIND == "q5_0":  # qh bit i: weight i's 5th bit; lo = weights 0..15, hi = 16..31
        s = 4 * tl.arange(0, 4)[None, None, None, :]  # H = 1
        lo |= _spread_bits((b >> s) & 15) << 4
        hi |= _spread_bits((b >> (16 + s)) & 15) << 4
    elif KIND == "q6_k":  # qh bits 2c of group c: lo is group e, hi group e + 2
        e2 = 2 * ((v // 2) % 2)
        lo |= ((b >> e2) & 0x03030303) << 4
        hi |= ((b >> (e2 + 4)) & 0x03030303) << 4
    return lo, hi


@triton.jit
def _pair_offsets(v, KIND: tl.constexpr):
    """Where the lo and hi units' inputs start in the row, [V] each."""
    if KIND == "q8_0" or KIND == "q4_k":  # q4_k: v = 4 sb + c, sub-blocks 2c and 2c + 1
        return 64 * v, 64 * v + 32
    elif KIND == "q5_0":
        return 32 * v, 32 * v + 16
    else:  # q6_k, v = 8 sb + 4 hh + 2 e + h
        lo = 256 * (v // 8) + 128 * ((v // 4) % 2) + 32 * ((v // 2) % 2) + 16 * (v % 2)
        return lo, lo + 64


@triton.jit
def _pair_scales(p1, p2, p3, r, v, K: tl.constexpr, KIND: tl.constexpr):
    """Per pair `v` [V, 1] (clamped to the row) and row `r` [1, BN]: the lo and hi units' code scales a and
    minimum scales b."""
    if KIND == "q8_0":  # f16 d a block
        d = p1 + r * (K // 32)
        lo = tl.load(d + 2 * v).to(tl.float32)
        return lo, tl.load(d + tl.minimum(2 * v + 1, K // 32 - 1)).to(tl.float32), 0.0, 0.0
    elif KIND == "q5_0":
        d = tl.load(p2 + r * (K // 32) + v).to(tl.float32)
        return d, d, 0.0, 0.0
    elif KIND == "q4_k":  # p1: the 12-byte scale field as 3 int32 words a super-block, p2: (d, dmin) as one word
        sb = v // 4
        words = p1 + r * (K // 256 * 3) + 3 * sb
        w0 = tl.load(words)
        w1 = tl.load(words + 1)
        w2 = tl.load(words + 2)
        dm = tl.load(p2 + r * (K // 256) + sb)
        d = (dm & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        dmin = (dm >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        j = 2 * (v % 4)
        sc_lo, mn_lo = _k_scale_min_words(w0, w1, w2, j)
        sc_hi, mn_hi = _k_scale_min_words(w0, w1, w2, j + 1)
        return d * sc_lo, d * sc_hi, dmin * mn_lo, dmin * mn_hi
    else:  # q6_k: int8 scale per 16 [N, K/16], f16 d [N, K/256]; lo scale 8 hh + 2 e + h, hi 4 further
        sb = v // 8
        s = p2 + r * (K // 16) + 16 * sb + 8 * ((v // 4) % 2) + 2 * ((v // 2) % 2) + (v % 2)
        d = tl.load(p3 + r * (K // 256) + sb).to(tl.float32)
        return d * tl.load(s).to(tl.float32), d * tl.load(s + 4).to(tl.float32), 0.0, 0.0


@triton.jit
def _round_to_int(x, ASM: tl.constexpr):
    """int32 nearest to x (one `cvt.rni` on the GPU; the interpreter rounds halves up, as good for the bound)."""
    if ASM:
        return tl.inline_asm_elementwise("cvt.rni.s32.f32 $0, $1;", "=r,r", [x], dtype=tl.int32, is_pure=True, pack=1)
    return tl.floor(x + 0.5).to(tl.int32)


@triton.jit
def _pack_bytes(q, ASM: tl.constexpr):
    """int32 [V, H, 4, 4] of values in -127..127 -> int32 [V, H, 4] holding them as little-endian bytes."""
    if ASM:  # two byte-packing conversions a word (the 4 values are in one thread)
        even, odd = tl.split(tl.reshape(q, [q.shape[0], q.shape[1], q.shape[2], 2, 2]))
        q0, q2 = tl.split(even)
        q1, q3 = tl.split(odd)
        return tl.inline_asm_elementwise(
            "{ .reg .b32 t; cvt.pack.sat.s8.s32.b32 t, $4, $3, 0; cvt.pack.sat.s8.s32.b32 $0, $2, $1, t; }",
            "=r,r,r,r,r", [q0, q1, q2, q3], dtype=tl.int32, is_pure=True, pack=1)
    return tl.sum((q & 0xFF) << (8 * tl.arange(0, 4))[None, None, None, :], axis=3)


@triton.jit
def _quantize_units(x_row, start, K: tl.constexpr, H: tl.constexpr, CODE_SUMS: tl.constexpr, SUMS: tl.constexpr,
                    ASM: tl.constexpr):
    """The 16H inputs at each `start` [V] -> (int8 codes round(x / dx) as words [V, H, 4], dx = max|x| / 127 [V],
    code sums [V] if CODE_SUMS, exact fp32 sums [V] if SUMS); inputs at or past K read as 0 (all-zero units give
    zero codes)."""
    k = (start[:, None, None, None] + 16 * tl.arange(0, H)[None, :, None, None]
         + 4 * tl.arange(0, 4)[None, None, :, None] + tl.arange(0, 4)[None, None, None, :])
    x = tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32)
    amax = tl.max(tl.max(tl.max(tl.abs(x), axis=3), axis=2), axis=1)
    words = _pack_bytes(_round_to_int(x * (127.0 / tl.maximum(amax, 1e-30))[:, None, None, None], ASM), ASM)
    code_sums = 0
    if CODE_SUMS:  # each byte times 1
        code_sums = tl.sum(tl.sum(_dot4(words, tl.zeros_like(words) + 0x01010101, True, ASM), axis=2), axis=1)
    sums = 0.0
    if SUMS:
        sums = tl.sum(tl.sum(tl.sum(x, axis=3), axis=2), axis=1)
    return words, amax / 127.0, code_sums, sums


@triton.jit
def _unit_sums(codes, a, b, xw, dx, xq_sum, x_sum, Z: tl.constexpr, SIGNED: tl.constexpr, HAS_MIN: tl.constexpr,
               ASM: tl.constexpr):
    """[V, BN]: a * dx * (codes . xq - Z * sum xq) - b * sum x for one unit of each pair."""
    dots = tl.sum(tl.sum(_dot4(codes, xw[:, None, :, :], SIGNED, ASM), axis=3), axis=2)
    if Z != 0:
        dots -= Z * xq_sum[:, None]
    out = a * dx[:, None] * dots.to(tl.float32)
    if HAS_MIN:
        out -= b * x_sum[:, None]
    return out


@triton.jit
def _gemv(x_ptr, p0, p1, p2, p3, y_ptr, N, stride_x, stride_y, K: tl.constexpr, KIND: tl.constexpr,
          BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, ASM: tl.constexpr):
    H: tl.constexpr = 2 if KIND == "q4_k" or KIND == "q8_0" else 1  # 16-byte vectors a unit
    V: tl.constexpr = CHUNK // (32 * H)  # pairs a chunk
    NV: tl.constexpr = (K + 32 * H - 1) // (32 * H)  # pairs a row
    Z: tl.constexpr = 16 if KIND == "q5_0" else (32 if KIND == "q6_k" else 0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    r = tl.minimum(rows, N - 1).to(tl.int64)[None, :]
    x_row = x_ptr + tl.program_id(0).to(tl.int64) * stride_x
    vv = tl.arange(0, V)
    a, b = _pair_words(p0, p1, r[:, :, None, None], vv[:, None, None, None], (vv < NV)[:, None, None, None], K, KIND, H)
    acc = tl.zeros([BLOCK_N], tl.float32)
    for v0 in range(0, NV, V):
        v = v0 + vv
        if NV > V:  # the next chunk's words go out before this chunk's math
            nxt = v + V
            a_next, b_next = _pair_words(p0, p1, r[:, :, None, None], nxt[:, None, None, None],
                                         (nxt < NV)[:, None, None, None], K, KIND, H)
        vc = tl.minimum(v, NV - 1)
        a_lo, a_hi, b_lo, b_hi = _pair_scales(p1, p2, p3, r, vc[:, None], K, KIND)  # loads out before the rounding
        start_lo, start_hi = _pair_offsets(v, KIND)
        xw_lo, dx_lo, qs_lo, xs_lo = _quantize_units(x_row, start_lo, K, H, Z != 0, KIND == "q4_k", ASM)
        xw_hi, dx_hi, qs_hi, xs_hi = _quantize_units(x_row, start_hi, K, H, Z != 0, KIND == "q4_k", ASM)
        lo, hi = _pair_codes(a, b, vc[:, None, None, None], KIND)
        part = _unit_sums(lo, a_lo, b_lo, xw_lo, dx_lo, qs_lo, xs_lo, Z, KIND == "q8_0", KIND == "q4_k", ASM)
        part += _unit_sums(hi, a_hi, b_hi, xw_hi, dx_hi, qs_hi, xs_hi, Z, KIND == "q8_0", KIND == "q4_k", ASM)
        acc += tl.sum(part, axis=0)
        if NV > V:
            a = a_next
            b = b_next
    tl.store(y_ptr + tl.program_id(0).to(tl.int64) * stride_y + rows, acc.to(y_ptr.dtype.element_ty), mask=rows < N)


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
    """Launch shape: BLOCK_N rows a program, CHUNK weights of each row an iteration. The H200 sweep over
    Llama-3-8B's Q4_K_M matrices (`benchmarks/gpu_quant_gemv.py --sweep`, RESULTS.md) found 8 rows best
    everywhere, the whole row of 4096 at once with 4 warps, and chunks of 2048 with 2 warps for 14336. The CPU
    interpreter runs one program at a time: one wide tile a row."""
    if device.type != "cuda":
        return {"BLOCK_N": 64, "CHUNK": 256, "num_warps": 4}
    if w.k <= 4096:
        return {"BLOCK_N": 8, "CHUNK": triton.next_power_of_2(w.k), "num_warps": 4}
    return {"BLOCK_N": 8, "CHUNK": 2048, "num_warps": 2}


def quant_gemv(x: torch.Tensor, w: PackedWeight, *, config: dict[str, int] | None = None) -> torch.Tensor:
    """`x @ W^T` for a few rows of `x` (`[..., k]`, any float dtype; output in x's dtype) on the GEMV path."""
    rows = _flat(x, w)
    y = torch.empty((rows.shape[0], w.n), dtype=x.dtype, device=x.device)
    if rows.shape[0] and w.n:
        cfg = config or gemv_config(w, x.device)
        planes = list(w.planes) + [w.planes[0]] * (4 - len(w.planes))
        if w.kind == "q4_k":  # scale fields and (d, dmin) read as whole words
            planes[1], planes[2] = planes[1].view(torch.int32), planes[2].view(torch.int32)
        grid = (rows.shape[0], triton.cdiv(w.n, cfg["BLOCK_N"]))
        _gemv[grid](rows, *planes, y, w.n, rows.stride(0), y.stride(0), K=w.k, KIND=w.kind,
                    BLOCK_N=cfg["BLOCK_N"], CHUNK=cfg["CHUNK"], ASM=not _INTERPRET, num_warps=cfg["num_warps"])
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
