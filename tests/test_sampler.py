"""Sampler against transformers' logits processors, sampling statistics, seeds and raw logprobs."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from nbllm.engine.sampler import Sampler, SamplingBatch, apply_penalties_, filter_thresholds
from nbllm.engine.sampling_params import SamplingParams


def build(params, generators=None, outputs=None, prompts=None) -> SamplingBatch:
    rows = len(params)
    return SamplingBatch.build(
        params,
        generators if generators is not None else [None] * rows,
        outputs if outputs is not None else [[] for _ in params],
        prompts if prompts is not None else [[] for _ in params],
        "cpu",
    )


def seeded(seeds) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def hf_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """One row through transformers' warpers in generate()'s order: temperature, top-k, top-p, min-p."""
    scores, ids = logits[None].clone(), torch.zeros(1, 1, dtype=torch.long)
    warpers = [TemperatureLogitsWarper(p.temperature)]
    warpers += [TopKLogitsWarper(p.top_k)] if p.top_k > 0 else []
    warpers += [TopPLogitsWarper(p.top_p)] if p.top_p < 1 else []
    warpers += [MinPLogitsWarper(p.min_p)] if p.min_p > 0 else []
    for warper in warpers:
        scores = warper(ids, scores)
    return torch.softmax(scores, dim=-1)[0]


def our_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    batch = build(params)
    scaled = logits / batch.temperature[:, None]
    threshold = filter_thresholds(scaled, torch.softmax(scaled, -1), batch.top_k, batch.top_p, batch.min_p)
    return torch.softmax(scaled.masked_fill(scaled < threshold[:, None], -math.inf), dim=-1)


FILTERS = [
    {"temperature": 0.5},
    {"temperature": 1.7},
    {"top_k": 1},
    {"top_k": 5},
    {"top_k": 50, "temperature": 0.8},
    {"top_k": 3000},  # larger than the vocabulary: off
    {"top_p": 0.5},
    {"top_p": 0.9, "temperature": 1.3},
    {"top_p": 0.999},
    {"min_p": 0.05},
    {"min_p": 0.2, "temperature": 2.0},
    {"temperature": 0.7, "top_k": 40, "top_p": 0.9, "min_p": 0.05},
    {"top_k": 1500, "top_p": 0.99},  # a top-k set larger than the first top-p candidate round
    {"top_p": 0.95, "min_p": 0.01},
]


@pytest.mark.parametrize("scale", [0.3, 3.0], ids=["flat", "peaked"])
def test_filters_match_transformers(scale):
    """Flat logits need far more than the first 1024 top-p candidates, peaked ones a handful."""
    torch.manual_seed(0)
    params = [SamplingParams(**f) for f in FILTERS]
    logits = torch.randn(len(params), 2000) * scale
    ours = our_probs(logits, params)
    for row, p in enumerate(params):
        expected = hf_probs(logits[row], p)
        assert torch.equal(ours[row] > 0, expected > 0), f"kept set differs for {p}"
        torch.testing.assert_close(ours[row], expected, atol=1e-6, rtol=0, msg=f"{p}")


def test_penalties_match_transformers_and_the_openai_formula():
    torch.manual_seed(1)
    prompts = [[3, 4, 4, 9], [1, 2], [5]]
    outputs = [[4, 7, 7, 7, 8], [2, 2, 6], []]
    params = [
        SamplingParams(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.25),
        SamplingParams(repetition_penalty=0.7),
        SamplingParams(repetition_penalty=2.0, presence_penalty=-1.0),
    ]
    logits = torch.randn(3, 12) * 2
    ours = apply_penalties_(logits.clone(), build(params, outputs=outputs, prompts=prompts), torch.arange(3))
    for row, p in enumerate(params):
        ids = torch.tensor([prompts[row] + outputs[row]])
        expected = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, logits[row : row + 1].clone())[0]
        counts = torch.bincount(torch.tensor(outputs[row], dtype=torch.long), minlength=12).float()
        expected = expected - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).float()
        torch.testing.assert_close(ours[row], expected, atol=1e-6, rtol=0)
    assert not build([SamplingParams()] * 3).has_penalties


@pytest.mark.parametrize(
    "filters",
    [{}, {"temperature": 0.8, "top_k": 6, "top_p": 0.9, "min_p": 0.05}, {"top_p": 0.6}, {"temperature": 2.5}],
    ids=["plain", "all-filters", "top-p", "hot"],
)
def test_sample_frequencies_match_processed_probabilities(filters):
    logits = torch.tensor([2.0, 1.5, 1.4, 0.3, 0.0, -0.5, -1.0, -3.0])
    draws = 20_000
    p = SamplingParams(**filters)
    result = Sampler()(logits.expand(draws, -1), build([p] * draws, seeded(range(draws))))
    observed = torch.bincount(result.token_ids, minlength=8).double()
    expected = hf_probs(logits, p).double() * draws
    assert observed[expected == 0].sum() == 0, "a filtered-out token was sampled"
    support = expected > 0
    chi2 = ((observed[support] - expected[support]) ** 2 / expected[support]).sum().item()
    # 99.99% quantile of chi-square with 7 degrees of freedom is 29.9; seeds are fixed, so this is not flaky.
    assert chi2 < 29.9, (observed.tolist(), expected.tolist())


def test_a_seed_gives_the_same_tokens_whatever_else_is_batched():
    torch.manual_seed(2)
    vocab, steps = 20_000, 4
    mine = [
        SamplingParams(seed=1),
        SamplingParams(seed=2, temperature=0.7, top_k=20),
        SamplingParams(seed=3, top_p=0.9),  # flat logits below: several top-p candidate rounds
        SamplingParams(seed=4, min_p=0.1, repetition_penalty=1.2, frequency_penalty=0.5),
        SamplingParams(temperature=0),
    ]
    others = [SamplingParams(seed=9, top_k=3000, top_p=0.5), SamplingParams(temperature=0), SamplingParams(seed=7)]
    logits = [torch.randn(len(mine), vocab) * torch.tensor([3.0, 3.0, 0.2, 1.0, 3.0])[:, None] for _ in range(steps)]
    noise = [torch.randn(len(others), vocab) for _ in range(steps)]

    def run(order: list[int], with_others: bool) -> dict[int, list[tuple[int, float]]]:
        """Rows of `mine` in `order`, interleaved with `others`, each request keeping one generator."""
        rows = [("mine", i) for i in order]
        if with_others:
            rows = [r for pair in zip(rows, [("other", j) for j in range(len(others))]) for r in pair] + rows[3:]
        gens = {r: torch.Generator().manual_seed(mine[r[1]].seed or 0 if r[0] == "mine" else r[1]) for r in rows}
        outputs, record = {r: [] for r in rows}, {r: [] for r in rows}
        for step in range(steps):
            params = [mine[i] if kind == "mine" else others[i] for kind, i in rows]
            step_logits = torch.stack([(logits if kind == "mine" else noise)[step][i] for kind, i in rows])
            batch = build(params, [gens[r] for r in rows], [outputs[r] for r in rows], [[1, 2, 3]] * len(rows))
            result = Sampler()(step_logits, batch)
            for r, token, logprob in zip(rows, result.token_ids.tolist(), result.logprobs.tolist()):
                outputs[r].append(token)
                record[r].append((token, logprob))
        return {i: record[kind, i] for kind, i in rows if kind == "mine"}

    alone = {}
    for i in range(len(mine)):
        alone.update(run([i], with_others=False))
    assert run(list(range(len(mine))), with_others=False) == alone
    assert run(list(reversed(range(len(mine)))), with_others=True) == alone


def test_greedy_is_exact_argmax_after_penalties_lowest_id_on_ties():
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0], [0.5, 0.1, 0.4, 0.3], [5.0, 4.0, 0.0, 0.0]])
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0),
        SamplingParams(temperature=0, repetition_penalty=2.0),
    ]
    result = Sampler()(logits, build(params, outputs=[[], [], [0]]))
    assert result.token_ids.tolist() == [1, 0, 1]
    torch.manual_seed(3)
    big = torch.randn(8, 50_000)
    assert torch.equal(Sampler()(big, build([SamplingParams(temperature=0)] * 8)).token_ids, big.argmax(-1))


def test_logprobs_are_raw_log_softmax_after_the_allowed_mask():
    torch.manual_seed(4)
    logits = torch.randn(4, 300).to(torch.bfloat16)
    before = logits.clone()
    allowed = torch.rand(4, 300) < 0.3
    params = [
        SamplingParams(logprobs=3, temperature=0.5, repetition_penalty=1.5),
        SamplingParams(),
        SamplingParams(logprobs=5, top_k=10, temperature=0),
        SamplingParams(logprobs=0, top_p=0.8),
    ]
    result = Sampler()(logits, build(params, seeded(range(4)), outputs=[[1, 2]] * 4), allowed_mask=allowed)
    assert torch.equal(logits, before)
    assert allowed[torch.arange(4), result.token_ids].all()
    raw = torch.log_softmax(logits.float().masked_fill(~allowed, -math.inf), dim=-1)
    # x - logsumexp(x) (the CPU computes logsumexp in C++): log_softmax up to fp32 rounding
    torch.testing.assert_close(result.logprobs, raw[torch.arange(4), result.token_ids], atol=1e-6, rtol=1e-6)
    ids, values = result.top_logprobs
    assert ids.shape == values.shape == (4, 5)
    for row, k in [(0, 3), (2, 5)]:  # bf16 logits tie often, so compare values, and ids through them
        torch.testing.assert_close(values[row, :k], raw[row].topk(k).values, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(raw[row, ids[row, :k]], values[row, :k], atol=1e-6, rtol=1e-6)
    assert ids[[1, 3]].eq(-1).all() and values[[1, 3]].eq(-math.inf).all()
    assert Sampler()(logits[3:], build(params[3:], seeded([0]))).top_logprobs is None
    with pytest.raises(ValueError, match="4 rows of logits for 1 rows of sampling settings"):
        Sampler()(logits, build(params[3:], seeded([0])))


@pytest.mark.parametrize(
    "params",
    [
        [SamplingParams(temperature=0.5, repetition_penalty=1.5, min_p=0.1)] * 2,
        [SamplingParams(temperature=0.5, top_k=3)] * 2,
        [SamplingParams(temperature=0.5), SamplingParams(temperature=0, presence_penalty=1.0)],
    ],
)
def test_caller_logits_are_never_written(params):
    logits = torch.randn(2, 50)
    before = logits.clone()
    Sampler()(logits, build(params, seeded([0, 1]), outputs=[[1, 2], [3]], prompts=[[4], [5]]))
    assert torch.equal(logits, before)


def test_penalties_reach_the_right_rows_of_a_mixed_batch():
    torch.manual_seed(5)
    logits = torch.randn(4, 30)
    params = [
        SamplingParams(temperature=0, repetition_penalty=3.0),
        SamplingParams(seed=1, frequency_penalty=2.0),
        SamplingParams(temperature=0),
        SamplingParams(temperature=0, presence_penalty=2.0),
    ]
    prompts, outputs = [[0, 1], [2], [3], [4]], [[logits[0].argmax().item()], [5], [6], [logits[3].argmax().item()]]
    result = Sampler()(logits, build(params, seeded(range(4)), outputs=outputs, prompts=prompts))
    expected = logits.clone()
    for row in (0, 3):
        seen = torch.tensor(prompts[row] + outputs[row])
        expected[row] = RepetitionPenaltyLogitsProcessor(params[row].repetition_penalty)(
            seen[None], logits[row : row + 1].clone()
        )[0]
        expected[row, outputs[row]] -= params[row].presence_penalty
    assert result.token_ids[[0, 2, 3]].tolist() == expected[[0, 2, 3]].argmax(-1).tolist()
    assert result.token_ids[3] != logits[3].argmax()


def test_a_plain_greedy_batch_takes_the_short_path_with_the_general_paths_answer():
    """All rows greedy, no penalty, no top log-probabilities: only the argmax and its log-probability (what a CUDA
    decode graph computes itself), equal to what the general path gives the same rows."""
    logits = torch.randn(4, 5000) * 3
    logits[1, [10, 4000]] = logits[1].max() + 1  # a tie: the lower id wins on both paths
    plain = build([SamplingParams(temperature=0.0, logprobs=0)] * 4)
    assert plain.plain_greedy
    assert not build([SamplingParams(temperature=0.0, logprobs=1)] * 4).plain_greedy
    assert not build([SamplingParams(temperature=0.0, repetition_penalty=1.2)] * 4).plain_greedy
    assert not build([SamplingParams(temperature=0.0), SamplingParams(temperature=0.7)]).plain_greedy
    short = Sampler()(logits, plain)
    general = Sampler()(logits, dataclasses.replace(plain, plain_greedy=False))
    assert short.token_ids.tolist() == general.token_ids.tolist() == logits.argmax(-1).tolist()
    assert torch.equal(short.logprobs, general.logprobs) and short.top_logprobs is None
