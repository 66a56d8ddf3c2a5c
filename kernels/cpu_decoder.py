"""Every decoder layer of a step in one C++ call (`cpu_decoder.cpp`), for CPU models with int8-activation weights.

Why: at batch 1 a layer's kernels take ~0.3 ms, and calling them one by one from Python cost as much again. This
module only turns tensors into the C structs; which models qualify, and from which modules the tensors come, is
`nbllm.models.native_cpu`'s business.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from nbllm.kernels.cpu_int8_gemm import Int8Gemm
from nbllm.kernels.cpu_library import I, P, function, num_threads, ptr

__all__ = ["DecoderLayerWeights", "DecoderStep", "decoder_layers", "layer_array", "layer_struct"]

_F = ctypes.c_float


class _Linear(ctypes.Structure):
    _fields_ = [("packed", P), *[(name, I) for name in ("n", "k", "group", "scale_half", "offsets", "width", "bias",
                                                     "act_block")]]


class _Layer(ctypes.Structure):
    _fields_ = [*[(name, P) for name in ("attn_norm", "post_attn_norm", "ffn_norm", "post_ffn_norm", "q_norm",
                                         "k_norm", "cos", "sin", "k_cache", "v_cache")],
                *[(name, _Linear) for name in ("qkv", "o", "gate_up", "down")],
                *[(name, I) for name in ("heads", "kv_heads", "head_dim", "block_size", "window", "gelu")],
                ("eps", _F), ("scale", _F)]


class _Step(ctypes.Structure):
    _fields_ = [*[(name, P) for name in ("positions", "slots", "block_tables", "cu_query_lens", "context_lens",
                                         "seqs")],
                *[(name, I) for name in ("tokens", "block_table_stride", "num_seqs")]]


@dataclass(frozen=True)
class DecoderLayerWeights:
    """One layer's tensors (fp32, contiguous; post/q/k norms optional) and shapes; the linears are bound
    int8-activation kernels (`Int8Gemm.panels`)."""

    attn_norm: torch.Tensor
    post_attn_norm: torch.Tensor | None
    ffn_norm: torch.Tensor
    post_ffn_norm: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    cos: torch.Tensor
    sin: torch.Tensor
    qkv: Int8Gemm
    o: Int8Gemm
    gate_up: Int8Gemm
    down: Int8Gemm
    heads: int
    kv_heads: int
    head_dim: int
    window: int | None
    gelu: bool
    eps: float
    scale: float


@dataclass(frozen=True)
class DecoderStep:
    """What a step's attention needs (as `nbllm.kernels.paged_attention` defines it), plus each layer's pools."""

    slots: torch.Tensor  # [T] int64, -1: not stored
    block_tables: torch.Tensor  # [B, max_blocks] int32
    cu_query_lens: torch.Tensor  # [B + 1] int32
    context_lens: torch.Tensor  # [B] int32
    seqs: torch.Tensor  # int64 indices of the sequences with queries
    k_caches: Sequence[torch.Tensor]  # per layer [blocks, block_size, Hkv, D] fp32
    v_caches: Sequence[torch.Tensor]


def layer_struct(w: DecoderLayerWeights) -> _Layer:
    """The C struct of a layer's weights (its pools are filled in per step); keep `w` alive while it is used."""
    linears = {name: _Linear(*getattr(w, name).panels) for name in ("qkv", "o", "gate_up", "down")}
    return _Layer(attn_norm=ptr(w.attn_norm), post_attn_norm=ptr(w.post_attn_norm), ffn_norm=ptr(w.ffn_norm),
                  post_ffn_norm=ptr(w.post_ffn_norm), q_norm=ptr(w.q_norm), k_norm=ptr(w.k_norm),
                  cos=ptr(w.cos), sin=ptr(w.sin), **linears, heads=w.heads, kv_heads=w.kv_heads,
                  head_dim=w.head_dim, window=w.window or 0, gelu=int(w.gelu), eps=w.eps, scale=w.scale)


def decoder_layers(layers: ctypes.Array, h: torch.Tensor, positions: torch.Tensor, step: DecoderStep) -> torch.Tensor:
    """`h: [T, hidden]` (contiguous fp32) at `positions: [T]` (int64) through every layer of `layers` (an array of
    `layer_struct`s), in place; returns `h`."""
    for struct, k_cache, v_cache in zip(layers, step.k_caches, step.v_caches, strict=True):
        struct.k_cache, struct.v_cache, struct.block_size = k_cache.data_ptr(), v_cache.data_ptr(), k_cache.shape[1]
    s = _Step(positions=positions.data_ptr(), slots=step.slots.data_ptr(),
              block_tables=step.block_tables.data_ptr(), cu_query_lens=step.cu_query_lens.data_ptr(),
              context_lens=step.context_lens.data_ptr(), seqs=step.seqs.data_ptr(), tokens=h.shape[0],
              block_table_stride=step.block_tables.shape[1], num_seqs=step.seqs.numel())
    kernel = function("nbllm_decoder_layers", P, I, P, P, I, ctypes.c_int)
    kernel(ctypes.addressof(layers), len(layers), ctypes.addressof(s), h.data_ptr(), h.shape[1], num_threads())
    return h


def layer_array(structs: Sequence[_Layer]) -> ctypes.Array:
    """The structs as the contiguous C array `decoder_layers` takes."""
    return (_Layer * len(structs))(*structs)
