"""Turn a BPE `Vocab` into an HF `tokenizers.Tokenizer` that encodes exactly as llama.cpp does.

The encoding engine is HF's Rust BPE; this module only chooses its parts: the GGUF merge list, the
pre-tokenizer's regexes as `Split` steps, then either GPT-2's byte-to-unicode alphabet or, for SPM-style BPE
(Gemma 4), ▁ for spaces and `<0xNN>` byte fallback. Special tokens: CONTROL / UNKNOWN tokens are HF "special"
added tokens (matched in text only when the caller parses specials), USER_DEFINED tokens are plain added tokens
(always matched), as in llama.cpp's `tokenizer_st_partition`. (SentencePiece vocabularies need none of this:
`spm.py` encodes them from their scores.)

HF's own `tokenizer.json` loader is slower than building from Python objects, and the merges of a large
vocabulary take a while to parse from GGUF strings, so the token list and the merges (as token-id pairs) are
cached in an `.npz` under `~/.cache/nbllm/tokenizers/`, keyed by a digest of the vocabulary.
"""

from __future__ import annotations

import gc
import os
import tempfile
import threading
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers

from nbllm.errors import TokenizerError
from nbllm.tokenizer.vocab import SPACE, Vocab, special_tokens

# Bump when the way tokenizers are built changes, so stale cache entries are not reused.
BUILD_VERSION = 4


def cache_dir() -> Path:
    """Where built tokenizers are cached (`$NBLLM_CACHE_DIR/tokenizers`, default `~/.cache/nbllm/tokenizers`)."""
    root = os.environ.get("NBLLM_CACHE_DIR") or Path.home() / ".cache" / "nbllm"
    return Path(root) / "tokenizers"


class HFEncoder:
    """HF's tokenizer behind the two calls the `Tokenizer` needs; its parse-special switch is object state, hence the lock."""

    def __init__(self, hf: Tokenizer) -> None:
        self._hf = hf
        self._lock = threading.Lock()

    def token_to_id(self, text: str) -> int | None:
        return self._hf.token_to_id(text)

    def encode(self, text: str, parse_special: bool) -> list[int]:
        with self._lock:
            self._hf.encode_special_tokens = not parse_special
            try:
                return self._hf.encode(text, add_special_tokens=False).ids
            finally:
                self._hf.encode_special_tokens = False


def load_or_build(vocab: Vocab) -> HFEncoder:
    """The HF encoder for a BPE `vocab`, its token list and merges from the cache when present."""
    path = cache_dir() / f"v{BUILD_VERSION}-{vocab.content_key()}.npz"
    gc_was_enabled = gc.isenabled()
    gc.disable()  # hundreds of thousands of new strings and tuples: cyclic GC passes would cost ~20%
    try:
        cached = _load_cache(path, vocab.size)
        if cached is not None:
            tokens, merges = cached
            return HFEncoder(build(vocab, tokens, dict(zip(tokens, range(len(tokens)))), merges))
        tokens = _unique_tokens(vocab.tokens)
        ids = dict(zip(tokens, range(len(tokens))))
        merges = _bpe_merges(vocab.merges, ids)
        _save_cache(path, tokens, merges)
        return HFEncoder(build(vocab, tokens, ids, merges))
    finally:
        if gc_was_enabled:
            gc.enable()


def build(vocab: Vocab, tokens: list[str], ids: dict[str, int], merges: np.ndarray) -> Tokenizer:
    """Assemble the HF tokenizer from the vocabulary and its merges as (left id, right id) rows, best first."""
    left, right = merges[:, 0].tolist(), merges[:, 1].tolist()
    pairs = list(zip(map(tokens.__getitem__, left), map(tokens.__getitem__, right)))
    pre = vocab.pre
    assert pre is not None, "SPM vocabularies are encoded by spm.SpmEncoder"
    tokenizer = Tokenizer(models.BPE(ids, pairs, byte_fallback=not pre.byte_level, ignore_merges=pre.ignore_merges))
    if pre.escape_spaces:
        tokenizer.normalizer = normalizers.Replace(" ", SPACE)
    steps = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre.regexes]
    if pre.byte_level:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tokenizer.add_tokens(_added_tokens(vocab, tokens))
    return tokenizer


def _unique_tokens(tokens) -> list[str]:
    """The token strings, with llama.cpp's placeholder for empty ones; duplicates make ids ambiguous."""
    out = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
    if len(set(out)) != len(out):
        seen: dict[str, int] = {}
        for i, t in enumerate(out):
            if t in seen:
                raise TokenizerError(f"duplicate token {t!r} (ids {seen[t]} and {i}) in the GGUF vocabulary; re-convert the model")
            seen[t] = i
    return out


def _bpe_merges(merges, ids: dict[str, int]) -> np.ndarray:
    """GGUF "left right" merges (split at the first space after the first character, as llama.cpp does).

    Merges whose parts or result are not tokens can never yield a token; HF rejects them, so they are dropped.
    """
    out = []
    for merge in merges:
        cut = merge.find(" ", 1)
        left, right = merge[:cut], merge[cut + 1 :]
        if cut > 0 and left in ids and right in ids and left + right in ids:
            out.append((ids[left], ids[right]))
    return np.array(out, dtype=np.int32).reshape(-1, 2)


def _load_cache(path: Path, n_tokens: int) -> tuple[list[str], np.ndarray] | None:
    """The cached (tokens, merges), or None when absent or unusable (then they are recomputed).

    Tokens are stored as one NUL-joined UTF-8 blob: splitting it is ~30x faster than decoding the GGUF's
    length-prefixed strings one by one.
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            blob, merges = data["tokens"], data["merges"]
            tokens = blob.tobytes().decode("utf-8").split("\x00")
    except (OSError, ValueError, KeyError, UnicodeDecodeError):
        return None
    ok = len(tokens) == n_tokens and merges.dtype == np.int32 and merges.ndim == 2 and merges.shape[1] == 2
    return (tokens, merges) if ok and (merges.size == 0 or (merges.min() >= 0 and merges.max() < n_tokens)) else None


def _save_cache(path: Path, tokens: list[str], merges: np.ndarray) -> None:
    """Write via a temp file and rename, so a concurrent reader never sees half a file; cache failures are not fatal."""
    blob = "\x00".join(tokens)
    if blob.count("\x00") != len(tokens) - 1:
        return  # a token containing NUL cannot use this format; such vocabularies are just rebuilt each time
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, tokens=np.frombuffer(blob.encode("utf-8"), dtype=np.uint8), merges=merges)
        os.replace(tmp, path)
    except OSError:
        pass


def _added_tokens(vocab: Vocab, tokens: list[str]) -> list[AddedToken]:
    """Tokens matched as a whole in raw text before the model runs (llama.cpp's special-token partition)."""
    return [AddedToken(tokens[i], special=control, normalized=False, rstrip=rstrip)
            for i, control, rstrip in special_tokens(vocab, tokens)]
