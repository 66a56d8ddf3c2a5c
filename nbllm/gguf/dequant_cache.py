"""Decoded tensors of a GGUF file (dequantized, or repacked to int8), kept on disk and mapped back in on the next load.

Dequantizing Gemma 3 270M to float32 (or repacking it for the int8 kernels) takes seconds on two cores; a notebook
wants the model in under one. The first load writes what it decoded into one file under `~/.cache/nbllm/<kind>/`
(`dequant` or `int8`); later loads map that file
(`torch.load(mmap=True)`): no decoding, no copy, pages come in from the page cache as the first forward touches
them. The key is the file's identity — size, modification time and a digest of its header (metadata and tensor
directory) — plus the cache format version, so a changed or replaced model file gets a new entry instead of
stale weights; the entry that key replaces (same kind, same model path) is deleted when the new one is written.
Hashing all of a multi-GB file would cost more than the decoding it saves.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from nbllm.gguf.reader import GGUFFile

FORMAT_VERSION = 1


def cache_dir(kind: str = "dequant") -> Path:
    return Path(os.environ.get("NBLLM_CACHE_DIR", Path.home() / ".cache" / "nbllm")) / kind


def file_identity(file: GGUFFile) -> str:
    """A digest of the file's header (metadata and tensor directory), size and modification time."""
    stat = file.path.stat()
    header_end = min((info.offset for info in file.tensors.values()), default=stat.st_size)
    digest = hashlib.sha256()
    with open(file.path, "rb") as f:
        digest.update(f.read(header_end))
    digest.update(f"{stat.st_size}:{stat.st_mtime_ns}:{FORMAT_VERSION}".encode())
    return digest.hexdigest()[:24]


class DequantCache:
    """The decoded tensors of one GGUF file: `get` what an earlier load stored, `put` new ones, `save` at the end.

    `identity`: `file_identity(file)`, passed in when one load keeps several kinds; `kind`: the cache's folder.
    """

    def __init__(self, file: GGUFFile, *, kind: str = "dequant", identity: str | None = None) -> None:
        where = hashlib.sha256(str(file.path.resolve()).encode()).hexdigest()[:8]
        self._prefix = f"{file.path.stem}-{where}-"
        self.path = cache_dir(kind) / f"{self._prefix}{identity or file_identity(file)}.pt"
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
            for stale in self.path.parent.glob(f"{self._prefix}*.pt"):
                if stale != self.path:
                    stale.unlink(missing_ok=True)
        except OSError:
            tmp.unlink(missing_ok=True)  # a read-only or full disk only costs the next load its speed
            return
        self._stored, self._new = merged, {}
