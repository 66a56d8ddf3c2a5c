"""Token index: allowed-token masks equal a brute-force check of every token against the byte automaton."""

from __future__ import annotations

import numpy as np
import pytest

from nbllm.constrain import compile_regex
from nbllm.constrain.cache import compile_constraint, token_index
from nbllm.constrain.token_index import MaskCache, TokenIndex, TokenMask, VocabTrie

EOS = 1
SPECIAL = 0
# A small vocabulary with the awkward cases: duplicate spellings (a byte token and a normal one), tokens that
# are prefixes of others, multi-byte characters split over byte tokens, a special token, an empty token.
SMALL = [b"<pad>", b"</s>", b"a", b"ab", b"abc", b"b", b"a", b"1", b"12", b"123", b"-", b".", b"\xc3", b"\xa9",
         b"\xc3\xa9", b"\"", b"{\"", b"\"}", b"{", b"}", b":", b" ", b"", b"x1", b"1.5", b"\n"]


def small_trie() -> VocabTrie:
    text = np.array([i not in (SPECIAL, EOS) and len(b) > 0 for i, b in enumerate(SMALL)])
    return VocabTrie.build(SMALL, text, [EOS])


def brute_force(index: TokenIndex, state) -> np.ndarray:
    """Every token stepped byte by byte from `state` (what the trie walk must reproduce)."""
    grammar, trie = index.grammar, index.trie
    allowed = np.zeros(trie.vocab_size, dtype=bool)
    for token, data in enumerate(trie.token_bytes):
        if trie.is_text(token):
            allowed[token] = grammar.step_bytes(state, data) is not None
    allowed[trie.eos_ids] = grammar.accepting(state)
    return allowed


def reachable_states(index: TokenIndex, limit: int) -> list:
    """States reached by tokens from the initial one, breadth first."""
    seen, order = {index.initial()}, [index.initial()]
    for state in order:
        for token in np.flatnonzero(index.mask(state).to_numpy()):
            nxt = index.advance(state, int(token))
            if nxt is not None and nxt not in seen and len(order) < limit:
                seen.add(nxt)
                order.append(nxt)
    return order


def test_trie_has_one_node_per_distinct_prefix():
    trie = small_trie()
    prefixes = {data[:k] for i, data in enumerate(SMALL) if trie.is_text(i) for k in range(len(data) + 1)}
    assert trie.num_nodes == len(prefixes)
    assert trie.token_node[2] == trie.token_node[6]  # two tokens spelling "a" share a node
    assert not trie.is_text(SPECIAL) and not trie.is_text(EOS) and not trie.is_text(22)


@pytest.mark.parametrize("pattern", [r"[0-9]+(\.[0-9]+)?", r"\{\"[a-c]{1,3}\":-?1[0-9]*\}", r"(ab|abc|é)+x?1?",
                                     r"a*", r"[^a]{2}\n"])
def test_small_vocab_masks_equal_brute_force(pattern):
    index = TokenIndex(compile_regex(pattern), small_trie(), MaskCache(1 << 20))
    for state in reachable_states(index, 40):
        mask = index.mask(state)
        expected = brute_force(index, state)
        np.testing.assert_array_equal(mask.to_numpy(), expected)
        assert mask.eos == index.grammar.accepting(state)
        assert mask.num_text == int(expected.sum()) - (EOS if mask.eos else 0)
        for token in range(len(SMALL)):
            assert (token in mask) == expected[token]


def test_special_and_eos_tokens():
    index = TokenIndex(compile_regex(r"a|ab"), small_trie(), MaskCache(1 << 20))
    start = index.initial()
    assert not index.mask(start).to_numpy()[[SPECIAL, EOS]].any()  # not accepting: no EOS
    after_a = index.advance(start, 2)
    row = index.mask(after_a).to_numpy()
    assert row[EOS] and not row[SPECIAL] and row[5]  # "a" may end or go on with "b"
    assert index.advance(start, SPECIAL) is None and index.advance(start, EOS) is None
    done = index.advance(after_a, 5)
    assert index.mask(done).num_text == 0 and index.mask(done).eos


def test_mask_forms_round_trip():
    rng = np.random.default_rng(0)
    for density in (0.001, 0.5, 0.999):
        allowed = rng.random(5000) < density
        mask = TokenMask.from_ids(np.flatnonzero(allowed), 5000, int(allowed.sum()), eos=False)
        np.testing.assert_array_equal(mask.to_numpy(), allowed)
        assert mask.nbytes <= 5000 // 8 + 1
    forms = {TokenMask.from_ids(np.flatnonzero(rng.random(5000) < d), 5000, 0, False).form for d in (0.001, 0.5, 0.999)}
    assert forms == {"allowed", "bits", "disallowed"}


def test_masks_are_memoized_and_bounded():
    masks = MaskCache(max_bytes=64)
    index = TokenIndex(compile_regex(r"[0-9a-z]{1,8}"), small_trie(), masks)
    state = index.initial()
    assert index.mask(state) is index.mask(state)
    for state in reachable_states(index, 10):
        index.mask(state)
    assert masks.nbytes <= 64 or len(masks) == 1


def test_compiled_constraints_and_indexes_are_cached_by_content():
    trie = small_trie()
    a = compile_constraint("regex", r"[0-9]+")
    assert compile_constraint("regex", r"[0-9]+") is a
    assert token_index(a, trie) is token_index(compile_constraint("regex", r"[0-9]+"), trie)
    assert token_index(a, trie) is not token_index(compile_constraint("regex", r"[0-9]*"), trie)


@pytest.mark.slow
def test_gemma_vocab_masks_equal_brute_force(default_model_path):
    from nbllm.tokenizer import from_gguf

    tokenizer = from_gguf(default_model_path)
    trie = VocabTrie.from_tokenizer(tokenizer)
    assert VocabTrie.from_tokenizer(tokenizer) is trie
    assert trie.vocab_size == 262144 and trie.eos_set == tokenizer.eos_token_ids
    index = TokenIndex(compile_regex(r'\{"name": "[a-zé ]{1,12}", "age": [1-9][0-9]?\}'), trie, MaskCache(1 << 24))
    prefixes = (b"", b'{"name": "', b'{"name": "jo', b'{"name": "\xc3', b'{"name": "ab", "age": 4')
    states = [index.step_bytes(index.initial(), p) for p in prefixes]  # the fourth is inside a character
    for state in states:
        np.testing.assert_array_equal(index.mask(state).to_numpy(), brute_force(index, state))
    control = [i for i in range(trie.vocab_size) if not trie.is_text(i) and i not in trie.eos_set]
    assert control and not index.mask(states[1]).to_numpy()[control].any()
