"""`python -m nbllm`: the quickstart — load the embedded default model, generate, print text and speed."""

from __future__ import annotations

import time

import torch

from nbllm.defaults import default_model_path
from nbllm.loader import load_model
from nbllm.models.reference import greedy_generate
from nbllm.tokenizer import from_gguf

PROMPTS = [
    "The capital of France is",
    "Here is a short poem about the sea:\n",
    "def fibonacci(n):",
]


def main() -> None:
    t0 = time.perf_counter()
    path = default_model_path()
    model, config = load_model(path)
    tokenizer = from_gguf(path)
    print(f"loaded {path.name} ({config.arch}, {config.num_layers} layers) in {time.perf_counter() - t0:.2f} s")
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        t1 = time.perf_counter()
        out = greedy_generate(model, ids, 48, tokenizer.eos_token_ids)
        dt = time.perf_counter() - t1
        print(f"\n>>> {prompt}{tokenizer.decode(out)}")
        print(f"[{len(ids)} prompt tokens, {len(out)} generated, {len(out) / dt:.1f} tok/s]")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
