"""nbllm: a Jupyter-native LLM inference engine.

The public surface lives here so that `from nbllm import ...` is all a user or a notebook needs.
"""

from nbllm.errors import ChatTemplateError, ModelLoadError, NbllmError, TokenizerError, UnsupportedQuantError

__all__ = ["NbllmError", "ModelLoadError", "UnsupportedQuantError", "TokenizerError", "ChatTemplateError"]
__version__ = "0.1.0"
