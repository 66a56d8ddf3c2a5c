"""Dequantized tensors of a GGUF file, kept on disk beside nothing else and mapped back in on the next load.

Dequantizing Gemma 3 270M to float32 takes seconds on two cores; a notebook wants the model in under one. The
first load writes what it decoded into one file under `~/.cache/nbllm/dequant/`; later loads map that file
(`torch.load(mmap=True)`): no decoding, no copy, pages come in from the page cache as the first forward touches
them. The key is the file's identity — size, modification time and a digest of its header (metadata and tensor
directory) — plus the cache format version, so a changed or replaced model file gets a new entry instead of
stale weights. Hashing all of a multi-GB file would cost more than the decoding it saves.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from nbllm.gguf.reader import GGUFFile

FORMAT_VERSION = 1


def cache_dir() -> Path:
    return Path(os.environ.get("NBLLM_CACHE_DIR", Path.home() / ".cache" / "nbllm")) / "dequant"


class DequantCache:
    """The decoded tensors of one GGUF file: `get` what an earlier load stored, `put` new ones, `save` at the end."""

    def __init__(self, file: GGUFFile) -> None:
        stat = file.path.stat()
        header_end = min((info.offset for info in file.tensors.values()), default=stat.st_size)
        digest = hashlib.sha256()
        with open(file.path, "rb") as f:
            digest.update(f.read(header_end))
        digest.update(f"{stat.st_size}:{stat.st_mtime_ns}:{FORMAT_VERSION}".encode())
        self.path = cache_dir() / f"{file.path.stem}-{digest.hexdigest()[:24]}.pt"
        self._stored: dict[str, torch.Tensor] = {}
        if self.path.is_file():
            try:
                self._stored = torch.load(self.path, mmap=True, weights_only=True)
            except Exception:  # a torn or foreign file: decode again and overwrite it
                self._stored = {}
        self._new: dict[str, torch.Tensor] = {}

    def get(self, name: str) -> torch.Tensor | None:
        return self._stored.get(name)

    def put(self, name: str, tensor: torch.Tensor) -> None:
        self._new[name] = tensor

    def save(self) -> None:
        """Write everything decoded so far (atomically: a crash never leaves a half-written entry)."""
        if not self._new:
            return
        merged = {**self._stored, **self._new}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        try:
            torch.save(merged, tmp)
            os.replace(tmp, self.path)
        except OSError:
            tmp.unlink(missing_ok=True)  # a read-only or full disk only costs the next load its speed
            return
        self._stored, self._new = merged, {}
