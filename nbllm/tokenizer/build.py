"""Turn a `Vocab` into an HF `tokenizers.Tokenizer` that encodes exactly as llama.cpp does.

The encoding engine is HF's Rust BPE; this module only chooses its parts:

* SPM (`tokenizer.ggml.model == "llama"`): SentencePiece-BPE repeatedly merges the adjacent pair whose
  concatenation is the highest-scoring vocabulary piece. That is BPE whose merge list is every split of every
  piece into two pieces, ranked by the joined piece's score, with byte fallback to `<0xNN>` tokens. Spaces
  become ▁ and, with add_space_prefix, each text segment gets a leading ▁ (llama.cpp prefixes every segment
  that follows a special token, which HF's per-segment normalizer also does).
* BPE (`gpt2`, `gemma4`): the GGUF merge list, the pre-tokenizer's regexes as `Split` steps, then either
  GPT-2's byte-to-unicode alphabet or, for SPM-style BPE, ▁ for spaces and `<0xNN>` byte fallback.
* Special tokens: CONTROL / UNKNOWN tokens are HF "special" added tokens (matched in text only when the
  caller parses specials), USER_DEFINED tokens are plain added tokens (always matched), as in llama.cpp's
  `tokenizer_st_partition`.

Computing SPM merges for a 262k vocabulary and building the Rust tokenizer takes seconds, so the result is
cached as `tokenizer.json` under `~/.cache/nbllm/tokenizers/`, keyed by a digest of the vocabulary; a warm
load only parses that file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers

from nbllm.errors import TokenizerError
from nbllm.tokenizer.vocab import Kind, TokenType, Vocab

# Bump when the way tokenizers are built changes, so stale cache entries are not reused.
BUILD_VERSION = 1
SPACE = "\u2581"  # ▁


def cache_dir() -> Path:
    """Where built tokenizers are cached (`$NBLLM_CACHE_DIR/tokenizers`, default `~/.cache/nbllm/tokenizers`)."""
    root = os.environ.get("NBLLM_CACHE_DIR") or Path.home() / ".cache" / "nbllm"
    return Path(root) / "tokenizers"


def load_or_build(vocab: Vocab) -> Tokenizer:
    """The HF tokenizer for `vocab`, from the cache when present, else built and cached."""
    path = cache_dir() / f"v{BUILD_VERSION}-{vocab.content_key()}.json"
    if path.is_file():
        try:
            return Tokenizer.from_file(str(path))
        except Exception:  # a truncated or foreign file: rebuild it below
            pass
    tokenizer = build(vocab)
    _write_atomically(path, tokenizer.to_str())
    return tokenizer


def build(vocab: Vocab) -> Tokenizer:
    """Build the HF tokenizer for `vocab` from scratch (no cache)."""
    tokens = _unique_tokens(vocab.tokens)
    ids = {t: i for i, t in enumerate(tokens)}
    if vocab.kind is Kind.SPM:
        tokenizer = Tokenizer(models.BPE(ids, _spm_merges(tokens, vocab.scores), byte_fallback=True, fuse_unk=False))
        steps = [normalizers.Replace(" ", SPACE)]
        if vocab.add_space_prefix:
            steps.insert(0, normalizers.Prepend(SPACE))
        tokenizer.normalizer = normalizers.Sequence(steps)
    else:
        pre = vocab.pre
        assert pre is not None
        merges = _bpe_merges(vocab.merges, ids)
        tokenizer = Tokenizer(models.BPE(ids, merges, byte_fallback=not pre.byte_level, ignore_merges=pre.ignore_merges))
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


def _spm_merges(tokens: list[str], scores: np.ndarray | None) -> list[tuple[str, str]]:
    """Every split of every token into two tokens, best joined-piece score first (SentencePiece BPE order)."""
    if scores is None:
        raise TokenizerError("SPM vocabulary without tokenizer.ggml.scores; re-convert the model with llama.cpp")
    ids = {t: i for i, t in enumerate(tokens)}
    found: list[tuple[float, int, int, str, str]] = []
    for i, piece in enumerate(tokens):
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                found.append((-float(scores[i]), i, cut, left, right))
    found.sort()
    return [(left, right) for _, _, _, left, right in found]


def _bpe_merges(merges, ids: dict[str, int]) -> list[tuple[str, str]]:
    """GGUF "left right" merges (split at the first space after the first character, as llama.cpp does).

    Merges whose parts or result are not tokens can never yield a token; HF rejects them, so they are dropped.
    """
    out = []
    for merge in merges:
        cut = merge.find(" ", 1)
        if cut < 0:
            continue
        left, right = merge[:cut], merge[cut + 1 :]
        if left in ids and right in ids and left + right in ids:
            out.append((left, right))
    return out


def _added_tokens(vocab: Vocab, tokens: list[str]) -> list[AddedToken]:
    """Tokens matched as a whole in raw text before the model runs (llama.cpp's special-token partition)."""
    types = vocab.token_types
    special = (types == TokenType.CONTROL) | (types == TokenType.UNKNOWN)
    chosen = np.nonzero(special | (types == TokenType.USER_DEFINED))[0]
    # llama.cpp's Phi-3 rule: specials (except <unk>, <s>, <|endoftext|>) swallow whitespace after them.
    no_rstrip = {"<unk>", "<s>", "<|endoftext|>"}
    added = []
    for i in chosen:
        text = tokens[i]
        rstrip = vocab.rstrip_specials and text not in no_rstrip
        added.append(AddedToken(text, special=bool(special[i]), normalized=False, rstrip=rstrip))
    return added


def _write_atomically(path: Path, text: str) -> None:
    """Write via a temp file and rename, so a concurrent reader never sees half a file; cache failures are not fatal."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError:
        pass
