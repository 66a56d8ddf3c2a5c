"""GGUF files read over mmap, fast, and checked before anything trusts them.

`gguf.GGUFReader` parses every element of every metadata array as a numpy record, which takes ~20 s for a
262,144-token vocabulary; a notebook must start in under a second. This reader walks the header once with
`struct` over the mmap, turns numeric arrays into zero-copy numpy views, and never reads tensor data until a
tensor is asked for. The format's constants (value types, quantization types, block sizes) come from the
`gguf` package so there is one source of truth for them.

Every count, length and offset in the header is checked against the file size before it is used, so a
corrupt or hostile file ends in a `ModelLoadError` naming the file and the reason — never a segfault, a hang
or a multi-GB allocation.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from nbllm.errors import ModelLoadError

if TYPE_CHECKING:
    import torch

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4

_SCALAR_FORMATS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
_NUMPY_DTYPES: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<u1",
    GGUFValueType.INT8: "<i1",
    GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2",
    GGUFValueType.UINT32: "<u4",
    GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4",
    GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8",
    GGUFValueType.FLOAT64: "<f8",
}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in the file; `shape` is in torch order (rows first, ggml's `ne` reversed)."""

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def tensor_nbytes(qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> int:
    """Bytes a tensor of `shape` takes in `qtype`; its last dim must be a whole number of blocks."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if any(n < 0 for n in shape):
        raise ValueError(f"shape {shape} has a negative dimension")
    if shape[-1] % block_size:
        raise ValueError(f"last dimension {shape[-1]} is not a multiple of {qtype.name}'s block size {block_size}")
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block_size) * type_size


class _Cursor:
    """Sequential little-endian reads over a buffer, each bounded by the buffer's end."""

    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf = buf
        self.pos = 0
        self.size = len(buf)
        self.path = path

    def fail(self, reason: str) -> ModelLoadError:
        return ModelLoadError(f"{self.path}: not a valid GGUF file: {reason} (at byte {self.pos}); re-download or re-convert it")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"{what} needs {n} bytes but the file ends after {self.size - self.pos}")

    def scalar(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def u32(self, what: str) -> int:
        return self.scalar("<I", what)

    def u64(self, what: str) -> int:
        return self.scalar("<Q", what)

    def string(self, what: str) -> str:
        n = self.u64(f"length of {what}")
        self.need(n, what)
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="replace")

    def value_type(self, what: str) -> GGUFValueType:
        code = self.u32(f"type of {what}")
        try:
            return GGUFValueType(code)
        except ValueError:
            raise self.fail(f"{what} has unknown value type {code}") from None

    def value(self, vtype: GGUFValueType, what: str, depth: int = 0) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string(what)
        if vtype != GGUFValueType.ARRAY:
            return self.scalar(_SCALAR_FORMATS[vtype], what)
        if depth > 2:
            raise self.fail(f"{what} nests arrays too deeply")
        etype = self.value_type(f"elements of {what}")
        count = self.u64(f"element count of {what}")
        if etype in _NUMPY_DTYPES:
            dtype = np.dtype(_NUMPY_DTYPES[etype])
            self.need(count * dtype.itemsize, what)
            arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
            self.pos += count * dtype.itemsize
            return arr
        # Each string or nested array takes at least 8 bytes: bound the count before looping.
        self.need(count * 8, what)
        if etype == GGUFValueType.STRING:
            return self.strings(count, what)
        return [self.value(etype, what, depth + 1) for _ in range(count)]

    def strings(self, count: int, what: str) -> LazyStrings:
        """Skip over a string array, checking its bounds; decoding waits until someone reads it."""
        buf, pos, end = self.buf, self.pos, self.size
        read_len = struct.Struct("<Q").unpack_from
        start = pos
        heads: list[int] = []  # where each length prefix starts: decoding later needs no second walk
        for i in range(count):
            if pos + 8 > end:
                raise self.fail(f"{what} declares {count} strings but the file ends after {i}")
            heads.append(pos)
            (n,) = read_len(buf, pos)
            pos += 8 + n
        if pos > end:
            raise self.fail(f"{what} declares {count} strings but the file ends inside the last one")
        self.pos = pos
        return LazyStrings(buf, start, pos, heads)


class LazyStrings(Sequence[str]):
    """A GGUF string array decoded on first use.

    A 262,144-token vocabulary takes ~0.3 s to decode in Python and most loads never need it (the tokenizer
    is rebuilt from a cache keyed by `content_key()`), so opening a file only walks the length prefixes.
    """

    def __init__(self, buf: mmap.mmap, start: int, end: int, heads: list[int]) -> None:
        self._buf, self._start, self._end, self._heads = buf, start, end, heads
        self._items: list[str] | None = None

    def _decoded(self) -> list[str]:
        """All strings in one UTF-8 decode: each 8-byte little-endian length keeps only its top byte, NUL for
        any real length, as a separator. A string that itself holds a NUL makes the split ambiguous: then one
        by one."""
        if self._items is None:
            raw = np.frombuffer(self._buf, dtype=np.uint8, count=self._end - self._start, offset=self._start)
            keep = np.ones(raw.size, dtype=bool)
            heads = np.asarray(self._heads, dtype=np.int64) - self._start
            keep[(heads[:, None] + np.arange(7)).ravel()] = False
            items = raw[keep].tobytes().decode("utf-8", errors="replace").split("\x00")[1:]
            if len(items) != len(self._heads):
                items = [self._buf[h + 8 : h + 8 + int.from_bytes(self._buf[h : h + 8], "little")].decode("utf-8", errors="replace")
                         for h in self._heads]
            self._items = items
        return self._items

    def content_key(self) -> str:
        """A digest of the array's bytes, cheap enough to key caches of anything built from it."""
        return hashlib.sha256(self._buf[self._start : self._end]).hexdigest()

    def __len__(self) -> int:
        return len(self._heads)

    def __getitem__(self, index):  # type: ignore[override]
        return self._decoded()[index]

    def __iter__(self) -> Iterator[str]:
        return iter(self._decoded())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, LazyStrings):
            other = other._decoded()
        return isinstance(other, list) and self._decoded() == other

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"LazyStrings({len(self._heads)} strings)"


