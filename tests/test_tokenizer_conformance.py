"""llama.cpp's tokenizer conformance vectors (`models/ggml-vocab-*.gguf` with `.inp`/`.out`), all of them.

llama.cpp's `test-tokenizer-0` tokenizes each text with add_special=false and parse_special=false, so the
expected ids hold no BOS and control-token texts are plain text (user-defined tokens are still matched).
"""

import os
import subprocess

import pytest

from nbllm.tokenizer import from_gguf

VOCABS = ["llama-spm", "llama-bpe", "qwen2", "qwen35", "gpt-2", "phi-3", "gemma-4", "command-r",
          "deepseek-llm", "deepseek-coder", "falcon", "mpt", "starcoder", "refact"]
SCRIPT = "/work/shared/tools/peer_vectors.sh"
SEPARATOR = "\n__ggml_vocab_test__\n"


@pytest.fixture(scope="module")
def vectors_dir():
    if not os.path.exists(SCRIPT):
        pytest.skip(f"{SCRIPT} is not available in this checkout")
    run = subprocess.run(["bash", SCRIPT], capture_output=True, text=True, timeout=900, check=False)
    if run.returncode != 0:
        pytest.skip(f"cannot fetch llama.cpp's vectors from PyPI (llama-cpp-python sdist): {run.stderr.strip()[-300:]}")
    return run.stdout.strip().splitlines()[-1]


def read_cases(path):
    """Texts and expected ids, split as test-tokenizer-0's read_tests does."""
    with open(path + ".inp", encoding="utf-8", newline="") as f:
        raw = f.read()
    texts, pos = [], 0
    while pos < len(raw):
        end = raw.find(SEPARATOR, pos)
        texts.append(raw[pos:] if end < 0 else raw[pos:end])
        pos = len(raw) if end < 0 else end + len(SEPARATOR)
    with open(path + ".out", encoding="utf-8") as f:
        expected = [[int(t) for t in line.split()] for line in f.read().split("\n")]
    return list(zip(texts, expected[: len(texts)]))


@pytest.mark.parametrize("name", VOCABS)
def test_llama_cpp_vectors(vectors_dir, name):
    path = os.path.join(vectors_dir, f"ggml-vocab-{name}.gguf")
    tok = from_gguf(path)
    cases = read_cases(path)
    failures = [(text, ids, got) for text, ids in cases
                if (got := tok.encode(text, add_special_tokens=False, parse_special=False)) != ids]
    print(f"{name}: {len(cases) - len(failures)}/{len(cases)} llama.cpp vectors pass")
    assert len(cases) >= 40
    assert not failures, f"{name}: first failure {failures[0]}"
