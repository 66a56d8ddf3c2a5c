"""Streaming detokenization: one token id in, the newly completed text out.

Tokens are byte strings, and a character may span several tokens (byte-fallback tokens such as `<0xE2>`
carry one byte each; byte-level BPE tokens can end mid-character). Emitting each token's bytes as soon as
it arrives would print U+FFFD in the middle of an emoji, so the bytes go through an incremental UTF-8
decoder that holds back an incomplete tail until the rest arrives. Because Python's incremental decoder
implements the same state machine as `bytes.decode`, the deltas concatenate (after `flush`) to exactly
`Tokenizer.decode(all_ids)`, including U+FFFD for bytes that never form a character.
"""

from __future__ import annotations

import codecs

from nbllm.tokenizer.tokenizer import Tokenizer


class Detokenizer:
    """Turns a stream of token ids into text deltas that are always whole characters.

    `at_start` says whether the ids begin a text (as `decode` assumes): SPM vocabularies with
    add_space_prefix then drop the phantom leading space. Pass `at_start=False` when streaming a
    continuation of a prompt, where a leading space is real.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = False, at_start: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = False  # the decoder holds the first bytes of a character
        self._strip_space = at_start and tokenizer.add_space_prefix

    def add(self, token_id: int) -> str:
        """Feed one token; returns the text it completes (often "", never a partial character). This runs for
        every generated token: ASCII bytes with nothing pending decode directly, without the incremental decoder
        (its `decode` is Python code, ~0.4 us a call)."""
        data = self._tokenizer.token_bytes(token_id, self._skip_special)
        if self._pending or not data.isascii():
            delta = self._decoder.decode(data)
            self._pending = bool(self._decoder.getstate()[0])
        else:
            delta = data.decode("ascii")
        return self._emit(delta)

    def flush(self) -> str:
        """End of stream: returns U+FFFD for any bytes left incomplete (usually "")."""
        self._pending = False
        return self._emit(self._decoder.decode(b"", final=True))

    def _emit(self, delta: str) -> str:
        if self._strip_space and delta:
            self._strip_space = False
            delta = delta.removeprefix(" ")
        return delta
