"""llama.cpp's CPU attention (f16 KV cache, flash attention off), bit for bit: `LlamaCppKVCache`.

Why: the greedy picks that `numerics="llamacpp"` must reproduce depend on the last bits of the attention too.
Without flash attention (llama-cpp-python's default) llama.cpp builds `softmax(K·q) · V` from two matmuls and a
softmax, with K and V in an f16 cache (`type_k`/`type_v` default); each matmul converts its f32 operand to f16
(the pre-scaled q, the probabilities). Every product of two f16 values is exact in fp32, so only the order of the
fp32 additions matters, and that depends on the batch: a batch of two or more tokens goes through llamafile's
`tinyBLAS` (one 8-lane accumulator, `hsum`), a single token through `ggml_vec_dot_f16` (four 8-lane
accumulators, `GGML_F32x8_REDUCE`). The softmax (`ggml_compute_forward_soft_max_f32`) takes `expf` from
`ggml_v_expf`'s AVX2 polynomial, sums each 8 values with `hsum` into a double, and scales by `(float)(1/sum)`.

KV cells are the positions (a fresh cache fills them in order), and the cells that llama.cpp pads with (masked,
or zero) add exact zeros, so only the cached tokens are computed.
"""

from __future__ import annotations

import torch

from nbllm.errors import NbllmError
from nbllm.models.attention import DenseKVCache
from nbllm.models.llamacpp_matmul import fma32, hsum_float_8

__all__ = ["LlamaCppKVCache", "attention", "dot_f16", "expf_avx2", "soft_max"]


# ggml_v_expf's constants, written as C hex floats
_H = {h: float.fromhex(h) for h in ("0x1.8p23", "0x1.715476p+0", "0x1.7f7d1cp-20", "0x1.62e4p-1", "0x1.0e4020p-7",
                                     "0x1.573e2ep-5", "0x1.555e66p-3", "0x1.fffdb6p-2", "0x1.ffffecp-1")}


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32).long()


def _float(bits: torch.Tensor) -> torch.Tensor:
    """int64 holding 32 bits (wrapped like C's unsigned arithmetic) as float32."""
    bits = bits & 0xFFFFFFFF
    return torch.where(bits >= 1 << 31, bits - (1 << 32), bits).int().view(torch.float32)


def _c(value: float, like: torch.Tensor) -> torch.Tensor:
    return torch.full_like(like, value)


def expf_avx2(x: torch.Tensor) -> torch.Tensor:
    """ggml's `ggml_v_expf(__m256)` on float32 values, instruction for instruction."""
    r = _c(_H["0x1.8p23"], x)
    z = fma32(x, _c(_H["0x1.715476p+0"], x), r)
    n = z - r
    b = fma32(-n, _c(_H["0x1.7f7d1cp-20"], x), fma32(-n, _c(_H["0x1.62e4p-1"], x), x))
    e = _bits(z) << 23
    k = _float(e + _bits(torch.ones_like(x)))
    c = n.abs() > 126
    u = b * b
    odd = fma32(_c(_H["0x1.0e4020p-7"], x), b, _c(_H["0x1.573e2ep-5"], x))
    even = fma32(_c(_H["0x1.555e66p-3"], x), b, _c(_H["0x1.fffdb6p-2"], x))
    j = fma32(fma32(odd, u, even), u, _c(_H["0x1.ffffecp-1"], x) * b)
    plain = fma32(k, j, k)
    if not bool(c.any()):
        return plain
    g = torch.where(n <= 0, 0x82000000, 0)
    s1 = _float(g + 0x7F000000)
    s2 = _float(e - g)
    huge = n.abs() > 192
    return torch.where(huge, s1 * s1, torch.where(c, fma32(s2, j, s2) * s1, plain))


def soft_max(scores: torch.Tensor) -> torch.Tensor:
    """`ggml_soft_max_ext(scores, mask, 1.0, 0)` along the last dim (masked scores are -inf): float32."""
    length = scores.shape[-1]
    pad = -length % 8
    x = torch.nn.functional.pad(scores, (0, pad), value=float("-inf"))
    top = x.amax(-1, keepdim=True)
    y = expf_avx2(x - top)
    chunks = hsum_float_8(y.reshape(*y.shape[:-1], -1, 8)).double()
    total = torch.zeros(y.shape[:-1], dtype=torch.float64)
    for i in range(chunks.shape[-1]):
        total = total + chunks[..., i]
    return (y * (1.0 / total).float()[..., None])[..., :length]


