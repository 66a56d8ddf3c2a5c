"""Which `LLM` a program runs on: the one passed to `run`, else the default set here, else the notebook's.

SGLang programs name a backend once (`sgl.set_default_backend(...)`) and then just `run`; the same here with an
in-process `LLM`. In a notebook where `%load_ext nbllm` is active, the session's model (the one `%%llm` cells
use, loaded on first use) is the fallback, so a tutorial needs no extra line.
"""

from __future__ import annotations

from typing import Any

from nbllm.engine.llm import LLM
from nbllm.lang.errors import NoBackendError

_default: LLM | None = None


def set_default_backend(llm: LLM | None) -> None:
    """Run programs on `llm` when `run` gets none (None forgets it)."""
    global _default
    if llm is not None and not isinstance(llm, LLM):
        raise NoBackendError(f"set_default_backend needs an nbllm.LLM, got {type(llm).__name__}")
    _default = llm


def resolve_backend(llm: LLM | None) -> LLM:
    if llm is not None:
        if not isinstance(llm, LLM):
            raise NoBackendError(f"llm= must be an nbllm.LLM, got {type(llm).__name__}")
        return llm
    if _default is not None:
        return _default
    session = _notebook_session()
    if session is not None:
        return session.llm
    raise NoBackendError("no model to run on: pass llm=LLM(...), call nbllm.lang.set_default_backend(llm), "
                         "or %load_ext nbllm in a notebook")


def _notebook_session() -> Any:
    """The `%%llm` session of the running IPython shell, if the extension is loaded there."""
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    shell = get_ipython()
    magics = shell.magics_manager.registry.get("NbllmMagics") if shell is not None else None
    return getattr(magics, "session", None)
