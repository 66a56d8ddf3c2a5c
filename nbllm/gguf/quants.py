"""Dequantize GGUF tensors to float32 in torch: vectorized over all blocks, bit-exact to gguf-py.

Why the layouts look the way they do (ggml's `block_*` structs, read in `ggml-quants.c`):

* A tensor is quantized along its last (contiguous) dimension in fixed-size blocks, each a self-contained
  record of scale(s) + packed integers, so any row or block range can be decoded without its neighbours.
  Rows are whole numbers of blocks; the tensor is the rows' blocks back to back.
* Legacy types (Q4_0 .. Q8_0, 32 weights a block) carry one f16 scale `d` (and an f16 minimum `m` for the
  `_1` variants).  4-bit codes are packed "split-half": byte j holds weight j in its low nibble and weight
  j+16 in its high nibble, so a SIMD unpack is one AND and one shift, with no interleave.  Q5 keeps the 5th
  bit of all 32 weights in one 32-bit little-endian word `qh`.
* K-quants (Q2_K .. Q6_K) use 256-weight super-blocks: an f16 super-scale (and super-min) multiplies small
  integer per-sub-block scales (16 or 32 weights a sub-block), which costs ~0.25-0.5 bit/weight instead of a
  full f16 per 32 weights.  Q4_K/Q5_K squeeze eight 6-bit scales and eight 6-bit mins into 12 bytes (low 6
  bits in bytes 0-7, the top 2 bits of the last four parked in bytes 0-7's spare bits, bytes 8-11 hold the
  rest); Q3_K packs sixteen 6-bit scales the same way.  Bit planes (Q3_K's hmask, Q5_K's qh, Q6_K's qh) are
  spread across 32 (or 64) bytes so one byte-wide shift serves 32 weights at a time.

Bit-exactness: every float operation here happens in float32 in the same order as gguf-py's numpy reference
(`gguf.quants`), e.g. K-quants compute `(d * sc) * q - (dmin * m)`, never a fused or reassociated form.
Integer work (nibble/bit extraction, offsets like q - 8) is exact, so doing it in uint8/int8 or float32 is
irrelevant as long as the float products and sums match.
"""

from __future__ import annotations

import warnings
from math import prod

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from nbllm.errors import ModelLoadError, UnsupportedQuantError
from nbllm.gguf.reader import tensor_nbytes

Q = GGMLQuantizationType
QK_K = 256

__all__ = ["dequantize", "quant_nbytes", "SUPPORTED_TYPES"]


def _qtype(qtype: GGMLQuantizationType | int, tensor_name: str) -> GGMLQuantizationType:
    try:
        qt = Q(int(qtype))
    except ValueError:
        raise UnsupportedQuantError(
            f"tensor {tensor_name!r} uses unknown GGUF quantization type id {int(qtype)}; re-quantize the model "
            f"to Q4_K_M or Q8_0 with llama-quantize (supported: {_supported_names()})"
        ) from None
    if qt not in _DEQUANT:
        raise UnsupportedQuantError(
            f"tensor {tensor_name!r} uses GGUF quantization type {qt.name}, which nbllm cannot dequantize; "
            f"re-quantize the model to Q4_K_M or Q8_0 with llama-quantize (supported: {_supported_names()})"
        )
    return qt


def _supported_names() -> str:
    return ", ".join(t.name for t in _DEQUANT)


def quant_nbytes(qtype: GGMLQuantizationType | int, shape: tuple[int, ...], *, tensor_name: str = "?") -> int:
    """Bytes a tensor of `shape` (torch order, last dim blocked) occupies in a GGUF file as `qtype`."""
    qt = _qtype(qtype, tensor_name)
    try:
        return tensor_nbytes(qt, tuple(int(s) for s in shape))
    except ValueError as exc:
        raise ModelLoadError(
            f"tensor {tensor_name!r} ({qt.name}, shape {tuple(shape)}): {exc}; the file is corrupt or was written by an incompatible tool"
        ) from None


# ---------------------------------------------------------------------------------------------------------
# helpers


