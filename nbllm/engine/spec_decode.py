"""Speculative decoding by prompt lookup: n-gram drafts proposed from a sequence's own tokens, verified in one
forward.

A decoding sequence normally computes one token per step. When its recent tokens repeat something earlier in
prompt + output (code, quotes, lists, retrieved text), the tokens that followed last time are a cheap guess of
what comes next: the *draft*. The engine appends the draft after the sequence's pending token, computes all of
them in the same forward (on CPU the step costs about what one token does: the output projection's weights are
read once for all rows), and gets the target model's next-token distribution at every draft position.

Verification (`num_accepted`) keeps the output distribution exactly that of plain decoding. At row i the target
token y_i is chosen by the ordinary sampler from the distribution given everything before it, draft tokens
included; the draft token d_i is accepted iff y_i == d_i, and the first mismatch emits y_i instead (a correct
token for that position: the target's own choice). After all k drafts match, row k's token is a free bonus.

* Greedy rows: y_i is the argmax, so the accepted tokens are exactly those plain greedy decoding would produce.
* Sampled rows: this is the speculative rejection sampler of Leviathan et al. (vLLM's `RejectionSampler`) for a
  deterministic draft (q = one-hot on d). That sampler accepts d with probability min(1, p(d) / q(d)) = p(d) and
  otherwise draws from the residual max(0, p - q), i.e. p with d removed and renormalized. Drawing y ~ p and
  accepting iff y == d does the same: P(accept) = p(d), and on rejection y is distributed as p(y) / (1 - p(d))
  over y != d. One draw per row reuses the sampler as is (penalties, temperature, top-k/p, min-p all apply).

Rollback: the rejected drafts' K/V were written at positions past the accepted ones; the engine sets
`num_computed` to the accepted length and truncates the block table (surplus blocks go back to the pool, and
slots past the end of the table are overwritten by later writes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class SpeculativeConfig:
    """Prompt-lookup speculation: up to `num_tokens` drafts per step, from the longest suffix n-gram
    (`ngram_max` down to `ngram_min` tokens) that occurred earlier in the sequence."""

    num_tokens: int = 4
    ngram_max: int = 3
    ngram_min: int = 1

    def __post_init__(self) -> None:
        if self.num_tokens < 1 or not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(
                f"speculative decoding needs num_tokens >= 1 and 1 <= ngram_min <= ngram_max, got "
                f"num_tokens={self.num_tokens}, ngram_min={self.ngram_min}, ngram_max={self.ngram_max}"
            )


def propose_ngram(tokens: Sequence[int], k: int, ngram_max: int, ngram_min: int) -> list[int]:
    """Up to `k` draft tokens continuing `tokens`, or none when no suffix n-gram occurred before.

    The longest suffix of `ngram_max` down to `ngram_min` tokens is looked up at its most recent earlier
    occurrence (the nearest context is the likeliest to repeat), and the draft copies what followed it. The copy
    may run into the draft itself, as in LZ77, so a period shorter than `k` still yields k tokens.
    """
    n_tokens = len(tokens)
    if k <= 0:
        return []
    for n in range(min(ngram_max, n_tokens - 1), ngram_min - 1, -1):
        suffix = list(tokens[n_tokens - n :])
        # Latest start i < n_tokens - n with tokens[i : i + n] == suffix.
        for start in range(n_tokens - n - 1, -1, -1):
            if tokens[start] == suffix[0] and list(tokens[start : start + n]) == suffix:
                source = list(tokens[start + n : start + n + k])  # shorter than k: the copy wraps into the draft
                draft: list[int] = []
                for j in range(k):
                    draft.append(source[j] if j < len(source) else draft[j - len(source)])
                return draft
    return []


def num_accepted(draft: Sequence[int], target: Sequence[int]) -> int:
    """How many leading draft tokens the target tokens confirm: `target[i]` is the token the model chose at the
    position of `draft[i]` (given the draft before it); `len(target) == len(draft) + 1`. The emitted tokens are
    `target[: accepted + 1]`: the confirmed drafts plus the target's token at the first mismatch (or the bonus)."""
    if len(target) != len(draft) + 1:
        raise ValueError(f"{len(target)} target tokens for {len(draft)} draft tokens; need one more")
    accepted = 0
    while accepted < len(draft) and draft[accepted] == target[accepted]:
        accepted += 1
    return accepted
