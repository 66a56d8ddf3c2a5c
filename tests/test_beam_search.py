"""`LLM.beam_search`: the same beams and scores as HF transformers' beam search on the tiny model's weights, beams
sharing KV blocks (fewer blocks than unshared beams need), no leaks, and the engine usable afterwards."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from nbllm import LLM, NbllmError, SamplingParams
from nbllm.engine.beam_search import BeamSearchOutput


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return tiny_model("llama", "f32")  # (GGUF path, HF twin with the same weights)


def make_llm(path, **kwargs) -> LLM:
    kwargs.setdefault("kv_cache_tokens", 4096)
    return LLM(path, device="cpu", **kwargs)


def assert_no_leak(llm: LLM) -> None:
    engine = llm.engine
    assert not engine.scheduler.running and not engine.scheduler.waiting and not engine.requests
    cached = engine.radix.cached_blocks() if engine.radix else 0
    assert engine.blocks.num_used_blocks == cached
    llm.reset_prefix_cache()
    assert engine.blocks.num_used_blocks == 0


def prompts(n: int, *, seed: int, lo: int = 5, hi: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 320) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def hf_beams(hf, prompt: list[int], width: int, max_new: int, *, eos: int | None, length_penalty: float = 1.0):
    """HF's beams for one prompt: (generated ids up to and including EOS, score), best first."""
    saved, hf.generation_config.eos_token_id = hf.generation_config.eos_token_id, eos  # a shared fixture
    try:
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), num_beams=width, num_return_sequences=width, do_sample=False,
                              max_new_tokens=max_new, length_penalty=length_penalty, early_stopping="never",
                              pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    finally:
        hf.generation_config.eos_token_id = saved
    beams = []
    for seq, score in zip(out.sequences, out.sequences_scores.tolist()):
        ids = seq[len(prompt):].tolist()
        if eos is not None and eos in ids:
            ids = ids[: ids.index(eos) + 1]
        beams.append((ids, score))
    return beams


