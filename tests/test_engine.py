"""The engine's contract (DESIGN.md invariants) on tiny random models: greedy output equals the unpaged
reference whatever the batching, chunking, caching or preemption; no block leaks; bad input fails cleanly."""

from __future__ import annotations

import random

import pytest

from nbllm import NbllmError, SamplingParams
from nbllm.engine.core import PromptTooLongError
from nbllm.engine.sampling_params import InvalidSamplingParams
from nbllm.models.reference import greedy_generate

from engine_helpers import assert_no_leak, interrupt_at_step, make_llm

MAX_NEW = 16


@pytest.fixture(scope="module")
def tiny_llama(tiny_model):
    path, _ = tiny_model("llama", "f32")
    return path


def prompts(n: int, *, seed: int = 0, lo: int = 3, hi: int = 60, vocab: int = 320) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


@pytest.fixture(scope="module")
def reference(tiny_llama):
    llm = make_llm(tiny_llama)
    cache: dict[tuple[int, ...], list[int]] = {}

    def ref(prompt: list[int], max_new: int = MAX_NEW) -> list[int]:
        key = (*prompt, -max_new)
        if key not in cache:
            cache[key] = greedy_generate(llm.model, prompt, max_new, llm.tokenizer.eos_token_ids)
        return cache[key]

    return ref


GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)


def test_alone_equals_reference(tiny_llama, reference) -> None:
    llm = make_llm(tiny_llama)
    for p in prompts(3, seed=1):
        (out,) = llm.generate([p], GREEDY)
        assert out.outputs[0].token_ids == reference(p)
        assert out.prompt_token_ids == p
    assert_no_leak(llm)


