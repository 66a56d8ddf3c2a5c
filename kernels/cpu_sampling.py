"""Argmax and logsumexp of each row of fp32 CPU logits in C++ (`cpu_sampling.cpp`), for the sampler.

Why: greedy decoding needs each row's argmax and the sampled token's log-probability (`x[t] - logsumexp(x)`); at
a 262,144-token vocabulary torch's log_softmax + argmax took ~25 ms of a 32-sequence CPU decode step (~12%), this
~2 ms. torch.argmax / torch.logsumexp are the reference.
"""

from __future__ import annotations

import ctypes

import torch

from nbllm.kernels.cpu_library import I, P, function, num_threads, unavailable_reason

__all__ = ["row_argmax_logsumexp", "supports"]


def supports(x: torch.Tensor) -> bool:
    """Whether `row_argmax_logsumexp` takes `x`: 2-d fp32 on the CPU with unit column stride."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2 and x.stride(1) == 1
            and unavailable_reason() is None)


def row_argmax_logsumexp(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(x.argmax(-1), x.logsumexp(-1))` of a 2-d fp32 CPU tensor (see `supports`); the first maximum wins."""
    rows, cols = x.shape
    best = torch.empty(rows, dtype=torch.int64)
    lse = torch.empty(rows, dtype=torch.float32)
    if rows:
        kernel = function("nbllm_row_argmax_logsumexp", P, I, I, I, P, P, ctypes.c_int)
        kernel(x.data_ptr(), rows, cols, x.stride(0), best.data_ptr(), lse.data_ptr(), num_threads())
    return best, lse
