"""Tensor parallel and data parallel on two GPUs (issue 9): TP=2 vs TP=1 and DP=2 vs DP=1 on the nano-vllm workload.

The workload is `gpu_throughput.nano_vllm_workload` (256 requests, prompt and output lengths uniform in 100-1024,
seed 0, EOS ignored, temperature 0.6); the models are that script's random-weight Qwen3-0.6B and Llama-3-8B shapes,
written once as F16 GGUF files (tensor-parallel workers and data-parallel replicas load their weights from a file
in their own processes), computed in bf16. Each configuration is its own `LLM`, warmed up on a few requests, then
timed from queueing every request to the last token; the table prints output tok/s and the speed-up over the one-GPU
run of the same model measured in the same invocation.

    python benchmarks/multi_gpu.py [--models qwen3-0.6b,llama3-8b] [--requests 256] [--dir /tmp/nbllm-multi-gpu]

With fewer than two GPUs it says so and exits 0 (nothing to compare).
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import gguf
import numpy as np
import torch
from gpu_throughput import HF_CONFIGS, MAX_MODEL_LEN, Workload, gguf_shapes, nano_vllm_workload

from nbllm import LLM, SamplingParams
from nbllm.models.config import ModelConfig

CONFIGS = [("1 GPU", {}), ("TP=2", {"tensor_parallel_size": 2}), ("DP=2", {"data_parallel_size": 2})]


def write_random_gguf(name: str, path: Path, *, num_layers: int | None = None, seed: int = 0) -> Path:
    """A GGUF of model `name` (a key of `HF_CONFIGS`) with random F16 weights at scales that keep activations O(1)
    and a placeholder SPM vocabulary; `num_layers` truncates the stack (same widths: what sharding sees).
    Tensors are generated and written one at a time, so the 8B needs no 16 GB in host memory."""
    hf = dict(HF_CONFIGS[name])
    if num_layers is not None:
        hf["num_hidden_layers"] = num_layers
    c = ModelConfig.from_hf_config(hf, source=name)
    arch = hf["model_type"]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_heads)
    writer.add_head_count_kv(c.num_kv_heads)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_tokenizer_model("llama")
    control = ["<pad>", "<s>", "</s>", "<unk>"]
    tokens = control + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"<extra{i}>" for i in range(c.vocab_size - len(tokens))]
    types = [int(gguf.TokenType.CONTROL)] * 4 + [int(gguf.TokenType.BYTE)] * 256
    writer.add_token_list(tokens)
    writer.add_token_types(types + [int(gguf.TokenType.NORMAL)] * (c.vocab_size - len(types)))
    writer.add_token_scores([-float(i) for i in range(c.vocab_size)])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    shapes = gguf_shapes(c)
    for tensor_name, shape in shapes.items():
        writer.add_tensor_info(tensor_name, list(shape), np.dtype(np.float16), int(np.prod(shape)) * 2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    gen = torch.Generator().manual_seed(seed)
    for tensor_name, shape in shapes.items():
        if len(shape) == 1:
            t = torch.ones(shape)
        else:
            std = 0.02 if tensor_name.startswith("token_embd") else shape[1] ** -0.5
            t = torch.randn(shape, generator=gen) * std
        writer.write_tensor_data(t.half().numpy())
    writer.close()
    return path


def run(llm: LLM, work: Workload) -> float:
    """Seconds from queueing every request to the last token."""
    start = time.perf_counter()
    llm.generate(work.prompts, work.params)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="qwen3-0.6b,llama3-8b")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/nbllm-multi-gpu"))
    args = parser.parse_args()
    if torch.cuda.device_count() < 2:
        print(f"multi_gpu: {torch.cuda.device_count()} GPU(s) here; TP=2 / DP=2 need 2 — nothing to measure")
        return
    args.dir.mkdir(parents=True, exist_ok=True)
    work = nano_vllm_workload(args.requests)
    warmup = Workload(work.prompts[:4], [SamplingParams(max_tokens=8, ignore_eos=True)] * 4)
    rows = []
    for name in args.models.split(","):
        path = args.dir / f"{name}-random-f16.gguf"
        if not path.exists():
            write_random_gguf(name, path)
        base = None
        for label, kwargs in CONFIGS:
            with LLM(path, device="cuda", max_model_len=MAX_MODEL_LEN, max_num_seqs=256,
                     max_num_batched_tokens=16384, **kwargs) as llm:
                run(llm, warmup)
                seconds = run(llm, work)
            del llm  # the next LLM sizes its KV pool from the free memory this one holds
            gc.collect()
            torch.cuda.empty_cache()
            tok_s = work.output_tokens / seconds
            base = base or tok_s
            rows.append((name, label, f"{seconds:.1f}", f"{tok_s:.0f}", f"{tok_s / base:.2f}x"))
    header = ("model", "config", "seconds", "output tok/s", "vs 1 GPU")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)))
    print(f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}, {len(work.prompts)} requests, "
          f"{work.output_tokens} output tokens")


if __name__ == "__main__":
    main()
