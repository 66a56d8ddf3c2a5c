"""Decode-sized linear layers in Triton: `y = prologue(x) W^T (+ b) (+ residual)` for 1-8 rows, with the torch
reference beside it.

A decode step of a small batch reads every weight once and does two flops per weight byte, so its time is the
bytes of W over the memory bandwidth. cuBLAS picks GEMM tiles for these shapes that leave much of an H200's
bandwidth unused (359-1,900 GB/s on Qwen3-0.6B's 4-13 MB matrices, of ~4,100). Here each program owns a few
output rows (`_BLOCK_N`: at least 256 programs for N >= 1024) and the whole of K (a compile-time constant), reads
its weight rows with 16-byte loads, accumulates every row of x against them in fp32 and reduces once at the end.
No split-K: no atomics, the same answer every run. On Hopper the launch is programmatic-dependent (`pdl`): a
GEMV's programs start while the kernel before it drains and load their first weight tile before waiting for its
output, which hides part of the fixed cost (launch, first DRAM round trip) that dominates a 2-5 µs kernel.

Because a program sees the whole input row, the small operations around a projection fold into it:
- `norm_weight`: the input is RMS-normalised first (`x / rms(x) * w`, statistics in fp32, rounded to the input's
  type as the separate norm would): the pre-norm of a decoder block fused into its first projection;
- `activation`: the input is `[M, 2K]`, gate then up, and the product is `act(gate) * up` (rounded to the
  input's type): the gated MLP's activation fused into its down projection;
- `residual`: added to the output before its one rounding: the residual stream's add fused into the block's
  last projection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .activation import ACTIVATIONS, gated_activation_reference
from .pdl import enabled as pdl_enabled
from .rmsnorm import rms_norm_reference

__all__ = ["MAX_ROWS", "gemv", "gemv_reference", "supports"]

MAX_ROWS = 8  # beyond this, GEMM tiles that reuse each weight across rows (cuBLAS) are the better shape
# Output rows a program: on an H200 the best or within 1% of it for every Qwen3-0.6B and Llama-3-8B projection
# and head at batch 1 (benchmarks/gpu_throughput.py (e): up to 2.6x faster than 32 rows, 3x than cuBLAS).
_BLOCK_N = 4
_NONE, _NORM = -2, -1  # prologue codes; activations use their `ACTIVATIONS` codes (0, 1)


def gemv_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                   norm_weight: torch.Tensor | None = None, eps: float = 0.0, activation: str | None = None,
                   residual: torch.Tensor | None = None) -> torch.Tensor:
    """The unfused composition: norm or gated activation, `F.linear`, then the residual add."""
    if norm_weight is not None:
        x = rms_norm_reference(x, norm_weight, eps)
    if activation is not None:
        x = gated_activation_reference(x, activation)
    y = F.linear(x, weight, bias)
    return y if residual is None else y + residual


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `gemv` serves `x @ weight.T`: a CUDA (or interpreted) 2-D input of 1-`MAX_ROWS` rows with unit
    inner stride, a contiguous weight of the same type."""
    return (x.dim() == 2 and 1 <= x.shape[0] <= MAX_ROWS and x.stride(1) == 1 and weight.is_contiguous()
            and x.dtype == weight.dtype and x.device == weight.device)


def max_registers(prologue: int, block_m: int, block_n: int, block_k: int, num_warps: int, *, even_n: bool,
                  has_residual: bool, element_size: int) -> int | None:
    """The launch's register cap: 40 a thread for a pre-norm projection of one row (the q/k/v and gate/up GEMVs
    of a batch-1 step: 16-bit weights, whole row groups, no residual, at most 4096 products for 4 warps), else
    none.

    The norm's statistics take such a program to 43-48 registers, allocated as 48, so 10 programs of 4 warps fit
    an SM; capped at 40 the same code compiles without spilling (ptxas for sm_90, same instruction count) and 12
    fit: all 1,536 of Qwen3-0.6B's gate/up programs are then resident at once on a 132-SM H200 and load their
    weights before they wait, instead of the last 216 starting only as others finish; and a decode attention
    program (164 registers) fits beside the q/k/v GEMV's 7-8 an SM, to gather its first K/V tile early. Other
    variants spill under the cap (some with a residual, or ragged N): tests/compile_kernels.py compiles the ones
    this admits at the models' widths (640-1024) and fails if any spills."""
    small_norm = prologue == _NORM and block_m == 1 and block_n * block_k <= 4096 and num_warps == 4
    return 40 if small_norm and even_n and not has_residual and element_size == 2 else None