def _reduce_f32x8(acc: torch.Tensor) -> torch.Tensor:
    """`GGML_F32x8_REDUCE` of 4 accumulators `[..., 4, 8]`."""
    x0 = acc[..., 0, :] + acc[..., 2, :]
    x1 = acc[..., 1, :] + acc[..., 3, :]
    x = x0 + x1
    t = x[..., :4] + x[..., 4:]
    return (t[..., 0] + t[..., 1]) + (t[..., 2] + t[..., 3])


def dot_f16(x: torch.Tensor, y: torch.Tensor, *, batched: bool) -> torch.Tensor:
    """Dot products over the last dim of f16 values held in float32 (broadcast), in ggml's order.

    `batched`: llamafile's tinyBLAS (the matmul had two or more columns), else `ggml_vec_dot_f16`.
    """
    n = x.shape[-1]
    block = 8 if batched else 32
    pad = -n % block
    x = torch.nn.functional.pad(x, (0, pad))
    y = torch.nn.functional.pad(y, (0, pad))
    shape = torch.broadcast_shapes(x.shape[:-1], y.shape[:-1])
    if batched:
        acc = torch.zeros(*shape, 8)
        for s in range(0, n + pad, 8):
            acc = acc + x[..., s : s + 8] * y[..., s : s + 8]
        return hsum_float_8(acc)
    acc = torch.zeros(*shape, 4, 8)
    for s in range(0, n + pad, 32):
        acc = acc + (x[..., s : s + 32] * y[..., s : s + 32]).reshape(*shape, 4, 8)
    return _reduce_f32x8(acc)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, past: int, scale: float,
              sliding_window: int | None, batched: bool) -> torch.Tensor:
    """One sequence's attention as llama.cpp computes it: `q [n, Hq, D]` f32, `k, v [L, Hkv, D]` f16 values."""
    n, hq, d = q.shape
    length, hkv, _ = k.shape
    qh = (q.float() * scale).half().float().reshape(n, hkv, hq // hkv, 1, d)
    kh = k.float().permute(1, 0, 2)[None, :, None]  # [1, Hkv, 1, L, D]
    scores = dot_f16(kh, qh, batched=batched)  # [n, Hkv, G, L]
    qpos = torch.arange(past, past + n)[:, None]
    kpos = torch.arange(length)[None, :]
    visible = kpos <= qpos
    if sliding_window is not None:
        visible &= kpos > qpos - sliding_window
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    probs = soft_max(scores).half().float()[..., None, :]  # [n, Hkv, G, 1, L]
    vh = v.float().permute(1, 2, 0)[None, :, None]  # [1, Hkv, 1, D, L]
    return dot_f16(vh, probs, batched=batched).reshape(n, hq, d)


class LlamaCppKVCache(DenseKVCache):
    """An f16 `DenseKVCache` whose attention is llama.cpp's, bit for bit (`attention`); one sequence per forward,
    as llama.cpp ran the reference prompts (the batch size picks the matmul kernel)."""

    def __init__(self) -> None:
        super().__init__(kv_dtype=torch.float16)

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                sliding_window: int | None) -> torch.Tensor:
        if len(self._plan) != 1:
            raise NbllmError("LlamaCppKVCache runs one sequence per forward, as llama.cpp ran the reference prompts")
        ((seq_id, n),) = self._plan
        layers = self._kv.setdefault(seq_id, [])
        layers.extend([None] * (layer + 1 - len(layers)))
        cached = layers[layer]
        new_k, new_v = k.half(), v.half()
        past = 0 if cached is None else cached[0].shape[0]
        if cached is not None:
            new_k, new_v = torch.cat((cached[0], new_k)), torch.cat((cached[1], new_v))
        layers[layer] = (new_k, new_v)
        return attention(q, new_k, new_v, past=past, scale=scale, sliding_window=sliding_window, batched=n > 1)
