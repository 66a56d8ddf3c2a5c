"""llama.cpp's CPU matmuls against quantized weights, bit for bit: integer block dots, then its float order.

Why: `numerics="llamacpp"` exists to reproduce llama.cpp's greedy picks, and at its near-ties those hinge on the
last bits of every matmul. ggml (x86, AVX2 build, as llama-cpp-python compiles it) quantizes the activation row
to the weight's `vec_dot_type`, takes exact integer dot products per block, and only then goes to float, in an
order fixed by the kernel. This module keeps each weight as its GGUF integers and scales and computes exactly
that: the integer sums exactly (float64 or small fp32 integers), the float steps one by one with fp32 fused
multiply-adds (`fma32`) and the kernels' horizontal sums. What it copies, per weight type:

- Q8_0, Q5_0 (`ggml_vec_dot_q8_0_q8_0`, `..._q5_0_q8_0`; llamafile's `tinyBLAS_Q0_AVX` for batches, same order):
  per block of 32, 8 int32 lanes of 4 products each; `acc[lane] = fma(f32(d_w*d_x), lane, acc[lane])` block by
  block; `hsum_float_8(acc)`.
- Q6_K (not repacked on AVX2): under 8 activation rows `ggml_vec_dot_q6_K_q8_K`: per super-block of 256,
  8 lanes of `scale*q6*q8` (lane = element % 32 // 4) minus `32*scale*bsum` (lane = element % 256 // 32),
  `acc = fma(f32(d_x*d_w), lane, acc)`, `hsum_float_8`; from 8 rows the tiled matmul (`tiled/`): one exact
  integer `S` per super-block, `acc = fma(f32(d_w*S), d_x, acc)`.
- Q4_K, rows a multiple of 8 (repacked to `block_q4_Kx8`, `ggml_gemm_q4_K_8x8_q8_K` / `ggml_gemv_...`): one fp32
  lane per output; `acc = fma(f32(I), f32(d_w*d_x), acc)` and the same for the mins, then `acc - acc_min`; `I`
  sums 64 elements (two sub-blocks) in the gemm, which takes the activation rows in groups of 4 (quantized by
  `ggml_quantize_mat_q8_K_4x8`), and a whole super-block in the gemv that takes the leftover rows.

Other weight types keep the rounded-activation approximation (`activation_rounding`).
"""

from __future__ import annotations

from functools import cache

import numpy as np
import torch
from gguf import GGMLQuantizationType
from torch import nn

__all__ = [
    "EXACT_TYPES", "ROW_SELECTABLE", "QuantLinear", "div32", "fma32", "fma32_", "hsum_float_8", "quantize_q8_0", "quantize_q8_K",
    "unpack",
]

Q = GGMLQuantizationType
QK_K = 256
_LANE_CACHE_ROWS = 1 << 15  # weights with up to this many outputs keep their lanes as floats (a head converts per call)
TILED_MIN_ROWS = 8  # `ggml_tiled_min_batch`: from 8 activation rows K-quants (not repacked) take the tiled matmul
_TIE_BITS = (1 << 29) - 1  # the 29 bits a float64 loses when rounded to float32
_TIE = 1 << 28


def _fma32_emulated(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """`fmaf` without an fma: the product of two floats is exact in float64, so the float64 sum has one rounding;
    a second rounding to float32 can only go wrong when that sum sits exactly half-way between two floats, which
    the exact error of the sum (TwoSum) settles."""
    p = a.double() * b.double()
    cd = c.double()
    s = p + cd
    r = s.float()
    tie = (s.view(torch.int64) & _TIE_BITS) == _TIE
    if bool(tie.any()):
        tie = torch.broadcast_to(tie, s.shape)
        p, cd = torch.broadcast_to(p, s.shape), torch.broadcast_to(cd, s.shape)
        bv = s - p
        err = (p - (s - bv)) + (cd - bv)
        up = torch.nextafter(r, torch.full_like(r, float("inf")))
        down = torch.nextafter(r, torch.full_like(r, float("-inf")))
        away = torch.where(s > r.double(), up, down)
        r = torch.where(tie & (err != 0) & ((err > 0) == (s > r.double())), away, r)
    return r


@cache
def _native_fma() -> bool:
    """Whether torch's float32 `addcmul` on this build is a fused multiply-add (x86 builds vectorize it as one):
    checked once, in place and not, against the emulation on values where fused and unfused results differ."""
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(4099, generator=g) for _ in range(3))
    expected = _fma32_emulated(a, b, c)
    strided = torch.zeros(4099, 2)[:, 0].copy_(c)  # in place on a strided view: the unvectorized loop
    return (torch.equal(torch.addcmul(c, a, b), expected) and torch.equal(c.clone().addcmul_(a, b), expected)
            and torch.equal(strided.addcmul_(a, b), expected))


