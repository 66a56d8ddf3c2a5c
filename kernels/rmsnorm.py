"""RMSNorm and fused residual-add + RMSNorm in Triton, with the torch reference beside them.

`x / rms(x) * w` with the statistics and the product in fp32 and one rounding to the input's type, exactly the
model's `RMSNorm` (`rms_norm_reference`). The fused form also adds the residual first (rounded to the input's
type, as the unfused `h = h + out` is) and returns that sum for the next block's residual: one pass over the
activations instead of three, which is what a pre-norm decoder layer does between its two blocks. On Hopper the
launch is programmatic-dependent (`pdl`) like the GEMVs around it: the weight loads before the wait.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import enabled as pdl_enabled

__all__ = ["add_rms_norm", "rms_norm", "rms_norm_reference"]


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * weight.float()).to(x.dtype)


@triton.jit
def _norm_kernel(x_ptr, res_ptr, sum_ptr, w_ptr, out_ptr, stride_x, stride_r, stride_s, stride_o, eps,
                 N: tl.constexpr, BLOCK: tl.constexpr, ADD: tl.constexpr, PDL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    if PDL:
        tl.extra.cuda.gdc_wait()  # x (and the residual) come from the kernels before
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    if ADD:
        x = x + tl.load(res_ptr + row * stride_r + cols, mask=ok, other=0.0)
        tl.store(sum_ptr + row * stride_s + cols, x, mask=ok)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / N + eps)
    tl.store(out_ptr + row * stride_o + cols, (xf * rstd * w).to(out_ptr.dtype.element_ty), mask=ok)


def _rows(x: torch.Tensor) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    return rows


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`rms_norm_reference` over the last dimension of `x` (any leading shape)."""
    rows = _rows(x)
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    if rows.shape[0]:
        n, pdl = rows.shape[1], pdl_enabled(x.device)
        _norm_kernel[(rows.shape[0],)](rows, rows, rows, weight, out, rows.stride(0), 0, 0, out.stride(0), eps,
                                       N=n, BLOCK=triton.next_power_of_2(n), ADD=False, PDL=pdl, num_warps=4,
                                       launch_pdl=pdl)
    return out.view(x.shape)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`(rms_norm(x + residual), x + residual)` for `[T, H]` inputs, in one pass."""
    rows, res = _rows(x), _rows(residual)
    total = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    out = torch.empty_like(total)
    if rows.shape[0]:
        n, pdl = rows.shape[1], pdl_enabled(x.device)
        _norm_kernel[(rows.shape[0],)](rows, res, total, weight, out, rows.stride(0), res.stride(0),
                                       total.stride(0), out.stride(0), eps,
                                       N=n, BLOCK=triton.next_power_of_2(n), ADD=True, PDL=pdl, num_warps=4,
                                       launch_pdl=pdl)
    return out.view(x.shape), total.view(x.shape)
