"""Prompt-lookup speculative decoding: the proposer and the verification alone, then the engine's contract with
speculation on -- greedy output identical to plain decoding (batched, cached, chunked, preempted, penalized),
drafts actually accepted, stops applied token by token, rejected K/V rolled back without leaking blocks, and the
sampling distribution unchanged."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch

from nbllm import SamplingParams
from nbllm.engine.sampler import Sampler, SamplingBatch
from nbllm.engine.spec_decode import SpeculativeConfig, num_accepted, propose_ngram

from engine_helpers import assert_no_leak, make_llm

# ---------------------------------------------------------------------------------------------- proposer


def test_proposes_what_followed_the_longest_latest_suffix() -> None:
    #        0  1  2  3  4  5  6  7  8  9
    tokens = [5, 6, 7, 8, 9, 6, 7, 1, 5, 6, 7]
    # Suffix [5, 6, 7] (n=3) occurred at 0: what followed was 8, 9, 6, 7.
    assert propose_ngram(tokens, 4, ngram_max=3, ngram_min=1) == [8, 9, 6, 7]
    # Only bigrams: [6, 7] last occurred at 5, followed by 1, 5, 6, 7.
    assert propose_ngram(tokens, 4, ngram_max=2, ngram_min=2) == [1, 5, 6, 7]
    assert propose_ngram(tokens, 2, ngram_max=2, ngram_min=1) == [1, 5]


def test_short_period_copies_into_its_own_draft() -> None:
    assert propose_ngram([3, 4, 3, 4, 3], 5, ngram_max=3, ngram_min=1) == [4, 3, 4, 3, 4]
    assert propose_ngram([9, 9], 3, ngram_max=3, ngram_min=1) == [9, 9, 9]


def test_no_match_or_no_room_proposes_nothing() -> None:
    assert propose_ngram([1, 2, 3, 4], 4, ngram_max=3, ngram_min=1) == []
    assert propose_ngram([1, 2, 1, 2], 0, ngram_max=3, ngram_min=1) == []
    assert propose_ngram([7], 4, ngram_max=3, ngram_min=1) == []
    assert propose_ngram([1, 2, 3, 9, 2, 3], 2, ngram_max=3, ngram_min=3) == []  # [2, 3] too short for n=3


def test_config_is_checked() -> None:
    with pytest.raises(ValueError, match="ngram_min"):
        SpeculativeConfig(num_tokens=4, ngram_max=1, ngram_min=2)
    with pytest.raises(ValueError, match="num_tokens"):
        SpeculativeConfig(num_tokens=0)


# ---------------------------------------------------------------------------------------------- verification


def test_num_accepted_is_the_matching_prefix() -> None:
    assert num_accepted([4, 5, 6], [4, 5, 6, 7]) == 3
    assert num_accepted([4, 5, 6], [4, 9, 6, 7]) == 1
    assert num_accepted([4, 5, 6], [1, 5, 6, 7]) == 0
    assert num_accepted([], [3]) == 0
    with pytest.raises(ValueError):
        num_accepted([1, 2], [1, 2])


def _chi2_critical(df: int, z: float = 3.719) -> float:
    """Upper chi-square quantile (Wilson-Hilferty); z = 3.719 is the normal's 1e-4 tail."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _assert_follows(counts: Counter, probs: torch.Tensor) -> None:
    """Chi-square goodness of fit of observed token counts to `probs` (tokens with p = 0 must never occur)."""
    total = sum(counts.values())
    assert total > 500
    support = [t for t in range(probs.numel()) if probs[t] > 0]
    assert set(counts) <= set(support), (counts, probs)
    stat = sum((counts.get(t, 0) - total * float(probs[t])) ** 2 / (total * float(probs[t])) for t in support)
    assert stat < _chi2_critical(len(support) - 1), (stat, counts, probs)


def test_verified_tokens_follow_the_processed_target_distribution() -> None:
    """Seeded trials on a 6-token vocabulary: rows of target logits at 3 draft positions, sampled with
    temperature 0.8 and top-k 4 by the engine's sampler, verified against the draft [1, 4]. The emitted tokens
    must be distributed as plain autoregressive sampling from the processed target: the first as row 0; the
    second, when the first is the draft's, as row 1; the third as row 2."""
    logits = torch.tensor([[2.0, 1.5, 0.0, -1.0, 0.5, 1.0], [0.0, 1.0, 0.2, -2.0, 1.4, 0.9], [1.0, 0.0, 0.0, 2.0, 0.3, -0.5]])
    draft = [1, 4]
    params = SamplingParams(temperature=0.8, top_k=4)
    trials = 6000
    generator = torch.Generator().manual_seed(0)
    batch = SamplingBatch.build([params] * 3 * trials, [generator] * 3 * trials, [[] for _ in range(3 * trials)],
                                [[1] for _ in range(3 * trials)], "cpu")
    targets = Sampler()(logits.repeat(trials, 1), batch).token_ids.view(trials, 3).tolist()

    processed = []
    for row in logits / 0.8:
        kept = row >= row.topk(4).values[-1]
        processed.append(torch.where(kept, torch.softmax(row.masked_fill(~kept, -math.inf), -1), 0.0))
    first, second, third = Counter(), Counter(), Counter()
    for t in targets:
        emitted = t[: num_accepted(draft, t) + 1]
        first[emitted[0]] += 1
        if emitted[0] == draft[0]:
            second[emitted[1]] += 1
            if emitted[1] == draft[1]:
                third[emitted[2]] += 1
        else:
            assert len(emitted) == 1  # nothing is emitted after a rejected draft token
    _assert_follows(first, processed[0])
    _assert_follows(second, processed[1])
    _assert_follows(third, processed[2])


