"""Building blocks shared by every architecture: linear, RMSNorm, rotary embedding, gated MLP, attention.

Each block is built from tensors a `WeightSource` has already checked, never randomly initialised, and works on
token-flattened activations `[T, ...]`: the model never sees sequences, only tokens and their positions.
The numerics follow transformers' fp32 path (norms and softmax in fp32, rope frequencies computed the same way)
so CPU fp32 logits match it to rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from nbllm.kernels import cpu_activation, cpu_rmsnorm, cpu_rotary
from nbllm.models.quantized_linear import Int8Linear

if TYPE_CHECKING:
    from nbllm.models.attention import AttentionBackend


class Linear(nn.Module):
    """`y = x W^T + b` over a dense weight `[out, in]`.

    Only `WeightSource.linear` constructs these, so quantized weight formats can replace this class in one place.
    `round_input` rounds `x` first: llama.cpp-compatible numerics quantize activations to the weight type's dot
    product type there (`nbllm.models.llamacpp_numerics`); None (the default) computes exactly.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        round_input: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.round_input = round_input

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _gemv_serves(self, x):
            from nbllm.kernels.gemv import gemv

            return gemv(x, self.weight, self.bias)
        if self.round_input is not None:
            x = self.round_input(x)
        return F.linear(x, self.weight, self.bias)


def _gemv_serves(linear: nn.Module, x: torch.Tensor) -> bool:
    """Whether `linear(x)` runs as the Triton GEMV (`nbllm.kernels.gemv`): a plain dense linear on CUDA over a
    decode-sized batch (at most `MAX_ROWS` rows; a GEMM's weight reuse makes cuBLAS the better choice beyond)."""
    if not (x.is_cuda and type(linear) is Linear and linear.round_input is None and x.dim() == 2):
        return False
    from nbllm.kernels import gemv

    return gemv.supports(x, linear.weight)


