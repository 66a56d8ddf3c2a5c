"""One sequence's progress through its grammar: the engine's per-request view of a constraint.

The token index answers for states; the matcher remembers which state a sequence is in, so the engine can ask
for the next-token mask, feed each appended token, and know when the output is complete. A matcher is a small
value per sequence; everything expensive (masks, transitions) lives in the shared `TokenIndex`.
"""

from __future__ import annotations

from typing import Any

from nbllm.constrain.cache import compile_constraint, token_index
from nbllm.constrain.jump_forward import JumpForward
from nbllm.constrain.token_index import TokenIndex, TokenMask, VocabTrie
from nbllm.tokenizer.tokenizer import Tokenizer


def matcher_for(kind: str, spec: Any, tokenizer: Tokenizer, *, jump_forward: bool = True) -> Matcher:
    """A matcher at the start of constraint `kind` (`"json_schema"`, `"regex"`, `"choices"` or `"grammar"`)
    with value `spec`, over `tokenizer`'s vocabulary. Grammar, vocabulary trie and token index are cached, so
    this costs a compile only the first time a constraint is seen. Raises `SchemaError` for bad input."""
    index = token_index(compile_constraint(kind, spec), VocabTrie.from_tokenizer(tokenizer))
    if not jump_forward:
        return Matcher(index)
    return Matcher(index, JumpForward(index, lambda text: tokenizer.encode(text, False, parse_special=False)))


class Matcher:
    """The grammar state after the tokens fed so far, and the bytes they spelled."""

    def __init__(self, index: TokenIndex, jump: JumpForward | None = None) -> None:
        self.index, self.jump = index, jump
        self.state = index.initial()
        self.data = bytearray()
        self.ended = False  # an end-of-generation token was accepted

    def mask(self) -> TokenMask:
        """The tokens allowed next (end-of-generation ones only where the output may end)."""
        return self.index.mask(self.state)

    @property
    def accepting(self) -> bool:
        return self.index.grammar.accepting(self.state)

    @property
    def complete(self) -> bool:
        """The output is a whole match and nothing may extend it: the sequence can end without sampling."""
        return self.ended or (self.accepting and not self.mask().num_text)

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")

    def plan(self, token: int) -> list[int]:
        """The tokens to append for sampled `token`: itself, or with jump-forward its re-tokenized bytes plus
        the forced continuation (see `jump_forward`)."""
        if self.jump is None or token in self.index.trie.eos_set:
            return [token]
        return self.jump.extend(self.state, token)

    def advance(self, token: int) -> bool:
        """Feed one token; False (state unchanged) when the grammar does not allow it here."""
        if token in self.index.trie.eos_set:
            self.ended = self.accepting
            return self.ended
        nxt = self.index.advance(self.state, token)
        if nxt is None:
            return False
        self.state = nxt
        self.data += self.index.trie.token_bytes[token]
        return True
