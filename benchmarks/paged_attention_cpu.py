"""Paged vs dense attention on CPU at Gemma 3 270M's attention shape (Hq=4, Hkv=1, D=256, blocks of 16).

Each row times one layer's attention call: `paged_attention` over a shuffled block pool, against
`scaled_dot_product_attention` over the same keys already laid out contiguously (the best a dense cache could
do), so the cost of paging (gathering slots, masks, splitting the batch) is the ratio column. "global" rows
attend the whole context, "local" rows use Gemma's 512-token sliding window.

    python benchmarks/paged_attention_cpu.py [--dtype bfloat16] [--reps 5] [--threads 1]

On a shared 2-core machine, 2 threads time OpenMP barriers stalled behind other processes (a 0.07 ms call
reads as 13-24 ms), so the default is 1 thread, whose best-of-N is stable; pass --threads 2 on a quiet machine.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from nbllm.kernels.paged_attention import paged_attention

HQ, HKV, D, BLOCK, WINDOW = 4, 1, 256, 16, 512
SCALE = D**-0.5


def best_ms(fn: Callable[[], object], reps: int) -> float:
    """Fastest of `reps` timed calls after one warm-up: the machine is shared, so the minimum is the signal."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def make_case(num_queries: list[int], context_lens: list[int], dtype: torch.dtype, window: int | None):
    """Random q/k/v for a batch, stored both in a shuffled paged pool and contiguously; returns both callables."""
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

    def paged() -> torch.Tensor:
        return paged_attention(q, k_cache, v_cache, block_tables=block_tables, cu_query_lens=cu,
                               context_lens=ctx, scale=SCALE, sliding_window=window)

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
        if n == 1:
            return F.scaled_dot_product_attention(q_dense, k_dense, v_dense, scale=SCALE, enable_gqa=True)
        return F.scaled_dot_product_attention(q_dense, k_dense, v_dense, attn_mask=None if causal_aligned else mask,
                                              is_causal=causal_aligned, scale=SCALE, enable_gqa=True)

    return paged, dense


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}; ms per call, best of {args.reps}")
    print(f"{'case':<34}{'layer':>7}{'paged':>10}{'dense':>10}{'ratio':>8}")
    cases = [(f"decode B={b} ctx={c}", [1] * b, [c] * b) for b in (1, 8, 32, 64) for c in (256, 1024, 2048)]
    cases += [("prefill 512", [512], [512]), ("extend 512 after 1024 cached", [512], [1536])]
    for name, num_queries, context_lens in cases:
        for layer, window in (("global", None), ("local", WINDOW)):
            paged, dense = make_case(num_queries, context_lens, dtype, window)
            tp, td = best_ms(paged, args.reps), best_ms(dense, args.reps)
            print(f"{name:<34}{layer:>7}{tp:>10.2f}{td:>10.2f}{tp / td:>8.2f}")


if __name__ == "__main__":
    main()