def linear_fp32(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`linear(x)` in fp32, for the logits: at decode sizes on CUDA the GEMV writes its fp32 sums as they are,
    one launch instead of a bf16 output and a cast kernel at the end of every decode step."""
    if _gemv_serves(linear, x):
        from nbllm.kernels.gemv import gemv

        return gemv(x, linear.weight, linear.bias, out_dtype=torch.float32)
    return linear(x).float()


def gated(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    """`act(gate) * up` of a fused `[T, 2I]` gate/up output: one Triton pass on CUDA, one C++ pass on the CPU."""
    if gate_up.is_cuda:
        from nbllm.kernels.activation import gated_activation

        return gated_activation(gate_up, activation)
    if cpu_activation.supports(gate_up, activation):
        return cpu_activation.gated_activation(gate_up, activation)
    gate, up = gate_up.chunk(2, dim=-1)
    return _ACTIVATIONS[activation](gate) * up


def project(linear: nn.Module, x: torch.Tensor, *, norm: RMSNorm | None = None, activation: str | None = None,
            residual: torch.Tensor | None = None) -> torch.Tensor:
    """`linear(prologue(x)) + residual`, the prologue `norm(x)` or, for a fused `[T, 2I]` gate/up `x`,
    `gated(x, activation)`.

    At decode sizes on CUDA the whole expression is one GEMV launch (the norm or activation folded into how it
    reads x, the residual into how it writes y) instead of three; a norm with numerics of its own (a subclass)
    or another kind of linear (quantized, tensor-parallel) runs the steps one by one. Larger CUDA batches fold
    the residual into cuBLAS's epilogue (`addmm`).
    """
    fusable_norm = norm is None or type(norm) is RMSNorm
    if fusable_norm and _gemv_serves(linear, x[:, : x.shape[1] // 2] if activation else x) and (
            residual is None or residual.dtype == x.dtype):
        from nbllm.kernels.gemv import gemv

        return gemv(x, linear.weight, linear.bias, norm_weight=None if norm is None else norm.weight,
                    eps=0.0 if norm is None else norm.eps, activation=activation, residual=residual)
    if norm is not None:
        x = norm(x)
    if activation is not None:
        x = gated(x, activation)
    if residual is None:
        return linear(x)
    if x.is_cuda and type(linear) is Linear and linear.round_input is None and linear.bias is None and x.dim() == 2:
        return torch.addmm(residual, x, linear.weight.t())
    return linear(x) + residual


class RMSNorm(nn.Module):
    """`x / rms(x) * w`, computed in fp32. Gemma's `(1 + w)` is folded into `w` at load time."""

    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:  # one Triton pass instead of six elementwise kernels
            from nbllm.kernels.rmsnorm import rms_norm

            return rms_norm(x, self.weight, self.eps)
        if cpu_rmsnorm.supports(x, self.weight):  # one C++ call instead of six tensor ops
            return cpu_rmsnorm.rms_norm(x, self.weight, self.eps)[0]
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(norm(residual + x), residual + x)`: a pre-norm layer's residual add and its next norm, fused on CUDA."""
        if x.is_cuda:
            from nbllm.kernels.rmsnorm import add_rms_norm

            return add_rms_norm(x, residual, self.weight, self.eps)
        if cpu_rmsnorm.supports(x, self.weight) and residual.shape == x.shape and residual.dtype == x.dtype:
            return cpu_rmsnorm.rms_norm(x, self.weight, self.eps, residual)
        total = residual + x
        return self(total), total


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None = None) -> torch.Tensor:
    """Rotary inverse frequencies `[head_dim / 2]` as transformers computes them (default, linear, llama3)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate smoothly in between.
    old_len = scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """NeoX-style (rotate-half) rope with cos/sin precomputed for positions `[0, max_positions)`.

    Interleaved-rope checkpoints (llama.cpp's permuted Llama q/k rows) are converted to this layout at load,
    so this is the only rotary implementation.
    """

    def __init__(self, inv_freq: torch.Tensor, max_positions: int) -> None:
        super().__init__()
        freqs = torch.arange(max_positions, dtype=torch.int64).float()[:, None] * inv_freq.float()[None, :]
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate `x: [T, heads, head_dim]` by each token's position `positions: [T]`."""
        if x.is_cuda:  # fp32 rotation in one kernel (this path rounds cos/sin to x's type first)
            from nbllm.kernels.rotary import rotary_embedding

            return rotary_embedding(x, positions, self.cos, self.sin)
        cos = self.cos.index_select(0, positions).to(x.dtype)[:, None, :]  # index_select: ~8x cheaper than [positions]
        sin = self.sin.index_select(0, positions).to(x.dtype)[:, None, :]
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


_ACTIVATIONS = {
    "silu": F.silu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class GatedMLP(nn.Module):
    """`down(act(gate(x)) * up(x))`: SwiGLU (Llama, Qwen) or GeGLU with tanh GELU (Gemma)."""

    def __init__(self, gate: Linear, up: Linear, down: Linear, activation: str) -> None:
        super().__init__()
        self.gate, self.up, self.down = gate, up, down
        self.gate_up: Linear | None = None
        self.activation = activation
        self.act = _ACTIVATIONS[activation]

    def fuse_projections(self, dense: bool = True) -> None:
        """Replace gate and up by one `[2I, H]` linear (one GEMM, one launch) where they can be joined (int8
        weights always, dense ones when `dense`; see `_concat_linears`)."""
        fused = _concat_linears((self.gate, self.up), dense)
        if fused is not None:
            self.gate_up, self.gate, self.up = fused, None, None

    def forward(self, x: torch.Tensor, *, norm: RMSNorm | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """`down(act(gate(x')) * up(x')) + residual`, `x' = norm(x)` (both optional: `project` fuses them)."""
        if self.gate_up is not None:
            return project(self.down, project(self.gate_up, x, norm=norm), activation=self.activation,
                           residual=residual)
        if norm is not None:
            x = norm(x)
        out = self.down(self.act(self.gate(x)) * self.up(x))
        return out if residual is None else out + residual


def _concat_linears(parts: tuple[Linear, ...], dense: bool) -> Linear | None:
    """One linear whose output is the parts' outputs side by side, or None where they cannot be joined: parts of
    different kinds, dense parts when `dense` is False, llama.cpp activation rounding, a bias on only some parts."""
    if any(p is None for p in parts):  # already joined (a second runner over the same model)
        return None
    biases = [p.bias for p in parts]
    if any(b is None for b in biases) and any(b is not None for b in biases):
        return None
    bias = torch.cat(biases) if biases[0] is not None else None
    if all(type(p) is Int8Linear for p in parts):
        return Int8Linear.concat(parts, bias)
    if not dense or any(type(p) is not Linear or p.round_input is not None for p in parts):
        return None
    return Linear(torch.cat([p.weight for p in parts]), bias)


class Attention(nn.Module):
    """Project to q/k/v, optionally RMS-normalise each head, rotate, attend through the backend, project out.

    The backend (`AttentionBackend`) owns the KV cache and knows which tokens belong to which sequence; this
    module only knows its layer index, scale and sliding window.
    """

    def __init__(
        self,
        *,
        layer: int,
        q: Linear,
        k: Linear,
        v: Linear,
        o: Linear,
        rotary: RotaryEmbedding,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        sliding_window: int | None,
        q_norm: RMSNorm | None = None,
        k_norm: RMSNorm | None = None,
    ) -> None:
        super().__init__()
        self.layer = layer
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q, k, v, o
        self.qkv_proj: Linear | None = None
        self.q_norm, self.k_norm = q_norm, k_norm
        self.rotary = rotary
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.sliding_window = sliding_window

    def fuse_projections(self, dense: bool = True) -> None:
        """Replace q, k and v by one linear (one GEMM, one launch) where they can be joined (as in GatedMLP's)."""
        fused = _concat_linears((self.q_proj, self.k_proj, self.v_proj), dense)
        if fused is not None:
            self.qkv_proj, self.q_proj, self.k_proj, self.v_proj = fused, None, None, None

    def _plain_rope_and_norms(self) -> bool:
        """Whether the fused C++ norm + rotary computes what these modules do (not subclasses with numerics of
        their own, such as llama.cpp-compatible ones)."""
        return type(self.rotary) is RotaryEmbedding and (
            self.q_norm is None or (type(self.q_norm) is RMSNorm and type(self.k_norm) is RMSNorm))

    def _attend_on_gpu(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                       attn: AttentionBackend) -> torch.Tensor:
        """Per-head norms, rotary, K/V store and attention in as few Triton launches as the backend allows: one
        on a paged decode step (`forward_rotary`), else the rotary kernel (storing K/V itself where the backend
        offers `kv_destination`) and the attention."""
        from nbllm.kernels.rotary import rotary_qk

        norms = {} if self.q_norm is None else {
            "q_weight": self.q_norm.weight, "k_weight": self.k_norm.weight, "eps": self.q_norm.eps}
        window = {"scale": self.scale, "sliding_window": self.sliding_window}
        fused = getattr(attn, "forward_rotary", None)  # optional (`AttentionBackend`)
        if fused is not None:
            out = fused(self.layer, q, k, v, positions, self.rotary.cos, self.rotary.sin, **window, **norms)
            if out is not None:
                return out
        destination = getattr(attn, "kv_destination", None)  # optional (`AttentionBackend`)
        store = None if destination is None else (v, *destination(self.layer))
        q, k = rotary_qk(q, k, positions, self.rotary.cos, self.rotary.sin, **norms, store=store)
        return attn.forward(self.layer, q, k, v, **window, **({"stored": True} if store is not None else {}))

    def forward(self, x: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend, *,
                norm: RMSNorm | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
        """`o_proj(attention(x')) + residual`, `x' = norm(x)` (both optional: `project` fuses them)."""
        t = x.shape[0]
        if self.qkv_proj is not None:
            q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            q, k, v = project(self.qkv_proj, x, norm=norm).split((q_dim, kv_dim, kv_dim), dim=-1)
        else:
            if norm is not None:
                x = norm(x)
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if x.is_cuda:
            out = self._attend_on_gpu(q, k, v, positions, attn)
        else:
            if self._plain_rope_and_norms() and cpu_rotary.supports(q, self.rotary.cos) and cpu_rotary.supports(
                    k, self.rotary.cos):
                rope = (positions, self.rotary.cos, self.rotary.sin)
                if self.q_norm is None:
                    q, k = cpu_rotary.norm_rotary(q, *rope), cpu_rotary.norm_rotary(k, *rope)
                else:
                    q = cpu_rotary.norm_rotary(q, *rope, self.q_norm.weight, self.q_norm.eps)
                    k = cpu_rotary.norm_rotary(k, *rope, self.k_norm.weight, self.k_norm.eps)
            else:
                if self.q_norm is not None:
                    q, k = self.q_norm(q), self.k_norm(k)
                q, k = self.rotary(q, positions), self.rotary(k, positions)
            out = attn.forward(self.layer, q, k, v, scale=self.scale, sliding_window=self.sliding_window)
        return project(self.o_proj, out.reshape(t, self.num_heads * self.head_dim), residual=residual)
