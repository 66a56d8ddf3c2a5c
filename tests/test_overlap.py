"""Overlap scheduling (`nbllm.engine.overlap`) gives the synchronous engine's answers, on the CPU.

The overlapped loop is device agnostic (on CUDA it is on by default; `tests/test_gpu_engine.py` covers it there),
so here it is switched on for a CPU engine and compared with the synchronous engine on the same tiny model:
identical tokens, text, stop reasons and log-probabilities, with stops seen one step late, the extra token of a
finished sequence dropped and every block released.
"""

from __future__ import annotations

import random

import pytest
import torch
from engine_helpers import assert_no_leak, make_llm

from nbllm import SamplingParams
from nbllm.engine.overlap import placeholder
from nbllm.kernels.placeholders import resolve_placeholders


@pytest.fixture(scope="module")
def tiny_llama(tiny_model):
    path, _ = tiny_model("llama", "f32")
    return path


def prompts(n: int, *, seed: int, lo: int = 3, hi: int = 60) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 320) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def overlapped(path, **kwargs):
    llm = make_llm(path, **kwargs)
    llm.engine.overlap.enabled = True
    return llm


def summary(outs) -> list[tuple]:
    """What must be identical: tokens, text, stops, and which tokens have log-probabilities."""
    return [(c.token_ids, c.text, c.finish_reason, c.stop_reason, c.logprobs and [sorted(e) for e in c.logprobs])
            for o in outs for c in o.outputs]


def logprob_values(outs) -> list[float]:
    """Equal to float rounding only: the two runs batch differently, which moves the last bits."""
    return [e[t] for o in outs for c in o.outputs for e in c.logprobs or [] for t in sorted(e)]


def mixed_params(n: int) -> list[SamplingParams]:
    """Greedy and seeded sampling with filters, EOS honoured or not, stop strings and ids, logprobs."""
    rng = random.Random(0)
    kinds = [
        lambda k: SamplingParams(max_tokens=k, temperature=0.0, ignore_eos=True),
        lambda k: SamplingParams(max_tokens=k, temperature=0.8, top_p=0.9, top_k=50, seed=k),
        lambda k: SamplingParams(max_tokens=k, temperature=0.0, logprobs=2),
        lambda k: SamplingParams(max_tokens=k, temperature=1.0, min_p=0.05, seed=k, stop=["e", "a"]),
        lambda k: SamplingParams(max_tokens=k, temperature=0.0, stop_token_ids=[5, 7, 11, 13]),
    ]
    return [kinds[i % len(kinds)](rng.randint(1, 24)) for i in range(n)]


def test_placeholders_are_resolved_from_the_sampled_rows() -> None:
    ids = torch.tensor([5, placeholder(0), 9, placeholder(2), placeholder(1)])
    resolve_placeholders(ids, torch.tensor([100, 101, 102]))
    assert ids.tolist() == [5, 100, 9, 102, 101]


@pytest.mark.parametrize("options", [{}, {"max_num_batched_tokens": 32}, {"kv_cache_tokens": 16 * 12}],
                         ids=["plain", "chunked-prefill", "preemption"])
def test_overlap_equals_the_synchronous_engine(tiny_llama, options) -> None:
    batch = prompts(16, seed=1, lo=20 if "kv_cache_tokens" in options else 3)
    params = mixed_params(len(batch))
    sync = make_llm(tiny_llama, **options)
    want = sync.generate(batch, params)
    llm = overlapped(tiny_llama, **options)
    steps = []
    original = llm.engine.overlap.step
    llm.engine.overlap.step = lambda: steps.append(1) or original()
    got = llm.generate(batch, params)
    assert steps, "the overlapped loop did not run"
    assert summary(got) == summary(want)
    assert logprob_values(got) == pytest.approx(logprob_values(want), abs=1e-4)
    if "kv_cache_tokens" in options:
        assert llm.stats()["preemptions"] > 0
    assert llm.stats()["generated_tokens"] == sync.stats()["generated_tokens"]  # dropped tokens are not counted
    assert not llm.engine.has_unfinished()
    assert_no_leak(llm)


def test_a_finished_sequence_is_computed_once_more_and_its_token_dropped(tiny_llama) -> None:
    p = prompts(1, seed=2)[0]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    counts = {}
    for name, llm in (("sync", make_llm(tiny_llama)), ("overlap", overlapped(tiny_llama))):
        (out,) = llm.generate([p], params)
        counts[name] = llm.stats()["steps"]
        assert len(out.outputs[0].token_ids) == 6
        assert out.outputs[0].finish_reason == "length"
        assert_no_leak(llm)
    assert counts["overlap"] == counts["sync"] + 1  # stop seen one step late


def test_stream_of_requests_with_one_that_needs_the_synchronous_step(tiny_llama) -> None:
    """A penalty request arriving mid-run drains the step in flight; later steps run synchronously, and the
    loop resumes once it is gone. Greedy answers do not depend on the batching, so the final outputs match."""
    batch = prompts(6, seed=3)
    plain = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    penalised = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, repetition_penalty=1.3)
    want = make_llm(tiny_llama).generate(batch, [plain] * 5 + [penalised])
    llm = overlapped(tiny_llama)
    engine = llm.engine
    results = {}
    for i in range(5):
        engine.add_request(f"r{i}", batch[i], plain)
    for _ in range(3):
        results.update({o.request_id: o for o in engine.step()})
    assert engine.overlap.inflight is not None
    engine.add_request("r5", batch[5], penalised)
    assert not engine.overlap.eligible()
    while engine.has_unfinished():
        results.update({o.request_id: o for o in engine.step()})
    assert engine.overlap.inflight is None
    assert summary(results[f"r{i}"] for i in range(6)) == summary(want)
    assert_no_leak(llm)


def test_abort_while_a_token_is_in_flight(tiny_llama) -> None:
    batch = prompts(4, seed=4)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    want = make_llm(tiny_llama).generate(batch[1:], params)
    llm = overlapped(tiny_llama)
    engine = llm.engine
    for i, p in enumerate(batch):
        engine.add_request(f"r{i}", p, params)
    results = {}
    for _ in range(4):
        results.update({o.request_id: o for o in engine.step()})
    engine.abort("r0")
    while engine.has_unfinished():
        results.update({o.request_id: o for o in engine.step()})
    assert summary(results[f"r{i}"] for i in range(1, 4)) == summary(want)
    assert all(t >= 0 for seq in results["r0"].outputs for t in seq.token_ids)
    assert_no_leak(llm)

