"""CPU matmul against int8 weight codes with per-group fp32 scales and offsets (`cpu_int8_gemm.cpp`), via ctypes.

Why a plain shared library and not a torch extension: it compiles in about a second with the system `g++` (no torch
headers, no ninja), and a ctypes call costs a few microseconds, like a pybind one. It is built on first use into
`$NBLLM_CACHE_DIR/kernels` (default `~/.cache/nbllm/kernels`) under a name that hashes the source and the flags, so an
edited kernel is rebuilt and concurrent builders never see a half-written file. It runs on `torch.get_num_threads()`
threads: the caller and helpers that claim chunks of rows (see the C++ source for why not OpenMP).

Where it cannot run (no AVX2/FMA, no compiler, build error) `unavailable_reason()` says why and callers keep dense
weights; nothing here raises at import.

Layout (`int8_linear`, `int8_dequantize`): codes `q: int8 [N, K]`, scales `s: float32 [N, K / G]`, offsets `o` (same
shape, or None), `W[n, k] = s[n, k // G] * q[n, k] - o[n, k // G]` with `G` a multiple of 8 dividing `K`.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

__all__ = ["int8_dequantize", "int8_linear", "unavailable_reason"]

_SOURCE = Path(__file__).with_name("cpu_int8_gemm.cpp")
_FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-pthread", "-fPIC", "-shared", "-std=c++17")
_P = ctypes.c_void_p
_I = ctypes.c_int64


def _build_dir() -> Path:
    return Path(os.environ.get("NBLLM_CACHE_DIR", Path.home() / ".cache" / "nbllm")) / "kernels"


@cache
def _library() -> ctypes.CDLL | str:
    """The loaded kernel library, or a one-line reason it cannot be had on this machine."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return f"the CPU lacks AVX2 (torch reports {torch.backends.cpu.get_cpu_capability()})"
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(_FLAGS).encode()).hexdigest()[:16]
    target = _build_dir() / f"cpu_int8_gemm-{key}.so"
    if not target.is_file():
        compiler = os.environ.get("CXX", "g++")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                built = Path(tmp) / target.name
                r = subprocess.run([compiler, *_FLAGS, str(_SOURCE), "-o", str(built)], capture_output=True, text=True)
                if r.returncode != 0:
                    return f"{compiler} failed to build {_SOURCE.name}: {r.stderr.strip().splitlines()[-1:]}"
                os.replace(built, target)
        except OSError as exc:  # no compiler, or an unwritable cache folder
            return f"cannot build {_SOURCE.name} with {compiler!r} into {target.parent}: {exc}"
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as exc:
        return f"cannot load {target}: {exc}"
    lib.nbllm_int8_gemm.argtypes = [_P, _I, _I, _P, _P, _P, _I, _I, _I, _P, _I, ctypes.c_int]
    lib.nbllm_int8_gemm.restype = None
    lib.nbllm_int8_dequantize.argtypes = [_P, _P, _P, _I, _I, _I, _P, ctypes.c_int]
    lib.nbllm_int8_dequantize.restype = None
    return lib


def unavailable_reason() -> str | None:
    """None when the kernels run here; otherwise why not (one line)."""
    lib = _library()
    return lib if isinstance(lib, str) else None


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check(q: torch.Tensor, s: torch.Tensor, o: torch.Tensor | None) -> int:
    n, k = q.shape
    group = k // s.shape[1]
    ok = (q.dtype == torch.int8 and s.dtype == torch.float32 and q.is_contiguous() and s.is_contiguous()
          and group % 8 == 0 and group * s.shape[1] == k and s.shape[0] == n
          and (o is None or (o.shape == s.shape and o.dtype == torch.float32 and o.is_contiguous())))
    if not ok:
        raise ValueError(f"bad int8 weight layout: q {tuple(q.shape)} {q.dtype}, s {tuple(s.shape)} {s.dtype}, "
                         f"o {None if o is None else (tuple(o.shape), o.dtype)}")
    return group


def int8_linear(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, o: torch.Tensor | None) -> torch.Tensor:
    """`x[..., K] · W^T -> [..., N]` in fp32 (x is converted to contiguous fp32 first)."""
    group = _check(q, s, o)
    lib = _library()
    if isinstance(lib, str):
        raise RuntimeError(f"nbllm CPU int8 kernels unavailable: {lib}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).to(torch.float32).contiguous()
    n, k = q.shape
    if x2.shape[1] != k:
        raise ValueError(f"x has {x2.shape[1]} features, the weight {k}")
    y = torch.empty((x2.shape[0], n), dtype=torch.float32)
    if x2.shape[0]:
        lib.nbllm_int8_gemm(x2.data_ptr(), x2.shape[0], k, q.data_ptr(), s.data_ptr(), _ptr(o), n, k, group,
                            y.data_ptr(), n, torch.get_num_threads())
    return y.view(*lead, n)


def int8_dequantize(q: torch.Tensor, s: torch.Tensor, o: torch.Tensor | None) -> torch.Tensor:
    """The dense fp32 weight `[N, K]`: `fmsub(q, s, o)` per element, one rounding."""
    group = _check(q, s, o)
    lib = _library()
    if isinstance(lib, str):
        raise RuntimeError(f"nbllm CPU int8 kernels unavailable: {lib}")
    out = torch.empty(q.shape, dtype=torch.float32)
    if q.numel():
        lib.nbllm_int8_dequantize(q.data_ptr(), s.data_ptr(), _ptr(o), q.shape[0], q.shape[1], group,
                                  out.data_ptr(), torch.get_num_threads())
    return out

