"""Jump-forward decoding: where the grammar allows exactly one continuation, append it without sampling.

After `{"name` in a schema with one property the bytes `": ` are certain; sampling them costs a forward pass a
token for no information. Jump-forward (SGLang's "compressed FSM") appends such forced bytes as tokens at once;
the engine computes their K/V in the next step together, as it computes a prompt's.

Which tokens spell the forced bytes matters: the model has only ever seen the tokenizer's own segmentation, and
`"na` + `me"` where training text always had `"name"` is an input it was never trained on. So, as SGLang does,
the boundary is re-tokenized: the sampled token's bytes and the forced bytes are encoded together, and the
result replaces the sampled token (it has no K/V yet, so nothing is rolled back). The *last* token of that
encoding is left out: the bytes after the forced run are free, and the token that merges the run's end with
them (`"` + `John` → `"John`) is the model's to pick, under the mask. Only when the grammar ends with the run is
the last token kept, since nothing can follow it.
"""

from __future__ import annotations

from collections.abc import Callable

from nbllm.constrain.automaton import State
from nbllm.constrain.token_index import TokenIndex

Encode = Callable[[str], list[int]]


class JumpForward:
    """Plans the tokens to append after a sampled one, for one grammar over one vocabulary.

    `encode` turns text into token ids the way the tokenizer segments it, without special-token parsing and
    without BOS/EOS (`Tokenizer.encode(text, False, parse_special=False)`).
    """

    def __init__(self, index: TokenIndex, encode: Encode) -> None:
        self.index, self.encode = index, encode

    def extend(self, state: State, token: int) -> list[int]:
        """The tokens that replace sampled `token` (allowed in `state`): `[token]`, or the tokens spelling its
        bytes followed by forced bytes of the grammar. Every plan spells a string the grammar allows from
        `state`, and is only taken when it adds at least one token."""
        after = self.index.advance(state, token)
        if after is None:
            return [token]
        forced = self.index.grammar.forced_bytes(after)
        if not forced:
            return [token]
        trie = self.index.trie
        head = trie.token_bytes[token]
        text = _utf8_prefix(head + forced, len(head) + 1)
        if text is None:
            return [token]
        spelled = text.encode()
        ids = self.encode(text)
        if b"".join(trie.token_bytes[i] for i in ids) != spelled or any(not trie.is_text(i) for i in ids):
            return [token]  # the tokenizer normalised the text: no exact spelling to trust
        end = self.index.step_bytes(state, spelled)
        if end is None:
            return [token]
        if self.index.mask(end).num_text:  # the run's last token may merge with what the model writes next
            ids = ids[:-1]
        kept = sum(len(trie.token_bytes[i]) for i in ids)
        return ids if kept > len(head) else [token]


def _utf8_prefix(data: bytes, min_len: int) -> str | None:
    """The longest prefix of `data` that is whole UTF-8 characters, if at least `min_len` bytes long."""
    for end in range(len(data), min_len - 1, -1):
        try:
            return data[:end].decode("utf-8")
        except UnicodeDecodeError:
            if len(data) - end >= 3:  # a character is at most 4 bytes: an earlier error will not heal
                return None
    return None