@pytest.mark.parametrize("width", [1, 3])
def test_matches_hf_beam_search_without_eos(tiny, width) -> None:
    path, hf = tiny
    llm = make_llm(path)
    batch = prompts(3, seed=1)
    outs = llm.beam_search(batch, width, 8, ignore_eos=True)
    assert all(isinstance(o, BeamSearchOutput) and len(o.sequences) == width for o in outs)
    for p, out in zip(batch, outs):
        if width == 1:
            break  # HF runs greedy search for one beam; compared with greedy below
        expected = hf_beams(hf, p, width, 8, eos=None)
        assert [b.output_token_ids for b in out.sequences] == [ids for ids, _ in expected]
        for beam, (_, score) in zip(out.sequences, expected):
            assert beam.tokens[: len(p)] == p and beam.finish_reason == "length"
            assert beam.score == pytest.approx(score, abs=1e-4)
            assert beam.cum_logprob == pytest.approx(sum(lp for d in beam.logprobs for lp in d.values()), abs=1e-4)
    if width == 1:  # a beam of one is greedy decoding
        greedy = llm.generate(batch, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
        assert [o.sequences[0].output_token_ids for o in outs] == [g.outputs[0].token_ids for g in greedy]
    assert_no_leak(llm)


@pytest.mark.parametrize("length_penalty", [1.0, 2.0, 0.5])
def test_matches_hf_beam_search_with_eos(tiny, monkeypatch, length_penalty) -> None:
    """EOS made common: among the tokens the tiny model's greedy outputs use most, the first that ends some
    beams is declared EOS on both sides."""
    path, hf = tiny
    llm = make_llm(path)
    batch = prompts(4, seed=2)
    greedy = llm.generate(batch, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    for eos, _ in Counter(t for g in greedy for t in g.outputs[0].token_ids).most_common(8):
        monkeypatch.setattr(llm.tokenizer, "eos_token_ids", frozenset({eos}))
        outs = llm.beam_search(batch, 3, 10, length_penalty=length_penalty)
        if any(b.finish_reason == "stop" for o in outs for b in o.sequences):
            break
    else:
        pytest.fail("no candidate EOS id ends a beam")
    for p, out in zip(batch, outs):
        expected = hf_beams(hf, p, 3, 10, eos=eos, length_penalty=length_penalty)
        assert [b.output_token_ids for b in out.sequences] == [ids for ids, _ in expected]
        for beam, (_, score) in zip(out.sequences, expected):
            assert beam.score == pytest.approx(score, abs=1e-4)
            assert (beam.finish_reason == "stop") == (beam.output_token_ids[-1] == eos)
    assert_no_leak(llm)


def test_beams_share_blocks(tiny, capsys) -> None:
    """A 70-token prompt and 4 beams of 20 tokens, blocks of 16: measured peak blocks in use vs what the same
    beams would hold without sharing (the sum of their table lengths at the same moment)."""
    path, _ = tiny
    llm = make_llm(path, enable_prefix_caching=False)
    engine = llm.engine
    forward = engine.forward
    used, unshared = [], []

    def spy():
        result = forward()
        used.append(engine.blocks.num_used_blocks)
        unshared.append(sum(len(s.table.blocks) for s in engine.scheduler.running))
        return result

    engine.forward = spy
    (out,) = llm.beam_search([prompts(1, seed=3, lo=69, hi=69)[0]], 4, 20, ignore_eos=True)
    assert len(out.sequences) == 4
    # Unshared: 4 beams x ceil(90 / 16) = 24 blocks at the end. Shared: the 4 full prompt blocks once, each
    # beam's own blocks from the prompt's partial block on (2 each) = 12 at most.
    with capsys.disabled():
        print(f"\nbeam search blocks: peak used {max(used)}, unshared beams would hold {max(unshared)}")
    assert max(used) <= 12 < max(unshared) == 24
    assert_no_leak(llm)


def test_chunked_prefill_prefix_cache_and_reuse(tiny) -> None:
    """Prompts prefilled over several steps (beams that are done wait for their siblings), a second search from
    the prefix cache, and plain generation afterwards: all give the same results."""
    path, _ = tiny
    batch = prompts(3, seed=4, lo=30, hi=60)
    expected = [[b.tokens for b in o.sequences] for o in make_llm(path).beam_search(batch, 2, 6)]
    llm = make_llm(path, max_num_batched_tokens=16)
    computed = []
    for _ in range(2):
        before = llm.engine.totals.prefill_tokens_computed
        outs = llm.beam_search(batch, 2, 6)
        assert [[b.tokens for b in o.sequences] for o in outs] == expected
        computed.append(llm.engine.totals.prefill_tokens_computed - before)
    assert computed[1] <= computed[0] - 16 * 3  # each prompt's first block at least came from the cache
    assert llm.generate(batch[:1], SamplingParams(max_tokens=4, temperature=0.0))[0].outputs[0].token_ids
    assert_no_leak(llm)


def test_bad_arguments_and_interrupt_leave_a_clean_engine(tiny) -> None:
    path, _ = tiny
    llm = make_llm(path)
    with pytest.raises(NbllmError, match="beam_width"):
        llm.beam_search([[1, 5, 6]], 0, 4)
    with pytest.raises(NbllmError, match="vocabulary"):
        llm.beam_search([[1, 5, 6]], 1000, 4)
    engine = llm.engine
    forward = engine.forward
    calls = 0

    def interrupting():
        nonlocal calls
        calls += 1
        if calls == 3:
            raise KeyboardInterrupt
        return forward()

    engine.forward = interrupting
    with pytest.raises(KeyboardInterrupt):
        llm.beam_search(prompts(2, seed=5), 3, 8)
    engine.forward = forward
    assert_no_leak(llm)
    (out,) = llm.beam_search(prompts(1, seed=6), 2, 4)
    assert len(out.sequences) == 2
    assert_no_leak(llm)