# ---------------------------------------------------------------------------------------------- engine


@pytest.fixture(scope="module")
def tiny_llama(tiny_model):
    path, _ = tiny_model("llama", "f32")
    return path


def repetitive_prompts(n: int, *, seed: int, repeats: int = 5) -> list[list[int]]:
    """Prompts that repeat a short random phrase: n-gram drafts match, and the tiny model often copies them."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        phrase = [rng.randrange(3, 320) for _ in range(rng.randint(2, 7))]
        out.append([1] + phrase * repeats + phrase[: rng.randint(0, len(phrase) - 1)])
    return out


def random_prompts(n: int, *, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 320) for _ in range(rng.randint(3, 40))] for _ in range(n)]


GREEDY = SamplingParams(max_tokens=24, temperature=0.0)


@pytest.fixture(scope="module")
def plain(tiny_llama):
    """Greedy outputs without speculation, memoized per (prompt, params)."""
    llm = make_llm(tiny_llama)
    cache: dict = {}

    def run(prompt: list[int], params: SamplingParams = GREEDY) -> list[int]:
        key = (tuple(prompt), repr(params))
        if key not in cache:
            cache[key] = llm.generate([prompt], params)[0].outputs[0].token_ids
        return cache[key]

    return run


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"enable_prefix_caching": False},
        {"max_num_batched_tokens": 8},
        {"block_size": 1},
        {"speculative_tokens": 7, "ngram_max": 4, "ngram_min": 2},
    ],
    ids=["default", "no-prefix-cache", "budget-8", "block-1", "k7-ngram2-4"],
)
def test_greedy_with_speculation_equals_plain(tiny_llama, plain, options) -> None:
    options = {"speculative_tokens": 4, **options}
    llm = make_llm(tiny_llama, **options)
    batch = repetitive_prompts(8, seed=1) + random_prompts(4, seed=2)
    outs = llm.generate(batch, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == [plain(p) for p in batch]
    stats = llm.stats()
    assert stats["spec_accepted"] > 0 and stats["spec_proposed"] >= stats["spec_accepted"]
    assert_no_leak(llm)


def test_mixed_batch_with_sampled_and_parallel_requests(tiny_llama, plain) -> None:
    llm = make_llm(tiny_llama, speculative_tokens=4)
    greedy = repetitive_prompts(4, seed=3)
    sampled = random_prompts(3, seed=4)
    params = [GREEDY] * 4 + [SamplingParams(max_tokens=20, temperature=0.8, seed=5, n=3)] * 3
    outs = llm.generate(greedy + sampled, params)
    assert [o.outputs[0].token_ids for o in outs[:4]] == [plain(p) for p in greedy]
    for o in outs[4:]:
        assert len(o.outputs) == 3 and all(len(c.token_ids) == 20 for c in o.outputs)
    assert llm.stats()["spec_accepted"] > 0
    assert_no_leak(llm)


def test_preemption_with_speculation_keeps_outputs(tiny_llama, plain) -> None:
    llm = make_llm(tiny_llama, speculative_tokens=4, kv_cache_tokens=16 * 10)
    batch = repetitive_prompts(10, seed=6, repeats=6)
    outs = llm.generate(batch, GREEDY)
    stats = llm.stats()
    assert stats["preemptions"] > 0 and stats["spec_accepted"] > 0
    assert [o.outputs[0].token_ids for o in outs] == [plain(p) for p in batch]
    assert_no_leak(llm)


def test_cached_second_run_and_penalties_keep_outputs(tiny_llama, plain) -> None:
    llm = make_llm(tiny_llama, speculative_tokens=4)
    batch = repetitive_prompts(4, seed=7)
    first = llm.generate(batch, GREEDY)
    again = llm.generate(batch, GREEDY)  # prompts now come from the prefix cache
    assert [o.outputs[0].token_ids for o in first] == [o.outputs[0].token_ids for o in again]
    assert all(o.metrics.cached_prompt_tokens > 0 for o in again if len(o.prompt_token_ids) > 16)
    # Penalties see the draft tokens before each verified position, exactly as plain decoding sees its output.
    penalized = SamplingParams(max_tokens=24, temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.5)
    outs = llm.generate(batch, penalized)
    assert [o.outputs[0].token_ids for o in outs] == [plain(p, penalized) for p in batch]
    assert_no_leak(llm)


def test_stops_apply_token_by_token_inside_accepted_drafts(tiny_llama, plain) -> None:
    llm = make_llm(tiny_llama, speculative_tokens=6)
    prompts = repetitive_prompts(6, seed=8)
    full = [plain(p) for p in prompts]
    for max_tokens in (1, 2, 5, 11):
        outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0))
        assert [o.outputs[0].token_ids for o in outs] == [f[:max_tokens] for f in full]
        assert all(o.outputs[0].finish_reason == "length" for o in outs if len(o.outputs[0].token_ids) == max_tokens)
    for p, f in zip(prompts, full):
        stop_id = f[9]
        (out,) = llm.generate([p], SamplingParams(max_tokens=24, temperature=0.0, stop_token_ids=[stop_id]))
        c = out.outputs[0]
        assert c.token_ids == f[: f.index(stop_id) + 1] and c.stop_reason == stop_id
        piece = llm.tokenizer.decode(f[6:8])
        (out,) = llm.generate([p], SamplingParams(max_tokens=24, temperature=0.0, stop=[piece]))
        text = llm.tokenizer.decode(f)
        assert out.outputs[0].text == text[: text.index(piece)]
    assert llm.stats()["spec_accepted"] > 0
    assert_no_leak(llm)


def test_logprobs_match_plain_decoding(tiny_llama) -> None:
    params = SamplingParams(max_tokens=16, temperature=0.0, logprobs=2)
    prompts = repetitive_prompts(3, seed=9)
    plain_out = make_llm(tiny_llama).generate(prompts, params)
    spec_llm = make_llm(tiny_llama, speculative_tokens=4)
    spec_out = spec_llm.generate(prompts, params)
    assert spec_llm.stats()["spec_accepted"] > 0
    for a, b in zip(plain_out, spec_out):
        ca, cb = a.outputs[0], b.outputs[0]
        assert ca.token_ids == cb.token_ids
        for ea, eb in zip(ca.logprobs, cb.logprobs):
            assert ea.keys() == eb.keys()
            assert all(ea[t] == pytest.approx(eb[t], abs=1e-4) for t in ea)


def test_rollback_releases_rejected_blocks(tiny_llama) -> None:
    """With block size 1 every rejected draft token held a block of its own: after each step every table holds
    exactly its computed tokens' blocks, none spare, and at the end the pool balances."""
    llm = make_llm(tiny_llama, speculative_tokens=6, block_size=1, enable_prefix_caching=False)
    engine = llm.engine
    step = engine.step
    checked = 0

    def checking_step():
        nonlocal checked
        outs = step()
        for seq in engine.scheduler.running:
            assert len(seq.table.blocks) == seq.table.num_tokens == seq.num_computed
            checked += 1
        return outs

    engine.step = checking_step
    llm.generate(repetitive_prompts(4, seed=10), GREEDY)
    assert checked > 0
    stats = llm.stats()
    assert 0 < stats["spec_accepted"] < stats["spec_proposed"]  # some drafts were rejected and rolled back
    assert_no_leak(llm)


