"""nbllm's CPU engine beside llama.cpp on the default model, same run, same thread count (issue: quantized CPU).

Both sides are measured the way a Python user sees them:
  load     `LLM()` (weights, tokenizer, KV pool) vs `Llama()`; median of warm constructions in one process.
  prompt   a ~512-token English prompt on an empty cache (nbllm: prefix caching off, one output token).
  decode   batch-1 greedy after a short prompt, 128 tokens (nbllm: the time of 129 tokens minus that of 1, so
           the prompt is not counted, as llama.cpp's timing does not count it).

    python benchmarks/cpu_vs_llamacpp.py [--threads 2] [--repeats 3] [--no-peer] [--gemm]

`--gemm` adds the matmuls alone on the default model's weight shapes: the int8 kernel against torch's fp32
`F.linear` over the dequantized weight, by batch rows M (decode 1, batched decode 8-64, prefill 512).

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


def gemm_table(repeats: int) -> None:
    import torch.nn.functional as F

    from nbllm.gguf import open_gguf
    from nbllm.gguf.repack import repack
    from nbllm.kernels.cpu_int8_gemm import int8_linear

    file = open_gguf(default_model_path())
    print("| weight (type, N×K) | M | int8 kernel ms | fp32 F.linear ms | fp32 / int8 |")
    print("|---|---|---|---|---|")
    for name in ("token_embd.weight", "blk.0.ffn_up.weight", "blk.0.attn_output.weight", "blk.0.ffn_down.weight"):
        info = file.tensors[name]
        packed = repack(file.tensor_bytes_torch(name), info.qtype, info.shape)
        dense = packed.dequantize()
        for m in (1, 8, 32, 64, 512):
            if name.startswith("token_embd") and m > 64:
                continue  # the output projection only sees each sequence's last row
            x = torch.randn(m, info.shape[1])
            times = []
            for fn in (lambda: int8_linear(x, packed.q, packed.scale, packed.offset), lambda: F.linear(x, dense)):
                fn()
                times.append(min(_timed(fn) for _ in range(repeats)) * 1e3)
            shape = f"{info.qtype.name}, {info.shape[0]}×{info.shape[1]}"
            print(f"| {name} ({shape}) | {m} | {times[0]:.2f} | {times[1]:.2f} | {times[1] / times[0]:.2f}× |")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-peer", action="store_true", help="skip llama.cpp")
    parser.add_argument("--gemm", action="store_true", help="also time the matmuls alone, int8 vs fp32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
    if args.gemm:
        gemm_table(args.repeats)
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
