"""What goes wrong when a model is served from several processes."""

from __future__ import annotations

from nbllm.errors import NbllmError


class ParallelConfigError(NbllmError, ValueError):
    """`tensor_parallel_size` / `data_parallel_size` that this model or machine cannot use."""


class WorkerError(NbllmError, RuntimeError):
    """A worker process failed or exited; the engine it served cannot continue (create a new `LLM`)."""