def _f16(cols: torch.Tensor) -> torch.Tensor:
    """(n, 2) uint8 columns holding a little-endian half -> (n, 1) float32."""
    # clone, not contiguous(): a lone block's slice is already contiguous but may sit at an odd address
    return cols.clone(memory_format=torch.contiguous_format).view(torch.float16).to(torch.float32)


def _shifted(x: torch.Tensor, shifts: tuple[int, ...], mask: int) -> torch.Tensor:
    """uint8 (..., W) -> fresh contiguous uint8 (..., len(shifts), W): `(x >> s) & mask` for each shift s.

    Each plane is computed contiguously and then stacked: writing through strided `out=` slices would fall off
    torch's vectorized byte kernels (measured ~10x slower)."""
    planes = []
    for s in shifts:
        if s == 0:
            planes.append(x & mask)
        elif mask == 0xFF >> s:  # the shift already clears the high bits
            planes.append(x >> s)
        else:
            planes.append((x >> s).bitwise_and_(mask))
    return torch.stack(planes, dim=-2)


_NIB = (0, 4)
_CRUMB = (0, 2, 4, 6)
_BITS = tuple(range(8))


def _bits32(qh: torch.Tensor) -> torch.Tensor:
    """(n, 4) uint8 of a little-endian uint32 -> (n, 32) uint8 with bit j of the word at position j.

    Each nibble t of the word is spread to one bit per byte by t * 0x00204081 (copies of t at bit offsets 0, 7,
    14, 21: they never overlap, so no carries) masked with 0x01010101 -- four weights per int32 op."""
    n = qh.shape[0]
    w = _i32(qh).reshape(n, 1)
    nib = torch.stack([w & 0xF if k == 0 else (w >> (4 * k)).bitwise_and_(0xF) for k in range(8)], dim=-1)
    return nib.mul_(0x00204081).bitwise_and_(0x01010101).view(torch.uint8).reshape(n, 32)


