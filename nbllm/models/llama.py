"""Llama 2/3, Mistral, SmolLM, Qwen2/2.5 and Qwen3: pre-norm decoder layers with SwiGLU.

These differ only in flags the config carries (q/k/v biases for Qwen2, per-head q/k RMSNorm for Qwen3, a
sliding window for Mistral, llama3 rope scaling), so they share this one layer.
"""

from __future__ import annotations

import torch
from torch import nn

from nbllm.models.attention import AttentionBackend
from nbllm.models.base import CausalLM, build_attention, build_mlp, build_norm
from nbllm.models.config import ModelConfig
from nbllm.models.layers import RotaryEmbedding
from nbllm.models.weights import WeightSource


class LlamaDecoderLayer(nn.Module):
    """`h += attn(norm(h)); h += mlp(norm(h))`."""

    native_cpu = True  # exactly the layer `nbllm.models.native_cpu` runs in C++ (without post norms)

    def __init__(self, config: ModelConfig, weights: WeightSource, layer: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.attn_norm = build_norm(config, weights, f"blk.{layer}.attn_norm.weight")
        self.attn = build_attention(config, weights, layer, rotary)
        self.ffn_norm = build_norm(config, weights, f"blk.{layer}.ffn_norm.weight")
        self.mlp = build_mlp(config, weights, layer)

    def forward(self, h: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend) -> torch.Tensor:
        if h.is_cuda:  # each norm and residual add folded into a projection: one GEMV each at decode sizes
            h = self.attn(h, positions, attn, norm=self.attn_norm, residual=h)
            return self.mlp(h, norm=self.ffn_norm, residual=h)
        normed, h = self.ffn_norm.add_forward(self.attn(self.attn_norm(h), positions, attn), h)
        return h + self.mlp(normed)


class LlamaForCausalLM(CausalLM):
    layer_class = LlamaDecoderLayer
