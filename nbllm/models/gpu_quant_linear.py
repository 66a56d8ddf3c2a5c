"""A linear layer for a CUDA model layer whose GGUF weight is Q4_K, Q5_0, Q6_K or Q8_0: the packed bits stay on
the GPU and the Triton kernels (`nbllm.kernels.quant_matmul`) read them, GEMV for decode-sized inputs, GEMM for
prefill.

Why: a GPU layer holding dequantized bf16 weights reads 3.5x (Q4_K) the bytes of the GGUF file at every decode step
and needs that much more memory; offloaded layers (`n_gpu_layers`) are the ones where both matter.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from gguf import GGMLQuantizationType
from torch import nn

from nbllm.errors import UnsupportedQuantError
from nbllm.gguf.quants import dequantize
from nbllm.kernels.quant_matmul import PackedWeight, pack, quant_matmul

Q = GGMLQuantizationType

#: The GGUF types the kernels read directly, and their kernel names.
KERNEL_KINDS: dict[GGMLQuantizationType, str] = {Q.Q4_K: "q4_k", Q.Q5_0: "q5_0", Q.Q6_K: "q6_k", Q.Q8_0: "q8_0"}

__all__ = ["GGUFLinear", "KERNEL_KINDS", "gguf_linear_reference"]


class GGUFLinear(nn.Module):
    """`y = x W^T + b` with `W` `[out, in]` in its GGUF bits on a CUDA device; output in x's dtype.

    Build it with `from_gguf`. Inputs of up to `GEMV_MAX_ROWS` rows round x to int8 per 16 values (llama.cpp's
    CUDA numerics, see the kernels' docstring); larger ones multiply W rounded to x's dtype.
    """

    def __init__(self, weight: PackedWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.kind, self.in_features = weight.kind, weight.k
        for i, plane in enumerate(weight.planes):
            self.register_buffer(f"plane{i}", plane)
        self.register_buffer("bias", bias)
        self._num_planes = len(weight.planes)

    @classmethod
    def from_gguf(
        cls,
        raw: torch.Tensor,
        qtype: GGMLQuantizationType | int,
        shape: tuple[int, int],
        *,
        bias: torch.Tensor | None = None,
        device: torch.device | str = "cuda",
        row_fixup: Callable[[torch.Tensor], torch.Tensor] | None = None,
        tensor_name: str = "?",
    ) -> GGUFLinear:
        """From one GGUF tensor: its bytes `raw` (uint8, e.g. `GGUFFile.tensor_bytes_torch(name)`), its type and
        its torch-order shape `[out, in]`. `row_fixup` permutes rows (applied to the `[out, row_bytes]` uint8 view,
        e.g. `weights.unpermute_qk_rows`' fixup: a row is whole blocks). The bytes are copied to `device` once."""
        kind = KERNEL_KINDS.get(Q(int(qtype)))
        if kind is None:
            raise UnsupportedQuantError(
                f"tensor {tensor_name!r} is {Q(int(qtype)).name}; the GPU kernels read only "
                f"{', '.join(t.name for t in KERNEL_KINDS)}: keep this layer dense (dequantized) instead")
        rows = raw.reshape(shape[0], -1)
        if row_fixup is not None:
            rows = row_fixup(rows)
        weight = pack(rows.to(device).contiguous(), kind, shape[1])
        return cls(weight, None if bias is None else bias.to(device))

    @property
    def weight(self) -> PackedWeight:
        return PackedWeight(self.kind, self.plane0.shape[0], self.in_features,
                            tuple(getattr(self, f"plane{i}") for i in range(self._num_planes)))

    @property
    def out_features(self) -> int:
        return self.plane0.shape[0]

    @property
    def device(self) -> torch.device:
        return self.plane0.device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = quant_matmul(x, self.weight)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def gguf_linear_reference(x: torch.Tensor, raw: torch.Tensor, qtype: GGMLQuantizationType | int,
                          shape: tuple[int, int]) -> torch.Tensor:
    """The torch reference: the GGUF dequantizer's fp32 weight times x in fp32, on the CPU."""
    w = dequantize(raw.reshape(-1).cpu(), qtype, shape)
    return x.detach().cpu().float() @ w.T
