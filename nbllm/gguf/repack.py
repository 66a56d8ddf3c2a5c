"""GGUF quantized tensors → int8 codes with per-group fp32 scales and offsets, for the CPU int8 kernels.

Why this format: every GGUF block type decodes as `w = s * q - o` per group of 16 or 32 weights, with small integer
codes `q` (4-8 bits, all fit int8), a scale `s` and an offset `o` (a K-quant's `dmin * m`, a `_1` type's `-m`) that
are exact products in fp32. Stored as int8 + one fp32 scale (and offset) per group, a weight costs 1.125-1.25 bytes
instead of fp32's 4, and `fmsub(q, s, o)` reproduces the dequantized fp32 weight bit for bit: the repack is lossless
(`repack` checks this on every tensor), so greedy outputs stay those of the dense fp32 model. One format and one
kernel serve all ten types; the kernels read 1.1-1.25 bytes a weight instead of 4.

`q = round((w + o) / s)` recovers the codes from the dequantized tensor, so this module needs only the scale fields
of each block layout (`nbllm.gguf.quants` documents them), not a second copy of the bit unpacking.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from nbllm.gguf.quants import _CRUMB, _NIB, _f16, _q45_k_scales, _shifted, dequantize

Q = GGMLQuantizationType

__all__ = ["ACTIVATION_BLOCK", "GROUP_SIZE", "Int8Weight", "repack"]

_CHUNK_WEIGHTS = 1 << 22

#: Weights per scale for each type this module repacks.
GROUP_SIZE: dict[GGMLQuantizationType, int] = {
    **dict.fromkeys((Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K), 32),
    **dict.fromkeys((Q.Q2_K, Q.Q3_K, Q.Q6_K), 16),
}


#: The block in which llama.cpp rounds a matmul's activations to int8 for each weight type (its `vec_dot_type`:
#: Q8_0's 32 for the legacy types -- Q8_1's for Q4_1/Q5_1, whose codes are the same -- and Q8_K's 256 for K-quants).
ACTIVATION_BLOCK: dict[GGMLQuantizationType, int] = {
    **dict.fromkeys((Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0), 32),
    **dict.fromkeys((Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K), 256),
}


@dataclass(frozen=True)
class Int8Weight:
    """`W[n, k] = scale[n, k // G] * q[n, k] - offset[n, k // G]` (offset None: 0), G = `q.shape[1] // scale.shape[1]`."""

    q: torch.Tensor  # int8 [N, K]
    scale: torch.Tensor  # float32 [N, K / G]
    offset: torch.Tensor | None  # float32 [N, K / G]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The parts by suffix, for a cache file."""
        parts = {"q": self.q, "scale": self.scale}
        return parts if self.offset is None else parts | {"offset": self.offset}

    @classmethod
    def from_tensors(cls, parts: dict[str, torch.Tensor]) -> Int8Weight:
        return cls(parts["q"], parts["scale"], parts.get("offset"))

    def map(self, fn) -> Int8Weight:
        """The same weight with `fn` applied to each part (row permutations, device moves)."""
        return Int8Weight(fn(self.q), fn(self.scale), None if self.offset is None else fn(self.offset))

    def dequantize(self) -> torch.Tensor:
        """The dense fp32 weight in plain torch (the product is exact, so `- offset` rounds once, as fmsub does)."""
        n, k = self.q.shape
        w = self.q.view(n, self.scale.shape[1], -1).to(torch.float32) * self.scale[:, :, None]
        if self.offset is not None:
            w = w - self.offset[:, :, None]
        return w.view(n, k)


def _group_scales(b: torch.Tensor, qtype: GGMLQuantizationType) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(blocks, groups per block) scales and offsets (None: all zero) of the uint8 blocks `b`, as the decoder forms them."""
    n = b.shape[0]
    if qtype in (Q.Q4_0, Q.Q5_0, Q.Q8_0):
        return _f16(b[:, 0:2]), None
    if qtype in (Q.Q4_1, Q.Q5_1):
        return _f16(b[:, 0:2]), -_f16(b[:, 2:4])  # w = d * q + m
    if qtype in (Q.Q4_K, Q.Q5_K):
        dl, ml = _q45_k_scales(b)
        return dl.reshape(n, 8), ml.reshape(n, 8)
    if qtype == Q.Q2_K:
        scales = b[:, 0:16]
        d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
        return d * (scales & 0x0F).to(torch.float32), dmin * (scales >> 4).to(torch.float32)
    if qtype == Q.Q3_K:
        sc = b[:, 96:108]
        lo = _shifted(sc[:, 0:8], _NIB, 0x0F).reshape(n, 16)
        hi = _shifted(sc[:, 8:12], _CRUMB, 3).reshape(n, 16)
        return _f16(b[:, 108:110]) * lo.bitwise_or_(hi.bitwise_left_shift_(4)).to(torch.float32).sub_(32), None
    if qtype == Q.Q6_K:
        return _f16(b[:, 208:210]) * b[:, 192:208].view(torch.int8).to(torch.float32), None
    raise ValueError(f"{qtype.name} is not repackable to int8")


def repack(raw: torch.Tensor, qtype: GGMLQuantizationType, shape: tuple[int, int], *, tensor_name: str = "?"
           ) -> Int8Weight | None:
    """The int8 form of one 2-d GGUF tensor (`raw`: its uint8 bytes, `shape`: torch order `[N, K]`).

    None when `qtype` has no int8 form here (floats, i-quants) or the codes do not reproduce every dequantized
    weight exactly (scales of wildly different magnitude within a block, which no real quantizer writes): the
    caller then keeps the dense weight, so this never changes what the model computes.
    """
    if qtype not in GROUP_SIZE or len(shape) != 2:
        return None
    n, k = shape
    group = GROUP_SIZE[qtype]
    row_bytes = raw.numel() // n if n else 0
    rows = max(1, _CHUNK_WEIGHTS // max(k, 1))  # bounded temporaries: the output projection has 168M weights
    parts = []
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        part = _repack_rows(raw[start * row_bytes : stop * row_bytes], qtype, (stop - start, k), group, tensor_name)
        if part is None:
            return None
        parts.append(part)
    if not parts:
        return None
    has_offset = any(p.offset is not None for p in parts)
    offsets = [p.offset if p.offset is not None else torch.zeros_like(p.scale) for p in parts] if has_offset else None
    return Int8Weight(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]),
                      torch.cat(offsets) if offsets is not None else None)


def _repack_rows(raw: torch.Tensor, qtype: GGMLQuantizationType, shape: tuple[int, int], group: int,
                 tensor_name: str) -> Int8Weight | None:
    n, k = shape
    w = dequantize(raw, qtype, shape, tensor_name=tensor_name)
    s, o = _group_scales(raw.reshape(-1, GGML_QUANT_SIZES[qtype][1]), qtype)
    s = s.reshape(n, k // group).contiguous()
    o = None if o is None or not o.any() else o.reshape(n, k // group).contiguous()
    shifted = w.view(n, k // group, group) + (0 if o is None else o[:, :, None])
    q = torch.where(s[:, :, None] == 0, 0.0, shifted / s[:, :, None]).round_().clamp_(-128, 127)
    packed = Int8Weight(q.to(torch.int8).view(n, k), s, o)
    return packed if torch.equal(packed.dequantize(), w) else None
