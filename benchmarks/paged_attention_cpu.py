"""Paged vs dense attention on CPU at Gemma 3 270M's attention shape (Hq=4, Hkv=1, D=256, blocks of 16).

Each row times one layer's attention over a shuffled block pool: `plan` (the index work, once per step),
`run` (per layer, reusing the plan, as the engine's 18 layers do) and `paged_attention` (both), against
`scaled_dot_product_attention` over the same keys already laid out contiguously (the best a dense cache could
do). `run/dense` is the cost of paging: gathering blocks into cache-sized batches. "global" rows attend the
whole context, "local" rows use Gemma's 512-token sliding window.

    python benchmarks/paged_attention_cpu.py [--dtype bfloat16] [--reps 5] [--threads 1] [--wall]

Times are CPU time of the calling thread (best of reps), 1 thread by default: on a shared 2-core machine wall
time measures the neighbours (2 threads time OpenMP barriers stalled behind other processes: a 0.07 ms call
reads as 13-24 ms). Pass --threads 2 --wall on a quiet machine.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from nbllm.kernels.paged_attention import (
    paged_attention,
    plan_paged_attention,
    run_paged_attention,
)

HQ, HKV, D, BLOCK, WINDOW = 4, 1, 256, 16, 512
SCALE = D**-0.5


def best_ms(fn: Callable[[], object], reps: int, clock: Callable[[], float]) -> float:
    """Fastest of `reps` timed calls after one warm-up: the machine is shared, so the minimum is the signal."""
    fn()
    times = []
    for _ in range(reps):
        start = clock()
        fn()
        times.append(clock() - start)
    return min(times) * 1e3


def make_case(num_queries: list[int], context_lens: list[int], dtype: torch.dtype, window: int | None):
    """Random q/k/v for a batch, in a shuffled paged pool and contiguously: callables (plan, run, paged, dense)."""
    blocks_per_seq = [-(-c // BLOCK) for c in context_lens]
    max_blocks = max(blocks_per_seq)
    num_blocks = sum(blocks_per_seq)
    physical = torch.randperm(num_blocks)
    k_cache = torch.randn(num_blocks, BLOCK, HKV, D, dtype=dtype)
    v_cache = torch.randn(num_blocks, BLOCK, HKV, D, dtype=dtype)
    block_tables = torch.zeros(len(context_lens), max_blocks, dtype=torch.int32)
    used = 0
    for i, nb in enumerate(blocks_per_seq):
        block_tables[i, :nb] = physical[used : used + nb].int()
        used += nb
    q = torch.randn(sum(num_queries), HQ, D, dtype=dtype)
    cu = torch.tensor([0, *torch.tensor(num_queries).cumsum(0).tolist()], dtype=torch.int32)
    ctx = torch.tensor(context_lens, dtype=torch.int32)

    index = {"block_tables": block_tables, "cu_query_lens": cu, "context_lens": ctx, "sliding_window": window}
    plan = plan_paged_attention(k_cache, **index)

    # Dense: each sequence's keys in reach, contiguous, as [B, Hkv, L, D] (all sequences here share shapes).
    n, length = num_queries[0], context_lens[0]
    first = 0 if window is None else max(0, length - n - window + 1)
    rows = block_tables[:, :max_blocks].long()
    k_dense = k_cache[rows].flatten(1, 2)[:, first:length].transpose(1, 2).contiguous()
    v_dense = v_cache[rows].flatten(1, 2)[:, first:length].transpose(1, 2).contiguous()
    q_dense = q.view(len(context_lens), n, HQ, D).transpose(1, 2)
    qpos = torch.arange(length - n, length)[:, None]
    kpos = torch.arange(first, length)[None]
    mask = kpos <= qpos
    if window is not None:
        mask &= kpos > qpos - window
    causal_aligned = first == length - n and (window is None or window >= n)

    def dense() -> torch.Tensor:
        if n == 1:  # the query group as rows of its kv head: the fastest decode form (as `run` does)
            return F.scaled_dot_product_attention(q_dense.view(-1, HKV, HQ // HKV, D), k_dense, v_dense, scale=SCALE)
        return F.scaled_dot_product_attention(q_dense, k_dense, v_dense, attn_mask=None if causal_aligned else mask,
                                              is_causal=causal_aligned, scale=SCALE, enable_gqa=True)

    return (
        lambda: plan_paged_attention(k_cache, **index),
        lambda: run_paged_attention(q, k_cache, v_cache, plan, scale=SCALE),
        lambda: paged_attention(q, k_cache, v_cache, scale=SCALE, **index),
        dense,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--wall", action="store_true", help="time wall clock instead of thread CPU time")
    args = parser.parse_args()
    clock = time.perf_counter if args.wall else time.thread_time
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    what = "wall" if args.wall else "thread CPU"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}; {what} ms, best of {args.reps}")
    print(f"{'case':<30}{'layer':>7}{'plan':>9}{'run':>9}{'paged':>9}{'dense':>9}{'run/dense':>11}")
    cases = [(f"decode B={b} ctx={c}", [1] * b, [c] * b) for b in (1, 8, 32, 64) for c in (256, 1024, 2048)]
    cases += [("prefill 512", [512], [512]), ("extend 512 after 1k cached", [512], [1536])]
    for name, num_queries, context_lens in cases:
        for layer, window in (("global", None), ("local", WINDOW)):
            fns = make_case(num_queries, context_lens, dtype, window)
            plan, run, paged, dense = (best_ms(f, args.reps, clock) for f in fns)
            print(f"{name:<30}{layer:>7}{plan:>9.2f}{run:>9.2f}{paged:>9.2f}{dense:>9.2f}{run / dense:>11.2f}")


if __name__ == "__main__":
    main()
