"""Jump-forward: forced continuations become tokens the tokenizer would have produced, never invalid ones."""

from __future__ import annotations

import numpy as np
import pytest

from nbllm.constrain import compile_regex
from nbllm.constrain.jump_forward import JumpForward
from nbllm.constrain.matcher import Matcher, matcher_for
from nbllm.constrain.token_index import MaskCache, TokenIndex, VocabTrie

VOCAB = [b"<pad>", b"</s>", b"{", b"{\"", b"\"", b"name", b"na", b"me", b"\":", b" ", b" \"", b"\"}", b"}",
         b"a", b"b", b"ab", b"\xc3", b"\xa9", b"\xc3\xa9", b"hello", b" world", b" wor", b"ld", b"x"]
EOS = 1


def small_index(pattern: str) -> TokenIndex:
    text = np.array([i > EOS for i in range(len(VOCAB))])
    return TokenIndex(compile_regex(pattern), VocabTrie.build(VOCAB, text, [EOS]), MaskCache(1 << 20))


def longest_match(text: str) -> list[int]:
    """A stand-in tokenizer: greedy longest match over `VOCAB` (deterministic, exact spelling)."""
    data, ids = text.encode(), []
    while data:
        token = max((i for i in range(2, len(VOCAB)) if data.startswith(VOCAB[i])), key=lambda i: len(VOCAB[i]))
        ids.append(token)
        data = data[len(VOCAB[token]):]
    return ids


def spelled(ids: list[int]) -> bytes:
    return b"".join(VOCAB[i] for i in ids)


def test_forced_run_is_retokenized_and_left_open_at_its_end():
    index = small_index(r'\{"name": "[ab]+"\}')
    jump = JumpForward(index, longest_match)
    plan = jump.extend(index.initial(), VOCAB.index(b"{"))
    # `{` + forced `"name": "` re-tokenized as `{"` `name` `":` ` "`; the last token stays open (`"` could merge
    # with the string's first characters in a real vocabulary), so the plan ends after `":`.
    assert plan == [VOCAB.index(b'{"'), VOCAB.index(b"name"), VOCAB.index(b'":')]
    assert index.step_bytes(index.initial(), spelled(plan)) is not None


def test_run_to_the_end_of_the_grammar_is_taken_whole():
    index = small_index(r"hello world")
    matcher = Matcher(index, JumpForward(index, longest_match))
    plan = matcher.plan(VOCAB.index(b"hello"))
    assert spelled(plan) == b"hello world"
    assert all(matcher.advance(t) for t in plan) and matcher.complete


def test_no_jump_without_forced_bytes_or_gain():
    index = small_index(r"[ab]+x")
    jump = JumpForward(index, longest_match)
    assert jump.extend(index.initial(), VOCAB.index(b"a")) == [VOCAB.index(b"a")]  # "a", "b" or "x" may follow
    index = small_index(r"ax")
    assert JumpForward(index, longest_match).extend(index.initial(), VOCAB.index(b"a")) == [VOCAB.index(b"a"),
                                                                                             VOCAB.index(b"x")]


def test_partial_character_is_not_jumped_over():
    index = small_index(r"\xc3\xa9x|éx")  # é then x: after the byte token \xc3, \xa9x is forced
    jump = JumpForward(index, longest_match)
    plan = jump.extend(index.initial(), VOCAB.index(b"\xc3"))  # starts mid-character: no exact text to encode
    assert spelled(plan).startswith(b"\xc3") and index.step_bytes(index.initial(), spelled(plan)) is not None


def test_untrustworthy_encoding_is_not_used():
    index = small_index(r"ax")
    jump = JumpForward(index, lambda text: [VOCAB.index(b"b")])  # spells something else
    assert jump.extend(index.initial(), VOCAB.index(b"a")) == [VOCAB.index(b"a")]


@pytest.mark.slow
def test_gemma_plans_match_the_tokenizer(default_model_path):
    from nbllm.tokenizer import from_gguf

    tokenizer = from_gguf(default_model_path)
    cases = (("regex", r'\{"name": "[a-z]{1,10}", "age": [0-9]{1,3}\}', '{"'),
             ("choices", ["Paris, France", "Paris, Texas"], "Paris"))
    for kind, spec, start in cases:
        matcher = matcher_for(kind, spec, tokenizer)
        plan = matcher.plan(tokenizer.encode(start, False)[0])
        text = b"".join(tokenizer.token_bytes(t) for t in plan).decode()
        assert len(plan) > 1 and plan == tokenizer.encode(text, False)  # the tokenizer's own segmentation
        assert all(matcher.advance(t) for t in plan)
