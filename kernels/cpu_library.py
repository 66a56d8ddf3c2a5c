"""The CPU kernels' shared library: every `cpu_*.cpp` here compiled into one `.so` with g++ and loaded with ctypes.

Why a plain shared library and not a torch extension: it compiles in a few seconds with the system `g++` (no torch
headers, no ninja), and a ctypes call costs a few microseconds, like a pybind one. Why one library for all kernels:
they share one thread pool (`cpu_pool.h`), and two pools' spinning helpers would take each other's cores.

It is built on first use into `$NBLLM_CACHE_DIR/kernels` (default `~/.cache/nbllm/kernels`) under a name that
hashes the sources and the flags, so an edited kernel is rebuilt and concurrent builders never see a half-written
file. Where it cannot be had (no AVX2/FMA, no compiler, build error) `unavailable_reason()` says why in one line;
nothing here raises at import.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import torch

__all__ = ["I", "P", "function", "kernels_own_the_threads", "library", "num_threads", "ptr", "unavailable_reason"]

_DIR = Path(__file__).parent
#: ctypes argument types of the kernels' C functions: pointers (a tensor's `data_ptr()`, or None) and sizes.
P, I = ctypes.c_void_p, ctypes.c_int64


def ptr(t: torch.Tensor | None) -> int | None:
    """A `P` argument: the tensor's address, or None (a null pointer) for an optional tensor left out."""
    return None if t is None else t.data_ptr()


# -march=native: the library is built on the machine that runs it, and the kernels use what it has beyond AVX2
# (AVX-VNNI / AVX512-VNNI integer dot products); the CPU's identity is part of the cache key. NBLLM_CPU_ARCH
# names another target (e.g. `haswell`: the AVX2-only paths most laptops run, testable on an AVX-512 machine).
_FLAGS = (f"-march={os.environ.get('NBLLM_CPU_ARCH', 'native')}", "-O3", "-mavx2", "-mfma", "-mf16c", "-pthread",
          "-fPIC", "-shared", "-std=c++17")


def _sources() -> list[Path]:
    return sorted([*_DIR.glob("cpu_*.cpp"), *_DIR.glob("cpu_*.h")])


def _cpu_identity() -> bytes:
    """What -march=native compiles for (a cache folder may be shared by machines with different CPUs)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor().encode()
    return "".join(line for line in info.splitlines(keepends=True)
                   if line.startswith(("model name", "flags")))[:4096].encode()


def _build_dir() -> Path:
    return Path(os.environ.get("NBLLM_CACHE_DIR", Path.home() / ".cache" / "nbllm")) / "kernels"


@cache
def _load() -> ctypes.CDLL | str:
    """The loaded library, or a one-line reason it cannot be had on this machine."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return f"the CPU lacks AVX2 (torch reports {torch.backends.cpu.get_cpu_capability()})"
    digest = hashlib.sha256(" ".join(_FLAGS).encode() + _cpu_identity())
    for path in _sources():
        digest.update(path.name.encode() + path.read_bytes())
    target = _build_dir() / f"nbllm_cpu-{digest.hexdigest()[:16]}.so"
    if not target.is_file():
        compiler = os.environ.get("CXX", "g++")
        units = [str(p) for p in _sources() if p.suffix == ".cpp"]
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                built = Path(tmp) / target.name
                r = subprocess.run([compiler, *_FLAGS, *units, "-o", str(built)], capture_output=True, text=True)
                if r.returncode != 0:
                    return f"{compiler} failed to build the CPU kernels: {r.stderr.strip().splitlines()[-1:]}"
                os.replace(built, target)
        except OSError as exc:  # no compiler, or an unwritable cache folder
            return f"cannot build the CPU kernels with {compiler!r} into {target.parent}: {exc}"
    try:
        return ctypes.CDLL(str(target))
    except OSError as exc:
        return f"cannot load {target}: {exc}"


def unavailable_reason() -> str | None:
    """None when the kernels run here; otherwise why not (one line)."""
    lib = _load()
    return lib if isinstance(lib, str) else None


@cache
def function(name: str, *argtypes: type, restype: type | None = None) -> ctypes._CFuncPtr:
    """The library's C function `name` with its argument and result types declared (None: returns void)."""
    fn = getattr(library(), name)
    fn.argtypes = list(argtypes)
    fn.restype = restype
    return fn


def library() -> ctypes.CDLL:
    """The library (declare each function's argtypes where it is wrapped); RuntimeError where it cannot be had."""
    lib = _load()
    if isinstance(lib, str):
        raise RuntimeError(f"nbllm CPU kernels unavailable: {lib}")
    return lib


_threads: int | None = None  # set while `kernels_own_the_threads` is entered


def num_threads() -> int:
    """Threads the kernels run on: torch's intra-op thread count, or what it was on entering
    `kernels_own_the_threads`."""
    return _threads or torch.get_num_threads()


@contextmanager
def kernels_own_the_threads() -> Iterator[None]:
    """Run the kernels on torch's threads' count and torch itself on one thread, for a forward whose heavy work is
    ours. Why: torch's OpenMP workers and the pool's helpers spin-wait for work on the same cores, and a core held
    by one spinning side stalls the other (measured: residual adds and GELUs of a 512-token prefill 20-30x slower
    than alone, the whole prefill ~25% slower); waking sleeping threads instead costs ~0.4 ms each time in a VM.
    """
    global _threads
    outer, count = _threads, torch.get_num_threads()
    _threads = outer or count
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(count)
        _threads = outer
