"""Rotary embedding (NeoX rotate-half) in Triton, with the torch reference beside it.

Each token's heads are rotated by the cos/sin of its position, read from the model's fp32 tables
`[max_positions, D / 2]`. The rotation runs in fp32 and rounds once to the input's type; the reference (the
model's `RotaryEmbedding`) rounds cos and sin to the input's type first, so in bf16 the two differ by a rounding.
One program per token covers all of its heads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["rotary_embedding", "rotary_reference"]


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
