"""SamplingParams: vLLM's defaults, and one-line errors naming field, value and allowed range."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nbllm.engine.sampling_params import InvalidSamplingParams, SamplingParams
from nbllm.errors import NbllmError


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p) == (16, 1.0, 1.0, -1, 0.0)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert (p.seed, p.stop, p.stop_token_ids, p.n, p.logprobs) == (None, None, None, 1, None)
    assert not p.ignore_eos and not p.include_stop_str_in_output
    assert (p.json_schema, p.regex, p.choices, p.grammar) == (None, None, None, None)
    assert not p.is_greedy and p.stop_strings == []


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("max_tokens", 0, ">= 1"),
        ("max_tokens", 2.5, ">= 1"),
        ("n", 0, ">= 1"),
        ("temperature", -0.1, "[0, inf)"),
        ("temperature", math.nan, "[0, inf)"),
        ("temperature", math.inf, "[0, inf)"),
        ("temperature", "hot", "[0, inf)"),
        ("top_p", 0.0, "(0, 1]"),
        ("top_p", 1.5, "(0, 1]"),
        ("top_k", -2, "-1 or 0 (off) or >= 1"),
        ("top_k", 3.0, "-1 or 0 (off) or >= 1"),
        ("min_p", -0.1, "[0, 1]"),
        ("min_p", 1.1, "[0, 1]"),
        ("repetition_penalty", 0.0, "(0, inf)"),
        ("presence_penalty", 2.5, "[-2, 2]"),
        ("frequency_penalty", -3, "[-2, 2]"),
        ("seed", 1.5, "an int or None"),
        ("seed", True, "an int or None"),
        ("logprobs", -1, ">= 0 or None"),
        ("stop", 5, "a string or a list of strings"),
        ("stop", ["ok", 3], "a string or a list of strings"),
        ("stop", ["ok", ""], "non-empty strings"),
        ("stop_token_ids", [1, -2], "a list of non-negative token ids"),
        ("stop_token_ids", 7, "a list of non-negative token ids"),
        ("ignore_eos", 1, "True or False"),
        ("json_schema", 3, "a dict, a bool or a JSON string"),
        ("regex", 3, "a string"),
        ("grammar", ["root ::= x"], "a string"),
        ("choices", [], "a non-empty list of strings"),
        ("choices", ["a", 1], "a non-empty list of strings"),
        ("output_kind", "final_only", "RequestOutputKind.CUMULATIVE or RequestOutputKind.FINAL_ONLY"),
    ],
)
def test_invalid_field_names_field_value_and_range(field, value, allowed):
    with pytest.raises(InvalidSamplingParams) as info:
        SamplingParams(**{field: value})
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{field} must be {allowed}, got ")
    assert repr(value)[:20] in message


def test_error_is_an_nbllm_error_and_a_value_error():
    with pytest.raises(NbllmError):
        SamplingParams(top_p=2)
    with pytest.raises(ValueError):
        SamplingParams(top_p=2)


def test_greedy_needs_n_1_and_ignores_nothing_else():
    p = SamplingParams(temperature=0, top_k=5, top_p=0.5)
    assert p.is_greedy
    with pytest.raises(InvalidSamplingParams, match="^n must be 1 when temperature is 0"):
        SamplingParams(temperature=0, n=2)
    assert not SamplingParams(temperature=1e-3).is_greedy


def test_only_one_constraint():
    with pytest.raises(InvalidSamplingParams, match="only one of json_schema, regex"):
        SamplingParams(regex="a+", choices=["a"])
    assert SamplingParams(json_schema={"type": "string"}).json_schema == {"type": "string"}


def test_stop_strings():
    assert SamplingParams(stop="###").stop_strings == ["###"]
    assert SamplingParams(stop=["a", "bc"]).stop_strings == ["a", "bc"]


def test_off_values_accepted():
    SamplingParams(top_k=0)
    SamplingParams(top_k=-1, min_p=0.0, top_p=1.0, logprobs=0, seed=-5)


@given(
    temperature=st.floats(0, 10),
    top_p=st.floats(1e-6, 1),
    top_k=st.integers(-1, 10**6),
    min_p=st.floats(0, 1),
    repetition_penalty=st.floats(1e-3, 10),
    presence_penalty=st.floats(-2, 2),
)
def test_every_in_range_value_is_accepted(temperature, top_p, top_k, min_p, repetition_penalty, presence_penalty):
    SamplingParams(
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        presence_penalty=presence_penalty,
    )