@pytest.mark.slow
def test_sampled_distribution_matches_plain_decoding(tiny_llama, plain) -> None:
    """Engine level, seeded: 400 sampled continuations with and without speculation; the tokens at output
    positions 1-3 (the ones speculation can produce) have the same distribution (two-sample chi-square over the
    categories seen at least 10 times in total). The tiny random model is nearly flat, so the prompt ends in its
    own greedy loop and the temperature is low: drafts then get accepted often."""
    base = repetitive_prompts(1, seed=11)[0]
    prompt = base + plain(base)[:7]
    params = SamplingParams(max_tokens=4, temperature=0.2, n=400, seed=12)
    (plain_out,) = make_llm(tiny_llama).generate([prompt], params)
    spec_llm = make_llm(tiny_llama, speculative_tokens=3)
    (spec_out,) = spec_llm.generate([prompt], params)
    assert spec_llm.stats()["spec_accepted"] > 100
    for position in (1, 2, 3):
        a = Counter(c.token_ids[position] for c in plain_out.outputs)
        b = Counter(c.token_ids[position] for c in spec_out.outputs)
        common = [t for t in set(a) | set(b) if a[t] + b[t] >= 10]
        rest_a = sum(a.values()) - sum(a[t] for t in common)
        rest_b = sum(b.values()) - sum(b[t] for t in common)
        cells = [(a[t], b[t]) for t in common] + ([(rest_a, rest_b)] if rest_a + rest_b else [])
        stat = sum((x - y) ** 2 / (x + y) for x, y in cells)  # equal sample sizes
        assert stat < _chi2_critical(max(1, len(cells) - 1)), (position, cells)
