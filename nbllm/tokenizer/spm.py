"""SentencePiece-BPE encoding (GGUF `tokenizer.ggml.model == "llama"`), as llama.cpp's `llm_tokenizer_spm`.

SPM needs no merge list: it repeatedly joins the adjacent pair of symbols whose concatenation is the
best-scoring vocabulary piece (leftmost on ties), starting from single characters; a character that no piece
covers becomes its UTF-8 bytes as `<0xNN>` tokens. Encoding straight from the scores means the only thing to
build at load time is a text → id dict, which is what makes a 262k vocabulary ready in a fraction of a second
(building HF's BPE model with ~240k derived merges took over a second on every start).
"""

from __future__ import annotations

import heapq

from nbllm.errors import TokenizerError
from nbllm.tokenizer.specials import SpecialTokens
from nbllm.tokenizer.vocab import SPACE, Vocab, special_tokens


class SpmEncoder:
    """Text → ids for one SPM vocabulary; immutable after construction, so safe to share between threads."""

    def __init__(self, vocab: Vocab, tokens: list[str]) -> None:
        if vocab.scores is None:
            raise TokenizerError("SPM vocabulary without tokenizer.ggml.scores; re-convert the model with llama.cpp")
        self._add_space_prefix = vocab.add_space_prefix
        self._ids = dict(zip(tokens, range(len(tokens))))  # duplicates: the last id wins, as in llama.cpp
        self._scores = vocab.scores.tolist()
        self._specials = SpecialTokens((tokens[i], i, control, rstrip) for i, control, rstrip in special_tokens(vocab, tokens))

    def token_to_id(self, text: str) -> int | None:
        return self._ids.get(text)

    def encode(self, text: str, parse_special: bool) -> list[int]:
        """Ids of `text` without BOS/EOS; every text fragment after a special token gets the space prefix."""
        out: list[int] = []
        for fragment in self._specials.partition(text, parse_special):
            if isinstance(fragment, int):
                out.append(fragment)
            else:
                self._encode_fragment((" " + fragment if self._add_space_prefix else fragment).replace(" ", SPACE), out)
        return out

    def _encode_fragment(self, text: str, out: list[int]) -> None:
        ids, scores = self._ids, self._scores
        # A doubly linked list of symbols; a merge grows the left symbol and unlinks the right one.
        sym = list(text)
        nxt = list(range(1, len(sym) + 1))
        nxt[-1] = -1
        prv = list(range(-1, len(sym) - 1))
        heap: list[tuple[float, int, int, int]] = []  # (-score, left, right, merged length)

        def push(left: int, right: int) -> None:
            merged = sym[left] + sym[right]
            tid = ids.get(merged)
            if tid is not None:
                heapq.heappush(heap, (-scores[tid], left, right, len(merged)))

        for i in range(1, len(sym)):
            push(i - 1, i)
        while heap:
            _, left, right, size = heapq.heappop(heap)
            if not sym[left] or not sym[right] or len(sym[left]) + len(sym[right]) != size:
                continue  # a stale pair: one side merged since it was queued
            sym[left] += sym[right]
            sym[right] = ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prv[nxt[right]] = left
            if prv[left] >= 0:
                push(prv[left], left)
            if nxt[left] >= 0:
                push(left, nxt[left])
        i = 0
        while i >= 0:
            tid = ids.get(sym[i])
            if tid is not None:
                out.append(tid)
            else:
                out.extend(self._byte_token(b) for b in sym[i].encode("utf-8", "surrogatepass"))
            i = nxt[i]

    def _byte_token(self, byte: int) -> int:
        """`<0xNN>`, else the byte as a one-character piece (llama.cpp's fallback); a vocabulary with neither cannot encode it."""
        tid = self._ids.get(f"<0x{byte:02X}>")
        if tid is None and byte < 0x80:
            tid = self._ids.get(chr(byte))
        if tid is None:
            raise TokenizerError(f"the vocabulary has no token for byte 0x{byte:02X} (no <0x{byte:02X}> byte token); this text cannot be encoded with it")
        return tid
