"""Programmatic dependent launch (PDL): the kernels of a decode step start while the kernel before them drains.

A batch-1 decode step of a small model is a chain of ~200 kernels of 2-6 us each, and a kernel normally starts
only once the one before it has finished and its own launch has gone through: per kernel, a microsecond or two
of nothing. On Hopper and later a kernel launched with PDL may start as soon as every program of its predecessor
has called `gdc_launch_dependents()`. Each of our decode kernels therefore calls that first, does the work that
depends on no earlier kernel, and calls `gdc_wait()` before it reads or writes anything earlier kernels produce
or still read; the wait returns once the predecessor has finished and its writes are visible. Since every kernel
waits before it finishes, a kernel that has passed its wait has seen every earlier kernel of the stream finish,
so the ordering stays transitive across the chain. Before its wait, though, a kernel may run beside any earlier
kernel of the chain that has started, not only its predecessor, so what it reads there must have been written
before the chain began: weights and tables (the norms', the rotary cos/sin), the step's inputs the host copied
in (positions, lengths, block tables, slots), and K/V that earlier steps stored; never what this step's
kernels write. The chain begins with the token lookup (`embedding`): an ordinary launch, which waits for
everything before it, that lets the kernel after it start early.
`NBLLM_PDL=0` turns it off (to measure what it is worth).
"""

from __future__ import annotations

import functools
import os

import torch

__all__ = ["enabled"]


@functools.cache
def enabled(device: torch.device) -> bool:
    """Whether kernels on `device` launch programmatic-dependent: a CUDA device of compute capability >= 9."""
    if device.type != "cuda" or os.environ.get("NBLLM_PDL", "1") == "0":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9