@pytest.mark.parametrize(
    "options",
    [
        dict(enable_prefix_caching=True),
        dict(enable_prefix_caching=False),
        dict(max_num_batched_tokens=32),
        dict(max_num_seqs=5),
        dict(block_size=1),
        dict(block_size=32),
    ],
    ids=["prefix-cache", "no-prefix-cache", "chunks-32", "max-seqs-5", "block-1", "block-32"],
)
def test_batch_of_16_equals_reference(tiny_llama, reference, options) -> None:
    llm = make_llm(tiny_llama, **options)
    batch = prompts(16, seed=2)
    outs = llm.generate(batch, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == [reference(p) for p in batch]
    assert_no_leak(llm)


def test_forced_preemption_keeps_outputs(tiny_llama, reference) -> None:
    llm = make_llm(tiny_llama, kv_cache_tokens=16 * 12)  # 12 blocks: far less than 16 requests need together
    batch = prompts(16, seed=3, lo=20, hi=60)
    outs = llm.generate(batch, GREEDY)
    assert llm.stats()["preemptions"] > 0
    assert [o.outputs[0].token_ids for o in outs] == [reference(p) for p in batch]
    assert_no_leak(llm)


def test_shared_prefix_hits_cache_and_keeps_outputs(tiny_llama, reference) -> None:
    llm = make_llm(tiny_llama)
    system = prompts(1, seed=4, lo=70, hi=70)[0]
    questions = [system + q[1:] for q in prompts(6, seed=5, lo=3, hi=10)]
    llm.generate(questions[:1], GREEDY)
    outs = llm.generate(questions[1:], GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == [reference(p) for p in questions[1:]]
    hits = [o.metrics.cached_prompt_tokens for o in outs]
    assert all(h >= 64 for h in hits), hits  # the 71-token shared prefix: 4 full blocks of 16
    stats = llm.stats()
    assert stats["cached_prompt_tokens"] >= 64 * 5
    assert_no_leak(llm)


def test_second_chat_turn_reuses_first_turn(tiny_llama) -> None:
    llm = make_llm(tiny_llama)
    turn1 = prompts(1, seed=6, lo=50, hi=50)[0]
    (first,) = llm.generate([turn1], GREEDY)
    turn2 = turn1 + first.outputs[0].token_ids + [7, 8, 9]
    (second,) = llm.generate([turn2], GREEDY)
    computed = len(turn1) + len(first.outputs[0].token_ids) - 1  # the last sampled token has no K/V yet
    assert second.metrics.cached_prompt_tokens == computed // 16 * 16
    assert_no_leak(llm)


def test_seeded_sampling_is_independent_of_batch(tiny_llama) -> None:
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=1234)
    p = prompts(1, seed=7)[0]
    alone = make_llm(tiny_llama).generate([p], params)[0].outputs[0].token_ids
    others = prompts(7, seed=8)
    mixed = make_llm(tiny_llama).generate(others[:3] + [p] + others[3:], [SamplingParams(max_tokens=12, temperature=1.0)] * 3 + [params] + [SamplingParams(max_tokens=12, temperature=0.5)] * 4)
    assert mixed[3].outputs[0].token_ids == alone


def test_parallel_sampling_shares_prompt_blocks(tiny_llama) -> None:
    llm = make_llm(tiny_llama, enable_prefix_caching=False)
    p = prompts(1, seed=9, lo=40, hi=40)[0]  # 41 tokens: 2 full blocks and a partial one
    params = SamplingParams(n=4, max_tokens=8, temperature=1.0, seed=3)
    used = []
    engine = llm.engine
    original = engine.runner.execute

    def spy(batch):
        result = original(batch)
        used.append(engine.blocks.num_used_blocks)
        return result

    engine.runner.execute = spy
    (out,) = llm.generate([p], params)
    assert len(out.outputs) == 4 and [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    assert all(len(c.token_ids) == 8 for c in out.outputs)
    # 4 unshared copies would need 4 * 4 = 16 blocks for 49 tokens; sharing the 2 full prompt blocks needs 10.
    assert max(used) <= 10
    assert_no_leak(llm)


def test_stop_strings_ids_and_lengths(tiny_llama, reference) -> None:
    llm = make_llm(tiny_llama)
    p = prompts(1, seed=10)[0]
    full = reference(p)
    (whole,) = llm.generate([p], GREEDY)
    text = whole.outputs[0].text  # a continuation: a leading space of its first token is kept
    piece = text[len(text) // 3 : len(text) // 3 + 4]
    (out,) = llm.generate([p], SamplingParams(max_tokens=MAX_NEW, temperature=0, stop=[piece]))
    c = out.outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == piece
    assert c.text == text[: text.index(piece)]
    (out,) = llm.generate([p], SamplingParams(max_tokens=MAX_NEW, temperature=0, stop_token_ids=[full[2]]))
    assert out.outputs[0].token_ids == full[:3] and out.outputs[0].stop_reason == full[2]
    (out,) = llm.generate([p], SamplingParams(max_tokens=4, temperature=0))
    assert out.outputs[0].token_ids == full[:4] and out.outputs[0].finish_reason == "length"
    assert_no_leak(llm)


def test_logprobs_are_reported(tiny_llama) -> None:
    llm = make_llm(tiny_llama)
    (out,) = llm.generate([prompts(1, seed=11)[0]], SamplingParams(max_tokens=5, temperature=0, logprobs=3))
    c = out.outputs[0]
    assert len(c.logprobs) == 5
    for token, entry in zip(c.token_ids, c.logprobs):
        assert token in entry and len(entry) >= 3
        assert entry[token] == max(entry.values())  # greedy picks the most likely token
    assert c.cumulative_logprob == pytest.approx(sum(e[t] for t, e in zip(c.token_ids, c.logprobs)))


def test_prompt_too_long_fails_before_any_work(tiny_llama) -> None:
    llm = make_llm(tiny_llama)
    with pytest.raises(PromptTooLongError, match="context"):
        llm.generate([[1] * 300, [1, 2, 3]], GREEDY)
    assert llm.stats()["steps"] == 0
    with pytest.raises(InvalidSamplingParams, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(NbllmError):
        llm.generate([[1, 999999]], GREEDY)
    assert_no_leak(llm)


def test_interrupt_leaves_no_request_and_no_block(tiny_llama, reference) -> None:
    llm = make_llm(tiny_llama)
    engine = llm.engine
    with pytest.raises(KeyboardInterrupt), interrupt_at_step(engine, 3):
        llm.generate(prompts(4, seed=12), GREEDY)
    assert not engine.requests
    assert_no_leak(llm)
    p = prompts(1, seed=13)[0]
    assert llm.generate([p], GREEDY)[0].outputs[0].token_ids == reference(p)


def test_final_only_requests_get_one_output_equal_to_the_streamed_ones_last(tiny_llama) -> None:
    """RequestOutputKind.FINAL_ONLY (what `LLM.generate` asks for): the engine builds one output per request, when
    it finishes, equal to the last of the outputs a CUMULATIVE request with the same settings streams; a
    CUMULATIVE request in the same batch keeps its per-step outputs."""
    from nbllm import RequestOutputKind

    llm = make_llm(tiny_llama)
    engine = llm.engine
    settings = {"max_tokens": 12, "temperature": 0.8, "seed": 5, "logprobs": 1, "ignore_eos": True}
    final = SamplingParams(**settings, output_kind=RequestOutputKind.FINAL_ONLY)
    streamed = SamplingParams(**settings)
    prompt = prompts(1, seed=9)[0]
    engine.add_request("final", prompt, final)
    engine.add_request("streamed", prompt, streamed)
    seen: dict[str, list] = {"final": [], "streamed": []}
    while engine.has_unfinished():
        for out in engine.step():
            seen[out.request_id].append(out)
    assert len(seen["final"]) == 1 and seen["final"][0].finished
    assert len(seen["streamed"]) > 1
    got, want = seen["final"][0].outputs[0], seen["streamed"][-1].outputs[0]
    assert (got.token_ids, got.text, got.finish_reason, got.logprobs) == (
        want.token_ids, want.text, want.finish_reason, want.logprobs)
    assert got.text_delta == got.text  # nothing of it was emitted before
    assert_no_leak(llm)


def test_generate_leaves_the_callers_sampling_params_as_they_were(tiny_llama) -> None:
    from nbllm import RequestOutputKind

    llm = make_llm(tiny_llama)
    params = SamplingParams(max_tokens=4, temperature=0.0)
    outs = llm.generate(prompts(3, seed=2), params)
    assert [len(o.outputs[0].token_ids) for o in outs] == [4, 4, 4]
    assert params.output_kind is RequestOutputKind.CUMULATIVE
