"""What a DSL program can get wrong, as `NbllmError` subclasses with one-line messages that say what to do."""

from __future__ import annotations

from nbllm.errors import NbllmError


class LangError(NbllmError):
    """Base of the errors raised by `nbllm.lang`."""


class UnknownVariableError(LangError, KeyError):
    """`s["name"]` for a name that no `gen`/`select` of the program has set."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class GenArgumentError(LangError, ValueError):
    """A `gen`/`select` call with arguments that cannot go together or are out of range."""


class ProgramArgumentError(LangError, TypeError):
    """`run`/`run_batch` arguments that do not fit the program's signature."""


class NoBackendError(LangError):
    """A program was run with no `LLM` to run on."""


class ProgramCancelled(LangError):
    """The run this program belongs to ended (an error elsewhere, or an interrupt) before it finished."""
