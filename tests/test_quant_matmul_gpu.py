"""The quantized GEMV/GEMM Triton kernels (Q4_K, Q5_0, Q6_K, Q8_0) against the GGUF dequantizer times x in fp32.

Tolerances are bounds, computed per output from the inputs, not fudge factors:

* GEMV rounds each group of `INPUT_GROUP[kind]` inputs to int8 codes of step `dx = max|x| / 127` (at most `dx / 2`
  off) and its integer dot products are exact, so `|y - ref| <= sum_k |s_g q_k| dx_k / 2` where `s_g q_k` is the
  weight's code term (`nbllm.gguf.repack` splits each weight into it and the offset, which the kernel multiplies
  exactly), plus fp32 summation slack (1e-5 of `|x| @ |W|^T`).
* GEMM multiplies W rounded to x's dtype: bf16 is off by at most 2^-9 relative per weight (`2^-9 |x| @ |W|^T`),
  fp32 multiplies exactly (slack as above); a bf16 output adds its own rounding (2^-8 |ref|).

Runs on CUDA; without it the same kernels run through Triton's CPU interpreter (tests/conftest.py; the dp4a
instruction emulated) on tiny shapes.
"""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not torch.cuda.is_available() and not INTERPRET:
    pytest.skip("needs CUDA (or TRITON_INTERPRET=1 for the CPU interpreter)", allow_module_level=True)

from nbllm.errors import UnsupportedQuantError  # noqa: E402
from nbllm.gguf.quants import dequantize  # noqa: E402
from nbllm.gguf.repack import repack  # noqa: E402
from nbllm.kernels.quant_matmul import (  # noqa: E402
    BLOCK_BYTES, GEMV_MAX_ROWS, INPUT_GROUP, pack, quant_gemm, quant_gemv, random_blocks)
from nbllm.models.gpu_quant_linear import KERNEL_KINDS, GGUFLinear, gguf_linear_reference  # noqa: E402

pytestmark = pytest.mark.gpu
DEVICE = torch.device("cpu" if INTERPRET else "cuda")
KINDS = list(BLOCK_BYTES)
QTYPE = {kind: qtype for qtype, kind in KERNEL_KINDS.items()}
# Weight rows (not a multiple of any row tile) and input features: K-quants 2-5 super-blocks, legacy types a block
# count that is no multiple of the 256-weight step. The interpreter gets the smallest.
N = 37 if INTERPRET else 300
K = {"q4_k": 512 if INTERPRET else 1280, "q6_k": 512 if INTERPRET else 1280,
     "q5_0": 96 if INTERPRET else 800, "q8_0": 96 if INTERPRET else 800}
GEMV_ROWS = [1, 3] if INTERPRET else [1, 2, 5, 8]
GEMM_ROWS = [5] if INTERPRET else [1, 17, 64, 300]
DTYPES = [torch.float32] if INTERPRET else [torch.float32, torch.bfloat16]


def weight(kind: str, n: int, k: int, seed: int) -> torch.Tensor:
    return random_blocks(kind, n, k, generator=torch.Generator().manual_seed(seed))


def inputs(m: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)) * 2
    x[:, :32] = 0  # an all-zero input group
    return x.to(dtype)


def magnitude(x: torch.Tensor, raw: torch.Tensor, kind: str, k: int) -> torch.Tensor:
    """`|x| @ |W|^T`: the scale of each output's rounding errors."""
    return x.float().abs() @ dequantize(raw.reshape(-1), QTYPE[kind], (raw.shape[0], k)).abs().T + 1e-6


def gemv_bound(x: torch.Tensor, raw: torch.Tensor, kind: str, k: int) -> torch.Tensor:
    """`sum_k |s_g q_k| dx_k / 2` + summation slack, per output (module docstring)."""
    packed = repack(raw.reshape(-1), QTYPE[kind], (raw.shape[0], k))
    assert packed is not None, "the random blocks should split into codes and scales exactly"
    groups = packed.scale.shape[1]
    code_terms = (packed.q.view(raw.shape[0], groups, -1).float() * packed.scale[:, :, None]).abs().view(-1, k)
    xf = x.float()
    group = INPUT_GROUP[kind]
    dx = xf.view(xf.shape[0], -1, group).abs().amax(-1) / 127
    return dx.repeat_interleave(group, dim=1) / 2 @ code_terms.T + 1e-5 * magnitude(x, raw, kind, k)