def _i32(x: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 4k) -> int32 (..., k) over a fresh copy (slices of blocks are not 4-byte aligned)."""
    return x.clone(memory_format=torch.contiguous_format).view(torch.int32)


def _k_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K 12-byte scale field (n, 12) -> 6-bit scales and mins as float32 (n, 8)."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.to(torch.float32), mn.to(torch.float32)


# ---------------------------------------------------------------------------------------------------------
# legacy 32-weight blocks
#
# Each decoder takes the (n, type_size) uint8 blocks and a preallocated float32 `out` of (n, block_size),
# copies the integer codes into `out` (the only int->float conversion) and finishes with in-place float ops
# in the reference's order, so the big buffer is written a minimum number of times and never re-allocated.


def _q4_0(b: torch.Tensor, out: torch.Tensor) -> None:
    d = _f16(b[:, 0:2])
    q = _shifted(b[:, 2:18], _NIB, 0x0F).view(torch.int8).sub_(8)  # exact in int8: -8..7
    out.view(-1, 2, 16).copy_(q)
    out.mul_(d)  # d * (q - 8)


def _q4_1(b: torch.Tensor, out: torch.Tensor) -> None:
    d, m = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    out.view(-1, 2, 16).copy_(_shifted(b[:, 4:20], _NIB, 0x0F))
    out.mul_(d).add_(m)  # (d * q) + m


def _q5(b: torch.Tensor, qh_off: int) -> torch.Tensor:
    n = b.shape[0]
    qh = _bits32(b[:, qh_off : qh_off + 4])
    ql = _shifted(b[:, qh_off + 4 : qh_off + 20], _NIB, 0x0F).reshape(n, 32)
    return ql.bitwise_or_(qh.bitwise_left_shift_(4))


def _q5_0(b: torch.Tensor, out: torch.Tensor) -> None:
    d = _f16(b[:, 0:2])
    out.copy_(_q5(b, 2).view(torch.int8).sub_(16))  # q - 16 exact in int8
    out.mul_(d)  # d * (q - 16)


def _q5_1(b: torch.Tensor, out: torch.Tensor) -> None:
    d, m = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    out.copy_(_q5(b, 4))
    out.mul_(d).add_(m)  # (d * q) + m


def _q8_0(b: torch.Tensor, out: torch.Tensor) -> None:
    d = _f16(b[:, 0:2])
    out.copy_(b[:, 2:34].view(torch.int8))
    out.mul_(d)  # q * d


# ---------------------------------------------------------------------------------------------------------
# K-quants: 256-weight super-blocks


def _q2_k(b: torch.Tensor, out: torch.Tensor) -> None:
    # scales[16] | qs[64] | d | dmin
    n = b.shape[0]
    scales = b[:, 0:16]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 0x0F).to(torch.float32)).unsqueeze(-1)
    ml = (dmin * (scales >> 4).to(torch.float32)).unsqueeze(-1)
    q = out.view(n, 16, 16)
    q.view(n, 2, 4, 32).copy_(_shifted(b[:, 16:80].reshape(n, 2, 32), _CRUMB, 3))
    q.mul_(dl).sub_(ml)  # dl * q - ml


def _q3_k(b: torch.Tensor, out: torch.Tensor) -> None:
    # hmask[32] | qs[64] | scales[12] | d
    n = b.shape[0]
    sc = b[:, 96:108]
    d = _f16(b[:, 108:110])
    lo = _shifted(sc[:, 0:8], _NIB, 0x0F).reshape(n, 16)
    hi = _shifted(sc[:, 8:12], _CRUMB, 3).reshape(n, 16)
    scales = lo.bitwise_or_(hi.bitwise_left_shift_(4)).to(torch.float32).sub_(32)
    dl = (d * scales).unsqueeze(-1)
    ql = _shifted(b[:, 32:96].reshape(n, 2, 32), _CRUMB, 3).reshape(n, 16, 16)
    # a *clear* high bit subtracts 4: q = ql - 4 * (1 - h) = (ql | h << 2) - 4, in -4..3
    qh = _shifted(b[:, 0:32].unsqueeze(1), _BITS, 1).reshape(n, 16, 16)
    q = out.view(n, 16, 16)
    q.copy_(ql.bitwise_or_(qh.bitwise_left_shift_(2)).view(torch.int8).sub_(4))
    q.mul_(dl)  # dl * q


def _q45_k_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    return (d * sc).unsqueeze(-1), (dmin * mn).unsqueeze(-1)


def _q4_k(b: torch.Tensor, out: torch.Tensor) -> None:
    # d | dmin | scales[12] | qs[128]
    n = b.shape[0]
    dl, ml = _q45_k_scales(b)
    q = out.view(n, 8, 32)
    q.view(n, 4, 2, 32).copy_(_shifted(b[:, 16:144].reshape(n, 4, 32), _NIB, 0x0F))
    q.mul_(dl).sub_(ml)  # (d * sc) * q - (dmin * m)


def _q5_k(b: torch.Tensor, out: torch.Tensor) -> None:
    # d | dmin | scales[12] | qh[32] | qs[128]
    n = b.shape[0]
    dl, ml = _q45_k_scales(b)
    ql = _shifted(b[:, 48:176].reshape(n, 4, 32), _NIB, 0x0F).reshape(n, 8, 32)
    qh = _shifted(b[:, 16:48].unsqueeze(1), _BITS, 1).reshape(n, 8, 32)
    q = out.view(n, 8, 32)
    q.copy_(ql.bitwise_or_(qh.bitwise_left_shift_(4)))
    q.mul_(dl).sub_(ml)  # (d * sc) * q - (dmin * m)


def _q6_k(b: torch.Tensor, out: torch.Tensor) -> None:
    # ql[128] | qh[64] | scales[16] (int8) | d
    n = b.shape[0]
    d = _f16(b[:, 208:210])
    dl = (d * b[:, 192:208].view(torch.int8).to(torch.float32)).unsqueeze(-1)
    ql = _shifted(b[:, 0:128].reshape(n, 2, 64), _NIB, 0x0F).reshape(n, 8, 32)
    qh = _shifted(b[:, 128:192].reshape(n, 2, 32), _CRUMB, 3).reshape(n, 8, 32)
    q = out.view(n, 16, 16)
    q.view(n, 8, 32).copy_(ql.bitwise_or_(qh.bitwise_left_shift_(4)).view(torch.int8).sub_(32))
    q.mul_(dl)  # (d * sc) * (q - 32); q - 32 is exact in int8


# ---------------------------------------------------------------------------------------------------------
# plain floats


def _as_dtype(raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    try:
        return raw.view(dtype)
    except RuntimeError:  # storage offset not aligned to the element size: copy to fresh storage
        return raw.clone().view(dtype)


def _f32(raw: torch.Tensor) -> torch.Tensor:
    return _as_dtype(raw, torch.float32)  # a view of raw: dequantize copies it


def _f16_plain(raw: torch.Tensor) -> torch.Tensor:
    return _as_dtype(raw, torch.float16).to(torch.float32)


def _bf16(raw: torch.Tensor) -> torch.Tensor:
    # bf16 is the top half of an f32: widen by a shift (exact for every bit pattern, NaNs included)
    return _as_dtype(raw, torch.int16).to(torch.int32).bitwise_left_shift_(16).view(torch.float32)


_PLAIN = {Q.F32: _f32, Q.F16: _f16_plain, Q.BF16: _bf16}
_BLOCKED = {
    Q.Q4_0: _q4_0,
    Q.Q4_1: _q4_1,
    Q.Q5_0: _q5_0,
    Q.Q5_1: _q5_1,
    Q.Q8_0: _q8_0,
    Q.Q2_K: _q2_k,
    Q.Q3_K: _q3_k,
    Q.Q4_K: _q4_k,
    Q.Q5_K: _q5_k,
    Q.Q6_K: _q6_k,
}
_DEQUANT = {**_PLAIN, **_BLOCKED}
SUPPORTED_TYPES: frozenset[GGMLQuantizationType] = frozenset(_DEQUANT)


def dequantize(
    raw: torch.Tensor | np.ndarray,
    qtype: GGMLQuantizationType | int,
    shape: tuple[int, ...],
    *,
    tensor_name: str = "?",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode one GGUF tensor's bytes `raw` (uint8) of type `qtype` into a float32 tensor of `shape`.

    `shape` is in torch order (reversed ggml `ne`); its last dim is the blocked one.  Bit-exact to
    `gguf.quants.dequantize`.  `out`, if given, is a contiguous float32 CPU tensor with `shape`'s element count
    that receives the result (saves first-touch page faults when a loader reuses one buffer).  Raises
    `UnsupportedQuantError` for types nbllm cannot decode and `ModelLoadError` when `raw` does not hold exactly
    the bytes `shape` needs.
    """
    qt = _qtype(qtype, tensor_name)
    shape = tuple(int(s) for s in shape)
    expected = quant_nbytes(qt, shape, tensor_name=tensor_name)
    if isinstance(raw, np.ndarray):
        with warnings.catch_warnings():  # read-only mmap views are fine: we never write into raw
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.from_numpy(np.ascontiguousarray(raw).view(np.uint8).reshape(-1))
    if raw.dtype != torch.uint8:
        raise ModelLoadError(f"tensor {tensor_name!r}: raw bytes must be a uint8 tensor, got {raw.dtype}")
    raw = raw.reshape(-1)
    if raw.numel() != expected:
        raise ModelLoadError(
            f"tensor {tensor_name!r} ({qt.name}, shape {shape}) should occupy {expected} bytes but {raw.numel()} "
            f"were given; the file is truncated or corrupt"
        )
    numel = prod(shape)
    if out is not None:
        if out.dtype != torch.float32 or not out.is_contiguous() or out.numel() != numel or out.device != raw.device:
            raise ValueError(f"out must be a contiguous float32 tensor of {numel} elements on {raw.device}")
    if qt in _PLAIN:
        res = _PLAIN[qt](raw)
        if out is None:
            return (res.clone() if qt == Q.F32 else res).reshape(shape)
        out.view(-1).copy_(res)
        return out.view(shape)

    block_size, type_size = GGML_QUANT_SIZES[qt]
    if out is None:
        out = torch.empty(numel, dtype=torch.float32, device=raw.device)
    if numel:
        _BLOCKED[qt](raw.view(-1, type_size), out.view(-1, block_size))
    return out.view(shape)
