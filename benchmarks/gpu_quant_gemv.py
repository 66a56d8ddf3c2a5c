"""Batch-1 decode of an 8B-shaped Q4_K_M model's layer matmuls on the GPU against the packed-bytes roofline (issue 8).

The weights are Llama-3-8B's 32 layers (q 4096x4096, k and v 1024x4096, o 4096x4096, gate and up 14336x4096,
down 4096x14336) as random valid GGUF blocks, in llama.cpp's Q4_K_M mix (`llama_tensor_get_type`): Q4_K
everywhere except attn_v and ffn_down in the "more bits" layers (the first and last eighth and every third
between), which are Q6_K. One decode step of the matmuls is the 224 GEMVs of one token in layer order, captured
in a CUDA graph (as the engine runs decode) and replayed; its roofline is the packed bytes over the
device-to-device copy bandwidth (`gpu_throughput.copy_bandwidth`, read + write). The same step with dense bf16
weights (`F.linear`) is the baseline. `--sweep` times GEMV launch shapes per matrix; the per-matrix table also
has the Q5_0/Q8_0 kernels on the 4096x4096 and 14336x4096 shapes, and the GEMM path for a 512-token prefill.
The GEMV variants are compiled first in parallel processes (Triton's disk cache), one per CPU core.

    python benchmarks/gpu_quant_gemv.py [--sweep]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import torch
import torch.nn.functional as F
from gpu_throughput import copy_bandwidth, median_replay_seconds

from nbllm.kernels.quant_matmul import gemv_config, pack, quant_gemm, quant_gemv, random_blocks

HIDDEN, INTER, KV, LAYERS = 4096, 14336, 1024, 32
MATRICES = {"q": (HIDDEN, HIDDEN), "k": (KV, HIDDEN), "v": (KV, HIDDEN), "o": (HIDDEN, HIDDEN),
            "gate": (INTER, HIDDEN), "up": (INTER, HIDDEN), "down": (HIDDEN, INTER)}


def more_bits(layer: int, layers: int = LAYERS) -> bool:
    """llama.cpp's `use_more_bits`: the layers whose attn_v and ffn_down get Q6_K in Q4_K_M."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def q4_k_m_kind(name: str, layer: int) -> str:
    return "q6_k" if name in ("v", "down") and more_bits(layer) else "q4_k"


#: GEMV launch shapes (BLOCK_N, CHUNK, num_warps) the sweep times, by K.
SWEEP = {HIDDEN: [(4, 4096, 2), (8, 4096, 2), (16, 4096, 2), (4, 4096, 4), (8, 4096, 4), (8, 2048, 1)],
         INTER: [(4, 4096, 2), (8, 4096, 2), (8, 2048, 1), (4, 2048, 1), (4, 2048, 2), (8, 2048, 2)]}


def launch(shape: tuple[int, int, int]) -> dict[str, int]:
    return dict(zip(("BLOCK_N", "CHUNK", "num_warps"), shape))


def compile_gemv(job: tuple[str, int, int, dict | None]) -> None:
    """Compile (and run once) the GEMV of one (kind, n, k, launch shape) into Triton's disk cache."""
    kind, n, k, config = job
    w = pack(random_blocks(kind, n, k, device="cuda"), kind, k)
    quant_gemv(torch.zeros(1, k, device="cuda", dtype=torch.bfloat16), w, config=config)
    torch.cuda.synchronize()


def precompile(jobs: list[tuple[str, int, int, dict | None]]) -> None:
    """Triton compiles one kernel variant at a time per process (seconds each): spread them over the cores."""
    workers = max(1, min(len(jobs), (os.cpu_count() or 2) - 2))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(compile_gemv, jobs))


def graph_seconds(step, repeats: int = 20) -> float:
    """Seconds per call of `step` replayed from a CUDA graph (median of `repeats` timed replays)."""
    step()  # compile and warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    return median_replay_seconds(graph, repeats)


