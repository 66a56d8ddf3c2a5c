"""Gemma 3 (text): sandwich norms, GeGLU, scaled embeddings, and local sliding-window layers between global ones.

Facts that neither file format states fully, and where they come from:
- every 6th layer is global, the rest slide (HF `sliding_window_pattern`/`layer_types`, llama.cpp
  `set_swa_pattern(6)`);
- local layers use rope theta 10k (HF `rope_local_base_freq` / `rope_parameters.sliding_attention`; llama.cpp
  hard-codes it for Gemma 3), global layers the file's theta, and rope scaling applies to global layers only;
- GGUF has no `query_pre_attn_scalar`: llama.cpp uses 1/sqrt(head_dim), except for the 27B (62 layers) where
  it uses 1/sqrt(hidden/heads), which is what that model's query_pre_attn_scalar says;
- norm weights are `1 + w`: llama.cpp's converter already added the 1, HF checkpoints did not (`ArchSpec`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from nbllm.errors import ModelLoadError
from nbllm.models.attention import AttentionBackend
from nbllm.models.base import CausalLM, build_attention, build_mlp, build_norm
from nbllm.models.config import ConfigReader, ModelConfig, hf_rope_parameters
from nbllm.models.layers import RotaryEmbedding
from nbllm.models.weights import WeightSource

SLIDING_WINDOW_PATTERN = 6
LOCAL_ROPE_THETA = 10_000.0
GLOBAL_ROPE_THETA = 1_000_000.0
_LLAMA_CPP_27B_LAYERS = 62


class Gemma3DecoderLayer(nn.Module):
    """`h += post_norm(attn(pre_norm(h))); h += post_norm(mlp(pre_norm(h)))`."""

    native_cpu = True  # exactly the layer `nbllm.models.native_cpu` runs in C++ (with its post norms)

    def __init__(self, config: ModelConfig, weights: WeightSource, layer: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        p = f"blk.{layer}"
        self.attn_norm = build_norm(config, weights, f"{p}.attn_norm.weight")
        self.attn = build_attention(config, weights, layer, rotary)
        self.post_attn_norm = build_norm(config, weights, f"{p}.post_attention_norm.weight")
        self.ffn_norm = build_norm(config, weights, f"{p}.ffn_norm.weight")
        self.mlp = build_mlp(config, weights, layer)
        self.post_ffn_norm = build_norm(config, weights, f"{p}.post_ffw_norm.weight")

    def forward(self, h: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend) -> torch.Tensor:
        h = h + self.post_attn_norm(self.attn(self.attn_norm(h), positions, attn))
        return h + self.post_ffn_norm(self.mlp(self.ffn_norm(h)))


class Gemma3ForCausalLM(CausalLM):
    layer_class = Gemma3DecoderLayer


def _pattern_layers(num_layers: int, pattern: int) -> tuple[bool, ...]:
    """Sliding flags for a period-`pattern` layout: the last layer of each period is global."""
    return tuple((i + 1) % pattern != 0 for i in range(num_layers))


def _common(config: ModelConfig) -> dict[str, Any]:
    return {
        "embedding_multiplier": math.sqrt(config.hidden_size),
        "activation": "gelu_tanh",
        "qk_norm": True,
    }


def gguf_config(r: ConfigReader, config: ModelConfig) -> dict[str, Any]:
    """Gemma 3 facts from GGUF metadata plus llama.cpp's built-in defaults."""
    window = config.sliding_window
    pattern = r.get("attention.sliding_window_pattern", SLIDING_WINDOW_PATTERN)
    if window is None:
        sliding = (False,) * config.num_layers
    elif isinstance(pattern, int):
        sliding = _pattern_layers(config.num_layers, pattern)
    else:  # a per-layer bool array
        sliding = tuple(bool(x) for x in pattern)
    if config.num_layers == _LLAMA_CPP_27B_LAYERS:
        default_scale = (config.hidden_size / config.num_heads) ** -0.5
    else:
        default_scale = config.head_dim**-0.5
    softcap = r.get("final_logit_softcapping")
    return _common(config) | {
        "layer_is_sliding": sliding,
        "rope_local_theta": r.float("rope.freq_base_swa", LOCAL_ROPE_THETA),
        "query_scale": r.float("attention.scale", default_scale),
        "final_logit_softcapping": float(softcap) if softcap else None,
    }


def hf_config(r: ConfigReader, config: ModelConfig) -> dict[str, Any]:
    """Gemma 3 facts from an HF config (Gemma3TextConfig defaults where keys are absent)."""
    text = r.data
    if text.get("attn_logit_softcapping") is not None:
        raise ModelLoadError(f"{r.source}: attention logit softcapping (Gemma 2) is not supported for Gemma 3")
    rope = hf_rope_parameters(text, r.source)
    global_rope = rope.get("full_attention", rope)
    sliding = config.layer_is_sliding
    if text.get("layer_types") is None:
        sliding = _pattern_layers(config.num_layers, int(text.get("sliding_window_pattern", SLIDING_WINDOW_PATTERN)))
    softcap = text.get("final_logit_softcapping")
    return _common(config) | {
        "layer_is_sliding": sliding,
        "sliding_window": int(text.get("sliding_window", 4096)),
        "rope_theta": float(global_rope.get("rope_theta", GLOBAL_ROPE_THETA)),
        "rope_local_theta": float(rope.get("sliding_attention", {}).get("rope_theta", LOCAL_ROPE_THETA)),
        "query_scale": r.float("query_pre_attn_scalar", 256) ** -0.5,
        "final_logit_softcapping": float(softcap) if softcap else None,
        "tie_word_embeddings": bool(text.get("tie_word_embeddings", True)),
    }
