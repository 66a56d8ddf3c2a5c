"""nbllm on one GPU beside transformers' continuous batching, on random-weight models of real shapes (issue 7).

  (a) the nano-vllm workload: 256 requests, prompt and output lengths uniform in 100-1024 (seed 0, EOS ignored,
      temperature 0.6 as nano-vllm's bench.py): output tok/s of nbllm, and of transformers' continuous batching
      (`continuous_batching_context_manager`) on the same weights; HF runs the first `--hf-requests` requests
      only (it needs minutes for all 256), and nbllm runs that subset too, so one row compares like with like.
  (b) batch-1 greedy decode tok/s against the memory roofline: weight bytes / device-to-device copy bandwidth
      measured in the same run (bytes read + written per second of a 1 GiB copy); with the overlap on, how much
      of a step the host waited for the device, and one replay of the decode graph timed alone (the device's
      time a step): together they say whether a step is bound by the host or by the device.
  (c) prefix-cache hits: requests sharing a long system prompt, prefix caching on vs off.
  (d) the decode attention kernel alone at batch 256, per launch setting.
  (e) batch-1 projections alone: cuBLAS against the decode GEMV (`nbllm.kernels.gemv`) per launch setting.

Models are built in code with random bf16 weights (no hub): Qwen3-0.6B (hidden 1024, intermediate 3072, 28
layers, 16 heads, 8 KV heads, head dim 128, vocab 151,936, tied embeddings, rope theta 1e6) and Llama-3-8B
(hidden 4096, intermediate 14336, 32 layers, 32 heads, 8 KV heads, vocab 128,256, rope theta 5e5). The
tokenizer is a placeholder SPM vocabulary of the same size: detokenizing costs what it costs, the text is noise.

    python benchmarks/gpu_throughput.py [--only a,b,c] [--models qwen3-0.6b,llama3-8b] [--hf-requests 32]
                                        [--overlap on,off]
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import torch

from nbllm.engine.core import EngineCore, num_blocks_for
from nbllm.engine.model_runner import gpu_kv_memory_bytes
from nbllm.engine.sampling_params import RequestOutputKind, SamplingParams
from nbllm.engine.scheduler import SchedulerConfig
from nbllm.models.base import CausalLM
from nbllm.models.config import ModelConfig
from nbllm.models.registry import spec_for_hf
from nbllm.models.weights import WeightSource
from nbllm.tokenizer import Tokenizer

HF_CONFIGS: dict[str, dict[str, Any]] = {
    "qwen3-0.6b": {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 1024,
        "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
        "head_dim": 128, "vocab_size": 151936, "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0}, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 40960, "bos_token_id": 1, "eos_token_id": 2},
    "llama3-8b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 128, "vocab_size": 128256, "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500_000.0}, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 8192, "bos_token_id": 1, "eos_token_id": 2},
}
MAX_MODEL_LEN = 4096


# ---------------------------------------------------------------------------------------------- model and tokenizer

def gguf_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The GGUF-named tensors of a Llama/Qwen3 model of config `c`, with their shapes."""
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    shapes = {"token_embd.weight": (c.vocab_size, c.hidden_size), "output_norm.weight": (c.hidden_size,)}
    if not c.tie_word_embeddings:
        shapes["output.weight"] = (c.vocab_size, c.hidden_size)
    for i in range(c.num_layers):
        p = f"blk.{i}"
        shapes |= {f"{p}.attn_norm.weight": (c.hidden_size,), f"{p}.ffn_norm.weight": (c.hidden_size,),
                   f"{p}.attn_q.weight": (q, c.hidden_size), f"{p}.attn_k.weight": (kv, c.hidden_size),
                   f"{p}.attn_v.weight": (kv, c.hidden_size), f"{p}.attn_output.weight": (c.hidden_size, q),
                   f"{p}.ffn_gate.weight": (c.intermediate_size, c.hidden_size),
                   f"{p}.ffn_up.weight": (c.intermediate_size, c.hidden_size),
                   f"{p}.ffn_down.weight": (c.hidden_size, c.intermediate_size)}
        if c.qk_norm:
            shapes |= {f"{p}.attn_q_norm.weight": (c.head_dim,), f"{p}.attn_k_norm.weight": (c.head_dim,)}
    return shapes


HF_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
            "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
            "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj",
            "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def hf_name(name: str) -> str:
    top = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
    if name in top:
        return top[name]
    _, layer, kind, _ = name.split(".")
    return f"model.layers.{layer}.{HF_NAMES[kind]}.weight"


