"""nbllm's CPU engine beside llama.cpp on the default model, same run, same thread count (issue: quantized CPU).

Both sides are measured the way a Python user sees them:
  load     `LLM()` (weights, tokenizer, KV pool) vs `Llama()`; median of warm constructions in one process.
  prompt   a ~512-token English prompt on an empty cache (nbllm: prefix caching off, one output token).
  decode   batch-1 greedy after a short prompt, 128 tokens (nbllm: the time of 129 tokens minus that of 1, so
           the prompt is not counted, as llama.cpp's timing does not count it).

    python benchmarks/cpu_vs_llamacpp.py [--threads 2] [--repeats 3] [--no-peer]

Run it on a quiet machine (load average < 1.5): two busy cores slow both engines far more than their share.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

from nbllm import LLM, SamplingParams  # noqa: E402
from nbllm.defaults import default_model_path  # noqa: E402

PROMPT_TOKENS = 512
DECODE_TOKENS = 128
# the same prose llama.cpp's side tokenizes (benchmarks/peers.py), cut to PROMPT_TOKENS
TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
        "combined movable metal type, oil-based inks and a wooden press adapted from wine making. "
        "Books became cheaper, literacy spread, and ideas travelled faster than ever before. ") * 40


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def nbllm_timings(repeats: int) -> dict:
    loads = [_timed(lambda: LLM(device="cpu", enable_prefix_caching=False)) for _ in range(repeats)]
    llm = LLM(device="cpu", enable_prefix_caching=False)
    ids = llm.tokenizer.encode(TEXT)[:PROMPT_TOKENS]
    one = SamplingParams(max_tokens=1, temperature=0.0)
    llm.generate([ids], one)  # warm-up
    prompt = [_timed(lambda: llm.generate([ids], one)) for _ in range(repeats)]

    short = llm.tokenizer.encode("Once upon a time")
    first = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    full = SamplingParams(max_tokens=DECODE_TOKENS + 1, temperature=0.0, ignore_eos=True)
    llm.generate([short], full)  # warm-up
    decode = []
    for _ in range(repeats):
        decode.append(_timed(lambda: llm.generate([short], full)) - _timed(lambda: llm.generate([short], first)))
    return {
        "load_s_median": statistics.median(loads),
        "prompt_tokens": len(ids),
        "prompt_tok_s": len(ids) / statistics.median(prompt),
        "decode_tok_s": DECODE_TOKENS / statistics.median(decode),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-peer", action="store_true", help="skip llama.cpp")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
    ours = nbllm_timings(args.repeats)
    peer = None
    if not args.no_peer:
        from peers import llamacpp_timings

        peer = llamacpp_timings(default_model_path(), n_threads=args.threads, prompt_tokens=PROMPT_TOKENS,
                                prompt_repeats=args.repeats, decode_tokens=DECODE_TOKENS,
                                decode_repeats=args.repeats, load_repeats=args.repeats)
    print(f"load average after: {os.getloadavg()[0]:.2f}\n")
    rows = [
        ("batch-1 decode tok/s", "decode_tok_s", True),
        (f"prompt processing tok/s ({ours['prompt_tokens']} tokens)", "prompt_tok_s", True),
        ("load s (warm, median)", "load_s_median", False),
    ]
    print(f"| default model, CPU, {args.threads} threads | nbllm | llama.cpp | nbllm / llama.cpp | target |")
    print("|---|---|---|---|---|")
    for label, key, higher in rows:
        mine = ours[key]
        theirs = peer[key] if peer else float("nan")
        ratio = mine / theirs if peer else float("nan")
        target = "≥ 1.0× ✓" if higher and ratio >= 1 else "≥ 1.0× ✗" if higher else ("≤ 1.0× ✓" if ratio <= 1 else "≤ 1.0× ✗")
        print(f"| {label} | {mine:.2f} | {theirs:.2f} | {ratio:.2f}× | {target} |")


if __name__ == "__main__":
    main()
