"""RMSNorm (and residual add + RMSNorm) for fp32 CPU tensors in C++ (`cpu_rmsnorm.cpp`).

Why: a decode step of a small model runs ~100 norms of one row; in torch each is six tensor ops (~50 us in a
forward), here one call (~2 us). Same formula as `nbllm.models.layers.RMSNorm` (its torch path is the reference);
only the summation order of the mean square differs.
"""

from __future__ import annotations

import ctypes

import torch

from nbllm.kernels.cpu_library import I, P, function, num_threads, unavailable_reason

__all__ = ["rms_norm", "supports"]


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `rms_norm` takes these: fp32 CPU tensors, a row length that is a multiple of 8."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.shape[-1] % 8 == 0 and unavailable_reason() is None)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(norm(x + residual) * weight, x + residual)` over the last dimension (the second item None without a
    residual)."""
    cols = x.shape[-1]
    x2 = x.reshape(-1, cols)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x.shape, dtype=torch.float32)
    total = None
    res_ptr = total_ptr = None
    if residual is not None:
        residual = residual.contiguous()
        total = torch.empty(x.shape, dtype=torch.float32)
        res_ptr, total_ptr = residual.data_ptr(), total.data_ptr()
    kernel = function("nbllm_rms_norm", P, I, P, P, P, I, I, ctypes.c_float, P, I, ctypes.c_int)
    kernel(x2.data_ptr(), x2.stride(0), res_ptr, total_ptr, weight.contiguous().data_ptr(), x2.shape[0], cols, eps,
           out.data_ptr(), cols, num_threads())
    return out, total