class TensorDict(WeightSource):
    """Weights already on the device, by GGUF name (random, or an HF model's own tensors)."""

    def __init__(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(Path("<random>"), dtype=dtype, device=device)
        self.tensors = tensors

    def names(self) -> frozenset[str]:
        return frozenset(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def ggml_type(self, name: str) -> gguf.GGMLQuantizationType:
        return gguf.GGMLQuantizationType.BF16

    def _read(self, name: str) -> torch.Tensor:
        return self.tensors[name]


def random_tensors(c: ModelConfig, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights at scales that keep activations O(1): N(0, 1/in) matrices, unit norms, N(0, 0.02) embeddings."""
    gen = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for name, shape in gguf_shapes(c).items():
        if len(shape) == 1:
            out[name] = torch.ones(shape, dtype=torch.bfloat16, device=device)
        else:
            std = 0.02 if name.startswith("token_embd") else shape[1] ** -0.5
            out[name] = torch.randn(shape, generator=gen, dtype=torch.bfloat16, device=device) * std
    return out


def build_model(name: str, device: torch.device, *, hf: bool = True) -> tuple[CausalLM, ModelConfig, Any]:
    """(nbllm model, its config, the HF model with the same weights, or None for the 8B or without `hf`)."""
    hf_config = HF_CONFIGS[name]
    config = ModelConfig.from_hf_config(hf_config, source=name)
    hf_model = None
    if name == "qwen3-0.6b" and hf:
        import transformers

        cfg = transformers.Qwen3Config(**{k: v for k, v in hf_config.items() if k != "architectures"})
        with torch.device(device):
            hf_model = transformers.Qwen3ForCausalLM._from_config(cfg, dtype=torch.bfloat16).eval()
        state = hf_model.state_dict()
        tensors = random_tensors(config, device)
        with torch.no_grad():
            for gname, t in tensors.items():
                state[hf_name(gname)].copy_(t)
    else:
        tensors = random_tensors(config, device)
    spec = spec_for_hf(hf_config["architectures"], name)
    model = spec.model_class(config, TensorDict(tensors, torch.bfloat16, device)).eval()
    return model, config, hf_model


def placeholder_tokenizer(vocab_size: int) -> Tokenizer:
    """An SPM vocabulary of `vocab_size` pieces: control tokens, byte fallbacks, then `<extraN>` pieces."""
    control = ["<pad>", "<s>", "</s>", "<unk>"]
    tokens = control + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"<extra{i}>" for i in range(vocab_size - len(tokens))]
    types = [int(gguf.TokenType.CONTROL)] * 4 + [int(gguf.TokenType.BYTE)] * 256
    types += [int(gguf.TokenType.NORMAL)] * (vocab_size - len(types))
    return Tokenizer.from_metadata({
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.scores": [-float(i) for i in range(vocab_size)], "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2})


def make_engine(model: CausalLM, config: ModelConfig, tokenizer: Tokenizer, *, prefix_caching: bool = True,
                max_num_seqs: int = 256) -> EngineCore:
    memory = gpu_kv_memory_bytes(model.device)
    num_blocks = num_blocks_for(config, 16, torch.bfloat16, kv_cache_tokens=None, memory_bytes=memory)
    scheduler = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=16384, max_model_len=MAX_MODEL_LEN,
                                enable_prefix_caching=prefix_caching)
    return EngineCore(model, config, tokenizer, num_blocks=num_blocks, block_size=16, scheduler_config=scheduler)


# ---------------------------------------------------------------------------------------------- workloads

@dataclass
class Workload:
    prompts: list[list[int]]
    params: list[SamplingParams]

    @property
    def output_tokens(self) -> int:
        return sum(p.max_tokens for p in self.params)

    def head(self, n: int) -> Workload:
        return Workload(self.prompts[:n], self.params[:n])


def nano_vllm_workload(n: int = 256) -> Workload:
    """nano-vllm's bench.py: seed 0, prompts of uniform 100-1024 random ids < 10000, outputs uniform 100-1024;
    final outputs only, as its `llm.generate` (and ours) asks for them."""
    rng = random.Random(0)
    prompts = [[rng.randint(0, 10000) for _ in range(rng.randint(100, 1024))] for _ in range(n)]
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=rng.randint(100, 1024),
                             output_kind=RequestOutputKind.FINAL_ONLY) for _ in range(n)]
    return Workload(prompts, params)


def shared_prefix_workload(n: int = 128, prefix: int = 2048) -> Workload:
    """`n` requests: one `prefix`-token system prompt, then 50-200 own tokens; 100-200 output tokens each."""
    rng = random.Random(1)
    system = [rng.randint(3, 10000) for _ in range(prefix)]
    prompts = [system + [rng.randint(3, 10000) for _ in range(rng.randint(50, 200))] for _ in range(n)]
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=rng.randint(100, 200),
                             output_kind=RequestOutputKind.FINAL_ONLY) for _ in range(n)]
    return Workload(prompts, params)


def run_engine(engine: EngineCore, work: Workload) -> float:
    """Seconds from queueing every request to the last token (nano-vllm's measure)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i, (prompt, params) in enumerate(zip(work.prompts, work.params)):
        engine.add_request(f"r{i}-{start}", prompt, params)
    while engine.has_unfinished():
        engine.step()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def run_hf(hf_model: Any, work: Workload) -> float:
    """transformers' continuous batching on the same requests (per-request max_new_tokens, EOS disabled)."""
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=True, temperature=0.6, top_k=0, top_p=1.0, max_new_tokens=1024,
                              eos_token_id=-1, pad_token_id=0)
    torch.cuda.synchronize()
    start = time.perf_counter()
    with hf_model.continuous_batching_context_manager(generation_config=config, block=True, timeout=30) as manager:
        ids = [manager.add_request(p, max_new_tokens=s.max_tokens, eos_token_id=-1)
               for p, s in zip(work.prompts, work.params)]
        done = 0
        while done < len(ids):
            result = manager.get_result(timeout=5)
            if result is not None and result.is_finished():
                done += 1
            elif result is None and not manager.is_running():
                raise RuntimeError("transformers' continuous batching loop stopped")
    torch.cuda.synchronize()
    return time.perf_counter() - start


def copy_bandwidth(device: torch.device) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write) of a 1 GiB buffer, median of 20."""
    src = torch.empty(1 << 29, dtype=torch.int16, device=device).random_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(25):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return 2 * src.numel() * src.element_size() / statistics.median(times[5:])


def weight_bytes(model: CausalLM) -> int:
    """Bytes a decode step must read: every weight once (the rotary tables excluded: a step reads a row)."""
    seen, total = set(), 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name.endswith(("cos", "sin")) or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


BATCH1_TOKENS = 512


def batch1_decode(engine: EngineCore, prompt_len: int = 128, tokens: int = BATCH1_TOKENS) -> float:
    """Greedy batch-1 decode tok/s, timed from the first generated token to the last."""
    rng = random.Random(2)
    engine.add_request(f"b1-{time.perf_counter()}", [rng.randint(3, 10000) for _ in range(prompt_len)],
                       SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=tokens))
    engine.step()  # prefill and the first token
    torch.cuda.synchronize()
    start = time.perf_counter()
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    torch.cuda.synchronize()
    return steps / (time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="a,b,c,d,e")
    parser.add_argument("--models", default="qwen3-0.6b,llama3-8b")
    parser.add_argument("--hf-requests", type=int, default=32, help="0 skips transformers")
    parser.add_argument("--profile", default="", help="write torch.profiler tables to PATH.<model>.batch*.txt")
    parser.add_argument("--overlap", default="on", help="overlap scheduling for (a) and (b): on, off or on,off")
    args = parser.parse_args()
    parts = set(args.only.split(","))
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    print(f"device: {props.name}, {props.total_memory / 2**30:.0f} GiB, torch {torch.__version__}")
    bandwidth = copy_bandwidth(device)
    print(f"device-to-device copy: {bandwidth / 1e9:.0f} GB/s (read + write)")
    rows: list[tuple[str, str, str]] = []
    # transformers runs last: nbllm runs measured after it were ~20% slower (7.3-7.6k vs 9.3k tok/s on (a)),
    # presumably its background thread or memory lingering; before it, each side has the machine to itself.
    hf_runs: list[tuple[str, Any, Workload]] = []
    for name in args.models.split(","):
        model, config, hf_model = build_model(name, device)
        tokenizer = placeholder_tokenizer(config.vocab_size)
        work = nano_vllm_workload()
        if "a" in parts and name == "qwen3-0.6b":
            subset = work.head(args.hf_requests)
            if args.hf_requests:
                hf_runs.append((name, hf_model, subset))
            free_memory()
            engine = make_engine(model, config, tokenizer)
            run_engine(engine, nano_vllm_workload(4))  # warm-up: kernels compiled, graphs captured
            if args.hf_requests:
                sub_s = run_engine(engine, subset)
                rows.append((name, f"(a) nbllm, {len(subset.prompts)} requests",
                             f"{subset.output_tokens / sub_s:,.0f} tok/s ({sub_s:.1f} s)"))
            for mode in args.overlap.split(","):
                engine.overlap.enabled = mode == "on"
                engine.reset_prefix_cache()  # no hits from the warm-up or the previous run
                steps_before, preempted_before = engine.stats()["steps"], engine.stats()["preemptions"]
                waited_before = engine.overlap.wait_seconds
                seconds = run_engine(engine, work)
                stats = engine.stats()
                rows.append((name, f"(a) nbllm, 256 requests (nano-vllm workload), overlap {mode}",
                             (f"{work.output_tokens / seconds:,.0f} tok/s ({seconds:.1f} s, "
                             f"{stats['steps'] - steps_before} steps, "
                             f"{stats['preemptions'] - preempted_before} preemptions, host waited "
                             f"{engine.overlap.wait_seconds - waited_before:.1f} s for the device)")))
                print(rows[-1], flush=True)
            engine.overlap.enabled = True
            if args.profile:
                profile_decode(engine, f"{args.profile}.{name}.batch256.txt")
            del engine
        hf_model = None
        if "b" in parts:
            free_memory()
            engine = make_engine(model, config, tokenizer, max_num_seqs=8)
            batch1_decode(engine, tokens=32)  # warm-up
            roof = bandwidth / weight_bytes(model)
            for mode in args.overlap.split(","):
                engine.overlap.enabled = mode == "on"
                waited = engine.overlap.wait_seconds
                tok_s = batch1_decode(engine)
                waited = (engine.overlap.wait_seconds - waited) / (BATCH1_TOKENS - 1)  # per timed step
                rows.append((name, f"(b) batch-1 decode, overlap {mode}",
                             (f"{tok_s:,.0f} tok/s = {tok_s / roof:.0%} of roofline {roof:,.0f} tok/s "
                             f"({weight_bytes(model) / 1e9:.2f} GB of weights); a step {1e3 / tok_s:.3f} ms"
                             + (f", the host waited {waited * 1e3:.3f} ms of it for the device" if mode == "on"
                                else ""))))
            engine.overlap.enabled = True
            replay = graph_replay_seconds(engine, 1)
            rows.append((name, "(b) batch-1 decode graph, one replay (the device's time a step)",
                         f"{replay * 1e3:.3f} ms = {1 / replay:,.0f} tok/s = {1 / replay / roof:.0%} of roofline"))
            print(rows[-2:], flush=True)
            if args.profile:
                profile_batch1(engine, f"{args.profile}.{name}.batch1.txt")
            del engine
        if "e" in parts:
            rows.extend((name, measure, result) for measure, result in gemv_sweep(config, bandwidth))
            print(*rows[-5:], sep="\n", flush=True)
        if "d" in parts and name == "qwen3-0.6b":
            rows.extend((name, measure, result) for measure, result in decode_kernel_sweep(config, bandwidth))
            print(rows[-1], flush=True)
        if "c" in parts and name == "qwen3-0.6b":
            shared = shared_prefix_workload()
            for caching in (True, False):
                free_memory()
                engine = make_engine(model, config, tokenizer, prefix_caching=caching)
                run_engine(engine, nano_vllm_workload(2))
                seconds = run_engine(engine, shared)
                stats = engine.stats()
                rows.append((name, f"(c) shared 2048-token prefix, 128 requests, caching {'on' if caching else 'off'}",
                             (f"{shared.output_tokens / seconds:,.0f} output tok/s ({seconds:.1f} s, "
                             f"{stats['cached_prompt_tokens'] / stats['prompt_tokens']:.0%} prompt tokens cached)")))
                print(rows[-1], flush=True)
                del engine
        del model
        free_memory()
    for name, hf_model, subset in hf_runs:
        try:
            hf_s = run_hf(hf_model, subset)
            rows.append((name, f"(a) transformers CB, {len(subset.prompts)} requests",
                         f"{subset.output_tokens / hf_s:,.0f} tok/s ({hf_s:.1f} s)"))
        except Exception as exc:  # noqa: BLE001 - a transformers without the API must not sink the nbllm numbers
            rows.append((name, "(a) transformers CB", f"failed: {type(exc).__name__}: {exc}"[:120]))
    width = max(len(r[1]) for r in rows)
    print(f"\n{'model':<11} {'measure':<{width}} result")
    for model_name, measure, result in rows:
        print(f"{model_name:<11} {measure:<{width}} {result}")


def graph_replay_seconds(engine: EngineCore, batch: int, repeats: int = 200) -> float:
    """Device seconds of one replay of the decode graph of bucket `batch`, the median of `repeats` replays each
    timed alone by CUDA events: each replay leaves the next step's inputs behind (`nbllm.kernels.next_inputs`),
    so before each one the inputs as the last step left them are copied back, outside the timed span (with no
    slots: the replays store no K/V into blocks the engine may have handed on)."""
    graphs = engine.runner.graphs
    graph, inputs = graphs._graphs[batch], graphs._inputs
    kept = inputs.clone()
    start = kept.clone()
    start[2] = -1
    times = []
    for _ in range(repeats + 10):
        inputs.copy_(start)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        times.append((a, b))
    inputs.copy_(kept)
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) / 1e3 for a, b in times[10:])


def median_replay_seconds(graph: torch.cuda.CUDAGraph, repeats: int) -> float:
    """Median seconds of one `graph.replay()`, each timed alone with CUDA events."""
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def decode_kernel_sweep(config: ModelConfig, bandwidth: float) -> list[tuple[str, str]]:
    """(d) The decode attention kernel alone at batch 256: achieved bandwidth of its K/V reads per launch setting."""
    from nbllm.kernels.decode_attention import decode_attention, default_num_splits

    dev = torch.device("cuda")
    batch, ctx, block_size = 256, 1024, 16
    hkv, hq, d = config.num_kv_heads, config.num_heads, config.head_dim
    blocks_per_seq = ctx // block_size
    k_cache = torch.randn((batch * blocks_per_seq, block_size, hkv, d), dtype=torch.bfloat16, device=dev)
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(batch * blocks_per_seq, device=dev).view(batch, blocks_per_seq).int()
    # The nano-vllm workload's mix: prompt 100-1024 plus what was generated so far.
    lens = torch.randint(100, ctx + 1, (batch,), dtype=torch.int32, device=dev)
    q = torch.randn((batch, hq, d), dtype=torch.bfloat16, device=dev)
    kv_bytes = 2 * int(lens.sum()) * hkv * d * k_cache.element_size()
    default = default_num_splits(batch, hkv, torch.cuda.get_device_properties(dev).multi_processor_count)
    results = []
    for splits, block_n, warps, stages in ((default, 64, 4, 2), (1, 64, 4, 2), (2, 64, 4, 2), (8, 64, 4, 2),
                                           (default, 32, 4, 2), (default, 128, 4, 2), (default, 64, 8, 2)):
        def launch(splits: int = splits, block_n: int = block_n, warps: int = warps, stages: int = stages) -> None:
            decode_attention(q, k_cache, v_cache, block_tables=tables, context_lens=lens, scale=d**-0.5,
                             sliding_window=None, num_splits=splits, block_n=block_n, num_warps=warps,
                             num_stages=stages)

        for _ in range(3):
            launch()
        times = []
        for _ in range(20):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            launch()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        t = statistics.median(times)
        results.append((f"(d) decode attention B=256 ctx 100-1024, splits={splits} block_n={block_n} warps={warps}",
                        f"{t * 1e3:.3f} ms, {kv_bytes / t / 1e9:,.0f} GB/s of K/V ({kv_bytes / t / bandwidth:.0%} of copy)"))
    return results


def gemv_sweep(config: ModelConfig, bandwidth: float) -> list[tuple[str, str]]:
    """(e) A decode layer's projections and the head at batch 1: cuBLAS against the Triton GEMV per launch
    setting (auto: the kernel's own), and the share of the copy bandwidth each reaches. Each timing is a graph of
    launches over enough weight copies (>= 256 MB) that L2 holds none."""
    from nbllm.kernels.gemv import gemv

    dev = torch.device("cuda")
    c = config
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    shapes = {"qkv": (q + 2 * kv, c.hidden_size), "o": (c.hidden_size, q), "gate_up": (2 * c.intermediate_size,
              c.hidden_size), "down": (c.hidden_size, c.intermediate_size), "head": (c.vocab_size, c.hidden_size)}
    settings: list[tuple[str, dict[str, int]]] = [("auto", {}), ("warps=8", {"num_warps": 8})]
    settings += [(f"block_n={bn}", {"block_n": bn}) for bn in (8, 16, 32)]
    results = []
    for name, (n, k) in shapes.items():
        nbytes = n * k * 2
        copies = max(1, -(-256 * 2**20 // nbytes))
        weights = [torch.randn((n, k), dtype=torch.bfloat16, device=dev) for _ in range(copies)]
        x = torch.randn((1, k), dtype=torch.bfloat16, device=dev)
        timings = []
        for label, launch in [("cuBLAS", None), *settings]:
            def step(launch: dict[str, int] | None = launch) -> None:
                for w in weights:
                    if launch is None:
                        torch.nn.functional.linear(x, w)
                    else:
                        gemv(x, w, **launch)

            step()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            t = median_replay_seconds(graph, 20) / copies
            timings.append(f"{label} {t * 1e6:.1f} us {nbytes / t / 1e9:,.0f} GB/s ({nbytes / t / bandwidth:.0%})")
            del graph
        results.append((f"(e) {name} {n}x{k} batch 1 ({nbytes / 1e6:.1f} MB)", "; ".join(timings)))
        del weights
    return results


def profile_batch1(engine: EngineCore, path: str) -> None:
    """torch.profiler tables of 50 batch-1 decode steps."""
    from torch.profiler import ProfilerActivity, profile

    engine.add_request("p1", list(range(3, 131)), SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=80))
    for _ in range(5):
        engine.step()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(50):
            engine.step()
    device_events = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
                     if e.device_type == torch.autograd.DeviceType.CUDA]
    Path(path).write_text(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40) + "\n\n"
                          + prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25) + "\n\n"
                          + chain_shares(device_events, steps=50) + "\n\n" + python_profile(engine, 20))
    for rid in list(engine.requests):
        engine.abort(rid)


def chain_shares(events: list[tuple[str, float, float]], steps: int, anchor: str = "_split_kernel") -> str:
    """What each kernel of a step adds to the chain's end, from the device's `(name, start, end)` records (µs).

    With programmatic-dependent launch a kernel starts while the one before it drains, so its span overstates its
    cost; its *share* is how much later the device's work ends because of it, `end - max(start, previous end)`,
    and time with nothing running is idle. Kernels are told apart by name and by their place after the last
    decode-attention launch (`anchor`): in a decoder layer, "+1" is the output projection, "+2" and "+3" the
    MLP's, "+4" the next layer's q/k/v projection; a memcpy (the step's inputs) restarts the count.
    """
    shares: dict[str, list[float]] = {}
    idle, previous_end, since_anchor = 0.0, None, None
    for name, start, end in sorted(events, key=lambda event: event[1]):
        if "Memcpy" in name or "memcpy" in name:
            since_anchor = None
        if previous_end is not None:
            idle += max(0.0, start - previous_end)
        share = end - (start if previous_end is None else max(start, previous_end))
        if name == anchor:
            since_anchor = 0
        elif since_anchor is not None:
            since_anchor += 1
        key = f"{name[:48]} {'' if since_anchor is None else f'+{since_anchor}'}"
        shares.setdefault(key, []).append(max(0.0, share))
        previous_end = end if previous_end is None else max(previous_end, end)
    lines = [f"chain shares over {steps} steps (µs; nothing running: {idle / steps:.1f} µs a step)",
             f"{'kernel':<56}{'a step':>9}{'count':>7}{'each':>7}"]
    for key, values in sorted(shares.items(), key=lambda item: -sum(item[1])):
        lines.append(f"{key:<56}{sum(values) / steps:>9.1f}{len(values) / steps:>7.1f}{statistics.mean(values):>7.2f}")
    return "\n".join(lines)


def python_profile(engine: EngineCore, steps: int) -> str:
    """cProfile of `steps` engine steps: where the host's time goes (a `tolist` waits for the GPU)."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        engine.step()
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(35)
    return text.getvalue()


def free_memory() -> None:
    """Give the previous engine's KV pool and graph pools back before the next one sizes itself."""
    gc.collect()
    torch.cuda.empty_cache()


def profile_decode(engine: EngineCore, path: str) -> None:
    """A torch.profiler table of 30 engine steps of a 256-request decode batch (where a step's time goes)."""
    from torch.profiler import ProfilerActivity, profile

    work = nano_vllm_workload(256)
    for i, (prompt, params) in enumerate(zip(work.prompts, work.params)):
        engine.add_request(f"p{i}", prompt, params)
    for _ in range(40):  # past the prefills
        engine.step()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(30):
            engine.step()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
    cuda_table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=20)
    Path(path).write_text(table + "\n\n" + cuda_table + "\n\n" + python_profile(engine, 20))
    for rid in list(engine.requests):
        engine.abort(rid)


if __name__ == "__main__":
    main()