class GGUFFile:
    """One open GGUF file: its metadata, its tensor directory, and zero-copy access to tensor bytes."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:  # ValueError: empty file cannot be mapped
            raise ModelLoadError(f"{self.path}: cannot open as a GGUF file: {exc}") from None
        try:
            self._parse()
        except ModelLoadError:
            self.close()
            raise

    def _parse(self) -> None:
        cur = _Cursor(self._mmap, self.path)
        cur.need(4, "magic")
        magic = bytes(self._mmap[:4])
        if magic != GGUF_MAGIC:
            raise ModelLoadError(f"{self.path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
        cur.pos = 4
        self.version = cur.u32("version")
        if self.version not in SUPPORTED_VERSIONS:
            raise ModelLoadError(
                f"{self.path}: GGUF version {self.version} is not supported (only v2 and v3); re-convert with a current llama.cpp"
            )
        n_tensors = cur.u64("tensor count")
        n_kv = cur.u64("metadata count")
        # Every key/value takes at least 12 bytes and every tensor info at least 24: absurd counts fail here.
        cur.need(n_kv * 12 + n_tensors * 24, f"{n_kv} metadata entries and {n_tensors} tensor infos")

        self.metadata: dict[str, Any] = {}
        for i in range(n_kv):
            key = cur.string(f"key of metadata entry {i}")
            self.metadata[key] = cur.value(cur.value_type(key), key)

        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise cur.fail(f"general.alignment {alignment!r} is not a power of two")

        infos = [self._read_tensor_info(cur, i) for i in range(n_tensors)]
        data_start = -(-cur.pos // alignment) * alignment
        self.tensors: dict[str, TensorInfo] = {}
        for name, qtype, shape, rel_offset in infos:
            if name in self.tensors:
                raise cur.fail(f"tensor {name!r} appears twice")
            if rel_offset % alignment:
                raise cur.fail(f"tensor {name!r} offset {rel_offset} is not aligned to {alignment}")
            try:
                nbytes = tensor_nbytes(qtype, shape)
            except ValueError as exc:
                raise cur.fail(f"tensor {name!r}: {exc}") from None
            start = data_start + rel_offset
            if start + nbytes > cur.size:
                raise cur.fail(f"tensor {name!r} ({nbytes} bytes at {start}) runs past the end of the file ({cur.size} bytes)")
            self.tensors[name] = TensorInfo(name, qtype, shape, start, nbytes)

    @staticmethod
    def _read_tensor_info(cur: _Cursor, i: int) -> tuple[str, GGMLQuantizationType, tuple[int, ...], int]:
        name = cur.string(f"name of tensor {i}")
        n_dims = cur.u32(f"dimension count of {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        ne = [cur.u64(f"dimension {d} of {name!r}") for d in range(n_dims)]
        if any(n <= 0 for n in ne) or int(np.prod(ne, dtype=np.float64)) > cur.size * 8:
            raise cur.fail(f"tensor {name!r} has impossible shape {ne}")
        code = cur.u32(f"type of {name!r}")
        try:
            qtype = GGMLQuantizationType(code)
        except ValueError:
            raise cur.fail(f"tensor {name!r} has unknown ggml type {code}") from None
        if qtype not in GGML_QUANT_SIZES:
            raise cur.fail(f"tensor {name!r} has ggml type {qtype.name} without a known block size")
        offset = cur.u64(f"offset of {name!r}")
        return name, qtype, tuple(reversed(ne)), offset

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise ModelLoadError(f"{self.path}: metadata has no general.architecture; the file cannot be used as a model")
        return arch

    def tensor_info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise ModelLoadError(f"{self.path}: tensor {name!r} is missing; the file is incomplete or of another architecture") from None

    def tensor_bytes(self, name: str) -> np.ndarray:
        """The raw bytes of a tensor as a read-only uint8 view of the mmap (no copy, no read yet)."""
        info = self.tensor_info(name)
        return np.frombuffer(self._mmap, dtype=np.uint8, count=info.nbytes, offset=info.offset)

    def tensor_bytes_torch(self, name: str) -> torch.Tensor:
        """The same bytes as a torch uint8 tensor; callers only read it (the mapping is read-only)."""
        import warnings

        import torch  # here, not at the top: reading a vocabulary alone should not pay torch's import

        info = self.tensor_info(name)
        if info.nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "buffer is not writable": we never write it
            return torch.frombuffer(self._mmap, dtype=torch.uint8, count=info.nbytes, offset=info.offset)

    def close(self) -> None:
        try:
            self._mmap.close()
        except BufferError:
            pass  # views handed out still reference the mapping; it closes when they are gone

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Open and validate a GGUF file; raises `ModelLoadError` for anything that is not a sound GGUF v2/v3."""
    return GGUFFile(path)
