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

Computing SPM merges for a 262k vocabulary takes seconds, and HF's own `tokenizer.json` loader needs ~1.5 s
for it, so neither is on the warm path: the token list and the merges (as token-id pairs) are cached in an `.npz`
under `~/.cache/nbllm/tokenizers/`, keyed by a digest of the vocabulary, and the Rust BPE model is built
from Python objects, which is about twice as fast.
"""

from __future__ import annotations

import gc
import os
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers

from nbllm.errors import TokenizerError
from nbllm.tokenizer.vocab import Kind, TokenType, Vocab

# Bump when the way tokenizers are built changes, so stale cache entries are not reused.
BUILD_VERSION = 4
SPACE = "\u2581"  # ▁


def cache_dir() -> Path:
    """Where built tokenizers are cached (`$NBLLM_CACHE_DIR/tokenizers`, default `~/.cache/nbllm/tokenizers`)."""
    root = os.environ.get("NBLLM_CACHE_DIR") or Path.home() / ".cache" / "nbllm"
    return Path(root) / "tokenizers"


def load_or_build(vocab: Vocab) -> Tokenizer:
    """The HF tokenizer for `vocab`, its token list and merges from the cache when present."""
    path = cache_dir() / f"v{BUILD_VERSION}-{vocab.content_key()}.npz"
    gc_was_enabled = gc.isenabled()
    gc.disable()  # hundreds of thousands of new strings and tuples: cyclic GC passes would cost ~20%
    try:
        cached = _load_cache(path, vocab.size)
        if cached is not None:
            tokens, merges = cached
            return build(vocab, tokens, dict(zip(tokens, range(len(tokens)))), merges)
        tokens = _unique_tokens(vocab.tokens)
        ids = dict(zip(tokens, range(len(tokens))))
        merges = _spm_merges(tokens, ids, vocab.scores) if vocab.kind is Kind.SPM else _bpe_merges(vocab.merges, ids)
        _save_cache(path, tokens, merges)
        return build(vocab, tokens, ids, merges)
    finally:
        if gc_was_enabled:
            gc.enable()


def build(vocab: Vocab, tokens: list[str], ids: dict[str, int], merges: np.ndarray) -> Tokenizer:
    """Assemble the HF tokenizer from the vocabulary and its merges as (left id, right id) rows, best first."""
    left, right = merges[:, 0].tolist(), merges[:, 1].tolist()
    pairs = list(zip(map(tokens.__getitem__, left), map(tokens.__getitem__, right)))
    if vocab.kind is Kind.SPM:
        tokenizer = Tokenizer(models.BPE(ids, pairs, byte_fallback=True, fuse_unk=False))
        steps = [normalizers.Replace(" ", SPACE)]
        if vocab.add_space_prefix:
            steps.insert(0, normalizers.Prepend(SPACE))
        tokenizer.normalizer = normalizers.Sequence(steps)
    else:
        pre = vocab.pre
        assert pre is not None
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


def _spm_merges(tokens: list[str], ids: dict[str, int], scores: np.ndarray | None) -> np.ndarray:
    """The merges that reproduce SentencePiece-BPE, ranked by the joined token's score.

    SentencePiece repeatedly joins the adjacent pair whose concatenation is the best-scoring token (leftmost
    on ties). Inside the span a token will occupy, symbols evolve exactly as when encoding the token's text
    alone, until the token forms; so the only split it can ever form from is the last merge of that
    isolated run, and a token whose isolated run does not end in itself never forms at all. One merge per
    token builds twice as fast as listing every split. HF breaks score ties by rank rather than position,
    so tokens whose run involves a score shared by another token keep every split instead.
    """
    if scores is None:
        raise TokenizerError("SPM vocabulary without tokenizer.ggml.scores; re-convert the model with llama.cpp")
    score_of = {t: float(scores[i]) for t, i in ids.items()}
    tied = {score for score, count in Counter(score_of.values()).items() if count > 1}
    found: list[tuple[float, int, int, int]] = []
    for i, piece in enumerate(tokens):
        if len(piece) < 2:
            continue
        last, exact = _isolated_run(piece, score_of, tied)
        splits = [last] if exact else [(piece[:k], piece[k:]) for k in range(1, len(piece))]
        found.extend((-score_of[piece], i, ids[l], ids[r]) for l, r in splits if l in ids and r in ids)
    found.sort()
    return np.array([(left, right) for _, _, left, right in found], dtype=np.int32).reshape(-1, 2)


def _isolated_run(text: str, score_of: dict[str, float], tied: set[float]) -> tuple[tuple[str, str], bool]:
    """SentencePiece-BPE on `text` alone: (its last merged pair, whether no tied score took part).

    A run that stops before joining all of `text` has no pair: ("", "") is returned, which matches no token.
    """
    symbols, exact = list(text), True
    while len(symbols) > 1:
        best, best_score = -1, float("-inf")
        for k in range(len(symbols) - 1):
            score = score_of.get(symbols[k] + symbols[k + 1])
            if score is not None and score > best_score:
                best, best_score = k, score
        if best < 0:
            return ("", ""), exact
        exact = exact and best_score not in tied
        if len(symbols) == 2:
            return (symbols[0], symbols[1]), exact
        symbols[best : best + 2] = [symbols[best] + symbols[best + 1]]
    return ("", ""), exact


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
