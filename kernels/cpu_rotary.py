"""Per-head RMSNorm + rotary embedding of fp32 CPU heads in C++ (`cpu_rotary.cpp`): one call for q, one for k.

Why: at decode a layer's q/k norms and rotations are ~12 small tensor ops in torch (a few ms a token over a
model's layers); here two calls. Same formulas as `nbllm.models.layers` (their torch paths are the reference).
"""

from __future__ import annotations

import ctypes

import torch

from nbllm.kernels.cpu_library import I, P, function, ptr, unavailable_reason

__all__ = ["norm_rotary", "supports"]


def supports(x: torch.Tensor, cos: torch.Tensor) -> bool:
    """Whether `norm_rotary` takes heads `x: [T, H, D]` rotated by tables like `cos: [P, D / 2]`."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and cos.dtype == torch.float32
            and x.dim() == 3 and x.shape[-1] % 16 == 0 and x.stride(-1) == 1 and cos.shape[-1] * 2 == x.shape[-1]
            and cos.is_contiguous() and unavailable_reason() is None)


def norm_rotary(
    x: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
) -> torch.Tensor:
    """`rotate(rms_norm(x) * norm_weight)` per head (no norm when `norm_weight` is None) -> contiguous `[T, H, D]`;
    `positions: [T]` int64 rows of the `cos`/`sin` tables."""
    t, h, d = x.shape
    out = torch.empty((t, h, d), dtype=torch.float32)
    positions = positions.to(torch.int64).contiguous()
    w = None if norm_weight is None else norm_weight.contiguous()
    kernel = function("nbllm_norm_rotary", P, I, I, I, I, I, P, ctypes.c_float, P, P, P, P)
    kernel(x.data_ptr(), x.stride(0), x.stride(1), t, h, d, ptr(w), eps,
           positions.data_ptr(), cos.data_ptr(), sin.data_ptr(), out.data_ptr())
    return out
