"""Run a `numerics="llamacpp"` model the way llama.cpp runs a batch: `llamacpp_logits`.

Why: llama.cpp's graph drops the rows nobody asked logits for right after the last layer's attention
(`inp_out_ids`), so that layer's feed-forward runs on fewer rows, and for some weights (the repacked Q4_K) the
number of rows picks the kernel and with it the float order. Reproducing its logits bit for bit therefore needs
the same row selection, and its attention (`LlamaCppKVCache`), which this module wires together. The layers run
op by op here (norms, projections, rope, attention, GeGLU), not through their modules' own forwards, whose fused
fast paths would bypass the llama.cpp variants of those ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nbllm.models.base import CausalLM
from nbllm.models.gemma3 import Gemma3DecoderLayer
from nbllm.models.layers import Attention, GatedMLP
from nbllm.models.llamacpp_attention import LlamaCppKVCache
from nbllm.models.llamacpp_matmul import ROW_SELECTABLE, QuantLinear
from nbllm.models.llamacpp_numerics import activation_rounding

__all__ = ["HEAD_MARGIN", "llamacpp_logits"]


def _attention(attn: Attention, x: torch.Tensor, positions: torch.Tensor, cache: LlamaCppKVCache) -> torch.Tensor:
    """`Attention.forward` spelled out op by op (whatever fused paths that class grows for speed)."""
    t = x.shape[0]
    q = attn.q_proj(x).view(t, attn.num_heads, attn.head_dim)
    k = attn.k_proj(x).view(t, attn.num_kv_heads, attn.head_dim)
    v = attn.v_proj(x).view(t, attn.num_kv_heads, attn.head_dim)
    if attn.q_norm is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = attn.rotary(q, positions), attn.rotary(k, positions)
    out = cache.forward(attn.layer, q, k, v, scale=attn.scale, sliding_window=attn.sliding_window)
    return attn.o_proj(out.reshape(t, -1))


def _mlp(mlp: GatedMLP, x: torch.Tensor) -> torch.Tensor:
    return mlp.down(mlp.act(mlp.gate(x)) * mlp.up(x))


def _layer(layer: torch.nn.Module, h: torch.Tensor, positions: torch.Tensor, cache: LlamaCppKVCache,
           rows: slice) -> torch.Tensor:
    """One decoder layer as llama.cpp's graph runs it, keeping only `rows` after the attention."""
    if not isinstance(layer, Gemma3DecoderLayer):  # other layouts: their own forward, then the selection
        return layer(h, positions, cache)[rows]
    attn = _attention(layer.attn, layer.attn_norm(h), positions, cache)[rows]
    h = h[rows] + layer.post_attn_norm(attn)
    return h + layer.post_ffn_norm(_mlp(layer.mlp, layer.ffn_norm(h)))


#: Logits this close to a row's maximum are computed exactly (`llamacpp_logits`); the fp32 approximation of the
#: rest is within ~1e-5 of llama.cpp's, far inside this margin.
HEAD_MARGIN = 0.05


def _head(model: CausalLM, h: torch.Tensor, margin: float | None) -> torch.Tensor:
    """The output head over the last layer's `h` (the final norm first): exact everywhere (`margin=None`), or
    exact within `margin` of each row's top logit and the fast fp32 matmul of the same rounded activations
    elsewhere (an exact head costs seconds a row)."""
    head = model.lm_head
    if margin is None or not isinstance(head, QuantLinear) or head.qtype not in ROW_SELECTABLE:
        return model.compute_logits(h)
    h = model.norm(h)
    logits = F.linear(activation_rounding(head.qtype)(h), head.weight)
    for r in range(h.shape[0]):
        top = (logits[r] >= logits[r].max() - margin).nonzero()[:, 0]
        logits[r, top] = head(h[r : r + 1], rows=top)[0]
    if cap := model.config.final_logit_softcapping:
        logits = torch.tanh(logits / cap) * cap
    return logits


def llamacpp_logits(model: CausalLM, ids: list[int], start: int, cache: LlamaCppKVCache, *,
                    all_logits: bool = False, margin: float | None = HEAD_MARGIN) -> torch.Tensor:
    """Logits `[n, vocab]` of one llama.cpp batch: `ids` at positions `start...` of sequence 0 of `cache`; only the
    last row's unless `all_logits` (llama-cpp-python's `logits_all`). The logits within `margin` of a row's
    maximum are llama.cpp's bit for bit, so its greedy pick is; `margin=None` makes every logit exact (slow)."""
    cache.prepare([0], [len(ids)])
    positions = torch.arange(start, start + len(ids))
    rows = slice(None) if all_logits else slice(len(ids) - 1, None)
    with torch.inference_mode():
        h = model.embed(torch.tensor(ids))
        for i, layer in enumerate(model.layers):
            h = _layer(layer, h, positions, cache, rows if i == len(model.layers) - 1 else slice(None))
        return _head(model, h, margin)
