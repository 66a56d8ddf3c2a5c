"""`nbllm.lang` forks on the default model, CPU: a fork of k generations against the same k run one after the
other, and against the engine's own batch of the same k prompts (`llm.generate([...])`), all in one run.

The claim (issue: DSL): a fork of two generations takes about the time of the longer one, not the sum. Targets:
fork / serial <= 0.65 for k = 2 (0.5 is perfect overlap; a batch row costs a little on CPU), and
fork / engine batch <= 1.10 (the DSL's threads and driver add little to the engine's own batching).
Every variant produces the same texts (greedy), which the script checks.

    python benchmarks/lang_fork_cpu.py [--tokens 32] [--branches 2,4] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import nbllm.lang as sgl
from nbllm import LLM, SamplingParams

CONTEXT = "Notes for a short talk about owls, written by a park ranger.\n"


def make_programs(k: int, tokens: int):
    @sgl.function
    def forked(s):
        s += CONTEXT
        forks = s.fork(k)
        for i, f in enumerate(forks):
            f += f"Point {i + 1}:" + sgl.gen("point", max_tokens=tokens, ignore_eos=True)
        forks.join()

    @sgl.function
    def single(s, i):
        s += CONTEXT + f"Point {i + 1}:" + sgl.gen("point", max_tokens=tokens, ignore_eos=True)

    return forked, single


def interleaved_best(repeats: int, llm: LLM, variants: dict):
    """Each variant once per round, rounds repeated: on a shared machine, load that drifts hits every variant
    alike. Per variant: (best seconds, engine steps of one run, the result of the best run)."""
    runs: dict[str, list] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            steps = llm.stats()["steps"]
            start = time.perf_counter()
            result = fn()
            runs[name].append((time.perf_counter() - start, llm.stats()["steps"] - steps, result))
    return {name: min(r, key=lambda x: x[0]) for name, r in runs.items()}


def measure(llm: LLM, k: int, tokens: int, repeats: int) -> str:
    """One table row: k branches of `tokens` tokens as serial programs, as a fork, as one engine batch."""
    forked, single = make_programs(k, tokens)
    prompts = [CONTEXT + f"Point {i + 1}:" for i in range(k)]
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    llm.generate(prompts, params)  # warm: weights paged in, the shared context in the prefix cache
    best = interleaved_best(repeats, llm, {
        "serial": lambda: [single.run(i, llm=llm, temperature=0.0) for i in range(k)],
        "fork": lambda: forked.run(llm=llm, temperature=0.0),
        "batch": lambda: llm.generate(prompts, params),
    })
    (t_serial, n_serial, serial), (t_fork, n_fork, fork), (t_batch, n_batch, batch) = best.values()
    if not [s["point"] for s in serial] == fork["point"] == [o.outputs[0].text for o in batch]:
        raise SystemExit("outputs differ between serial, fork and batch: greedy determinism is broken")
    return (f"| {k} | {t_serial:.2f} ({n_serial}) | {t_fork:.2f} ({n_fork}) | {t_batch:.2f} ({n_batch}) | "
            f"{t_fork / t_serial:.2f} | {t_fork / t_batch:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--branches", default="2,4")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    llm = LLM(device="cpu")
    print(f"load average {os.getloadavg()[0]:.2f}; {args.tokens} tokens per branch, best of {args.repeats} interleaved rounds")
    print("| k | serial s (steps) | fork s (steps) | engine batch s (steps) | fork / serial | fork / batch |")
    print("|---|---|---|---|---|---|")
    for k in (int(b) for b in args.branches.split(",")):
        print(measure(llm, k, args.tokens, args.repeats))
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
