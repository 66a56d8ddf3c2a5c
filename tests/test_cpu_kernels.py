"""The small CPU C++ kernels (`nbllm.kernels.cpu_rmsnorm`, `cpu_rotary`) against the torch paths of the layers
they replace, and the layers choosing them."""

from __future__ import annotations

import pytest
import torch

from nbllm.kernels import cpu_rmsnorm, cpu_rotary
from nbllm.kernels.cpu_library import unavailable_reason
from nbllm.models.layers import RMSNorm, RotaryEmbedding, rope_inv_freq

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=f"CPU kernels: {unavailable_reason()}")


def _torch_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


@pytest.mark.parametrize("shape", [(1, 640), (3, 4, 256), (513, 64)])
def test_rms_norm_matches_torch(shape) -> None:
    gen = torch.Generator().manual_seed(len(shape))
    x, w = torch.randn(shape, generator=gen) * 3, torch.rand(shape[-1], generator=gen)
    out, total = cpu_rmsnorm.rms_norm(x, w, 1e-6)
    assert total is None
    torch.testing.assert_close(out, _torch_norm(x, w, 1e-6), atol=1e-6, rtol=1e-5)
    residual = torch.randn(shape, generator=gen)
    out, total = cpu_rmsnorm.rms_norm(x, w, 1e-6, residual)
    assert torch.equal(total, x + residual)
    torch.testing.assert_close(out, _torch_norm(x + residual, w, 1e-6), atol=1e-6, rtol=1e-5)


def test_rms_norm_reads_strided_rows() -> None:
    """q/k heads arrive as views into a fused projection's output."""
    fused = torch.randn(5, 1536)
    q = fused[:, :1024].view(5, 4, 256)
    w = torch.rand(256)
    torch.testing.assert_close(cpu_rmsnorm.rms_norm(q, w, 1e-6)[0], _torch_norm(q, w, 1e-6), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("with_norm", [False, True])
def test_norm_rotary_matches_the_layers(with_norm: bool) -> None:
    rotary = RotaryEmbedding(rope_inv_freq(128, 1e6), 4096)
    norm = RMSNorm(torch.rand(128) + 0.5, 1e-6)
    fused = torch.randn(4, 3 * 8 * 128)
    x = fused[:, 1024 : 2048].view(4, 8, 128)  # a strided view, as split from a q/k/v projection
    positions = torch.tensor([0, 1, 2047, 4095])
    want = rotary(norm(x) if with_norm else x, positions)
    weight = (norm.weight, norm.eps) if with_norm else ()
    torch.testing.assert_close(cpu_rotary.norm_rotary(x, positions, rotary.cos, rotary.sin, *weight), want,
                               atol=2e-6, rtol=1e-5)


def test_layers_use_the_kernels_only_where_they_apply() -> None:
    assert cpu_rmsnorm.supports(torch.randn(2, 64), torch.rand(64))
    assert not cpu_rmsnorm.supports(torch.randn(2, 60), torch.rand(60))  # not a multiple of 8: torch path
    assert not cpu_rmsnorm.supports(torch.randn(2, 64, dtype=torch.bfloat16), torch.rand(64))
    norm = RMSNorm(torch.rand(60), 1e-6)
    x = torch.randn(3, 60)
    torch.testing.assert_close(norm(x), _torch_norm(x, norm.weight, 1e-6))


def test_row_argmax_logsumexp_matches_torch() -> None:
    """The sampler's per-row argmax (first maximum) and logsumexp, against torch (logsumexp in double)."""
    from nbllm.kernels.cpu_sampling import row_argmax_logsumexp

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 262_147, generator=gen) * 5  # a vocabulary that is not a multiple of 8
    x[1, 1000] = float("-inf")
    x[2] = float("-inf")  # a constrained row with one allowed token
    x[2, 7] = 2.0
    x[3, 10] = x[3, 20] = 100.0  # a tie: the first wins
    x[4, -1] = 200.0  # the maximum in the scalar tail
    best, lse = row_argmax_logsumexp(x)
    assert torch.equal(best, x.argmax(-1))
    torch.testing.assert_close(lse, torch.logsumexp(x.double(), -1).float(), atol=0, rtol=2e-7)
    view = x[:, 5:1005]  # rows with a stride
    best, lse = row_argmax_logsumexp(view)
    assert torch.equal(best, view.argmax(-1))
    torch.testing.assert_close(lse, torch.logsumexp(view.double(), -1).float(), atol=0, rtol=2e-7)


@pytest.mark.parametrize("activation", ["gelu_tanh", "silu"])
def test_gated_activation_matches_torch(activation: str) -> None:
    import torch.nn.functional as F

    from nbllm.kernels.cpu_activation import gated_activation

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(7, 2 * 2048, generator=gen) * 4
    x[0, :8] = torch.tensor([-100.0, -50.0, -10.0, 0.0, 10.0, 50.0, 100.0, 1e-3])  # saturated and tiny inputs
    gate, up = x.chunk(2, dim=-1)
    act = F.gelu(gate, approximate="tanh") if activation == "gelu_tanh" else F.silu(gate)
    torch.testing.assert_close(gated_activation(x, activation), act * up, atol=1e-5, rtol=1e-6)
