"""How one request wants its tokens chosen: vLLM's `SamplingParams` names, defaults and checks.

Every value is checked when the object is built, so a bad flag in a notebook cell fails at once with one line
naming the field, the value and what is allowed, instead of producing NaNs or a hang mid-generation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Any

from nbllm.errors import NbllmError

#: Temperatures below this sample greedily (vLLM's `_SAMPLING_EPS`): dividing logits by a tinier value only
#: risks overflow while the distribution is already a point mass on the argmax.
GREEDY_TEMPERATURE = 1e-5

_CONSTRAINTS = ("json_schema", "regex", "choices", "grammar")


class InvalidSamplingParams(NbllmError, ValueError):
    """A `SamplingParams` field is out of range or of the wrong type; the message names field, value, range."""


class RequestOutputKind(Enum):
    """Which outputs the engine builds for a request (vLLM's names).

    CUMULATIVE: the request's state after every step that changed it; its `text_delta` and `token_ids_delta` say
    what is new, so it also serves as vLLM's DELTA stream. FINAL_ONLY: one output, when the request finishes —
    what a batch `LLM.generate` needs; the engine then builds nothing per step (at batch 256 the per-step outputs,
    each copying the token ids so far, were the largest part of the host's work after the sampler).
    """

    CUMULATIVE = "cumulative"
    FINAL_ONLY = "final_only"


@dataclass
class SamplingParams:
    """Per-request decoding settings; `temperature == 0` means greedy (top-k, top-p and min-p then ignored).

    `logprobs` is the number of most likely tokens to report besides the sampled one (0: only the sampled
    token's log-probability). `json_schema`, `regex`, `choices` and `grammar` constrain the output; at most
    one may be given. `output_kind`: every step's state, or only the final output (`RequestOutputKind`).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    n: int = 1
    logprobs: int | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    json_schema: dict[str, Any] | bool | str | None = None
    regex: str | None = None
    choices: list[str] | None = None
    grammar: str | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE

    def __post_init__(self) -> None:
        _check_int("max_tokens", self.max_tokens, 1, ">= 1")
        _check_int("n", self.n, 1, ">= 1")
        _check_range("temperature", self.temperature, 0.0, math.inf, "[0, inf)")
        _check_range("top_p", self.top_p, 0.0, 1.0, "(0, 1]", open_low=True)
        _check_int("top_k", self.top_k, -1, "-1 or 0 (off) or >= 1")
        _check_range("min_p", self.min_p, 0.0, 1.0, "[0, 1]")
        _check_range("repetition_penalty", self.repetition_penalty, 0.0, math.inf, "(0, inf)", open_low=True)
        _check_range("presence_penalty", self.presence_penalty, -2.0, 2.0, "[-2, 2]")
        _check_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0, "[-2, 2]")
        if self.seed is not None:
            _check_int("seed", self.seed, -(2**63), "an int or None")
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, 0, ">= 0 or None")
        self._check_stop()
        self._check_constraints()
        for name in ("ignore_eos", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "True or False")
        if not isinstance(self.output_kind, RequestOutputKind):
            _fail("output_kind", self.output_kind, "RequestOutputKind.CUMULATIVE or RequestOutputKind.FINAL_ONLY")
        if self.is_greedy and self.n > 1:
            _fail("n", self.n, "1 when temperature is 0 (greedy outputs would all be identical)")

    @property
    def is_greedy(self) -> bool:
        """True when the sampler takes the argmax (vLLM: temperature below 1e-5)."""
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        """Whether sampling looks at the tokens seen so far (repetition, presence or frequency penalty)."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def constraint(self) -> tuple[str, Any] | None:
        """The output constraint as (field name, value), or None for free text."""
        for name in _CONSTRAINTS:
            value = getattr(self, name)
            if value is not None:
                return name, value
        return None

    @property
    def stop_strings(self) -> list[str]:
        """`stop` as a list (a single string is one stop string; None is none)."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def _check_stop(self) -> None:
        if self.stop is not None:
            if not isinstance(self.stop, (str, list, tuple)) or any(not isinstance(s, str) for s in self.stop):
                _fail("stop", self.stop, "a string or a list of strings")
            if any(s == "" for s in self.stop_strings):
                _fail("stop", self.stop, "non-empty strings")
        if self.stop_token_ids is not None and (
            not isinstance(self.stop_token_ids, (list, tuple))
            or any(not _is_int(t) or t < 0 for t in self.stop_token_ids)
        ):
            _fail("stop_token_ids", self.stop_token_ids, "a list of non-negative token ids")

    def _check_constraints(self) -> None:
        if self.json_schema is not None and not isinstance(self.json_schema, (dict, bool, str)):
            _fail("json_schema", self.json_schema, "a dict, a bool or a JSON string")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                _fail(name, value, "a string")
        if self.choices is not None and (
            not isinstance(self.choices, (list, tuple))
            or not self.choices
            or any(not isinstance(c, str) for c in self.choices)
        ):
            _fail("choices", self.choices, "a non-empty list of strings")
        given = [n for n in _CONSTRAINTS if getattr(self, n) is not None]
        if len(given) > 1:
            raise InvalidSamplingParams(f"only one of json_schema, regex, choices, grammar may be set, got {given}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fail(name: str, value: object, allowed: str) -> None:
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    raise InvalidSamplingParams(f"{name} must be {allowed}, got {shown}")


def _check_int(name: str, value: object, low: int, allowed: str) -> None:
    if not _is_int(value) or value < low:
        _fail(name, value, allowed)


def _check_range(name: str, value: object, low: float, high: float, allowed: str, open_low: bool = False) -> None:
    """Numbers only (not bools); NaN fails every comparison and so is rejected too."""
    ok = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and (low < value if open_low else low <= value)
        and value <= high
        and math.isfinite(value)
    )
    if not ok:
        _fail(name, value, allowed)
