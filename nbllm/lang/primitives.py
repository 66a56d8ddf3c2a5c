"""The expressions a program appends to its state: text, `gen`, `select`, role blocks, and sequences of them.

`s += "Q: " + question + gen("answer", stop="\\n")` builds one `Concat` of a `Text` and a `Gen`; the state
runs its parts in order. Arguments are checked here, where the user wrote them, so a bad `gen` fails on its own
line instead of later inside the engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from nbllm.engine.sampling_params import SamplingParams
from nbllm.errors import NbllmError
from nbllm.lang.errors import GenArgumentError

#: Sampling fields a `gen` may set and `run(...)` may default for every `gen` of a program.
SAMPLING_FIELDS = ("max_tokens", "stop", "stop_token_ids", "temperature", "top_p", "top_k", "min_p",
                   "repetition_penalty", "presence_penalty", "frequency_penalty", "seed", "ignore_eos")

#: A DSL `gen` without max_tokens writes up to this many tokens (SGLang's default; `SamplingParams` keeps 16).
DEFAULT_MAX_TOKENS = 128


class Expr:
    """Something a state can append; `+` chains expressions (and strings) into one `Concat`."""

    def __add__(self, other: Expr | str) -> Concat:
        return Concat([*_parts(self), *_parts(as_expr(other))])

    def __radd__(self, other: str) -> Concat:
        return Concat([*_parts(as_expr(other)), *_parts(self)])


@dataclass
class Text(Expr):
    text: str


@dataclass
class Concat(Expr):
    parts: list[Expr]


@dataclass
class Gen(Expr):
    """Generate text after the state's text so far and store it under `name` (when given)."""

    name: str | None
    sampling: dict[str, Any]  # only the fields the call set; `run(...)` defaults fill the rest
    constraint: dict[str, Any]  # at most one of regex / json_schema / grammar

    def params(self, defaults: dict[str, Any]) -> SamplingParams:
        values = {"max_tokens": DEFAULT_MAX_TOKENS, **defaults, **self.sampling, **self.constraint}
        return SamplingParams(**values)


@dataclass
class Select(Expr):
    """Append the most likely of `choices` (highest mean token log-probability) and store it under `name`."""

    name: str | None
    choices: list[str]


@dataclass
class Role(Expr):
    """A chat turn: the model's template around `body` (`system`, `user`, `assistant`)."""

    role: str
    body: Expr = field(default_factory=lambda: Concat([]))


def as_expr(value: Expr | str) -> Expr:
    if isinstance(value, Expr):
        return value
    if isinstance(value, str):
        return Text(value)
    raise GenArgumentError(f"a program state takes text, gen(...), select(...) or a role, got {type(value).__name__}; "
                           "convert it with str() first")


def _parts(expr: Expr) -> list[Expr]:
    return list(expr.parts) if isinstance(expr, Concat) else [expr]


def gen(
    name: str | None = None,
    *,
    max_tokens: int | None = None,
    stop: str | list[str] | None = None,
    stop_token_ids: list[int] | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    seed: int | None = None,
    ignore_eos: bool | None = None,
    regex: str | None = None,
    json_schema: dict[str, Any] | bool | str | None = None,
    grammar: str | None = None,
    choices: Sequence[str] | None = None,
) -> Gen | Select:
    """Generate text into `s[name]`. Unset sampling fields come from `run(...)`, then from the defaults
    (128 tokens, temperature 1). `regex`, `json_schema` or `grammar` constrain the output; `choices` makes this a
    `select` (as in SGLang): the best choice by score, not a generated string."""
    _check_name(name)
    given = {"regex": regex, "json_schema": json_schema, "grammar": grammar, "choices": choices}
    constraints = [k for k, v in given.items() if v is not None]
    if len(constraints) > 1:
        raise GenArgumentError(f"gen({name!r}) got {' and '.join(constraints)}; give at most one constraint")
    if choices is not None:
        return select(name, choices)
    local = {"max_tokens": max_tokens, "stop": stop, "stop_token_ids": stop_token_ids, "temperature": temperature,
             "top_p": top_p, "top_k": top_k, "min_p": min_p, "repetition_penalty": repetition_penalty,
             "presence_penalty": presence_penalty, "frequency_penalty": frequency_penalty, "seed": seed,
             "ignore_eos": ignore_eos}
    sampling = {k: v for k, v in local.items() if v is not None}
    constraint = {k: v for k, v in given.items() if v is not None}
    check_sampling(sampling | constraint, where=f"gen({name!r})")
    return Gen(name, sampling, constraint)


def select(name: str | None = None, choices: Sequence[str] | None = None) -> Select:
    """Pick one of `choices` into `s[name]`, scored as SGLang's default does: the choice whose tokens have the
    highest mean log-probability after the text so far."""
    _check_name(name)
    if isinstance(choices, str) or not isinstance(choices, Sequence) or not choices:
        raise GenArgumentError(f"select({name!r}) needs choices=[...], a non-empty list of strings")
    if any(not isinstance(c, str) or not c for c in choices):
        raise GenArgumentError(f"select({name!r}): every choice must be a non-empty string, got {list(choices)!r}")
    return Select(name, list(choices))


def check_sampling(values: dict[str, Any], *, where: str) -> None:
    """Build the `SamplingParams` once now, so a bad value fails where it was written."""
    try:
        SamplingParams(**values)
    except NbllmError as exc:
        raise GenArgumentError(f"{where}: {exc}") from None


def _check_name(name: object) -> None:
    if name is not None and (not isinstance(name, str) or not name):
        raise GenArgumentError(f"a gen/select name must be a non-empty string or None, got {name!r}")


def system(body: Expr | str = "") -> Role:
    return Role("system", as_expr(body))


def user(body: Expr | str = "") -> Role:
    return Role("user", as_expr(body))


def assistant(body: Expr | str = "") -> Role:
    return Role("assistant", as_expr(body))
