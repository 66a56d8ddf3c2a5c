"""nbllm: a Jupyter-native LLM inference engine.

The public surface lives here so that `from nbllm import ...` is all a user or a notebook needs.
"""

from nbllm.engine.llm import LLM
from nbllm.engine.outputs import CompletionOutput, RequestOutput
from nbllm.engine.sampling_params import InvalidSamplingParams, SamplingParams
from nbllm.errors import ChatTemplateError, ModelLoadError, NbllmError, TokenizerError, UnsupportedQuantError

__all__ = [
    "LLM",
    "SamplingParams",
    "RequestOutput",
    "CompletionOutput",
    "NbllmError",
    "ModelLoadError",
    "UnsupportedQuantError",
    "TokenizerError",
    "ChatTemplateError",
    "InvalidSamplingParams",
]
__version__ = "0.1.0"
