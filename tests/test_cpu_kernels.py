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
