"""The seam between models and KV caches: `AttentionBackend`, and `DenseKVCache`, the reference backend.

A model forward sees one flat batch of T tokens from any number of sequences. Before the forward, the caller
tells the backend which sequences the tokens belong to and how many each has (`DenseKVCache.prepare`); each
attention layer then hands the backend its new q/k/v and gets back attention outputs. The backend stores k/v
and attends every query to its own sequence's keys causally. The paged engine backend plugs in here too.

Sliding windows follow HF/llama.cpp: a query at position q sees key positions p with q - window < p <= q.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from nbllm.errors import NbllmError


class AttentionBackend(Protocol):
    """What an attention layer calls. A paged CUDA backend may also offer `kv_destination(layer)`, returning
    `(k_cache, v_cache, slot_mapping)`: the layer then writes its K/V itself, fused into its rotary kernel, and
    calls `forward(..., stored=True)`; and `forward_rotary(layer, q, k, v, positions, cos, sin, ...)`, which takes
    q and k before their per-head norms and rotary and does those, the K/V store and the attention in one launch
    (or returns None where it cannot)."""

    def forward(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        """Store `k, v: [T, Hkv, D]` for `layer` and return attention of `q: [T, Hq, D]` as `[T, Hq, D]`."""
        ...


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    past: int,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """Attention of one sequence's `n` new queries over its `L` keys, the first `past` of them cached earlier.

    `q: [n, Hq, D]`, `k, v: [L, Hkv, D]` with `L == past + n`; query head h uses kv head h // (Hq / Hkv), as
    HF's `repeat_kv` does. Scores and softmax are plain fp32 matmuls with an explicit mask: exactness over speed.

    f16 `k`/`v` under an fp32 `q` (an f16 KV cache of an fp32 model) compute as llama.cpp's CPU backend does
    without flash attention: the scaled q and the softmax probabilities are rounded to f16 too, since ggml
    converts a matmul's second operand to the first's type, and the products accumulate in fp32.
    """
    n, hq, d = q.shape
    length, hkv, _ = k.shape
    group = hq // hkv
    qh = q.reshape(n, hkv, group, d).permute(1, 2, 0, 3)  # [Hkv, G, n, D]
    kh = k.permute(1, 0, 2)[:, None]  # [Hkv, 1, L, D]
    vh = v.permute(1, 0, 2)[:, None]
    half = k.dtype == torch.float16 and q.dtype == torch.float32
    if half:
        qh, kh, vh = (qh * scale).to(torch.float16).float(), kh.float(), vh.float()
        scores = torch.matmul(qh, kh.transpose(-1, -2))
    else:
        scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale  # [Hkv, G, n, L]
    qpos = torch.arange(past, past + n, device=q.device)[:, None]
    kpos = torch.arange(length, device=q.device)[None, :]
    visible = kpos <= qpos
    if sliding_window is not None:
        visible &= kpos > qpos - sliding_window
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    probs = probs.to(torch.float16).float() if half else probs.to(q.dtype)
    out = torch.matmul(probs, vh)  # [Hkv, G, n, D]
    return out.permute(2, 0, 1, 3).reshape(n, hq, d).to(q.dtype)


class DenseKVCache:
    """Contiguous per-sequence k/v for every layer: the reference backend the paged engine is tested against.

    Usage per forward: `prepare(seq_ids, num_new_tokens)`, then run the model on the concatenation of those
    sequences' new tokens in that order (positions continue each sequence: its cached length onwards).
    `kv_dtype`: the stored k/v type: None keeps the model's; `torch.float16` under an fp32 model is llama.cpp's
    default cache and, with `load_model(..., numerics="llamacpp")`, reproduces its attention (`causal_attention`).
    """

    def __init__(self, kv_dtype: torch.dtype | None = None) -> None:
        self.kv_dtype = kv_dtype
        self._kv: dict[int, list[tuple[torch.Tensor, torch.Tensor] | None]] = {}
        self._plan: list[tuple[int, int]] = []

    def prepare(self, seq_ids: Sequence[int], num_new_tokens: Sequence[int]) -> None:
        """Declare the sequences of the next forward and how many new tokens each contributes (new ids start empty)."""
        if len(seq_ids) != len(num_new_tokens) or len(set(seq_ids)) != len(seq_ids):
            raise NbllmError("prepare() needs distinct sequence ids and one token count per sequence")
        if any(n <= 0 for n in num_new_tokens):
            raise NbllmError(f"every sequence needs at least one new token, got {list(num_new_tokens)}")
        self._plan = list(zip(seq_ids, num_new_tokens, strict=True))

    def seq_len(self, seq_id: int) -> int:
        """Tokens cached for `seq_id` (0 for an unknown id)."""
        layers = self._kv.get(seq_id)
        first = layers[0] if layers else None
        return 0 if first is None else first[0].shape[0]

    def free(self, seq_id: int) -> None:
        self._kv.pop(seq_id, None)

    def forward(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        total = sum(n for _, n in self._plan)
        if q.shape[0] != total:
            raise NbllmError(f"forward got {q.shape[0]} tokens but prepare() declared {total}")
        outs = []
        start = 0
        for seq_id, n in self._plan:
            layers = self._kv.setdefault(seq_id, [])
            layers.extend([None] * (layer + 1 - len(layers)))
            new_k, new_v = k[start : start + n], v[start : start + n]
            if self.kv_dtype is not None:
                new_k, new_v = new_k.to(self.kv_dtype), new_v.to(self.kv_dtype)
            cached = layers[layer]
            past = 0 if cached is None else cached[0].shape[0]
            if cached is not None:
                new_k, new_v = torch.cat((cached[0], new_k)), torch.cat((cached[1], new_v))
            layers[layer] = (new_k, new_v)
            outs.append(causal_attention(q[start : start + n], new_k, new_v, past=past, scale=scale,
                                         sliding_window=sliding_window))
            start += n
        return torch.cat(outs)
