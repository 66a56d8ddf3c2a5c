"""Gated activations in Triton: `act(gate) * up` from the fused gate/up projection, with the torch reference.

The MLP's gate and up halves come out of one GEMM as `[T, 2I]`; this reads both halves once and writes `[T, I]`,
one launch where torch needs two (the activation, then the product) and an intermediate round trip.
The activation runs in fp32 and the product rounds once to the input's type.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

__all__ = ["gated_activation", "gated_activation_reference"]

ACTIVATIONS = {"silu": 0, "gelu_tanh": 1}


def gated_activation_reference(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    gate, up = gate_up.float().chunk(2, dim=-1)
    act = F.silu(gate) if activation == "silu" else F.gelu(gate, approximate="tanh")
    return (act * up).to(gate_up.dtype)


@triton.jit
def _gated_kernel(x_ptr, out_ptr, stride_x, stride_o, N: tl.constexpr, BLOCK: tl.constexpr, ACT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < N
    gate = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + N + cols, mask=ok, other=0.0).to(tl.float32)
    if ACT == 0:
        act = gate / (1.0 + tl.exp(-gate))
    else:  # tanh-approximated GELU; tanh(y) = 2 sigmoid(2y) - 1
        y = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        act = 0.5 * gate * (2.0 / (1.0 + tl.exp(-2.0 * y)))
    tl.store(out_ptr + row * stride_o + cols, (act * up).to(out_ptr.dtype.element_ty), mask=ok)


def gated_activation(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    """`act(gate) * up` for `gate_up: [T, 2I]` (last dimension contiguous) -> `[T, I]`; `activation` is "silu"
    or "gelu_tanh"."""
    tokens, width = gate_up.shape
    if gate_up.stride(1) != 1:
        raise ValueError("gated_activation needs the last dimension contiguous")
    n = width // 2
    out = torch.empty((tokens, n), dtype=gate_up.dtype, device=gate_up.device)
    if tokens:
        block = min(4096, triton.next_power_of_2(n))
        _gated_kernel[(tokens, triton.cdiv(n, block))](gate_up, out, gate_up.stride(0), out.stride(0), N=n,
                                                       BLOCK=block, ACT=ACTIVATIONS[activation], num_warps=4)
    return out
