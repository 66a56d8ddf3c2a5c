"""The decode GEMV and what it fuses against their torch references (issue 7 point 4).

`nbllm.kernels.gemv` alone (plain, with a bias, with the RMS norm or the gated activation folded into its input,
with the residual folded into its output), then the model blocks' `project`, whose decode-sized CUDA calls take
the fused kernel and larger ones cuBLAS (`addmm`), both against the unfused composition of the same modules;
and the q/k norm + rotary kernel that also stores K/V into the paged pools, against rotary then `store_kv`.
They run on CUDA; without it, on the CPU through Triton's interpreter (tests/conftest.py), with smaller shapes.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not torch.cuda.is_available() and not INTERPRET:
    pytest.skip("needs CUDA (or TRITON_INTERPRET=1 for the CPU interpreter)", allow_module_level=True)

from nbllm.kernels.gemv import MAX_ROWS, gemv, gemv_reference  # noqa: E402
from nbllm.kernels.paged_attention import store_kv as store_kv_reference  # noqa: E402
from nbllm.kernels.rmsnorm import rms_norm_reference  # noqa: E402
from nbllm.kernels.rotary import rotary_qk  # noqa: E402
from nbllm.models.layers import Linear, RMSNorm, project  # noqa: E402

pytestmark = pytest.mark.gpu
DEVICE = torch.device("cpu" if INTERPRET else "cuda")
DTYPES = [torch.float32] if INTERPRET else [torch.float32, torch.bfloat16]
# (N, K): ragged ones (no whole tiles) and, on a GPU, Qwen3-0.6B decode shapes (q/k/v, down).
SHAPES = [(40, 96), (24, 200)] if INTERPRET else [(40, 96), (300, 1000), (4096, 1024), (1024, 3072)]


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}


def randn(*shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, MAX_ROWS])
@pytest.mark.parametrize("shape", SHAPES)
def test_gemv_matches_linear(dtype, rows, shape) -> None:
    """A bias on the 3-row calls (Qwen2's q/k/v), none on the others."""
    torch.manual_seed(0)
    n, k = shape
    x, w = randn(rows, k, dtype=dtype), randn(n, k, dtype=dtype, scale=k ** -0.5)
    b = randn(n, dtype=dtype) if rows == 3 else None
    torch.testing.assert_close(gemv(x, w, b), gemv_reference(x, w, b), **tolerance(dtype))


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("norm", [False, True])
def test_gemv_writes_fp32_sums_unrounded_where_asked(rows, norm) -> None:
    """The logits' path: bf16 in (the final norm folded in, its output rounded as the norm's would be), fp32 out,
    the sums as the fp32 reference has them (not rounded to bf16 first)."""
    torch.manual_seed(6)
    n, k = SHAPES[-1]
    # Triton's interpreter rounds to bf16 by truncation, not to nearest as a GPU and torch do: there the normed
    # input stays fp32.
    dtype = torch.float32 if norm and INTERPRET else torch.bfloat16
    x, w = randn(rows, k, dtype=dtype, scale=3.0), randn(n, k, dtype=dtype, scale=k ** -0.5)
    norm_w = randn(k, dtype=dtype) if norm else None
    got = gemv(x, w, norm_weight=norm_w, eps=1e-6, out_dtype=torch.float32)
    assert got.dtype == torch.float32
    want = gemv_reference((rms_norm_reference(x, norm_w, 1e-6) if norm else x).float(), w.float())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.equal(got, got.bfloat16().float())  # not a bf16 result widened


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("shape", SHAPES[1:3])
def test_gemv_with_norm_prologue_and_residual_matches_reference(dtype, rows, shape) -> None:
    torch.manual_seed(1)
    n, k = shape
    x, w = randn(rows, k, dtype=dtype, scale=3.0), randn(n, k, dtype=dtype, scale=k ** -0.5)
    norm_w, residual = randn(k, dtype=dtype), randn(rows, n, dtype=dtype)
    got = gemv(x, w, norm_weight=norm_w, eps=1e-6, residual=residual)
    want = gemv_reference(x, w, norm_weight=norm_w, eps=1e-6, residual=residual)
    torch.testing.assert_close(got, want, **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("residual", [False, True])
def test_gemv_with_gated_prologue_matches_reference(dtype, activation, residual) -> None:
    torch.manual_seed(2)
    n, k = SHAPES[-1]
    x, w = randn(2, 2 * k, dtype=dtype), randn(n, k, dtype=dtype, scale=k ** -0.5)
    res = randn(2, n, dtype=dtype) if residual else None
    torch.testing.assert_close(gemv(x, w, activation=activation, residual=res),
                               gemv_reference(x, w, activation=activation, residual=res), **tolerance(dtype))


@pytest.mark.parametrize("block_n, block_k, num_warps", [(4, 32, 4), (16, 64, 2), (32, 16, 8)])
def test_gemv_launch_settings_do_not_change_the_answer(block_n, block_k, num_warps) -> None:
    """The benchmark's sweep settings, including tiles that do not divide N or K."""
    torch.manual_seed(3)
    n, k = SHAPES[1]
    x, w = randn(3, k, dtype=torch.float32), randn(n, k, dtype=torch.float32, scale=k ** -0.5)
    got = gemv(x, w, block_n=block_n, block_k=block_k, num_warps=num_warps)
    torch.testing.assert_close(got, gemv_reference(x, w), **tolerance(torch.float32))


def test_gemv_rejects_what_it_does_not_serve() -> None:
    w = randn(8, 16, dtype=torch.float32)
    with pytest.raises(ValueError, match="rows"):
        gemv(randn(MAX_ROWS + 1, 16, dtype=torch.float32), w)
    with pytest.raises(ValueError, match="not both"):
        gemv(randn(1, 32, dtype=torch.float32), w, norm_weight=randn(16, dtype=torch.float32), activation="silu")


@pytest.mark.skipif(INTERPRET, reason="project's GEMV path needs x on CUDA")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 8, 24])  # the GEMV, and cuBLAS's addmm beyond MAX_ROWS
def test_project_matches_the_unfused_blocks(dtype, rows) -> None:
    """`project` through the fused kernel (decode sizes) or addmm equals norm, gated activation, linear and the
    residual add run one by one."""
    torch.manual_seed(4)
    hidden, inter = 1024, 3072
    norm = RMSNorm(randn(hidden, dtype=dtype), 1e-6)
    gate_up = Linear(randn(2 * inter, hidden, dtype=dtype, scale=hidden ** -0.5))
    down = Linear(randn(hidden, inter, dtype=dtype, scale=inter ** -0.5))
    h = randn(rows, hidden, dtype=dtype)
    fused = project(down, project(gate_up, h, norm=norm), activation="silu", residual=h)
    unfused = gemv_reference(gemv_reference(h, gate_up.weight, norm_weight=norm.weight, eps=1e-6), down.weight,
                             activation="silu", residual=h)
    torch.testing.assert_close(fused, unfused, **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", [False, True])
def test_rotary_qk_with_store_writes_the_pools_as_store_kv(dtype, norm) -> None:
    """q/k/v as column slices of one projection output; padding tokens (slot -1) write nothing; the pools start
    NaN, so a stray write shows."""
    torch.manual_seed(5)
    d, hq, hkv, tokens, max_pos, blocks, block_size = 32 if INTERPRET else 128, 4, 2, 9, 64, 5, 4
    freqs = torch.arange(max_pos).float()[:, None] * (1.0 / (1e4 ** (torch.arange(0, d, 2).float() / d)))[None]
    cos, sin = freqs.cos().to(DEVICE), freqs.sin().to(DEVICE)
    qkv = randn(tokens, (hq + 2 * hkv) * d, dtype=dtype)
    q, k, v = (part.view(tokens, -1, d) for part in qkv.split((hq * d, hkv * d, hkv * d), dim=-1))
    weights = {"q_weight": randn(d, dtype=dtype), "k_weight": randn(d, dtype=dtype), "eps": 1e-6} if norm else {}
    positions = torch.randint(0, max_pos, (tokens,), device=DEVICE)
    slots = torch.randperm(blocks * block_size, device=DEVICE)[:tokens]
    slots[::4] = -1
    want_q, want_k = rotary_qk(q, k, positions, cos, sin, **weights)
    def nan_pools(device: torch.device) -> list[torch.Tensor]:
        return [torch.full((blocks, block_size, hkv, d), float("nan"), dtype=dtype, device=device) for _ in "kv"]

    want_pools, got_pools = nan_pools(torch.device("cpu")), nan_pools(DEVICE)
    store_kv_reference(*want_pools, want_k.cpu(), v.cpu(), slots.cpu())
    got_q, got_k = rotary_qk(q, k, positions, cos, sin, **weights, store=(v, *got_pools, slots))
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
    for got, want in zip(got_pools, want_pools, strict=True):
        assert torch.equal(got.cpu().nan_to_num(7.0), want.nan_to_num(7.0))
