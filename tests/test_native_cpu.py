"""The one-call CPU decoder (`nbllm.models.native_cpu`): bit for bit the model's modules, on the default model and
on tiny ones, through prefill chunks, batched decode, sliding windows and prefix hits; other models keep the
module path."""

from __future__ import annotations

import pytest

from nbllm import LLM, SamplingParams
from nbllm.kernels.cpu_library import unavailable_reason
from nbllm.models.native_cpu import NativeDecoder

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=f"CPU kernels: {unavailable_reason()}")

# Different lengths (sliding windows of 4 on the tiny Gemma are crossed), a shared prefix (a cache hit).
PROMPTS = ["The capital of France is", "Write a haiku about the sea, the wind and the long grey rocks of the shore:",
           "1, 2, 3, 4, 5,", "The capital of France is a city where"]


def _runs(llm: LLM, native: bool) -> list[tuple[list[int], list[dict[int, float]]]]:
    llm.model.use_native_cpu = native
    params = SamplingParams(max_tokens=10, temperature=0, logprobs=3, ignore_eos=True)
    outs = llm.generate(PROMPTS, params) + llm.generate(PROMPTS[3:], params)  # the second call hits the cache
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]


def _check_bit_identical(llm: LLM, monkeypatch) -> None:
    calls = []
    run = NativeDecoder.__call__
    monkeypatch.setattr(NativeDecoder, "__call__", lambda self, *args: calls.append(1) or run(self, *args))
    native = _runs(llm, True)
    steps = len(calls)
    assert steps > 0  # the C++ program ran every step (else both runs below would be the module path)
    llm.reset_prefix_cache()  # the module path computes every prompt again
    assert native == _runs(llm, False)
    assert len(calls) == steps  # and not on the module path


@pytest.mark.slow
def test_default_model_one_call_decoder_is_bit_identical(default_model_path, monkeypatch) -> None:
    # 16-token chunks: prompts are prefilled over several steps, beside other sequences' decode tokens.
    _check_bit_identical(LLM(str(default_model_path), max_num_batched_tokens=16, max_num_seqs=4), monkeypatch)


@pytest.mark.parametrize(("arch", "fmt"), [("gemma3", "q8_0"), ("gemma3", "q4_k"), ("qwen3", "q8_0"), ("llama", "q8_0")])
def test_tiny_model_one_call_decoder_is_bit_identical(tiny_model, monkeypatch, arch: str, fmt: str) -> None:
    path, _ = tiny_model(arch, fmt)
    _check_bit_identical(LLM(str(path), max_num_batched_tokens=8), monkeypatch)


def test_models_it_does_not_compute_keep_the_module_path(tiny_model) -> None:
    path, _ = tiny_model("gemma3", "q8_0")
    assert LLM(str(path), numerics="exact").model._native() is None  # fp32 activations: not the program's linears
    qwen2, _ = tiny_model("qwen2", "q8_0")
    assert LLM(str(qwen2)).model._native() is None  # q/k/v biases