def _block_k(rows: int, k: int, block_n: int) -> int:
    """A K tile of at most 8192 products a step (64 fp32 accumulators a thread at 4 warps), one that divides K
    where a power of two >= 64 does (no masked tail: 3072 -> 1024, not 2048). Except where K is no power of two
    but its next one holds at most 16384 products: then all of K in one masked tile (3072 -> 4096), one DRAM
    round trip a program instead of three (Qwen3-0.6B's down projection: 2% of a batch-1 step on an H200)."""
    whole = triton.next_power_of_2(k)
    if whole != k and whole * triton.next_power_of_2(rows) * block_n <= 16384:
        return whole
    budget = min(whole, max(64, 8192 // (triton.next_power_of_2(rows) * block_n)))
    tile = budget
    while tile > 64 and k % tile:
        tile //= 2
    return tile if k % tile == 0 else budget


@triton.jit
def _weight_tile(w_rows, k, n_ok, K: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr):
    if EVEN_K and EVEN_N:
        return tl.load(w_rows + k).to(tl.float32)
    return tl.load(w_rows + k, mask=n_ok & (k < K), other=0.0).to(tl.float32)


@triton.jit
def _norm_weights(nw_ptr, k, K: tl.constexpr, PROLOGUE: tl.constexpr):
    """The norm's weights at `k` in fp32 where the prologue is the norm (else 0): constants, so a program may
    load them before it waits for the kernel before."""
    if PROLOGUE == -1:
        return tl.load(nw_ptr + k, mask=k < K, other=0.0).to(tl.float32)
    return tl.zeros(k.shape, tl.float32)


@triton.jit
def _input_tile(x_rows, nw, k, m_ok, rstd, K: tl.constexpr, PROLOGUE: tl.constexpr):
    """x[:, k] in fp32 after the prologue (rounded to x's type where the unfused op's output would be); `nw`:
    `_norm_weights` at `k`."""
    x_ok = m_ok & (k < K)
    x = tl.load(x_rows + k, mask=x_ok, other=0.0)
    if PROLOGUE == -1:
        x = (x.to(tl.float32) * rstd * nw).to(x_rows.dtype.element_ty)
    elif PROLOGUE >= 0:  # x is the gate half of a [M, 2K] row; its up half follows at +K
        gate = x.to(tl.float32)
        up = tl.load(x_rows + K + k, mask=x_ok, other=0.0).to(tl.float32)
        if PROLOGUE == 0:
            act = gate / (1.0 + tl.exp(-gate))
        else:  # tanh-approximated GELU; tanh(y) = 2 sigmoid(2y) - 1
            y = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
            act = 0.5 * gate * (2.0 / (1.0 + tl.exp(-2.0 * y)))
        x = (act * up).to(x_rows.dtype.element_ty)
    return x.to(tl.float32)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, nw_ptr, res_ptr, out_ptr, M, N, stride_xm, stride_wn, stride_rm, stride_om,
                 eps, K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 PROLOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                 EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr):
    # [BLOCK_M, BLOCK_N, BLOCK_K] products: rows of x, rows of W, the K slice; reduced over K once at the end.
    ms = tl.arange(0, BLOCK_M)[:, None, None]
    ns = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)[None, :, None]
    ks = tl.arange(0, BLOCK_K)[None, None, :]
    m_ok = ms < M
    n_ok = ns < N
    x_rows = x_ptr + ms * stride_xm
    w_rows = w_ptr + ns * stride_wn
    if PDL:  # let the next kernel's programs start and fetch their weights
        tl.extra.cuda.gdc_launch_dependents()
    # The weights never depend on the kernel before: the first tile, the norm's and the bias load while it runs.
    w = _weight_tile(w_rows, ks, n_ok, K, EVEN_N, EVEN_K)
    nw = _norm_weights(nw_ptr, ks, K, PROLOGUE)
    ms2 = tl.arange(0, BLOCK_M)[:, None]
    ns2 = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)[None, :]
    ok = (ms2 < M) & (ns2 < N)
    if HAS_BIAS:
        bias = tl.load(b_ptr + ns2, mask=ns2 < N, other=0.0).to(tl.float32)
    if PDL:  # everything below reads or writes what earlier kernels produce or still read
        tl.extra.cuda.gdc_wait()
    if HAS_RESIDUAL:  # asked for before the sum (ptxas issues it ahead of the reduction, not after it)
        residual = tl.load(res_ptr + ms2 * stride_rm + ns2, mask=ok, other=0.0).to(tl.float32)
    rstd = tl.zeros([BLOCK_M, 1, 1], tl.float32)
    if PROLOGUE == -1:  # RMS statistics of each input row (from L2: every program reads the same rows)
        squares = tl.zeros([BLOCK_M, 1, 1], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            xf = tl.load(x_rows + k0 + ks, mask=m_ok & (k0 + ks < K), other=0.0).to(tl.float32)
            squares += tl.sum(xf * xf, 2, keep_dims=True)
        rstd = 1.0 / tl.sqrt(squares / K + eps)
    acc = _input_tile(x_rows, nw, ks, m_ok, rstd, K, PROLOGUE) * w
    for k0 in range(BLOCK_K, K, BLOCK_K):
        k = k0 + ks
        acc += _input_tile(x_rows, _norm_weights(nw_ptr, k, K, PROLOGUE), k, m_ok, rstd, K, PROLOGUE) * _weight_tile(
            w_rows, k, n_ok, K, EVEN_N, EVEN_K)
    out = tl.sum(acc, 2)  # [BLOCK_M, BLOCK_N]
    if HAS_BIAS:
        out += bias
    if HAS_RESIDUAL:
        out += residual
    tl.store(out_ptr + ms2 * stride_om + ns2, out.to(out_ptr.dtype.element_ty), mask=ok)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
         norm_weight: torch.Tensor | None = None, eps: float = 0.0, activation: str | None = None,
         residual: torch.Tensor | None = None, out_dtype: torch.dtype | None = None, block_n: int | None = None,
         block_k: int | None = None, num_warps: int = 4) -> torch.Tensor:
    """`gemv_reference` for `x: [M, K]` (`[M, 2K]` with `activation`, gate then up), `weight: [N, K]`,
    `M <= MAX_ROWS` (`supports`) -> `[M, N]` in `out_dtype` (default x's type: fp32 keeps the fp32 sums unrounded,
    the logits without a cast kernel). `norm_weight` and `activation` exclude each other.
    `block_n`, `block_k`, `num_warps`: launch settings (the benchmark sweeps them; None: `_BLOCK_N`, `_block_k`)."""
    rows = x.shape[0]
    n, k = weight.shape
    if not supports(x, weight) or x.shape[1] != (2 * k if activation else k):
        raise ValueError(f"gemv needs 1-{MAX_ROWS} contiguous rows of width {k} (x2 gated) and a contiguous "
                         f"weight of the same type, got {tuple(x.shape)} {x.dtype} and {tuple(weight.shape)} "
                         f"{weight.dtype}")
    if norm_weight is not None and activation is not None:
        raise ValueError("gemv fuses a norm or an activation into its input, not both")
    if residual is not None and (residual.shape != (rows, n) or residual.stride(1) != 1):
        raise ValueError(f"gemv's residual must be [{rows}, {n}] with unit inner stride")
    block_n = block_n or _BLOCK_N
    block_k = block_k or _block_k(rows, k, block_n)
    pdl = pdl_enabled(x.device)
    prologue = _NORM if norm_weight is not None else ACTIVATIONS[activation] if activation else _NONE
    block_m, even_n = triton.next_power_of_2(rows), n % block_n == 0
    out = torch.empty((rows, n), dtype=out_dtype or x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, bias if bias is not None else weight, norm_weight if norm_weight is not None else weight,
        residual if residual is not None else out, out, rows, n, x.stride(0), weight.stride(0),
        residual.stride(0) if residual is not None else 0, out.stride(0), eps, K=k,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PROLOGUE=prologue,
        HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, EVEN_N=even_n,
        EVEN_K=k % block_k == 0, PDL=pdl, num_warps=num_warps,
        maxnreg=max_registers(prologue, block_m, block_n, block_k, num_warps, even_n=even_n,
                              has_residual=residual is not None, element_size=x.element_size()),
        launch_pdl=pdl)
    return out