def decode_step(weights: list[dict[str, object]], matmul, x_h: torch.Tensor, x_i: torch.Tensor):
    """The layer matmuls of one token in model order (inputs fixed: the data flow does not change the bytes)."""
    def step() -> None:
        for layer in weights:
            for name, w in layer.items():
                matmul(x_i if name == "down" else x_h, w)
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="time GEMV launch shapes per matrix, decode with the best")
    args = parser.parse_args()
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    bandwidth = copy_bandwidth(dev)
    print(f"device: {torch.cuda.get_device_name(dev)}; device-to-device copy {bandwidth / 1e9:,.0f} GB/s")
    x_h = torch.randn(1, HIDDEN, device=dev, dtype=torch.bfloat16)
    x_i = torch.randn(1, INTER, device=dev, dtype=torch.bfloat16)

    quant = [{name: pack(random_blocks(q4_k_m_kind(name, i), n, k, generator=gen, device=dev), q4_k_m_kind(name, i), k)
              for name, (n, k) in MATRICES.items()} for i in range(LAYERS)]
    q_bytes = sum(w.nbytes for layer in quant for w in layer.values())
    q6 = sum(w.kind == "q6_k" for layer in quant for w in layer.values())
    groups = {}  # (kind, n, k) -> the 32 layers' weights of that shape and type
    for layer in quant:
        for name, w in layer.items():
            groups.setdefault((w.kind, w.n, w.k, name), []).append(w)
    shapes = {(kind, n, k) for kind, n, k, _ in groups}
    shapes |= {(kind, *MATRICES[name]) for kind in ("q5_0", "q8_0") for name in ("q", "gate")}
    jobs = [(kind, n, k, None) for kind, n, k in shapes]
    if args.sweep:
        jobs += [(kind, n, k, launch(s)) for kind, n, k in shapes if kind in ("q4_k", "q6_k") for s in SWEEP[k]]
    try:
        precompile(jobs)
    except Exception as error:  # noqa: BLE001 - the timings below compile what is missing, one at a time
        print(f"parallel compile failed ({error!r}); compiling in this process")

    print("\nper matrix, the layers' copies back to back in one graph (default launch shape):")
    print(f"{'matrix':>28} {'launch':>12} {'us each':>8} {'GB/s':>6} {'% roof':>6}")
    for (kind, n, k, name), ws in groups.items():
        if name != "up":
            per_matrix(f"{kind} {name} {n}x{k} x{len(ws)}", ws, x_i if name == "down" else x_h, bandwidth)
    for kind in ("q5_0", "q8_0"):
        for name in ("q", "gate"):
            n, k = MATRICES[name]
            ws = [pack(random_blocks(kind, n, k, generator=gen, device=dev), kind, k) for _ in range(8)]
            per_matrix(f"{kind} {name} {n}x{k} x8", ws, x_h, bandwidth)
            del ws

    tuned = sweep(groups, x_h, x_i, bandwidth) if args.sweep else {}
    roof_q = q_bytes / bandwidth
    print(f"\nQ4_K_M layer matmuls ({LAYERS * len(MATRICES) - q6} Q4_K + {q6} Q6_K matrices, {q_bytes / 1e9:.2f} GB), "
          f"roofline {roof_q * 1e3:.3f} ms a token:")
    for label, configs in (("default launch", {}), ("swept launch", tuned)):
        if label == "swept launch" and not tuned:
            continue
        t_q = graph_seconds(decode_step(quant, lambda x, w, c=configs: quant_gemv(x, w, config=c.get((w.kind, w.n, w.k))),
                                        x_h, x_i))
        print(f"  {label}: {t_q * 1e3:.3f} ms a token, {q_bytes / t_q / 1e9:,.0f} GB/s, {roof_q / t_q:.0%} of roofline")

    dense = [{name: torch.randn(n, k, device=dev, dtype=torch.bfloat16, generator=gen) * 0.02
              for name, (n, k) in MATRICES.items()} for _ in range(LAYERS)]
    d_bytes = sum(w.numel() * 2 for layer in dense for w in layer.values())
    t_d = graph_seconds(decode_step(dense, lambda x, w: F.linear(x, w), x_h, x_i))
    print(f"bf16 dense ({d_bytes / 1e9:.2f} GB): {t_d * 1e3:.3f} ms a token, {d_bytes / t_d / 1e9:,.0f} GB/s, "
          f"{d_bytes / bandwidth / t_d:.0%} of its roofline")

    for name in ("gate", "down"):
        x = torch.randn(512, MATRICES[name][1], device=dev, dtype=torch.bfloat16)
        w, wd = quant[0][name], dense[0][name]
        t_g = graph_seconds(lambda: quant_gemm(x, w))
        t_dd = graph_seconds(lambda: F.linear(x, wd))
        flops = 2 * 512 * w.n * w.k
        print(f"prefill 512 tokens, {w.kind} {name} {w.n}x{w.k}: GEMM {t_g * 1e6:,.0f} us "
              f"({flops / t_g / 1e12:,.0f} TFLOP/s), bf16 dense {t_dd * 1e6:,.0f} us")


def per_matrix(label: str, ws: list, x: torch.Tensor, bandwidth: float, config: dict | None = None) -> float:
    """Time the GEMVs of `ws` back to back; prints and returns the fraction of the roofline."""
    t = graph_seconds(lambda: [quant_gemv(x, w, config=config) for w in ws]) / len(ws)
    nbytes = ws[0].nbytes
    cfg = config or gemv_config(ws[0], x.device)
    shape = f"N{cfg['BLOCK_N']} C{cfg['CHUNK']} w{cfg['num_warps']}"
    print(f"{label:>28} {shape:>12} {t * 1e6:8.1f} {nbytes / t / 1e9:6,.0f} {nbytes / bandwidth / t:6.0%}")
    return nbytes / bandwidth / t


def sweep(groups: dict, x_h: torch.Tensor, x_i: torch.Tensor, bandwidth: float) -> dict:
    """The best GEMV launch shape per (kind, n, k) of the model, each timed over the layers' copies."""
    best = {}
    print("\nGEMV launch shapes:")
    for (kind, n, k, name), ws in groups.items():
        if name == "up" or (kind, n, k) in best:
            continue
        x = x_i if name == "down" else x_h
        results = [(per_matrix(f"{kind} {name} {n}x{k}", ws, x, bandwidth, launch(s)), launch(s)) for s in SWEEP[k]]
        frac, cfg = max(results, key=lambda r: r[0])
        best[(kind, n, k)] = cfg
        print(f"  best for {kind} {n}x{k}: {cfg}: {frac:.0%}")
    return best


if __name__ == "__main__":
    main()
