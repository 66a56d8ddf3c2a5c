"""The engine on the default model, CPU, beside llama.cpp in the same run (issue: engine benchmarks).

  (a) prefix caching: 64 requests sharing a 1,000-token system prompt, each with its own ~20-token question and
      32 output tokens: nbllm with prefix caching on vs off, and llama.cpp answering them one by one (it keeps
      the previous prompt's KV and reuses the common prefix, its own form of prefix caching).
  (b) throughput: 32 requests x 128 output tokens (EOS ignored): nbllm's aggregate output tok/s against
      llama.cpp's batch-1 decode tok/s.
  (c) sharing: n = 8 parallel sampling and beam width 4: KV blocks used at the peak vs the unshared count.

    python benchmarks/engine_cpu.py [--only a,b,c] [--threads 2] [--no-peer]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

from nbllm import LLM, SamplingParams  # noqa: E402

WORDS = ("system policy answer question model engine cache token block request stream user assistant data "
         "paper method result table figure value error time memory batch prompt output").split()


def text_of(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def token_prompt(llm: LLM, n_tokens: int, seed: int) -> list[int]:
    ids = llm.tokenizer.encode(text_of(n_tokens * 2, seed))
    return ids[:n_tokens]


def peak_blocks(llm: LLM, fn):
    """Run `fn()` while recording the KV blocks in use after every step."""
    engine = llm.engine
    original = engine.runner.execute
    peak = 0

    def spy(batch):
        nonlocal peak
        result = original(batch)
        peak = max(peak, engine.blocks.num_used_blocks - (engine.radix.cached_blocks() if engine.radix else 0))
        return result

    engine.runner.execute = spy
    try:
        out = fn()
    finally:
        engine.runner.execute = original
    return out, peak


def bench_prefix(args, peer: bool) -> list[tuple[str, float, str]]:
    rows = []
    probe = LLM(device="cpu")
    system = token_prompt(probe, 1000, seed=1)
    questions = [probe.tokenizer.encode(f" Question {i}: " + text_of(12, 100 + i), add_special_tokens=False)[:20]
                 for i in range(64)]
    prompts = [system + q for q in questions]
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    del probe
    for caching in (True, False):
        llm = LLM(device="cpu", enable_prefix_caching=caching)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params)
        dt = time.perf_counter() - t0
        hits = sum(o.metrics.cached_prompt_tokens for o in outs)
        rows.append((f"(a) nbllm, prefix caching {'on' if caching else 'off'}", dt, f"{hits} cached prompt tokens"))
        del llm
    if peer:
        from peers import run_in_llamacpp
        from nbllm.defaults import default_model_path

        res = run_in_llamacpp(_LLAMACPP_ONE_BY_ONE, dict(model=str(default_model_path()), prompts=prompts,
                                                         max_tokens=32, threads=args.threads))
        rows.append(("(a) llama.cpp, one by one (reuses the common prefix)", res["seconds"], ""))
    on, off = rows[0][1], rows[1][1]
    rows.append(("(a) speed-up of caching on vs off", off / on, "x (target >= 3)"))
    return rows


def bench_throughput(args, peer: bool) -> list[tuple[str, float, str]]:
    llm = LLM(device="cpu")
    prompts = [token_prompt(llm, 32, seed=200 + i) for i in range(32)]
    params = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0.0))  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    dt = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    rows = [("(b) nbllm, 32 x 128 tokens, aggregate output tok/s", tokens / dt, f"{dt:.1f} s")]
    if peer:
        from peers import llamacpp_timings
        from nbllm.defaults import default_model_path

        timing = llamacpp_timings(default_model_path(), n_threads=args.threads, load_repeats=1, prompt_repeats=1,
                                  decode_tokens=128, decode_repeats=3)
        rows.append(("(b) llama.cpp batch-1 decode tok/s", timing["decode_tok_s"], ""))
        rows.append(("(b) nbllm aggregate / llama.cpp batch-1", rows[0][1] / timing["decode_tok_s"], "x (target >= 3)"))
    return rows


def bench_sharing(args) -> list[tuple[str, float, str]]:
    llm = LLM(device="cpu", enable_prefix_caching=False)
    prompt = token_prompt(llm, 200, seed=300)
    bs = llm.engine.block_size
    max_tokens = 64

    def unshared(seqs: int) -> int:
        return seqs * -(-(len(prompt) + max_tokens) // bs)

    _, peak = peak_blocks(llm, lambda: llm.generate([prompt], SamplingParams(n=8, max_tokens=max_tokens, temperature=1.0, seed=0)))
    rows = [("(c) n=8 sampling: peak KV blocks", peak, f"unshared would need {unshared(8)}")]
    if hasattr(llm, "beam_search"):
        _, peak = peak_blocks(llm, lambda: llm.beam_search([prompt], beam_width=4, max_tokens=max_tokens))
        rows.append(("(c) beam width 4: peak KV blocks", peak, f"unshared would need {unshared(8)} (2W candidates)"))
    return rows


_LLAMACPP_ONE_BY_ONE = r"""
import time
import numpy as np
import llama_cpp
from llama_cpp import Llama
p = PAYLOAD
llm = Llama(model_path=p["model"], n_threads=p["threads"], n_threads_batch=p["threads"], n_ctx=2048, verbose=False)
def logits():
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
t0 = time.perf_counter()
prev = []
for prompt in p["prompts"]:
    # keep the KV of the longest common prefix with what was evaluated before, as llama-cpp-python's generate does
    common = 0
    while common < min(len(prev), len(prompt)) - 1 and prev[common] == prompt[common]:
        common += 1
    llm.n_tokens = common  # eval() drops the KV cells from n_tokens on before evaluating
    llm.eval(prompt[common:])
    seq = list(prompt)
    for _ in range(p["max_tokens"]):
        tok = int(np.argmax(logits()))
        seq.append(tok)
        llm.eval([tok])
    prev = seq
emit({"seconds": time.perf_counter() - t0})
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="a,b,c")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-peer", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    parts = set(args.only.split(","))
    rows: list[tuple[str, float, str]] = []
    if "a" in parts:
        rows += bench_prefix(args, not args.no_peer)
    if "b" in parts:
        rows += bench_throughput(args, not args.no_peer)
    if "c" in parts:
        rows += bench_sharing(args)
    print(f"\nload average {os.getloadavg()[0]:.1f}, torch threads {torch.get_num_threads()}")
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:10.2f}  {note}")


if __name__ == "__main__":
    main()
