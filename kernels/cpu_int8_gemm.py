"""CPU matmul against int8 weight codes with per-group fp32 scales and offsets (`cpu_int8_gemm.cpp`).

The kernel lives in the CPU kernels' library (`cpu_library`); where it cannot run, callers keep dense weights.

Layout (`int8_linear`, `int8_dequantize`): codes `q: int8 [N, K]`, scales `s: float32 [N, K / G]`, offsets `o` (same
shape, or None), `W[n, k] = s[n, k // G] * q[n, k] - o[n, k // G]` with `G` a multiple of 8 dividing `K`.
"""

from __future__ import annotations

import ctypes
import torch

from nbllm.kernels.cpu_library import I, P, function, num_threads, ptr, unavailable_reason
from nbllm.kernels.cpu_memory import weight_bytes

__all__ = ["Int8Gemm", "int8_dequantize", "int8_linear", "q8_supported", "unavailable_reason"]


def _int8_gemm() -> ctypes._CFuncPtr:
    return function("nbllm_int8_gemm", P, I, I, P, P, P, I, I, I, P, I, ctypes.c_int)


def _check(q: torch.Tensor, s: torch.Tensor, o: torch.Tensor | None, half_scales: bool = False) -> int:
    n, k = q.shape
    group = k // s.shape[1]
    scale_types = (torch.float32, torch.float16) if half_scales else (torch.float32,)
    ok = (q.dtype == torch.int8 and s.dtype in scale_types and q.is_contiguous() and s.is_contiguous()
          and group % 8 == 0 and group * s.shape[1] == k and s.shape[0] == n
          and (o is None or (o.shape == s.shape and o.dtype == torch.float32 and o.is_contiguous())))
    if not ok:
        raise ValueError(f"bad int8 weight layout: q {tuple(q.shape)} {q.dtype}, s {tuple(s.shape)} {s.dtype}, "
                         f"o {None if o is None else (tuple(o.shape), o.dtype)}")
    return group


def int8_linear(
    x: torch.Tensor,
    q: torch.Tensor,
    s: torch.Tensor,
    o: torch.Tensor | None,
    *,
    activation_block: int | None = None,
) -> torch.Tensor:
    """`x[..., K] · W^T -> [..., N]` in fp32 (x is converted to contiguous fp32 first).

    `activation_block` 32 or 256 rounds x to int8 first as llama.cpp does for the weight's type (Q8_0 or Q8_K
    blocks; `cpu_q8_gemm.cpp`): integer dot products, ~3x less compute, llama.cpp's rounding error; the scales
    may then be float16 (half the bytes, where they are exact in it). None computes with x exactly. See
    `q8_supported`.
    """
    if x.shape[-1] != q.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features, the weight {q.shape[1]}")
    return Int8Gemm(q, s, o, activation_block)(x)


class Int8Gemm:
    """`int8_linear` for one weight, its layout checked once: a call costs ~6 us of Python instead of ~20 (a
    small model's decode step makes ~70 of them). The tensors must stay where they are while it is used."""

    def __init__(self, q: torch.Tensor, s: torch.Tensor, o: torch.Tensor | None, activation_block: int | None) -> None:
        group = _check(q, s, o, half_scales=activation_block is not None)
        if activation_block is not None and not q8_supported(q, s, activation_block):
            raise ValueError(f"int8 activations in blocks of {activation_block} need K divisible by it and groups "
                             f"of 16 or 32, got K={q.shape[1]}, group {group}")
        self.n, self.k = q.shape
        if activation_block is None:
            self._tensors = (q, s, o)  # kept alive: the kernel reads them through raw pointers
            kernel, weight = _int8_gemm(), (q.data_ptr(), s.data_ptr(), ptr(o), self.n, self.k, group)
            self._run = lambda x, rows, y: kernel(x, rows, self.k, *weight, y, self.n, num_threads())
            self.panels = None
        else:
            half = int(s.dtype == torch.float16)
            width, bias = _code_width(q)
            packed = _pack_panels(q, s, o, group, half, width, bias)
            self._tensors = (packed,)
            kernel = function("nbllm_q8_gemm", P, I, I, P, I, I, I, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int, P, I, ctypes.c_int, I)
            weight = (packed.data_ptr(), self.n, self.k, group, half, int(o is not None), width, bias)
            self._run = lambda x, rows, y: kernel(x, rows, self.k, *weight, y, self.n, num_threads(),
                                                  activation_block)
            #: The packed weight as kernels that chain this one take it (`cpu_decoder.py`'s NbllmQ8Linear).
            self.panels: tuple[int, ...] | None = (*weight, activation_block)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.k)
        if x2.dtype != torch.float32 or not x2.is_contiguous():
            x2 = x2.to(torch.float32).contiguous()
        y = torch.empty((x2.shape[0], self.n), dtype=torch.float32)
        if x2.shape[0]:
            self._run(x2.data_ptr(), x2.shape[0], y.data_ptr())
        return y.view(*x.shape[:-1], self.n)


def _code_width(q: torch.Tensor) -> tuple[int, int]:
    """The fewest bits that hold every code as `q + bias` (4: Q4_K's 0..15 or Q4_0's -8..7; 5: Q5_0's -16..15;
    else 8), and that bias: the panels store the file's own widths, so decode reads as few bytes as llama.cpp."""
    lo, hi = (int(v) for v in torch.aminmax(q)) if q.numel() else (0, 0)
    for width in (4, 5):
        if hi - lo < 1 << width:
            return width, -lo
    return 8, 128


def _pack_panels(q: torch.Tensor, s: torch.Tensor, o: torch.Tensor | None, group: int, half: int, width: int,
                 bias: int) -> torch.Tensor:
    """The weight in the int8-activation kernel's own layout (panels of 16 rows; `cpu_q8_gemm.cpp` says why)."""
    n, k = q.shape
    size = function("nbllm_q8_packed_bytes", I, I, I, ctypes.c_int, ctypes.c_int, ctypes.c_int, restype=I)
    packed = weight_bytes(size(n, k, group, half, int(o is not None), width))
    function("nbllm_q8_pack", P, P, P, I, I, I, ctypes.c_int, ctypes.c_int, ctypes.c_int, P, ctypes.c_int)(
        q.data_ptr(), s.data_ptr(), ptr(o), n, k, group, half, width, bias, packed.data_ptr(), num_threads())
    return packed


def q8_supported(q: torch.Tensor, s: torch.Tensor, activation_block: int) -> bool:
    """Whether `int8_linear` can round x in blocks of `activation_block` (32 or 256) for this weight."""
    return (activation_block in (32, 256) and q.shape[1] % activation_block == 0
            and q.shape[1] // s.shape[1] in (16, 32))


def int8_dequantize(q: torch.Tensor, s: torch.Tensor, o: torch.Tensor | None) -> torch.Tensor:
    """The dense fp32 weight `[N, K]`: `fmsub(q, s, o)` per element, one rounding."""
    group = _check(q, s, o)
    out = torch.empty(q.shape, dtype=torch.float32)
    if q.numel():
        kernel = function("nbllm_int8_dequantize", P, P, P, I, I, I, P, ctypes.c_int)
        kernel(q.data_ptr(), s.data_ptr(), ptr(o), q.shape[0], q.shape[1], group, out.data_ptr(), num_threads())
    return out

