"""Layer offload (`n_gpu_layers`, issue 8 points 3 and 6): which parts go where, bad values, and a split model's
answers against the model on one device.

Without a GPU, the split runs through the same code between two CPU places, float32 (int8 weights) and float64
(dense): the crossing of the hidden state, the per-layer KV pools of different dtypes, the per-layer attention
dispatch and the tied head's own copy are all exercised, and float64 is exact enough that greedy tokens must
equal the float32 model's. With CUDA, `LLM(device="cuda", n_gpu_layers=N)` for N = 0, some and all must give
the CPU engine's greedy tokens in fp32 (a float GGUF: dense GPU layers), and stay close in bf16 with a Q8_0 GGUF,
whose GPU layers keep the packed bits (`GGUFLinear`, whose decode path rounds inputs to int8 as llama.cpp does).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from engine_helpers import assert_no_leak, make_llm
from tiny_models import random_prompts

from nbllm import LLM, NbllmError, SamplingParams
from nbllm.engine.core import EngineCore
from nbllm.engine.llm import _num_kv_blocks
from nbllm.engine.model_runner import KVPool
from nbllm.loader import open_weights
from nbllm.models.layers import Linear
from nbllm.models.placement import (
    CPU,
    LayerPlacement,
    Place,
    PlacementError,
    build_placed_model,
    gpu_layer_count,
    is_split,
    plan_layer_offload,
)
from nbllm.models.quantized_linear import Int8Linear

GPU = Place(torch.device("cuda", 0), torch.bfloat16)
F64 = Place(torch.device("cpu"), torch.float64)  # the stand-in accelerator of the CPU tests
PROMPT_LENGTHS = [5, 17, 40]
TOKENS = 32
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


# ---------------------------------------------------------------- what goes where


@pytest.mark.parametrize("n", [None, -1, 7])
def test_none_minus_one_and_the_layer_count_mean_all(n) -> None:
    assert gpu_layer_count(n, 7) == 7


def test_more_layers_than_the_model_has_are_clamped_with_a_warning() -> None:
    with pytest.warns(UserWarning, match=r"n_gpu_layers=99 is more than the model's 7 layers"):
        assert gpu_layer_count(99, 7) == 7


@pytest.mark.parametrize("n", [-2, -100])
def test_negative_counts_other_than_minus_one_are_errors(n) -> None:
    with pytest.raises(PlacementError, match=r"n_gpu_layers must be 0\.\.7"):
        gpu_layer_count(n, 7)


def test_the_last_layers_and_the_head_go_to_the_gpu() -> None:
    p = plan_layer_offload(6, 2, GPU)
    assert p.embed == CPU and p.head == GPU
    assert p.layers == (CPU,) * 4 + (GPU,) * 2
    assert p.crossings == {4: GPU}  # the hidden state crosses once
    assert is_split(p) and p.places == [CPU, GPU]


@pytest.mark.parametrize(("n", "place"), [(0, CPU), (6, GPU)])
def test_none_or_all_layers_is_a_model_on_one_device(n, place) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no clamping warning for a count in range
        p = plan_layer_offload(6, n, GPU)
    assert p == LayerPlacement(place, (place,) * 6, place)
    assert not is_split(p) and p.crossings == {}


def test_tensors_are_served_on_their_part_s_place() -> None:
    p = plan_layer_offload(4, 1, GPU)
    assert p.place_of_tensor("token_embd.weight") == CPU
    assert p.place_of_tensor("rope_freqs.weight") == CPU
    assert p.place_of_tensor("blk.2.attn_q.weight") == CPU
    assert p.place_of_tensor("blk.3.ffn_down.weight") == GPU
    assert p.place_of_tensor("output_norm.weight") == GPU
    assert p.place_of_tensor("output.weight") == GPU


# ---------------------------------------------------------------- bad input


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error_suggesting_cpu(tiny_model) -> None:
    path, _ = tiny_model("llama", "f32")
    with pytest.raises(NbllmError, match=r"CUDA is not available.*device='cpu'"):
        LLM(path, device="cuda", n_gpu_layers=1)


def test_gpu_layers_on_an_explicit_cpu_device_are_an_error(tiny_model) -> None:
    path, _ = tiny_model("llama", "f32")
    with pytest.raises(PlacementError, match=r"device='cpu'; use device='cuda'"):
        LLM(path, device="cpu", n_gpu_layers=1)


def test_gpu_layers_do_not_combine_with_parallelism(tiny_model) -> None:
    path, _ = tiny_model("llama", "f32")
    with pytest.raises(PlacementError, match="tensor_parallel_size or data_parallel_size"):
        LLM(path, device="cpu", n_gpu_layers=1, tensor_parallel_size=2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto is CUDA here")
def test_gpu_layers_on_auto_without_cuda_run_on_the_cpu(tiny_model) -> None:
    path, _ = tiny_model("llama", "f32")
    llm = LLM(path, device="auto", n_gpu_layers=1, kv_cache_tokens=256)
    assert llm.model.placement is None and llm.model.device.type == "cpu"


# ---------------------------------------------------------------- a split model, on two CPU places


def _greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    outs = llm.generate(prompts, SamplingParams(max_tokens=TOKENS, temperature=0.0, ignore_eos=True))
    return [o.outputs[0].token_ids for o in outs]


def _split_llm(path, n_layers_on_f64: int) -> LLM:
    """A CPU `LLM` whose model is rebuilt split between float32 and float64 (what `n_gpu_layers` builds on CUDA);
    with exact numerics, so the int8 CPU layers compute with exactly the dequantized weights as the float64 ones
    do (0: the one-device reference)."""
    llm = make_llm(path)
    weights, config, spec = open_weights(path, numerics="exact")
    placement = plan_layer_offload(config.num_layers, n_layers_on_f64, F64)
    model = build_placed_model(spec.model_class, config, weights, placement).eval()
    weights.finish()
    old = llm.engine
    llm.model = model
    llm.engine = EngineCore(model, config, llm.tokenizer, num_blocks=old.blocks.num_blocks,
                            block_size=old.block_size, scheduler_config=old.scheduler.config)
    return llm


@pytest.mark.parametrize(("arch", "n"), [("llama", 1), ("gemma3", 3)])
def test_a_split_model_gives_the_one_device_model_s_tokens(tiny_model, arch: str, n: int) -> None:
    path, _ = tiny_model(arch, "q8_0")
    prompts = random_prompts(PROMPT_LENGTHS, seed=3)
    want = _greedy(_split_llm(path, 0), prompts)
    llm = _split_llm(path, n)
    assert _greedy(llm, prompts) == want
    assert_no_leak(llm)


def test_each_part_is_built_on_its_place(tiny_model) -> None:
    path, _ = tiny_model("gemma3", "q8_0")  # tied head, 7 layers
    llm = _split_llm(path, 3)
    model, layers = llm.model, llm.model.layers
    cpu_linear = Int8Linear if isinstance(layers[0].mlp.down, Int8Linear) else Linear  # dense where no kernels
    assert all(isinstance(layer.mlp.down, cpu_linear) for layer in layers[:4])
    assert all(type(layer.mlp.down) is Linear and layer.mlp.down.weight.dtype == torch.float64 for layer in layers[4:])
    assert model.norm.weight.dtype == torch.float64
    # the tied head is a float64 copy of the token table, which stays with the embedding
    assert model.lm_head is not model.embed_tokens and model.lm_head.weight.dtype == torch.float64


def test_each_layer_s_kv_lives_in_its_place_s_pool(tiny_model) -> None:
    path, _ = tiny_model("gemma3", "q8_0")
    llm = _split_llm(path, 3)
    pool = llm.engine.runner.pool
    assert [k.dtype for k in pool.k] == [torch.float32] * 4 + [torch.float64] * 3
    assert [v.dtype for v in pool.v] == [k.dtype for k in pool.k]
    assert {k.shape[0] for k in (*pool.k, *pool.v)} == {llm.engine.blocks.num_blocks}  # one block id space


def test_the_kv_budget_counts_each_layer_s_bytes_on_its_device(tiny_model) -> None:
    path, _ = tiny_model("gemma3", "q8_0")
    model = _split_llm(path, 3).model  # 4 float32 layers, 3 float64 ones, all in the CPU's 1 GiB
    c = model.config
    slots = 2 * 16 * c.num_kv_heads * c.head_dim  # K and V values of one 16-token block of one layer
    assert _num_kv_blocks(model, 16, None) == (1 << 30) // (slots * (4 * 4 + 3 * 8))
    assert _num_kv_blocks(model, 16, 100) == 7  # an explicit token count wins


def test_copy_on_write_copies_the_block_in_every_layer_s_pool(tiny_model) -> None:
    path, _ = tiny_model("llama", "f32")
    config = open_weights(path)[1]
    pool = KVPool(config, 4, 2, places=[CPU, F64])
    for cache in (*pool.k, *pool.v):
        cache.copy_(torch.randn(cache.shape, dtype=torch.float64))
    before = [c.clone() for c in (*pool.k, *pool.v)]
    pool.copy_blocks([(1, 3), (0, 2)])
    for cache, old in zip((*pool.k, *pool.v), before, strict=True):
        assert torch.equal(cache[3], old[1]) and torch.equal(cache[2], old[0]) and torch.equal(cache[:2], old[:2])


def test_prefix_sharing_and_forks_stay_exact_when_split(tiny_model) -> None:
    """Shared prefix blocks and copy-on-write forks (n=2 from one prompt) through the split pools."""
    path, _ = tiny_model("llama", "q8_0")
    base = random_prompts([40], seed=5)[0]
    prompts = [base, base[:33] + [7, 8, 9]]
    forks = SamplingParams(max_tokens=8, temperature=1.0, seed=11, n=2, ignore_eos=True)
    one = _split_llm(path, 0)
    want = _greedy(one, prompts), [c.token_ids for c in one.generate([base], forks)[0].outputs]
    llm = _split_llm(path, 1)
    assert (_greedy(llm, prompts), [c.token_ids for c in llm.generate([base], forks)[0].outputs]) == want
    assert_no_leak(llm)


# ---------------------------------------------------------------- on a GPU


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_fp32_gpu_layers_give_the_cpu_engine_s_tokens(tiny_model, arch: str) -> None:
    path, _ = tiny_model(arch, "f32")
    prompts = random_prompts(PROMPT_LENGTHS, seed=7)
    want = _greedy(make_llm(path), prompts)
    layers = 2 if arch == "llama" else 7
    for n in (0, layers // 2, layers):
        llm = LLM(path, device="cuda", dtype=torch.float32, n_gpu_layers=n, kv_cache_tokens=4096)
        pool = llm.engine.runner.pool
        assert [k.device.type for k in pool.k] == ["cpu"] * (layers - n) + ["cuda"] * n
        assert _greedy(llm, prompts) == want, f"n_gpu_layers={n}"
        assert_no_leak(llm)
        del llm
        torch.cuda.empty_cache()


@cuda
@pytest.mark.gpu
def test_bf16_packed_gpu_layers_stay_close_to_the_cpu_engine(tiny_model) -> None:
    """bf16 GPU layers over packed Q8_0 bits follow the fp32 CPU engine token for token until a near tie (top
    two within 0.15), for most of the tokens."""
    from nbllm.models.gpu_quant_linear import GGUFLinear

    path, _ = tiny_model("gemma3", "q8_0")
    prompts = random_prompts(PROMPT_LENGTHS, seed=8)
    cpu = make_llm(path).generate(prompts, SamplingParams(max_tokens=TOKENS, temperature=0.0, ignore_eos=True,
                                                          logprobs=2))
    llm = LLM(path, device="cuda", n_gpu_layers=3, kv_cache_tokens=4096)
    assert all(isinstance(layer.mlp.down, GGUFLinear) for layer in llm.model.layers[4:])
    assert all(not isinstance(layer.mlp.down, GGUFLinear) for layer in llm.model.layers[:4])
    agreed = 0
    for want, got in zip(cpu, _greedy(llm, prompts), strict=True):
        for step, (w, g) in enumerate(zip(want.outputs[0].token_ids, got, strict=True)):
            if w != g:
                top = sorted(want.outputs[0].logprobs[step].values(), reverse=True)
                assert top[0] - top[1] < 0.15, f"step {step}: bf16 chose {g}, fp32 {w} by a clear margin"
                break
            agreed += 1
    assert agreed >= len(prompts) * TOKENS // 2
