"""Layer offload on one GPU (issue 8 point 3): `LLM(path, device="cuda", n_gpu_layers=N)` for N = 0, half, all.

The default model is not on the GPU machine, so this writes a GGUF of random quantized weights of a real shape
first: Qwen3-0.6B (hidden 1024, intermediate 3072, 28 layers, 16 heads, 8 KV heads, head dim 128, vocab
151,936, tied embeddings), every matrix in Q8_0 or Q4_K (`--qtype`; random valid blocks: random bytes with small
fp16 (super-)block scales, so no quantizer runs), and a placeholder SPM vocabulary of the same size. Q8_0 is the
default because the CPU layers' one-time int8 repack of Q4_K takes minutes of a short device session. For each N
it loads the file, then measures batch-1 greedy decode (tok/s after the first token) and one prefill, and reports
the GPU memory the model holds. N = 0 runs all on the CPU (int8 weights); GPU layers keep the packed bits
(`GGUFLinear`); N = all is the plain GPU model (with its CUDA graphs), a split model runs its GPU layers eagerly.

    python benchmarks/layer_offload.py [--layers-on-gpu 0,14,28] [--qtype q8_0|q4_k] [--tokens 128] [--prompt 512]
                                       [--threads N]
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np
import torch
from gpu_throughput import HF_CONFIGS, gguf_shapes

from nbllm import LLM, SamplingParams
from nbllm.models.config import ModelConfig

Q = gguf.GGMLQuantizationType
#: fp16 super-block scales that keep the random weights' magnitudes near N(0, 1/in) for these shapes.
SCALES = {Q.Q4_K: (1.5e-4, 1.5e-4), Q.Q8_0: (4e-4,)}


def random_blocks(rows: int, cols: int, qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """`[rows, row_bytes]` of valid `qtype` blocks: random codes, the fp16 scale fields overwritten with small
    finite values (random bytes there could be inf or NaN)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    for i, scale in enumerate(SCALES[qtype]):
        data[:, 2 * i : 2 * i + 2] = np.frombuffer(np.float16(scale).tobytes(), dtype=np.uint8)
    return data.reshape(rows, -1)


def write_random_gguf(path: Path, config: ModelConfig, qtype: Q, seed: int = 0) -> None:
    """A Qwen3 GGUF of `config`'s shape: `qtype` layer weights, a Q8_0 token table, F32 norms."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "qwen3")
    w.add_context_length(config.max_positions)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_heads)
    w.add_head_count_kv(config.num_kv_heads)
    w.add_rope_freq_base(config.rope_theta)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if qtype == Q.Q8_0 else gguf.LlamaFileType.MOSTLY_Q4_K_M)
    control = ["<pad>", "<s>", "</s>", "<unk>"]
    tokens = control + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"<extra{i}>" for i in range(config.vocab_size - len(tokens))]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types([int(gguf.TokenType.CONTROL)] * 4 + [int(gguf.TokenType.BYTE)] * 256
                      + [int(gguf.TokenType.NORMAL)] * (config.vocab_size - 260))
    w.add_token_scores([-float(i) for i in range(config.vocab_size)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for name, shape in gguf_shapes(config).items():
        if len(shape) == 1:
            w.add_tensor(name, np.ones(shape, dtype=np.float32))
        else:
            kind = Q.Q8_0 if name.startswith("token_embd") else qtype
            w.add_tensor(name, random_blocks(*shape, kind, rng), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def measure(path: Path, n_gpu_layers: int, *, tokens: int, prompt_len: int) -> dict[str, float]:
    """Load time, GPU memory held, batch-1 decode tok/s and prefill tok/s of one placement."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    llm = LLM(path, device="cuda", n_gpu_layers=n_gpu_layers, kv_cache_tokens=8192)
    load = time.perf_counter() - start
    weights_gib = (torch.cuda.memory_allocated() - base) / 2**30
    rng = np.random.default_rng(n_gpu_layers)

    def prompt(n: int) -> list[int]:
        return rng.integers(300, llm.config.vocab_size, n).tolist()

    llm.generate([prompt(16)], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))  # warm-up
    out = llm.generate([prompt(32)], SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True))[0]
    prefill_prompt = prompt(prompt_len)
    pre = llm.generate([prefill_prompt], SamplingParams(max_tokens=1))[0]
    result = {"load_s": load, "gpu_gib": weights_gib, "decode_tok_s": out.metrics.decode_tok_s,
              "prefill_tok_s": prompt_len / pre.metrics.ttft}
    del llm, out, pre
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers-on-gpu", default="0,14,28", help="comma list of n_gpu_layers")
    parser.add_argument("--qtype", default="q8_0", choices=["q8_0", "q4_k"], help="the layers' weight type")
    parser.add_argument("--tokens", type=int, default=128, help="greedy tokens per decode measurement")
    parser.add_argument("--prompt", type=int, default=512, help="prefill prompt length")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = ModelConfig.from_hf_config(HF_CONFIGS["qwen3-0.6b"], source="qwen3-0.6b")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("NBLLM_CACHE_DIR", str(Path(tmp) / "cache"))
        path = Path(tmp) / f"qwen3-0.6b-random-{args.qtype}.gguf"
        start = time.perf_counter()
        write_random_gguf(path, config, Q[args.qtype.upper()])
        print(f"wrote {path.name}: {path.stat().st_size / 2**20:.0f} MiB in {time.perf_counter() - start:.1f} s; "
              f"{torch.cuda.get_device_name()}, {torch.get_num_threads()} CPU threads")
        print("| n_gpu_layers | load s | GPU GiB | decode tok/s (batch 1) | prefill tok/s |")
        print("|---:|---:|---:|---:|---:|")
        for n in (int(x) for x in args.layers_on_gpu.split(",")):
            r = measure(path, n, tokens=args.tokens, prompt_len=args.prompt)
            print(f"| {n} / {config.num_layers} | {r['load_s']:.1f} | {r['gpu_gib']:.2f} | {r['decode_tok_s']:.1f} "
                  f"| {r['prefill_tok_s']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
