"""`python -m nbllm`: the quickstart — load the embedded default model, generate a batch, print text and speed."""

from __future__ import annotations

import time

from nbllm import LLM, SamplingParams

PROMPTS = [
    "The capital of France is",
    "Here is a short poem about the sea:\n",
    "def fibonacci(n):",
    "The three primary colors are",
]


def main() -> None:
    t0 = time.perf_counter()
    llm = LLM()
    print(f"loaded {llm.model_path.name} ({llm.config.arch}, {llm.config.num_layers} layers) "
          f"in {time.perf_counter() - t0:.2f} s")
    t1 = time.perf_counter()
    outputs = llm.generate(PROMPTS, SamplingParams(max_tokens=48, temperature=0.0))
    elapsed = time.perf_counter() - t1
    for out in outputs:
        print(f"\n>>> {out.prompt}{out.outputs[0].text}")
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    stats = llm.stats()
    print(f"\n{len(outputs)} requests, {generated} tokens in {elapsed:.2f} s: {generated / elapsed:.1f} tok/s overall; "
          f"prefill {stats['prefill_tok_s']:.0f} tok/s, decode {stats['decode_tok_s']:.0f} tok/s; "
          f"KV blocks used {stats['kv_blocks_used']}/{stats['kv_blocks_total']}")


if __name__ == "__main__":
    main()
