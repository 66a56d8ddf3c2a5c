"""nbllm: a Jupyter-native LLM inference engine.

The public surface lives here so that `from nbllm import ...` is all a user or a notebook needs. The engine
(and with it torch) is imported on first use, so `import nbllm`, `%load_ext nbllm` and the tokenizer alone
stay quick.
"""

from importlib import import_module
from typing import Any

from nbllm.errors import ChatTemplateError, ModelLoadError, NbllmError, TokenizerError, UnsupportedQuantError

_LAZY = {
    "LLM": "nbllm.engine.llm",
    "SamplingParams": "nbllm.engine.sampling_params",
    "InvalidSamplingParams": "nbllm.engine.sampling_params",
    "RequestOutputKind": "nbllm.engine.sampling_params",
    "RequestOutput": "nbllm.engine.outputs",
    "CompletionOutput": "nbllm.engine.outputs",
}

__all__ = [*_LAZY, "NbllmError", "ModelLoadError", "UnsupportedQuantError", "TokenizerError", "ChatTemplateError"]
__version__ = "0.1.0"


def load_ipython_extension(ipython: Any) -> None:
    """`%load_ext nbllm` registers the magics (see `nbllm.notebook`)."""
    from nbllm.notebook import load_ipython_extension as load

    load(ipython)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'nbllm' has no attribute {name!r}")
