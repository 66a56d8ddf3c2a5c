"""A linear layer whose weight stays quantized on the CPU: int8 codes + per-group fp32 scales (`Int8Weight`).

Why: dense fp32 weights make CPU decode read 4 bytes a weight (Gemma 3 270M's output projection alone is 671 MB a
token) and make batched decode run fp32 GEMMs of awkward shapes. The int8 form reads ~1.1 bytes a weight, and the
kernels (`nbllm.kernels.cpu_int8_gemm`) multiply by exactly the dequantized weights (the repack is lossless).

Activations: a GGUF weight's layer rounds its input to int8 as llama.cpp's CPU backend does for that weight type
(`activation_block`: Q8_0 blocks of 32, or Q8_K blocks of 256 for K-quants) and multiplies in integers -- ~3x less
compute, so decode runs at memory speed, with llama.cpp's own rounding error. Without an `activation_block` the
input is used exactly (only the fp32 summation order then differs from `Linear`).

Integer products beat MKL's fp32 GEMM at every batch size (prefill included: 200-270 vs 58-71 GMAC/s at 512 rows
on these cores, and no weight to dequantize). With exact activations, prefill-sized inputs (`DENSE_MIN_ROWS` rows or
more) have enough rows per weight for MKL to win: those dequantize the weight a slice at a time (a few MB,
cache-sized) and call it, so no dense copy is kept.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from nbllm.gguf.repack import Int8Weight
from nbllm.kernels.cpu_int8_gemm import Int8Gemm, int8_dequantize, q8_supported

#: Input rows from which dequantize-and-GEMM beats the int8 kernel (quiet box, default model's shapes): MKL alone
#: wins from ~32 rows (`benchmarks/cpu_vs_llamacpp.py --gemm`), but the dense path also dequantizes the weight on
#: every call (~0.3 ms for a 2048×640 layer), which moves the break-even to ~64. The output projection (262144
#: rows, dequantized slice by slice) stays faster on the kernel up to at least 64.
DENSE_MIN_ROWS = 64
DENSE_MIN_ROWS_SLICED = 128
# Weights dequantized at a time on the dense path (fp32 bytes: 4x this).
_SLICE_WEIGHTS = 1 << 21


class Int8Linear(nn.Module):
    """`y = x W^T + b` with `W` held as an `Int8Weight`; fp32 in, fp32 out, CPU only.

    `round_input` as in `Linear` (llama.cpp-compatible activation rounding, in torch); `activation_block` (32 or
    256) rounds the input to int8 in the kernel instead (see the module docstring; None where the shapes do not
    allow it). `rows(ids)` returns the dequantized weight rows: a token table (tied embeddings) looks its rows up
    there instead of keeping a dense copy.
    """

    def __init__(
        self,
        weight: Int8Weight,
        bias: torch.Tensor | None = None,
        *,
        round_input: Callable[[torch.Tensor], torch.Tensor] | None = None,
        activation_block: int | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("q", weight.q)
        self.register_buffer("scale", weight.scale)
        self.register_buffer("offset", weight.offset)
        self.register_buffer("bias", bias)
        self.round_input = round_input
        ok = activation_block is not None and round_input is None and q8_supported(weight.q, weight.scale,
                                                                                   activation_block)
        self.activation_block = activation_block if ok else None
        self._gemm: Int8Gemm | None = None  # the kernel bound to these buffers, built on first use

    def _apply(self, fn, *args, **kwargs):  # noqa: ANN001, ANN202 - nn.Module's signature
        self._gemm = None  # buffers moved or converted: bind the kernel again
        return super()._apply(fn, *args, **kwargs)

    @property
    def out_features(self) -> int:
        return self.q.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        """What it computes in and returns (a token table's dtype, like a dense table's)."""
        return torch.float32

    @property
    def device(self) -> torch.device:
        return self.q.device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.round_input is not None:
            x = self.round_input(x)
        rows = x.numel() // x.shape[-1]
        if self.activation_block is None and rows >= (
                DENSE_MIN_ROWS if self.q.numel() <= _SLICE_WEIGHTS else DENSE_MIN_ROWS_SLICED):
            y = self._dense_forward(x)
        else:
            y = self.kernel()(x)
        return y if self.bias is None else y + self.bias

    def kernel(self) -> Int8Gemm:
        """The int8 kernel bound to this layer's buffers (built on first use)."""
        if self._gemm is None:
            self._gemm = Int8Gemm(self.q, self._kernel_scale(), self.offset, self.activation_block)
        return self._gemm

    def _kernel_scale(self) -> torch.Tensor:
        """The scales the kernel reads: fp16 where the integer kernel runs and they are exact in it (Q8_0/Q5_0/Q4_0
        store fp16 ones; decode reads every scale each token, the output projection's 10 MB less in fp16). Made
        when the kernel is bound, so layers that `concat` joins never pay for it."""
        if self.activation_block is None or self.offset is not None:
            return self.scale
        half = self.scale.to(torch.float16)
        return half if torch.equal(half.to(torch.float32), self.scale) else self.scale

    def _dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        n, k = self.q.shape
        step = max(1, _SLICE_WEIGHTS // k)
        if step >= n:
            return F.linear(x, int8_dequantize(self.q, self.scale, self.offset))
        y = x.new_empty((*x.shape[:-1], n), dtype=torch.float32)
        for a in range(0, n, step):
            b = min(n, a + step)
            off = None if self.offset is None else self.offset[a:b]
            y[..., a:b] = F.linear(x, int8_dequantize(self.q[a:b], self.scale[a:b], off))
        return y

    @classmethod
    def concat(cls, parts: tuple[Int8Linear, ...], bias: torch.Tensor | None) -> Int8Linear | None:
        """One layer whose output is the parts' outputs side by side, with the parts' joined `bias` (q/k/v,
        gate/up: one kernel call instead of several), or None when the parts do not share a group size and input
        rounding.

        Rows are summed in the same order either way (the kernel is row-wise), so outputs are bit-identical.
        """
        first = parts[0]
        groups = {p.q.shape[1] // p.scale.shape[1] for p in parts}
        if len(groups) != 1 or any(p.round_input is not first.round_input or p.activation_block !=
                                   first.activation_block for p in parts):
            return None
        if any(p.offset is not None for p in parts):
            offset = torch.cat([torch.zeros_like(p.scale) if p.offset is None else p.offset for p in parts])
        else:
            offset = None
        weight = Int8Weight(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]), offset)
        return cls(weight, bias, round_input=first.round_input, activation_block=first.activation_block)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantized weight rows `[*ids.shape, K]` (bit-equal to the GGUF dequantizer's)."""
        flat = ids.reshape(-1)
        off = None if self.offset is None else self.offset.index_select(0, flat)
        w = int8_dequantize(self.q.index_select(0, flat), self.scale.index_select(0, flat), off)
        return w.view(*ids.shape, -1)
