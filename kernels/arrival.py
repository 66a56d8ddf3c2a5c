"""Last-arrival merging: the program that finishes last combines the partial results of the others.

A decode kernel that splits one output over several programs (flash-decoding's key splits, a vocabulary cut into
chunks) must combine their partials. A second kernel does that in one more launch, and at batch 1 a launch costs
as much as the work it does. Instead each program stores its partial and counts itself in on an atomic counter
(release: its stores are visible before the count; acquire: the program that completes the count sees every
partial); that last program merges and resets the counter for the next launch. The merge reads the partials in a
fixed order, so the result is the same whichever program came last.

The counters are one zeroed int32 buffer per device, kept for the life of the process because CUDA graphs replay
kernels that point into it. It grows only outside graph capture (a capture's warm-up run has already asked for
what the captured launch needs); a grown buffer never frees the old one, which captured graphs may still use.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["counters", "last_arrival"]

_MIN_COUNTERS = 4096
_buffers: dict[torch.device, list[torch.Tensor]] = {}


def counters(device: torch.device, n: int) -> torch.Tensor:
    """At least `n` zeroed counters on `device`, for kernels that call `last_arrival` on them."""
    device = torch.device(device.type, torch.cuda.current_device() if device.type == "cuda" and device.index is None
                          else device.index)
    kept = _buffers.setdefault(device, [])
    if not kept or kept[-1].numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"{n} arrival counters are needed inside a CUDA graph capture: run the launch once "
                               "before capturing it")
        kept.append(torch.zeros(max(n, _MIN_COUNTERS, 2 * (kept[-1].numel() if kept else 0)), dtype=torch.int32,
                                device=device))
    return kept[-1]


@triton.jit
def last_arrival(counter_ptr, arrivals: tl.constexpr):
    """Count this program in; True in the program that completes the count of `arrivals` (then reset to 0).
    Call it after storing this program's partial result; the merge that follows must read partials with
    `cache_modifier=".cg"` (from L2: another program's writes may be stale in this SM's L1)."""
    tl.debug_barrier()  # every thread's stores come before the count
    count = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    last = count == arrivals - 1
    if last:
        tl.atomic_xchg(counter_ptr, 0, sem="relaxed", scope="gpu")
    return last
