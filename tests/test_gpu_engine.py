"""The CUDA engine gives the CPU engine's answers: greedy tokens equal in fp32, close in bf16 (issue 7).

Each tiny model (random weights, GGUF with its placeholder vocabulary) answers a batch of prompts of different
lengths on both devices. On CUDA that exercises the Triton extend kernel for the prefills, the graph-captured
decode buckets (batch 5 pads to 8), the fused q/k/v and gate/up projections, the Triton norms and rotary, and
for Gemma 3 the sliding-window layers and logit softcapping.
"""

from __future__ import annotations

import pytest
import torch
from engine_helpers import make_llm
from tiny_models import random_prompts

from nbllm import LLM, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

ARCHS = ["llama", "qwen2", "qwen3", "gemma3"]
PROMPT_LENGTHS = [5, 17, 40, 64, 100]
TOKENS = 32


def greedy(llm: LLM, prompts: list[list[int]], logprobs: int) -> list[tuple[list[int], list[dict[int, float]]]]:
    outs = llm.generate(prompts, SamplingParams(max_tokens=TOKENS, temperature=0.0, ignore_eos=True,
                                                logprobs=logprobs))
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]


@pytest.mark.parametrize("arch", ARCHS)
def test_fp32_greedy_tokens_equal_the_cpu_engine(tiny_model, arch: str) -> None:
    path, _ = tiny_model(arch, "f32")
    prompts = random_prompts(PROMPT_LENGTHS, seed=7)
    cpu = greedy(make_llm(path), prompts, logprobs=0)
    gpu = greedy(LLM(path, device="cuda", dtype=torch.float32, kv_cache_tokens=4096), prompts, logprobs=0)
    assert [ids for ids, _ in gpu] == [ids for ids, _ in cpu]


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_stays_close_to_the_cpu_engine(tiny_model, arch: str) -> None:
    """bf16 follows fp32 token for token, with the chosen tokens' log-probabilities within 0.1, until a step
    where fp32's two best tokens were within 0.15 of each other (a near tie bf16 may break either way)."""
    path, _ = tiny_model(arch, "f32")
    prompts = random_prompts(PROMPT_LENGTHS, seed=8)
    cpu = greedy(make_llm(path), prompts, logprobs=2)
    gpu = greedy(LLM(path, device="cuda", kv_cache_tokens=4096), prompts, logprobs=1)
    agreed = 0
    for (cpu_ids, cpu_lp), (gpu_ids, gpu_lp) in zip(cpu, gpu, strict=True):
        for step, (want, got) in enumerate(zip(cpu_ids, gpu_ids, strict=True)):
            if want != got:
                top = sorted(cpu_lp[step].values(), reverse=True)
                assert top[0] - top[1] < 0.15, f"step {step}: bf16 chose {got}, fp32 {want} by a clear margin"
                break
            assert abs(gpu_lp[step][got] - cpu_lp[step][want]) < 0.1
            agreed += 1
    assert agreed >= len(prompts) * TOKENS // 2  # mostly the same answers, not only up to early ties


def test_overlap_scheduling_keeps_the_answers(tiny_model) -> None:
    """Overlap scheduling (on by default on CUDA) against the same engine stepping synchronously, fp32: greedy,
    seeded sampling, stop ids and log-probabilities; sequences that finish at different steps (one step late
    with the overlap) release every block."""
    from engine_helpers import assert_no_leak

    path, _ = tiny_model("llama", "f32")
    prompts = random_prompts(PROMPT_LENGTHS * 3, seed=9)
    params = [SamplingParams(max_tokens=4 + 3 * i, temperature=0.0 if i % 2 else 0.8, seed=i, logprobs=1,
                             stop_token_ids=[5, 9] if i % 3 == 0 else None, ignore_eos=True)
              for i in range(len(prompts))]
    llm = LLM(path, device="cuda", dtype=torch.float32, kv_cache_tokens=4096)
    assert llm.engine.overlap.enabled
    got = llm.generate(prompts, params)
    assert not llm.engine.has_unfinished()
    assert_no_leak(llm)
    llm.engine.overlap.enabled = False
    want = llm.generate(prompts, params)
    for g, w in zip(got, want, strict=True):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        assert g.outputs[0].finish_reason == w.outputs[0].finish_reason
        got_lp = [e[t] for t, e in zip(g.outputs[0].token_ids, g.outputs[0].logprobs)]
        want_lp = [e[t] for t, e in zip(w.outputs[0].token_ids, w.outputs[0].logprobs)]
        assert got_lp == pytest.approx(want_lp, abs=1e-4)


def test_the_decode_graphs_greedy_tokens_equal_the_samplers(tiny_model) -> None:
    """Plain greedy steps take their tokens and log-probabilities from the decode graph's own argmax (no sampling
    launch); asked for a top log-probability, the same steps go through the sampler: bit-identical answers, bf16."""
    path, _ = tiny_model("qwen3", "f32")
    prompts = random_prompts(PROMPT_LENGTHS, seed=10)
    llm = LLM(path, device="cuda", kv_cache_tokens=4096, enable_prefix_caching=False)
    short, general = greedy(llm, prompts, logprobs=0), greedy(llm, prompts, logprobs=1)
    for (ids, lps), (want_ids, want_lps) in zip(short, general, strict=True):
        assert ids == want_ids
        assert [e[t] for t, e in zip(ids, lps)] == [e[t] for t, e in zip(want_ids, want_lps)]


def test_a_steady_decode_leaves_its_next_inputs_on_the_device(tiny_model) -> None:
    """Batch-1 greedy decode: each replay's argmax writes the next step's inputs, so the host copies them only
    when they differ (the first step, and a sequence entering a new 16-token block, whose slot the replay before
    could not know), and the answers are the CPU engine's."""
    path, _ = tiny_model("qwen3", "f32")
    prompt = random_prompts([20], seed=11)
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    llm = LLM(path, device="cuda", dtype=torch.float32, kv_cache_tokens=4096)
    got = llm.generate(prompt, params)[0].outputs[0].token_ids
    graphs = llm.engine.runner.graphs
    replays = len(got) - 1  # the prompt's step samples the first token
    assert graphs.input_copies <= 1 + replays // 16 + 1 < replays // 4
    assert make_llm(path).generate(prompt, params)[0].outputs[0].token_ids == got
