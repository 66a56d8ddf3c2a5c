"""The error family of nbllm.

Every failure a user can cause (a bad file, a bad flag, a bad schema) surfaces as a subclass of
`NbllmError` whose message is one line saying what went wrong and what to do, so a notebook shows a short
red line instead of a traceback wall and the engine stays usable.
"""


class NbllmError(Exception):
    """Base class of every error nbllm raises on purpose."""


class ModelLoadError(NbllmError):
    """A model file or directory cannot be used: names the file and the reason."""


class UnsupportedQuantError(ModelLoadError):
    """A GGUF tensor uses a quantization type nbllm cannot compute with."""


class TokenizerError(NbllmError):
    """A vocabulary in a model file cannot be turned into a working tokenizer."""


class ChatTemplateError(NbllmError):
    """A chat template failed to render (bad template, hostile template, or invalid messages)."""
