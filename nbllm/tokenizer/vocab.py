"""A GGUF vocabulary read into one plain description, with llama.cpp's defaults and quirks applied.

GGUF stores a tokenizer as parallel arrays (`tokenizer.ggml.tokens`, `.scores`, `.token_type`, `.merges`)
plus a handful of ids and flags, and leaves much unsaid: which flags default to what for each tokenizer
model and pre-tokenizer type, which tokens end a turn. llama.cpp (`src/llama-vocab.cpp`, `llama_vocab::load`)
is the reference that every GGUF producer tests against, so this module reproduces its decisions; the HF
encoders are then built from the result (`spm.py` for SentencePiece, HF `tokenizers` for BPE in `build.py`).
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from nbllm.errors import TokenizerError
from nbllm.tokenizer.pretokenizers import PreTokenizer, pre_tokenizer_for


class TokenType(enum.IntEnum):
    """`tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`)."""

    UNDEFINED = 0
    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


class Kind(enum.Enum):
    """The two tokenizer algorithms nbllm supports."""

    SPM = "spm"  # SentencePiece BPE: merges ranked by piece score, byte fallback, ▁ for spaces
    BPE = "bpe"  # merges list; GPT-2 byte-level alphabet, or raw UTF-8 with ▁ (Gemma 4)


SPACE = "\u2581"  # ▁, SentencePiece's visible space

# Texts llama.cpp treats as end-of-generation whatever their declared type (llama-vocab.cpp, "special_eog_ids").
EOG_TEXTS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<|eom_id|>",
    "<EOT>", "_<EOT>", "<｜end▁of▁sentence｜>", "<end_of_utterance>", "<turn|>", "<|return|>", "<|call|>",
)


@dataclass(frozen=True)
class Vocab:
    """Everything needed to build, run and cache a tokenizer, in llama.cpp's interpretation."""

    kind: Kind
    pre: PreTokenizer | None  # None for SPM, which does not pre-split
    tokens: Sequence[str]
    token_types: np.ndarray  # int32 per token
    scores: np.ndarray | None  # float32 per token (SPM merge priority)
    merges: Sequence[str]  # "left right" strings (BPE)
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    extra_eog_ids: tuple[int, ...]  # eot / eom ids declared in the metadata
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    rstrip_specials: bool  # Phi-3: specials swallow the whitespace after them
    chat_template: str | None

    @property
    def size(self) -> int:
        return len(self.tokens)

    def content_key(self) -> str:
        """A digest of everything the built HF tokenizer depends on, to key the on-disk cache."""
        h = hashlib.sha256()
        for part in (self.tokens, self.merges):
            key = getattr(part, "content_key", None)
            h.update((key() if key else "\x00".join(part)).encode("utf-8", "surrogatepass"))
        h.update(np.ascontiguousarray(self.token_types, dtype=np.int32).tobytes())
        if self.scores is not None:
            h.update(np.ascontiguousarray(self.scores, dtype=np.float32).tobytes())
        flags = (self.kind.value, self.pre.name if self.pre else "", self.add_space_prefix, self.rstrip_specials)
        h.update(repr(flags).encode())
        return h.hexdigest()[:32]


