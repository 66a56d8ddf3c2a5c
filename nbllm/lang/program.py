"""`@function`: a Python function over a state `s` becomes a program with `run` and `run_batch`.

`run` binds the arguments, starts the program in a thread of a fresh `Runtime` and drives the engine from the
calling thread until the program and all its forks are done; `run_batch` does the same for many argument sets
at once, so their generations share engine steps (one batch) and their common prefixes share KV blocks through
the radix cache. Sampling keywords given to `run` (`temperature=0`, `max_tokens=...`) are defaults for every
`gen` of the program that does not set them itself, as in SGLang.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from nbllm.engine.llm import LLM
from nbllm.lang.backend import resolve_backend
from nbllm.lang.errors import ProgramArgumentError
from nbllm.lang.primitives import SAMPLING_FIELDS, check_sampling
from nbllm.lang.runtime import Runtime
from nbllm.lang.state import ProgramState


class Program:
    """A decorated function; call `run(...)` (or the program itself) and `run_batch([...])`."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        params = list(inspect.signature(fn).parameters.values())
        if not params or params[0].kind not in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
            raise ProgramArgumentError(f"@function {fn.__name__} must take the state as its first argument: "
                                       f"def {fn.__name__}(s, ...)")
        self.fn = fn
        self._signature = inspect.signature(fn).replace(parameters=params[1:])
        functools.update_wrapper(self, fn)

    def run(self, *args: Any, llm: LLM | None = None, **kwargs: Any) -> ProgramState:
        """Run the program once; returns its final state (`state["name"]`, `state.text()`)."""
        defaults = _split_sampling(kwargs)
        return self._execute(resolve_backend(llm), [self._bind(args, kwargs)], defaults)[0]

    __call__ = run

    def run_batch(self, batch_kwargs: Sequence[Mapping[str, Any]], *, llm: LLM | None = None,
                  **sampling: Any) -> list[ProgramState]:
        """Run the program once per argument dict, all together; states come back in input order."""
        if isinstance(batch_kwargs, Mapping) or not isinstance(batch_kwargs, Sequence):
            raise ProgramArgumentError("run_batch needs a list of argument dicts, e.g. [{'question': ...}, ...]")
        defaults = _split_sampling(sampling)
        if sampling:
            raise ProgramArgumentError(f"run_batch got unknown keywords {sorted(sampling)}; program arguments go "
                                       "in the dicts of the list, sampling keywords are " + ", ".join(SAMPLING_FIELDS))
        bound = []
        for i, kwargs in enumerate(batch_kwargs):
            if not isinstance(kwargs, Mapping):
                raise ProgramArgumentError(f"run_batch item {i} is a {type(kwargs).__name__}, not a dict of arguments")
            bound.append(self._bind((), dict(kwargs)))
        return self._execute(resolve_backend(llm), bound, defaults)

    def _bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> inspect.BoundArguments:
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise ProgramArgumentError(f"{self.fn.__name__}{self._signature}: {exc}") from None
        bound.apply_defaults()
        return bound

    def _execute(self, llm: LLM, calls: list[inspect.BoundArguments], defaults: dict[str, Any]) -> list[ProgramState]:
        runtime = Runtime(llm)
        states = [ProgramState(runtime, defaults) for _ in calls]

        def program(state: ProgramState, call: inspect.BoundArguments) -> None:
            self.fn(state, *call.args, **call.kwargs)
            state.sync_all()

        roots = [runtime.spawn(functools.partial(program, s, c), name=f"nbllm-lang-{self.fn.__name__}")
                 for s, c in zip(states, calls)]
        runtime.drive(roots)
        for root in roots:
            root.result()  # the first program error, as the program raised it
        return states

    def __repr__(self) -> str:
        return f"<nbllm.lang program {self.fn.__name__}{self._signature}>"


def function(fn: Callable[..., Any]) -> Program:
    """Decorator: `@function def qa(s, question): s += question + gen("answer")`."""
    return Program(fn)


def _split_sampling(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Pop the sampling keywords out of `kwargs` (the rest are program arguments) and check them."""
    defaults = {k: kwargs.pop(k) for k in SAMPLING_FIELDS if k in kwargs}
    check_sampling(defaults, where="run(...)")
    return defaults
