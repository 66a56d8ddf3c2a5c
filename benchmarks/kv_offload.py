"""The KV offload tier on a multi-turn chat workload (issue 8, point 5): prefill saved by restoring from host RAM.

Several users chat in turn with the default model, one request at a time (a notebook server's shape): each
conversation opens with its own document, then asks follow-up questions; every prompt is the whole history.
The device KV pool is sized to hold about one conversation, so by the time a user speaks again, the other
users' turns have pushed that history out of it. Without the host tier it is prefilled again; with it, it
comes back from host RAM. A run with a pool large enough for everything is the bound and the reference.

Reported per configuration: prompt tokens prefilled (computed by the model), tokens restored from host RAM,
wall and CPU time of the whole workload. Every configuration's greedy answers must be equal: the host tier restores
bit-identical K/V, and re-prefilling a history (no tier) computes the same bits too, since the CPU kernels give a
token the same result whatever chunk it is computed in.

    nice -n 19 python benchmarks/kv_offload.py [--users 3] [--turns 3] [--doc 256] [--question 24] [--answer 8]
                                               [--device cpu|cuda] [--threads 2] [--model PATH|random]

`--model random` writes a Qwen3-0.6B-shaped GGUF of random Q8_0 weights first (`layer_offload.write_random_gguf`):
the GPU machine has no default model package.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch

from nbllm import LLM, SamplingParams

WORDS = ("system policy answer question model engine cache token block request stream user assistant data "
         "paper method result table figure value error time memory batch prompt output").split()


def text_ids(llm: LLM, n_tokens: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    ids = llm.tokenizer.encode(" ".join(rng.choice(WORDS) for _ in range(2 * n_tokens)), add_special_tokens=False)
    return ids[:n_tokens]


def workload(llm: LLM, args) -> list[list[list[int]]]:
    """Per user, the token ids of each turn's new text: the document first, then the questions."""
    return [[text_ids(llm, args.doc, 1000 * u)] + [text_ids(llm, args.question, 1000 * u + t)
                                                     for t in range(1, args.turns)]
            for u in range(args.users)]


def run(llm: LLM, turns: list[list[list[int]]], answer: int) -> tuple[list[list[int]], float, float]:
    """Users take turns, one request at a time; returns every answer, the wall time and this process's CPU time
    (the steadier figure on a shared box, where a niced run's wall time mostly measures the others)."""
    params = SamplingParams(max_tokens=answer, temperature=0.0, ignore_eos=True)
    history = [[llm.tokenizer.bos_token_id] for _ in turns]
    answers = []
    t0, c0 = time.perf_counter(), time.process_time()
    for t in range(len(turns[0])):
        for user, conv in enumerate(turns):
            history[user] += conv[t]
            (out,) = llm.generate([history[user]], params)
            history[user] += out.outputs[0].token_ids
            answers.append(out.outputs[0].token_ids)
    return answers, time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=3)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--doc", type=int, default=256)
    parser.add_argument("--question", type=int, default=24)
    parser.add_argument("--answer", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default=None, help="a model path (default: the embedded model) or 'random'")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model == "random":
            from gpu_throughput import HF_CONFIGS
            from layer_offload import Q, write_random_gguf

            from nbllm.models.config import ModelConfig

            model = str(Path(tmp) / "qwen3-0.6b-random-q8_0.gguf")
            write_random_gguf(Path(model), ModelConfig.from_hf_config(HF_CONFIGS["qwen3-0.6b"], source="qwen3-0.6b"),
                              Q.Q8_0)
        compare(args, model)


def compare(args: argparse.Namespace, model: str | None) -> None:
    """The three configurations on `model` (None: the embedded default), one table row each."""
    longest = args.doc + (args.turns - 1) * args.question + args.turns * args.answer + 1
    small = longest + longest // 4  # about one conversation's history
    configs = [("pool holding everything", dict(kv_cache_tokens=longest * args.users * 2)),
               ("small pool, no host tier", dict(kv_cache_tokens=small)),
               ("small pool + host tier", dict(kv_cache_tokens=small, kv_offload_gb=1.0))]
    print(f"{args.users} users x {args.turns} turns (document {args.doc}, questions {args.question}, answers "
          f"{args.answer} tokens), one request at a time, {args.device}, {args.threads} threads; "
          f"small pool = {small} tokens")
    print("| configuration | prompt tokens | prefilled | restored from host | wall s | CPU s | answers = large pool's |")
    print("|---|---:|---:|---:|---:|---:|---|")
    reference = None
    for name, options in configs:
        llm = LLM(model, device=args.device, **options)
        if reference is None:
            turns = workload(llm, args)
        answers, wall, cpu = run(llm, turns, args.answer)
        reference = reference or answers
        same = sum(a == b for a, b in zip(answers, reference))
        stats = llm.stats()
        prefilled = stats["prompt_tokens"] - stats["cached_prompt_tokens"]
        print(f"| {name} | {stats['prompt_tokens']} | {prefilled} | {stats['kv_host_tokens_restored']} | "
              f"{wall:.2f} | {cpu:.2f} | {same}/{len(answers)} |")
        if options.get("kv_offload_gb"):
            assert same == len(answers), "the host tier changed greedy answers"
        del llm


if __name__ == "__main__":
    main()
