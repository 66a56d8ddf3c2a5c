"""The tokenizer object the engine, the front-end and the constraint compiler share.

Encoding runs in `spm.py` (SentencePiece vocabularies) or HF `tokenizers` (BPE, built by `build.py`); decoding is done here from per-token byte strings,
because a token is a run of *bytes* (byte-fallback `<0xE2>` tokens carry a third of a character), and the
same byte view serves full decodes, the incremental detokenizer and vocabulary scans for constrained output.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from functools import cache
from typing import Any

from nbllm.errors import TokenizerError
from nbllm.gguf.reader import open_gguf
from nbllm.tokenizer.build import HFEncoder, load_or_build
from nbllm.tokenizer.chat_template import ChatTemplate, builtin_template
from nbllm.tokenizer.spm import SpmEncoder
from nbllm.tokenizer.vocab import EOG_TEXTS, SPACE, Kind, TokenType, Vocab, vocab_from_metadata


class Tokenizer:
    """Text ↔ token ids for one GGUF vocabulary, with llama.cpp's semantics.

    `encode` matches special-token texts (e.g. `<start_of_turn>`) as single tokens, as llama.cpp does with
    parse_special=True, because chat templates render them as text; pass `parse_special=False` to treat
    control tokens as plain text (user-defined tokens are still matched, as in llama.cpp).
    """

    def __init__(self, vocab: Vocab, encoder: SpmEncoder | HFEncoder) -> None:
        self.vocab = vocab
        self._encoder = encoder
        self._chat_template: ChatTemplate | None = None  # compiled on first use
        self._piece_cache: tuple[dict[int, bytes], dict[int, bytes]] = ({}, {})
        eog = {vocab.eos_id, *vocab.extra_eog_ids, *(encoder.token_to_id(t) for t in EOG_TEXTS)}
        self.eos_token_ids: frozenset[int] = frozenset(i for i in eog if i is not None)

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """Build from an already parsed GGUF metadata dict (e.g. the model loader's)."""
        vocab = vocab_from_metadata(metadata)
        return cls(vocab, SpmEncoder(vocab, list(vocab.tokens)) if vocab.kind is Kind.SPM else load_or_build(vocab))

    # -- properties -------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.vocab.size

    @property
    def bos_token_id(self) -> int | None:
        return self.vocab.bos_id

    @property
    def eos_token_id(self) -> int | None:
        return self.vocab.eos_id

    @property
    def bos_token(self) -> str:
        return "" if self.vocab.bos_id is None else self.id_to_piece(self.vocab.bos_id)

    @property
    def eos_token(self) -> str:
        return "" if self.vocab.eos_id is None else self.id_to_piece(self.vocab.eos_id)

    @property
    def chat_template(self) -> str | None:
        return self.vocab.chat_template

    @property
    def add_space_prefix(self) -> bool:
        """SPM vocabularies that prefix text with a space also drop one leading space when decoding."""
        return self.vocab.add_space_prefix

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """The prompt text for a conversation (encode it with `add_special_tokens=False`: it holds BOS).

        Uses the GGUF's template, else a builtin one matching the vocabulary's turn markers (Gemma, ChatML),
        else plain "Role: content" paragraphs (`chat_template.FALLBACK_TEMPLATE`).
        """
        if self._chat_template is None:
            source = self.chat_template or builtin_template(lambda text: self._encoder.token_to_id(text) is not None)
            self._chat_template = ChatTemplate(source, bos_token=self.bos_token, eos_token=self.eos_token,
                                               add_bos=self.vocab.add_bos)
        return self._chat_template.render(messages, add_generation_prompt=add_generation_prompt, **kwargs)

    # -- encode -----------------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True, *, parse_special: bool = True) -> list[int]:
        """Token ids of `text`; with `add_special_tokens`, BOS/EOS as the GGUF's add_bos/add_eos flags say."""
        ids = self._encoder.encode(text, parse_special)
        if add_special_tokens:
            if self.vocab.add_bos:
                ids.insert(0, self.vocab.bos_id)
            if self.vocab.add_eos:
                ids.append(self.vocab.eos_id)
        return ids

    # -- decode -----------------------------------------------------------------------------------------

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """The text of `ids`; invalid UTF-8 (e.g. a lone byte-fallback token) becomes U+FFFD."""
        data = b"".join(self.token_bytes(i, skip_special_tokens) for i in ids)
        text = data.decode("utf-8", errors="replace")
        if self.add_space_prefix and text.startswith(" "):
            text = text[1:]
        return text

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary entry for `token_id` as stored (e.g. `▁Hello`, `<0x0A>`, `Ġworld`)."""
        self._check_id(token_id)
        return self.vocab.tokens[token_id]

    def token_bytes(self, token_id: int, skip_special_tokens: bool = False) -> bytes:
        """The bytes `token_id` contributes to decoded text (empty for a skipped control token).

        llama.cpp's `token_to_piece`: normal tokens decode their alphabet (▁ → space, or GPT-2's
        byte-to-unicode map), byte tokens are one raw byte, control/unknown tokens render their text unless
        skipped, user-defined tokens always render their text, unused tokens render nothing.
        """
        cache = self._piece_cache[skip_special_tokens]
        piece = cache.get(token_id)
        if piece is None:
            piece = cache[token_id] = self._render(token_id, skip_special_tokens)
        return piece

    def _render(self, token_id: int, skip_special: bool) -> bytes:
        text = self.id_to_piece(token_id)
        ttype = int(self.vocab.token_types[token_id])
        if ttype in (TokenType.CONTROL, TokenType.UNKNOWN) or token_id in self.eos_token_ids:
            return b"" if skip_special else text.encode()
        if ttype == TokenType.USER_DEFINED:
            return text.encode()
        if ttype == TokenType.BYTE:
            return bytes([int(text[3:5], 16)])
        if ttype != TokenType.NORMAL:
            return b""
        if self.vocab.kind is Kind.SPM or not self.vocab.pre.byte_level:
            return text.replace(SPACE, " ").encode()
        return _byte_level_decode(text)

    def _check_id(self, token_id: int) -> None:
        if not 0 <= token_id < self.vocab.size:
            raise TokenizerError(f"token id {token_id} is outside the vocabulary (0..{self.vocab.size - 1}); check where the ids come from")

    def __repr__(self) -> str:
        pre = f", pre={self.vocab.pre.name!r}" if self.vocab.pre else ""
        return f"Tokenizer({self.vocab.kind.value}{pre}, vocab_size={self.vocab_size})"


def from_gguf(path: str | os.PathLike[str]) -> Tokenizer:
    """The tokenizer of a GGUF file, without loading its weights."""
    return Tokenizer.from_metadata(open_gguf(path).metadata)


@cache
def _unicode_to_byte() -> dict[str, int]:
    """GPT-2's byte-to-unicode alphabet, reversed: printable bytes map to themselves, the rest to U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            mapping[chr(256 + extra)] = b
            extra += 1
    return mapping


def _byte_level_decode(text: str) -> bytes:
    """Bytes of a GPT-2 byte-level token; a character outside the alphabet (a malformed vocab) stays UTF-8."""
    table = _unicode_to_byte()
    out = bytearray()
    for ch in text:
        b = table.get(ch)
        if b is None:
            out += ch.encode()
        else:
            out.append(b)
    return bytes(out)