def vocab_from_metadata(md: Mapping[str, Any]) -> Vocab:
    """Read a GGUF metadata dict into a `Vocab`; raises `TokenizerError` for vocabularies nbllm cannot run."""
    model = md.get("tokenizer.ggml.model")
    tokens = md.get("tokenizer.ggml.tokens")
    if model is None or tokens is None or len(tokens) == 0:
        raise TokenizerError("the GGUF metadata holds no tokenizer (tokenizer.ggml.model/tokens missing); use a GGUF converted with its vocabulary")
    n = len(tokens)
    token_types = _int_array(md.get("tokenizer.ggml.token_type"), n, default=TokenType.NORMAL, key="token_type")
    scores = md.get("tokenizer.ggml.scores")
    scores = None if scores is None else _float_array(scores, n)
    merges: Sequence[str] = md.get("tokenizer.ggml.merges") or []
    pre_name = md.get("tokenizer.ggml.pre") or "default"

    if model == "llama":
        kind, pre = Kind.SPM, None
        defaults = {"bos": 1, "eos": 2, "unk": 0, "add_bos": True, "add_space_prefix": True}
    elif model in ("gpt2", "gemma4"):
        kind = Kind.BPE
        pre = pre_tokenizer_for("gemma4" if model == "gemma4" else pre_name)
        if not merges:
            raise TokenizerError(f"BPE vocabulary without tokenizer.ggml.merges (pre-tokenizer {pre_name!r}); re-convert the model with llama.cpp")
        # llama.cpp's BPE default ids (11, Falcon's) would silently make a random token a stop token: not kept.
        defaults = {"bos": None, "eos": None, "unk": None, "add_bos": pre.add_bos, "add_space_prefix": False}
    else:
        raise TokenizerError(f"tokenizer model {model!r} is not supported (only 'llama' SPM and 'gpt2'/'gemma4' BPE); use a model with one of those")

    def special(key: str, default: int | None) -> int | None:
        """The declared id, else the default; out-of-range ids are dropped as llama.cpp does."""
        for candidate in (md.get(f"tokenizer.ggml.{key}_token_id"), default):
            if candidate is not None and 0 <= int(candidate) < n:
                return int(candidate)
        return None

    bos, eos, unk = special("bos", defaults["bos"]), special("eos", defaults["eos"]), special("unknown", defaults["unk"])
    add_bos = bool(md.get("tokenizer.ggml.add_bos_token", defaults["add_bos"]))
    if model == "gemma4":
        add_bos = True  # llama.cpp forces this: Gemma 4 GGUFs say false but the model needs <bos>
    add_eos = bool(md.get("tokenizer.ggml.add_eos_token", False))
    for flag, tid, key in ((add_bos, bos, "bos"), (add_eos, eos, "eos")):
        if flag and tid is None:
            raise TokenizerError(f"tokenizer.ggml.add_{key}_token is true but tokenizer.ggml.{key}_token_id is missing; fix the GGUF metadata")
    add_space_prefix = kind is Kind.SPM and bool(md.get("tokenizer.ggml.add_space_prefix", defaults["add_space_prefix"]))
    extra_eog = tuple(i for i in (special("eot", None), special("eom", None)) if i is not None)
    name = str(md.get("general.name", "")).lower()
    template = md.get("tokenizer.chat_template")
    return Vocab(
        kind=kind, pre=pre, tokens=tokens, token_types=token_types, scores=scores, merges=merges,
        bos_id=bos, eos_id=eos, unk_id=unk, extra_eog_ids=extra_eog, add_bos=add_bos, add_eos=add_eos,
        add_space_prefix=add_space_prefix, rstrip_specials="phi-3" in name or "phi3" in name,
        chat_template=template if isinstance(template, str) else None,
    )


def special_tokens(vocab: Vocab, tokens: Sequence[str]) -> list[tuple[int, bool, bool]]:
    """(id, is control/unknown, swallows whitespace after it) for every token matched whole in raw text.

    Control and unknown tokens are matched only when the caller parses specials; user-defined ones always
    (llama.cpp's `tokenizer_st_partition`). llama.cpp's Phi-3 rule: specials except <unk>, <s> and
    <|endoftext|> swallow the whitespace after them.
    """
    types = vocab.token_types
    control = (types == TokenType.CONTROL) | (types == TokenType.UNKNOWN)
    no_rstrip = {"<unk>", "<s>", "<|endoftext|>"}
    return [(int(i), bool(control[i]), vocab.rstrip_specials and tokens[i] not in no_rstrip)
            for i in np.nonzero(control | (types == TokenType.USER_DEFINED))[0]]


def _int_array(value: Any, n: int, *, default: int, key: str) -> np.ndarray:
    if value is None:
        return np.full(n, default, dtype=np.int32)
    arr = np.asarray(value, dtype=np.int32)
    if arr.shape != (n,):
        raise TokenizerError(f"tokenizer.ggml.{key} has {arr.size} entries for {n} tokens; the GGUF is corrupt, re-convert it")
    return arr


def _float_array(value: Any, n: int) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float32)
    if arr.shape != (n,):
        raise TokenizerError(f"tokenizer.ggml.scores has {arr.size} entries for {n} tokens; the GGUF is corrupt, re-convert it")
    return arr