def fma32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """`fmaf(a, b, c)` on float32 tensors (broadcast): `a*b + c` rounded once, as AVX2's `vfmadd` computes it."""
    if _native_fma():
        a, b, c = torch.broadcast_tensors(a.float(), b.float(), c.float())
        return torch.addcmul(c, a, b)
    return _fma32_emulated(a, b, c)


def fma32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`acc = fmaf(a, b, acc)` in place (float32 `acc` of the broadcast shape): the accumulation loops' form."""
    if _native_fma():
        return acc.addcmul_(a, b)
    return acc.copy_(_fma32_emulated(a, b, acc))


def hsum_float_8(x: torch.Tensor) -> torch.Tensor:
    """ggml's `hsum_float_8` (and tinyBLAS's `hsum`) over the last dim of 8 lanes: `(s0+s2) + (s1+s3)`,
    `s_i = x[i+4] + x[i]`."""
    s = x[..., 4:] + x[..., :4]
    return (s[..., 0] + s[..., 2]) + (s[..., 1] + s[..., 3])


def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)[..., 0]


def unpack(qtype: GGMLQuantizationType, raw: np.ndarray, rows: int, cols: int) -> dict[str, torch.Tensor]:
    """A GGUF tensor's integers and scales, elements in natural order.

    Q8_0/Q5_0: `q [rows, cols]` (signed) and `d [rows, cols/32]`. Q4_K: `q` (0..15), `sc`, `m` per 32 and `d`,
    `dmin` per 256. Q6_K: `q` (0..63, unsigned), `sc` per 16 (signed) and `d` per 256.
    """
    if qtype == Q.Q8_0:
        b = raw.reshape(rows, cols // 32, 34)
        q = b[..., 2:].view(np.int8)
        return {"q": torch.from_numpy(q.reshape(rows, cols)), "d": torch.from_numpy(_f16(b[..., :2]))}
    if qtype == Q.Q5_0:
        b = raw.reshape(rows, cols // 32, 22)
        qh = np.ascontiguousarray(b[..., 2:6]).view(np.uint32)[..., 0].astype(np.int64)
        qs = b[..., 6:].astype(np.int32)
        bits = (qh[..., None] >> np.arange(32)) & 1
        q = np.concatenate((qs & 15, qs >> 4), axis=-1) | (bits.astype(np.int32) << 4)
        q = (q - 16).astype(np.int8)
        return {"q": torch.from_numpy(q.reshape(rows, cols)), "d": torch.from_numpy(_f16(b[..., :2]))}
    if qtype == Q.Q4_K:
        b = raw.reshape(rows, cols // QK_K, 144)
        s = b[..., 4:16].astype(np.int32)
        sc = np.concatenate((s[..., 0:4] & 63, (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)), axis=-1)
        m = np.concatenate((s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)), axis=-1)
        qs = b[..., 16:].reshape(rows, cols // QK_K, 4, 1, 32).astype(np.int32)
        q = np.concatenate((qs & 15, qs >> 4), axis=-2)  # [.., chunk of 64, low/high half, 32]
        return {"q": torch.from_numpy(q.astype(np.int8).reshape(rows, cols)), "sc": torch.from_numpy(sc),
                "m": torch.from_numpy(m),
                "d": torch.from_numpy(_f16(b[..., 0:2])), "dmin": torch.from_numpy(_f16(b[..., 2:4]))}
    if qtype == Q.Q6_K:
        b = raw.reshape(rows, cols // QK_K, 210)
        ql = b[..., :128].reshape(rows, -1, 2, 2, 32).astype(np.int32)  # [.., half, ql +0/+32, l]
        qh = b[..., 128:192].reshape(rows, -1, 2, 1, 32).astype(np.int32)
        low = np.stack((ql & 15, ql >> 4), axis=-3)  # [.., half, nibble, +0/+32, l]: group 2*nibble + offset
        high = (qh >> (2 * np.arange(4)).reshape(4, 1)) & 3  # qh bits 2g, 2g+1 for group g
        q = (low | (high.reshape(rows, -1, 2, 2, 2, 32) << 4)).astype(np.int8).reshape(rows, cols)
        sc = b[..., 192:208].view(np.int8).astype(np.int32)
        return {"q": torch.from_numpy(q), "sc": torch.from_numpy(sc), "d": torch.from_numpy(_f16(b[..., 208:210]))}
    raise ValueError(f"no exact llama.cpp matmul for {qtype.name}")


def div32(a: float | torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a / b` rounded once to float32, as C's float division is (torch's float32 `scalar / tensor` multiplies
    by a reciprocal: an ulp off now and then, enough to move a value across a q8 rounding step)."""
    return torch.div(torch.as_tensor(a, dtype=torch.float64), b.double()).float()


def quantize_q8_0(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x86 `quantize_row_q8_0` (AVX2) along the last dim: `q` (ints held as floats, `x`'s shape) and `d` (f16
    values, one per block of 32).

    Per block `amax = max|x|`, `d = f16(amax / 127)`, `q = round_half_even(x * (127 / amax))`. The AVX2 kernel
    multiplies by `127 / amax`, not by `1 / d` as the scalar reference (`quantize_row_q8_0_ref`, gguf-py) does,
    and rounds half to even, not half away from zero: the two differ on ties and one-ulp cases.
    """
    blocks = x.float().reshape(*x.shape[:-1], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    d = div32(amax, torch.full_like(amax, 127.0)).half().float()
    inv = torch.where(amax == 0, 0.0, div32(127.0, torch.where(amax == 0, 1.0, amax)))
    return torch.round(blocks * inv).reshape(x.shape), d[..., 0]


def quantize_q8_K(x: torch.Tensor, *, positive_wins: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_row_q8_K_ref` (what x86 runs for rows) along the last dim: `q` (`x`'s shape) and `d` (float32,
    one per block of 256); `positive_wins`: the repacking gemm's `ggml_quantize_mat_q8_K_4x8` instead.

    Both scale by `iscale = -127 / max` with `max` the signed value of largest magnitude, round half to even, cap
    at 127 and keep `d = 1 / iscale` in float32; they differ only when `+max` and `-max` both occur: the
    reference takes the first, the AVX2 4-row kernel the positive one.
    """
    blocks = x.float().reshape(*x.shape[:-1], -1, QK_K)
    amax = blocks.abs().amax(-1, keepdim=True)
    if positive_wins:
        signed = torch.where((blocks == amax).any(-1, keepdim=True), amax, -amax)
    else:
        signed = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))  # the first index of the maximum
    zero = amax == 0
    iscale = torch.where(zero, 0.0, div32(-127.0, torch.where(zero, 1.0, signed)))
    d = torch.where(zero, 0.0, div32(1.0, torch.where(zero, 1.0, iscale)))
    q = torch.round(blocks * iscale).clamp(max=127)
    return q.reshape(x.shape), d[..., 0]


class QuantLinear(nn.Module):
    """A linear layer over a GGUF-quantized weight that computes what llama.cpp's CPU backend computes.

    `weight` is the dequantized tensor (kept for everything that reads weights: the embedding lookup, tests);
    the forward uses only the integers and scales.
    """

    def __init__(self, qtype: GGMLQuantizationType, parts: dict[str, torch.Tensor], weight: torch.Tensor) -> None:
        super().__init__()
        self.qtype = qtype
        self.register_buffer("weight", weight)
        self.register_buffer("bias", None)
        self.round_input = None
        for name, t in parts.items():
            self.register_buffer(f"_{name}", t, persistent=False)
        self._lanes = None
        if qtype in (Q.Q8_0, Q.Q5_0) and weight.shape[0] <= _LANE_CACHE_ROWS:
            self._lanes = self._lane_weights(slice(None))
        if qtype == Q.Q4_K:  # per-element `scale * q`, as the gemm's int16 madd produces it
            sc = self._sc.repeat_interleave(32, dim=-1).reshape(self._q.shape)
            self.register_buffer("_scaled", (sc * self._q).short(), persistent=False)

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """`x @ W.T` as llama.cpp computes it; `rows`: only those outputs (Q8_0/Q5_0 weights: an output head)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1]).float()
        if self.qtype in ROW_SELECTABLE:
            y = self._q8_0_dot(x, rows)
        elif rows is not None:
            raise ValueError(f"output rows are only selectable for Q8_0/Q5_0 weights, not {self.qtype.name}")
        elif self.qtype == Q.Q6_K:
            y = self._q6_K_dot(x)
        else:
            n = x.shape[0] - x.shape[0] % 4
            y = torch.cat((self._q4_K_dot(x[:n], gemm=True), self._q4_K_dot(x[n:], gemm=False)))
        return y.reshape(*shape[:-1], -1)

    def _lane_weights(self, rows: torch.Tensor | slice) -> torch.Tensor:
        """The weight's 4-element lane groups `[K/4, 4, O]` as floats."""
        q = self._q[rows].float()
        return q.reshape(q.shape[0], -1, 4).permute(1, 2, 0).contiguous()

    def _q8_0_dot(self, x: torch.Tensor, rows: torch.Tensor | None, chunk: int = 1 << 15) -> torch.Tensor:
        xq, xd = quantize_q8_0(x)
        t, k = xq.shape
        nb = k // 32
        xl = xq.reshape(t, nb * 8, 4).permute(1, 0, 2)  # [lane groups, T, 4]
        outs = []
        for o0 in range(0, self._q.shape[0] if rows is None else len(rows), chunk):
            part = slice(o0, o0 + chunk) if rows is None else rows[o0 : o0 + chunk]
            wl = self._lanes if self._lanes is not None and rows is None else self._lane_weights(part)
            d = self._d[part].T[:, None, :] * xd.T[:, :, None]  # [nb, T, O], f32(d_w * d_x)
            acc = torch.zeros(8, t, wl.shape[-1])
            for t0 in range(0, t, 8):  # a few tokens at a time: their lanes and accumulators stay in cache
                lanes = torch.bmm(xl[:, t0 : t0 + 8], wl).reshape(nb, 8, -1, wl.shape[-1])  # exact: |sum| < 2^16
                rows_acc, rows_d = acc[:, t0 : t0 + 8], d[:, t0 : t0 + 8]
                for b in range(nb):
                    fma32_(rows_acc, rows_d[b], lanes[b])
            outs.append(hsum_float_8(acc.permute(1, 2, 0)))
        return torch.cat(outs, dim=-1)

    def _q6_K_dot(self, x: torch.Tensor) -> torch.Tensor:
        xq, xd = quantize_q8_K(x)
        t, k = xq.shape
        nb = k // QK_K
        o = self._q.shape[0]
        sc = self._sc.double().repeat_interleave(16, dim=-1).reshape(o, k)
        d = self._d.T[:, None, :]  # [nb, 1, O]
        if t >= TILED_MIN_ROWS:  # ggml's tiled K-quant matmul: one exact integer per super-block
            w = (sc * (self._q.double() - 32)).reshape(o, nb, QK_K).permute(1, 2, 0)
            ints = torch.bmm(xq.double().reshape(t, nb, QK_K).permute(1, 0, 2), w).float()  # [nb, T, O]
            acc = torch.zeros(t, o)
            for b in range(nb):
                acc = fma32(d[b] * ints[b], xd[:, b, None].expand(t, o), acc)
            return acc
        x5 = xq.double().reshape(t, nb, 8, 8, 4)  # [.., vector of 32, lane, 4]
        w5 = (sc * self._q.double()).reshape(o, nb, 8, 8, 4)
        prod = torch.einsum("tbvlk,obvlk->botl", x5, w5)
        bsum = torch.einsum("tblk,oblk->botl", xq.double().reshape(t, nb, 8, 32), sc.reshape(o, nb, 8, 32))
        lanes = (prod - 32 * bsum).float()  # exact integers, then ggml's int->float rounding
        scale = d * xd.T[:, :, None]  # [nb, T, O]: y.d * fp16(x.d)
        acc = torch.zeros(o, t, 8)
        for b in range(nb):
            acc = fma32(scale[b].T[:, :, None], lanes[b], acc)
        return hsum_float_8(acc).T

    def _q4_K_dot(self, x: torch.Tensor, *, gemm: bool) -> torch.Tensor:
        o = self._q.shape[0]
        if x.shape[0] == 0:
            return x.new_zeros(0, o)
        xq, xd = quantize_q8_K(x, positive_wins=gemm)
        t, k = xq.shape
        step = 64 if gemm else QK_K  # elements per float step: two sub-blocks, or the whole super-block
        n = k // step
        xc = xq.double().reshape(t, n, step).permute(1, 0, 2)
        ints = torch.bmm(xc, self._scaled.double().reshape(o, n, step).permute(1, 2, 0)).float()  # [n, T, O]
        bsums = xq.double().reshape(t, n, -1, 32).sum(-1).permute(1, 0, 2)  # [n, T, sub-blocks]: ggml's bsums
        mins = torch.bmm(bsums, self._m.double().reshape(o, n, -1).permute(1, 2, 0)).float()  # [n, T, O]
        acc = torch.zeros(t, o)
        acc_min = torch.zeros(t, o)
        for i in range(n):
            b = i // 4 if gemm else i
            scale = self._d[:, b][None, :] * xd[:, b][:, None]
            scale_min = self._dmin[:, b][None, :] * xd[:, b][:, None]
            acc = fma32(ints[i], scale, acc)
            acc_min = fma32(mins[i], scale_min, acc_min)
        return acc - acc_min


EXACT_TYPES = frozenset({Q.Q8_0, Q.Q5_0, Q.Q6_K, Q.Q4_K})
ROW_SELECTABLE = frozenset({Q.Q8_0, Q.Q5_0})  # `QuantLinear(x, rows=...)` computes only some outputs
