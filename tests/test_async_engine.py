"""AsyncLLM: streamed deltas add up to the blocking result, requests in flight share steps, abort frees blocks."""

from __future__ import annotations

import asyncio

import pytest

from nbllm import LLM, SamplingParams
from nbllm.engine.async_engine import AsyncLLM
from nbllm.engine.core import PromptTooLongError

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


@pytest.fixture(scope="module")
def async_llm(tiny_model):
    path, _ = tiny_model("llama", "f32")
    engine = AsyncLLM(LLM(path, device="cpu", kv_cache_tokens=4096))
    yield engine
    engine.shutdown()


async def collect(engine: AsyncLLM, prompt, params=GREEDY):
    outs = [out async for out in engine.generate(prompt, params)]
    return outs


def test_stream_matches_blocking_generate(async_llm) -> None:
    prompts = [[1, 5, 9, 13, 17], [1, 40, 41, 42], [1, 100, 200, 300, 7, 8]]
    expected = [o.outputs[0].token_ids for o in async_llm.llm.generate(prompts, GREEDY)]

    async def main():
        return await asyncio.gather(*(collect(async_llm, p) for p in prompts))

    streams = asyncio.run(main())
    for outs, want in zip(streams, expected):
        assert outs[-1].finished and not any(o.finished for o in outs[:-1])
        final = outs[-1].outputs[0]
        assert final.token_ids == want
        assert [t for o in outs for t in o.outputs[0].token_ids_delta] == want
        assert "".join(o.outputs[0].text_delta for o in outs) == final.text
    assert async_llm.engine.stats()["running"] == 0


def test_leaving_early_aborts_and_frees_blocks(async_llm) -> None:
    async def main():
        async for out in async_llm.generate([1, 2, 3, 4, 5, 6], SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)):
            if len(out.outputs[0].token_ids) >= 3:
                break
        await asyncio.sleep(0.2)

    asyncio.run(main())
    engine = async_llm.engine
    assert not engine.requests and not engine.scheduler.running
    cached = engine.radix.cached_blocks()
    assert engine.blocks.num_used_blocks == cached


def test_bad_request_fails_only_its_caller(async_llm) -> None:
    async def main():
        bad = collect(async_llm, [1] * 5000)
        good = collect(async_llm, [1, 5, 9])
        return await asyncio.gather(bad, good, return_exceptions=True)

    bad, good = asyncio.run(main())
    assert isinstance(bad, PromptTooLongError)
    assert good[-1].finished
