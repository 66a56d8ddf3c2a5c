"""Load time of the default model: nbllm's `LLM()` beside llama.cpp's `Llama()`, measured in the same run.

Both are measured warm (the model file and nbllm's dequantized-weight cache in the page cache, as on a second
notebook start) and exclude the Python interpreter's and torch's own import, which llama-cpp-python's number
excludes too (its shared library is loaded at import). Each nbllm sample is a fresh process so no in-process
cache helps it.

    python benchmarks/load_time.py [--repeats 5] [--no-peer]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

_SAMPLE = r"""
import json, time
import torch, nbllm
from nbllm.defaults import default_model_path
from nbllm.loader import load_model
from nbllm.tokenizer import from_gguf
path = default_model_path()
t0 = time.perf_counter()
llm = nbllm.LLM(device="cpu")
t1 = time.perf_counter()
llm.generate(["Hello"], nbllm.SamplingParams(max_tokens=1))
t2 = time.perf_counter()
model, _ = load_model(path)
t3 = time.perf_counter()
from_gguf(path)
t4 = time.perf_counter()
print(json.dumps({"llm": t1 - t0, "first_token": t2 - t0, "weights": t3 - t2, "tokenizer": t4 - t3}))
"""


def nbllm_samples(repeats: int) -> list[dict[str, float]]:
    subprocess.run([sys.executable, "-c", _SAMPLE], check=True, capture_output=True)  # warm the caches
    out = []
    for _ in range(repeats):
        r = subprocess.run([sys.executable, "-c", _SAMPLE], check=True, capture_output=True, text=True)
        out.append(json.loads(r.stdout.strip().splitlines()[-1]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-peer", action="store_true", help="skip llama.cpp")
    args = parser.parse_args()

    samples = nbllm_samples(args.repeats)
    med = {k: statistics.median(s[k] for s in samples) for k in samples[0]}
    rows = [("nbllm LLM() (weights + tokenizer + KV pool)", med["llm"]),
            ("  LLM() and a first generated token", med["first_token"]),
            ("  of which weights (load_model)", med["weights"]),
            ("  of which tokenizer (from_gguf)", med["tokenizer"])]
    if not args.no_peer:
        from peers import llamacpp_timings
        from nbllm.defaults import default_model_path

        peer = llamacpp_timings(default_model_path(), load_repeats=args.repeats, prompt_repeats=1, decode_repeats=1,
                                decode_tokens=8)
        rows.append((f"llama.cpp Llama() (llama-cpp-python {peer['llama_cpp_python']})", peer["load_s_median"]))
    width = max(len(r[0]) for r in rows)
    print(f"{'default model, warm, median of ' + str(args.repeats):<{width}}  seconds")
    for name, seconds in rows:
        print(f"{name:<{width}}  {seconds:7.3f}")
    if not args.no_peer:
        print(f"\nnbllm / llama.cpp: {med['llm'] / rows[-1][1]:.2f}x")


if __name__ == "__main__":
    main()
