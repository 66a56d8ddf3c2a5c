"""The CPU fast path of a forward: every decoder layer in one C++ call (`nbllm.kernels.cpu_decoder`).

Why: a CPU decode step of a small model is call-bound — each layer's ~14 kernels take ~0.3 ms at batch 1 and
calling them one by one from Python cost as much again. Where a model's layers are exactly what the C++ program
computes (the standard pre-norm residual layer with optional post norms, q/k norms and rope, fused q/k/v and
gate/up int8 weights rounding their inputs as llama.cpp does, fp32 paged KV), the program runs them with the same
kernels in the same order: its output is bit for bit the Python modules' (`tests/test_native_cpu.py`), and those
modules stay the readable reference. Anything else — exact or llama.cpp numerics, dense weights, biases, split or
sharded models, GPUs — takes the module path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from nbllm.kernels.cpu_decoder import DecoderLayerWeights, DecoderStep, decoder_layers, layer_array, layer_struct
from nbllm.kernels.cpu_library import unavailable_reason
from nbllm.models.layers import Attention, GatedMLP, RMSNorm
from nbllm.models.quantized_linear import Int8Linear

if TYPE_CHECKING:
    from nbllm.models.base import CausalLM

__all__ = ["NativeDecoder", "native_decoder"]

_GELU = {"gelu_tanh": True, "silu": False}


class NativeDecoder:
    """A model's decoder layers as one C++ program; `decoder(h, positions, step)` runs a step in place."""

    def __init__(self, layers: list[DecoderLayerWeights]) -> None:
        self._weights = layers  # kept alive: the structs hold their addresses
        self._layers = layer_array([layer_struct(w) for w in layers])

    def __call__(self, h: torch.Tensor, positions: torch.Tensor, step: DecoderStep) -> torch.Tensor:
        return decoder_layers(self._layers, h, positions.to(torch.int64).contiguous(), step)


def _int8(linear: object) -> Int8Linear | None:
    """The layer if it is a plain int8 one rounding its input as llama.cpp does (the program's only linear)."""
    ok = (type(linear) is Int8Linear and linear.activation_block is not None and linear.bias is None
          and linear.round_input is None)
    return linear if ok else None


def _norm(norm: object, eps: float) -> torch.Tensor | None:
    """The norm's fp32 weight, or None where the program's RMSNorm is not this one."""
    if type(norm) is RMSNorm and norm.eps == eps and norm.weight.dtype == torch.float32 and norm.weight.is_contiguous():
        return norm.weight
    return None


def _layer(layer: torch.nn.Module, hidden: int) -> DecoderLayerWeights | None:
    attn, mlp = getattr(layer, "attn", None), getattr(layer, "mlp", None)
    if not (getattr(type(layer), "native_cpu", False) and type(attn) is Attention and type(mlp) is GatedMLP):
        return None
    linears = [_int8(x) for x in (attn.qkv_proj, attn.o_proj, mlp.gate_up, mlp.down)]
    eps = layer.attn_norm.eps
    norms = {name: _norm(getattr(layer, name, None), eps) for name in ("attn_norm", "ffn_norm")}
    optional = {name: getattr(layer, name, None) for name in ("post_attn_norm", "post_ffn_norm")}
    optional |= {"q_norm": attn.q_norm, "k_norm": attn.k_norm}
    optional_weights = {name: None if m is None else _norm(m, eps) for name, m in optional.items()}
    rotary = attn.rotary
    if (None in linears or None in norms.values()
            or any(m is not None and optional_weights[name] is None for name, m in optional.items())
            or not attn._plain_rope_and_norms() or mlp.activation not in _GELU
            or attn.head_dim % 16 or hidden % 8 or (mlp.gate_up.out_features // 2) % 8
            or rotary.cos.dtype != torch.float32 or not rotary.cos.is_contiguous() or not rotary.sin.is_contiguous()):
        return None
    qkv, o, gate_up, down = (x.kernel() for x in linears)
    return DecoderLayerWeights(**norms, **optional_weights, cos=rotary.cos, sin=rotary.sin, qkv=qkv, o=o,
                               gate_up=gate_up, down=down, heads=attn.num_heads, kv_heads=attn.num_kv_heads,
                               head_dim=attn.head_dim, window=attn.sliding_window, gelu=_GELU[mlp.activation],
                               eps=eps, scale=attn.scale)


def native_decoder(model: CausalLM) -> NativeDecoder | None:
    """The program for `model`'s layers, or None where any layer is not exactly what it computes."""
    if unavailable_reason() is not None or model.placement is not None or model.device.type != "cpu":
        return None
    layers = [_layer(layer, model.config.hidden_size) for layer in model.layers]
    if not layers or None in layers:
        return None
    return NativeDecoder(layers)


