"""Each row's argmax and log-sum-exp in one Triton launch: the sampler's pass over the logits on a GPU.

A greedy token is its row's argmax, and its raw log-probability is `max - logsumexp`. torch takes ~8 kernels for
that (argmax, then amax / sub / exp / sum / log / add for the log-sum-exp), each a pass over the `[B, V]` logits
and, at batch 1, each costing more to launch than to run. Here the vocabulary is cut into chunks of `_CHUNK`
logits; the program of a (row, chunk) finds the chunk's maximum, its first position and the sum of
`exp(x - max)`, and the row's last program to finish (`arrival`) merges the chunks in order: one launch, one read
of the logits, the same answer every run. Contract of the CPU's `cpu_sampling.row_argmax_logsumexp` (the first
maximum wins), plus the maximum's log-probability, which is what a greedy row reports.

The host needs the ids every step. A copy to the host after the launch is one more operation on the stream, and
at batch 1 the device idles through it before the next step's graph can start; so the merge can also write a
row's id and log-probability straight into pinned host memory (`host`: mapped into the device's address space
under unified addressing), into the half that its `halves[row]` names: the caller alternates halves between
launches so that the host still reads one launch's results while the next is queued. As the last kernel of a
decode graph, the merge also writes the graph's next inputs (`advance`: `nbllm.kernels.next_inputs`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .arrival import counters, last_arrival
from .next_inputs import advance as advance_inputs
from .pdl import enabled as pdl_enabled

__all__ = ["argmax_logsumexp", "argmax_logsumexp_reference"]

_CHUNK = 4096


def argmax_logsumexp_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(argmax, logsumexp, x[argmax] - logsumexp)` of each row of `x`, in fp32."""
    x = x.float()
    best, lse = x.argmax(dim=-1), torch.logsumexp(x, dim=-1)
    return best, lse, x.gather(1, best[:, None]).squeeze(1) - lse


@triton.jit
def _kernel(x_ptr, stride_x, V, part_max_ptr, part_sum_ptr, part_arg_ptr, counter_ptr, ids_ptr, lse_ptr, lp_ptr,
            host_ids_ptr, host_lp_ptr, halves_ptr, stride_host, inputs_ptr, stride_in, tables_ptr, stride_t, max_blocks,
            CHUNK: tl.constexpr, CHUNKS: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr, HOST: tl.constexpr,
            ADVANCE: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()  # the logits come from the kernel before
    cols = chunk * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(x_ptr + row.to(tl.int64) * stride_x + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
    top = tl.max(x, 0)
    first = tl.argmax(x, 0, tie_break_left=True) + chunk * CHUNK
    shift = tl.where(top == float("-inf"), 0.0, top)  # a chunk of -inf only: weight 0, not NaN
    total = tl.sum(tl.exp(x - shift), 0)
    part = row * CHUNKS + chunk
    tl.store(part_max_ptr + part, top)
    tl.store(part_sum_ptr + part, total)
    tl.store(part_arg_ptr + part, first)
    if last_arrival(counter_ptr + row, CHUNKS):
        cs = tl.arange(0, BLOCK_C)
        ok = cs < CHUNKS
        tops = tl.load(part_max_ptr + row * CHUNKS + cs, mask=ok, other=float("-inf"), cache_modifier=".cg")
        sums = tl.load(part_sum_ptr + row * CHUNKS + cs, mask=ok, other=0.0, cache_modifier=".cg")
        args = tl.load(part_arg_ptr + row * CHUNKS + cs, mask=ok, other=2**30, cache_modifier=".cg")
        m = tl.max(tops, 0)
        best = tl.min(tl.where(tops == m, args, 2**30), 0)
        shift = tl.where(m == float("-inf"), 0.0, m)
        lse = shift + tl.log(tl.sum(sums * tl.exp(tops - shift), 0))
        tl.store(ids_ptr + row, best.to(tl.int64))
        tl.store(lse_ptr + row, lse)
        tl.store(lp_ptr + row, m - lse)
        if HOST:
            half = tl.load(halves_ptr + row) * stride_host
            tl.store(host_ids_ptr + half + row, best.to(tl.int64))
            tl.store(host_lp_ptr + half + row, m - lse)
        if ADVANCE:  # after the host half is chosen: it flips the halves
            advance_inputs(inputs_ptr, stride_in, tables_ptr, stride_t, max_blocks, row, BLOCK_SIZE)


def argmax_logsumexp(x: torch.Tensor, *, out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                     host: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                     advance: tuple[torch.Tensor, torch.Tensor, int] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`argmax_logsumexp_reference` of `x: [B, V]` (unit column stride, any float type) as
    `(ids int64 [B], lse fp32 [B], logprob of the argmax fp32 [B])`, written into `out` when given.
    Launches only (no host synchronisation), so a CUDA graph can capture it. `host = (ids, logprobs, halves)`:
    row b's id and log-probability are also written to `ids[halves[b], b]` and `logprobs[halves[b], b]`
    (`[2, >= B]` int64 and fp32 in pinned host memory, `halves` int64 0 or 1 on the device; module docstring).
    `advance = (inputs, block_tables, block_size)`: then each row's decode inputs (`inputs[:, b]`, whose last row
    should be `halves`) become the next step's (`nbllm.kernels.next_inputs`)."""
    rows, vocab = x.shape
    if x.stride(1) != 1:
        raise ValueError("argmax_logsumexp needs the logits' columns contiguous")
    host_ids, host_lp, halves = host if host is not None else (x, x, x)  # unused pointers
    if host is not None and (host_ids.shape[1] < rows or host_ids.stride() != host_lp.stride()
                             or host_ids.stride(1) != 1):
        raise ValueError("argmax_logsumexp's host buffers need [2, >= rows] rows with the same contiguous layout")
    inputs, tables, block_size = advance if advance is not None else (x, x, 1)  # unused pointers
    if advance is not None and (inputs.shape[0] != 5 or inputs.shape[1] < rows or inputs.stride(1) != 1
                                or tables.shape[0] < rows or tables.stride(1) != 1):
        raise ValueError("argmax_logsumexp's advance needs inputs [5, >= rows] and block tables [>= rows, blocks], "
                         "their columns contiguous")
    ids, lse, logprob = out if out is not None else (
        torch.empty(rows, dtype=torch.int64, device=x.device),
        torch.empty(rows, dtype=torch.float32, device=x.device),
        torch.empty(rows, dtype=torch.float32, device=x.device))
    chunks = triton.cdiv(vocab, _CHUNK)
    if rows:
        part_max = torch.empty((rows, chunks), dtype=torch.float32, device=x.device)
        part_sum = torch.empty_like(part_max)
        part_arg = torch.empty((rows, chunks), dtype=torch.int32, device=x.device)
        pdl = pdl_enabled(x.device)
        _kernel[(rows, chunks)](x, x.stride(0), vocab, part_max, part_sum, part_arg, counters(x.device, rows),
                                ids, lse, logprob, host_ids, host_lp, halves, host_ids.stride(0), inputs,
                                inputs.stride(0), tables, tables.stride(0), tables.shape[-1], CHUNK=_CHUNK,
                                CHUNKS=chunks, BLOCK_C=triton.next_power_of_2(chunks), PDL=pdl, HOST=host is not None,
                                ADVANCE=advance is not None, BLOCK_SIZE=block_size, num_warps=4, launch_pdl=pdl)
    return ids, lse, logprob