def check(got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor) -> None:
    err = (got.float().cpu() - want).abs()
    assert torch.isfinite(got).all()
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"error {worst:.3g}x the bound"


# "narrow": many chunks a row (the next chunk's words loaded ahead) and, on the GPU, two rows a program.
NARROW = {"BLOCK_N": 16 if INTERPRET else 2, "CHUNK": 128 if INTERPRET else 64, "num_warps": 4}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", [None, NARROW], ids=["default", "narrow"])
def test_gemv_within_int8_input_rounding_bound(kind, dtype, config) -> None:
    k = K[kind]
    raw = weight(kind, N, k, seed=len(kind))
    w = pack(raw.to(DEVICE), kind, k)
    for m in GEMV_ROWS:
        x = inputs(m, k, dtype, seed=m)
        got = quant_gemv(x.to(DEVICE), w, config=config)
        assert got.shape == (m, N) and got.dtype == dtype
        want = gguf_linear_reference(x, raw, QTYPE[kind], (N, k))
        bound = gemv_bound(x, raw, kind, k)
        if dtype == torch.bfloat16:
            bound = bound + 2**-8 * want.abs()
        check(got, want, bound)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gemm_within_weight_rounding_bound(kind, dtype) -> None:
    k = K[kind]
    raw = weight(kind, N, k, seed=7 + len(kind))
    w = pack(raw.to(DEVICE), kind, k)
    for m in GEMM_ROWS:
        x = inputs(m, k, dtype, seed=100 + m)
        got = quant_gemm(x.to(DEVICE), w)
        want = gguf_linear_reference(x, raw, QTYPE[kind], (N, k))
        if dtype == torch.float32:
            bound = 1e-5 * magnitude(x, raw, kind, k)
        else:
            bound = 2**-9 * magnitude(x, raw, kind, k) + 2**-8 * want.abs()
        check(got, want, bound)


def test_pack_keeps_the_gguf_bytes() -> None:
    for kind in KINDS:
        raw = weight(kind, 5, K[kind], seed=1)
        w = pack(raw, kind, K[kind])
        assert w.nbytes == raw.numel() and (w.n, w.k) == (5, K[kind])
        with pytest.raises(ValueError):
            pack(raw[:, 1:], kind, K[kind])


def test_gguf_linear_applies_row_fixup_and_bias_on_both_paths() -> None:
    kind, k, n = "q4_k", K["q4_k"], 24
    raw = weight(kind, n, k, seed=3)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    bias = torch.randn(n)
    layer = GGUFLinear.from_gguf(raw.reshape(-1), QTYPE[kind], (n, k), bias=bias, device=DEVICE,
                                 row_fixup=lambda rows: rows[perm])
    assert layer.out_features == n and layer.device.type == DEVICE.type
    for m in (1, GEMV_MAX_ROWS + 1):  # one input row takes the GEMV path, more than GEMV_MAX_ROWS the GEMM
        x = inputs(m, k, torch.float32, seed=m)
        want = gguf_linear_reference(x, raw, QTYPE[kind], (n, k))[:, perm] + bias
        bound = gemv_bound(x, raw, kind, k) if m == 1 else 1e-5 * magnitude(x, raw, kind, k)
        bound = bound[:, perm]
        check(layer(x.to(DEVICE)), want, bound + 1e-6 * bias.abs())


def test_gguf_linear_rejects_other_types() -> None:
    from gguf import GGMLQuantizationType

    with pytest.raises(UnsupportedQuantError, match="dense"):
        GGUFLinear.from_gguf(torch.zeros(16 * 18, dtype=torch.uint8), GGMLQuantizationType.Q4_0, (16, 32))
