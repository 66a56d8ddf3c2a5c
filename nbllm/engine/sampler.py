"""Logits of one engine step → next tokens: one batched tensor program over all rows.

Order (HF's and vLLM's): allowed-token mask → repetition, frequency, presence penalties → greedy rows take the
argmax → temperature → top-k → top-p → min-p → sample.

Three choices shape the code:

* Every filter is a per-row logit *threshold*. Top-k keeps logits >= the k-th largest value, top-p keeps the
  largest logits down to the first one whose preceding mass reaches p, min-p keeps logits >= max + log(min_p).
  So one comparison against max(thresholds) applies all three, ties at a boundary are all kept (as HF's
  top-k does), and only rows that ask for top-k or top-p ever sort, and then only their largest candidates.
* Sampling is by inverse CDF with ONE uniform per row drawn from that row's own generator: the kept weights
  are summed in token-id order (`cumsum`, sequential per row on CPU) and the token where `u * total` falls is
  picked. A row's token therefore depends on its own logits, parameters and generator only, never on what
  else is batched or in which order. (vLLM's exponential race draws V exponentials per row per step; on
  these 2 CPU cores that costs ~6x a log-softmax over a whole [32, 262144] batch, one uniform costs nothing.)
* `SampleResult.logprobs` follows vLLM V1's default (`logprobs_mode="raw_logprobs"`): log-softmax of the
  logits as the model produced them, after the allowed-token mask (vLLM applies the grammar bitmask before
  its sampler) and before penalties, temperature and filters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from nbllm.engine.sampling_params import SamplingParams
from nbllm.kernels import cpu_sampling

# Top-p candidates are the rows' largest logits; this many first, eight times more while p is not reached.
_TOP_P_FIRST_CANDIDATES = 1024


@dataclass
class SamplingBatch:
    """The per-row sampling settings of one step, as tensors on the logits' device (built by the engine)."""

    temperature: torch.Tensor  # [B] float32; 1.0 on greedy rows
    top_k: torch.Tensor  # [B] long; 0 = off
    top_p: torch.Tensor  # [B] float32; 1.0 = off
    min_p: torch.Tensor  # [B] float32; 0.0 = off
    greedy_rows: torch.Tensor  # [G] long
    random_rows: torch.Tensor  # [R] long
    generators: list[torch.Generator | None]  # one per random row, in random_rows order
    # Repetition penalty as (row, token id, penalty) triples over the distinct prompt + output tokens.
    repetition_index: tuple[torch.Tensor, torch.Tensor]
    repetition_penalty: torch.Tensor
    # Frequency * count + presence, as (row, token id, amount) triples over the distinct output tokens.
    additive_index: tuple[torch.Tensor, torch.Tensor]
    additive_penalty: torch.Tensor
    logprob_rows: torch.Tensor  # [L] long: rows with params.logprobs > 0
    max_logprobs: int
    # Decided on the host, so that sampling reads nothing back from the device (overlap scheduling needs a
    # sampler that only queues work): some random row has a temperature other than 1 / asks for a filter.
    random_scaled: bool = True
    random_filtered: bool = True
    # Every row greedy with no penalty and no top log-probabilities: the tokens are the rows' argmax, which a
    # CUDA decode graph takes itself (`DecodeGraphs.greedy`), so such a step needs no sampling launch at all.
    plain_greedy: bool = False

    @property
    def has_penalties(self) -> bool:
        return bool(self.repetition_index[0].numel() or self.additive_index[0].numel())

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        output_token_ids: list[list[int]],
        prompt_token_ids: list[list[int]],
        device: torch.device | str,
    ) -> SamplingBatch:
        """Gather the rows' settings; penalties become sparse index lists, so no [B, V] tensor is built."""
        greedy = [p.is_greedy for p in params]
        rep_rows, rep_ids, rep_vals, add_rows, add_ids, add_vals = [], [], [], [], [], []
        for row, p in enumerate(params):
            if p.repetition_penalty != 1.0:
                seen = torch.tensor(prompt_token_ids[row] + output_token_ids[row], dtype=torch.long).unique()
                rep_rows.append(torch.full_like(seen, row))
                rep_ids.append(seen)
                rep_vals.append(torch.full(seen.shape, p.repetition_penalty))
            if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0:
                ids, counts = torch.tensor(output_token_ids[row], dtype=torch.long).unique(return_counts=True)
                add_rows.append(torch.full_like(ids, row))
                add_ids.append(ids)
                add_vals.append(p.frequency_penalty * counts.float() + p.presence_penalty)

        def to_device(values: list, dtype: torch.dtype) -> torch.Tensor:
            host = torch.tensor(values, dtype=dtype)
            if torch.device(device).type != "cuda":
                return host.to(device)
            # Pinned and asynchronous: a pageable copy would wait for the step's forward to finish first.
            return host.pin_memory().to(device, non_blocking=True)

        def long(values: list[int]) -> torch.Tensor:
            return to_device(values, torch.long)

        def floats(values: list[float]) -> torch.Tensor:
            return to_device(values, torch.float32)

        def cat(parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
            return torch.cat(parts).to(device) if parts else torch.empty(0, dtype=dtype, device=device)

        k_max = [p.logprobs or 0 for p in params]
        return cls(
            temperature=floats([1.0 if g else p.temperature for p, g in zip(params, greedy)]),
            top_k=long([max(p.top_k, 0) for p in params]),
            top_p=floats([p.top_p for p in params]),
            min_p=floats([p.min_p for p in params]),
            greedy_rows=long([i for i, g in enumerate(greedy) if g]),
            random_rows=long([i for i, g in enumerate(greedy) if not g]),
            generators=[gen for gen, g in zip(generators, greedy) if not g],
            repetition_index=(cat(rep_rows, torch.long), cat(rep_ids, torch.long)),
            repetition_penalty=cat(rep_vals, torch.float32),
            additive_index=(cat(add_rows, torch.long), cat(add_ids, torch.long)),
            additive_penalty=cat(add_vals, torch.float32),
            logprob_rows=long([i for i, k in enumerate(k_max) if k > 0]),
            max_logprobs=max(k_max, default=0),
            random_scaled=any(p.temperature != 1.0 for p, g in zip(params, greedy) if not g),
            random_filtered=any(p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0 for p, g in zip(params, greedy) if not g),
            plain_greedy=all(greedy) and not (rep_rows or add_rows) and max(k_max, default=0) == 0,
        )


@dataclass
class SampleResult:
    """Sampled tokens and their raw log-probabilities (see the module docstring for which logits)."""

    token_ids: torch.Tensor  # [B] long
    logprobs: torch.Tensor  # [B] float32: log-prob of the sampled token
    # ([B, k] long ids, [B, k] float32 log-probs), k = the batch's largest `logprobs`, best first; a row that
    # asked for j < k uses its first j columns; rows that asked for none hold id -1 and -inf.
    top_logprobs: tuple[torch.Tensor, torch.Tensor] | None = None


class Sampler:
    """Stateless: everything per-request arrives in the `SamplingBatch`."""

    def __call__(
        self, logits: torch.Tensor, batch: SamplingBatch, allowed_mask: torch.Tensor | None = None
    ) -> SampleResult:
        if logits.shape[0] != batch.temperature.shape[0]:
            raise ValueError(
                f"{logits.shape[0]} rows of logits for {batch.temperature.shape[0]} rows of sampling settings"
            )
        if batch.plain_greedy and allowed_mask is None:
            return greedy_sample(logits)
        x = logits.to(torch.float32)
        if allowed_mask is not None:
            x = x.masked_fill(~allowed_mask, -math.inf)
        best, lse = _argmax_logsumexp(x)  # raw log-probabilities are x - lse
        owned = x is not logits  # else never write into it: it is the caller's

        token_ids = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
        if batch.greedy_rows.numel():
            greedy = _penalized_rows(x, batch.greedy_rows, batch, owned)
            token_ids[batch.greedy_rows] = best if greedy is x else _argmax_logsumexp(greedy)[0]
        if batch.random_rows.numel():
            rows = batch.random_rows
            scale = batch.random_scaled
            scaled = _penalized_rows(x, rows, batch, owned, will_write=scale)
            if scale:
                scaled.div_(batch.temperature[rows, None])
            probs = torch.softmax(scaled, dim=-1)
            keep_from = (filter_thresholds(scaled, probs, batch.top_k[rows], batch.top_p[rows], batch.min_p[rows])
                         if batch.random_filtered else None)
            token_ids[rows] = sample(probs, scaled, keep_from, _uniforms(batch.generators, x.device))

        sampled_logprobs = x.gather(1, token_ids[:, None]).squeeze(1) - lse
        return SampleResult(token_ids, sampled_logprobs, _top_logprobs(x, lse, batch))


def greedy_sample(logits: torch.Tensor, *, out: tuple[torch.Tensor, ...] | None = None,
                  host: tuple[torch.Tensor, ...] | None = None,
                  advance: tuple[torch.Tensor, torch.Tensor, int] | None = None) -> SampleResult:
    """Every row's argmax and its raw log-probability: the whole sampler for a `plain_greedy` batch. On CUDA one
    launch and no host synchronisation, so a decode graph captures it, writing into `out` (ids, log-sum-exp,
    log-probability buffers), the ids and log-probabilities into pinned `host` memory as well, and a decode
    graph's next inputs (`advance`; both `argmax_logsumexp`'s); elsewhere the same values as the general path."""
    if logits.is_cuda:
        from nbllm.kernels.argmax_logsumexp import argmax_logsumexp

        ids, _, logprobs = argmax_logsumexp(logits, out=out, host=host, advance=advance)
        return SampleResult(ids, logprobs)
    x = logits.to(torch.float32)
    best, lse = _argmax_logsumexp(x)
    return SampleResult(best, x.gather(1, best[:, None]).squeeze(1) - lse)


def _argmax_logsumexp(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's argmax (the first maximum) and logsumexp: one C++ pass pair on a CPU, one Triton launch on CUDA
    (`nbllm.kernels.argmax_logsumexp`), torch elsewhere."""
    if cpu_sampling.supports(x):
        return cpu_sampling.row_argmax_logsumexp(x)
    if x.is_cuda:
        from nbllm.kernels.argmax_logsumexp import argmax_logsumexp

        best, lse, _ = argmax_logsumexp(x)
        return best, lse
    return x.argmax(dim=-1), torch.logsumexp(x, dim=-1)


def _penalized_rows(
    x: torch.Tensor, rows: torch.Tensor, batch: SamplingBatch, owned: bool, will_write: bool = False
) -> torch.Tensor:
    """x[rows] with those rows' penalties applied. Copies only where needed: x itself serves when `rows`
    (sorted, distinct) is every row and x is either owned or left unwritten."""
    if rows.numel() < x.shape[0]:
        part = x[rows]
    elif owned or not (will_write or batch.has_penalties):
        part = x
    else:
        part = x.clone()
    if batch.has_penalties:
        position = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
        position[rows] = torch.arange(rows.numel(), device=x.device)
        apply_penalties_(part, batch, position)
    return part


def apply_penalties_(logits: torch.Tensor, batch: SamplingBatch, position: torch.Tensor) -> torch.Tensor:
    """In place on the batch rows that `position` maps to rows of `logits` (-1: not there): repetition
    (HF/vLLM: divide a positive logit, multiply a negative one) over prompt + output tokens, then
    `frequency * count + presence` subtracted over output tokens (OpenAI/vLLM)."""
    for (rows, ids), amount, multiplicative in (
        (batch.repetition_index, batch.repetition_penalty, True),
        (batch.additive_index, batch.additive_penalty, False),
    ):
        rows = position[rows]
        here = rows >= 0
        rows, ids, amount = rows[here], ids[here], amount[here]
        if multiplicative:
            seen = logits[rows, ids]
            logits[rows, ids] = torch.where(seen > 0, seen / amount, seen * amount)
        else:
            logits[rows, ids] -= amount
    return logits


def filter_thresholds(
    scaled: torch.Tensor, probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor | None:
    """[R] logit thresholds that apply top-k, then top-p, then min-p (HF's order) to temperature-scaled rows
    (`probs` = their softmax): the kept tokens are exactly those with `scaled >= threshold`. None: no filter."""
    vocab = scaled.shape[-1]
    k_on = (top_k > 0) & (top_k < vocab)
    k_rows, p_rows, m_rows = (on.nonzero().squeeze(1) for on in (k_on, top_p < 1, min_p > 0))
    if not (k_rows.numel() or p_rows.numel() or m_rows.numel()):
        return None
    threshold = torch.full_like(top_p, -math.inf)
    if m_rows.numel():
        threshold[m_rows] = scaled[m_rows].amax(dim=-1) + torch.log(min_p[m_rows])
    if k_rows.numel():
        k = top_k[k_rows]
        kth = scaled[k_rows].topk(int(k.max()), dim=-1).values.gather(1, (k - 1)[:, None]).squeeze(1)
        threshold[k_rows] = torch.maximum(threshold[k_rows], kth)
    if p_rows.numel():
        k_cap = torch.where(k_on[p_rows], top_k[p_rows], vocab)
        p_cut = _top_p_thresholds(scaled[p_rows], probs, p_rows, top_p[p_rows], k_cap)
        threshold[p_rows] = torch.maximum(threshold[p_rows], p_cut)
    return threshold


def _top_p_thresholds(
    scaled: torch.Tensor, probs: torch.Tensor, prob_rows: torch.Tensor, top_p: torch.Tensor, k_cap: torch.Tensor
) -> torch.Tensor:
    """For each row, the smallest logit among the largest ones whose *preceding* mass is below p, the mass
    taken over the row's top-k set (`k_cap` tokens; the vocabulary size when top-k is off). HF's rule: remove
    a token once the mass strictly above it reaches p.

    Works on the largest `n` logits only, n covering every top-k set and growing eightfold while a row without
    top-k has not reached p: a peaked LM distribution settles in the first round, a flat one ends in a full
    sort of that row alone. The threshold is a value, the same for any n, so batch neighbours cannot move it.
    Row i of `scaled` is row `prob_rows[i]` of `probs`."""
    vocab = scaled.shape[-1]
    result = torch.empty_like(top_p)
    pending = torch.arange(scaled.shape[0], device=scaled.device)
    n = max(_TOP_P_FIRST_CANDIDATES, int(k_cap.masked_fill(k_cap == vocab, 0).max()))
    while pending.numel():
        n = min(n, vocab)
        cap = k_cap[pending]
        values, ids = _rows(scaled, pending).topk(n, dim=-1)
        cand = probs[prob_rows[pending, None], ids].masked_fill(torch.arange(n, device=ids.device) >= cap[:, None], 0)
        mass = cand.cumsum(dim=-1)
        whole_set = cap <= n  # the row's top-k set is all among the candidates, so its mass is known
        total = torch.where(whole_set, mass[:, -1], torch.ones_like(top_p[pending]))
        kept = (mass - cand < top_p[pending, None] * total[:, None]).sum(dim=-1)
        done = whole_set | (kept < n)
        result[pending[done]] = values[done].gather(1, (kept[done] - 1)[:, None]).squeeze(1)
        pending = pending[~done]
        n *= 8
    return result


def _rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x[rows], without the copy when `rows` (sorted, distinct) is every row."""
    return x if rows.numel() == x.shape[0] else x[rows]


def sample(
    probs: torch.Tensor, scaled: torch.Tensor, threshold: torch.Tensor | None, uniforms: torch.Tensor
) -> torch.Tensor:
    """Inverse-CDF sampling from `probs` restricted to `scaled >= threshold`, one uniform in [0, 1) per row;
    the CDF runs in token-id order, so the pick depends on the kept set alone. Overwrites `probs`."""
    if threshold is not None:
        probs.masked_fill_(scaled < threshold[:, None], 0)
    cdf = probs.cumsum_(dim=-1)
    total = cdf[:, -1]
    # u * total < total keeps the pick on a token with weight > 0 (searchsorted finds cdf[i-1] <= x < cdf[i]).
    target = torch.minimum(uniforms * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target[:, None], right=True).squeeze(1)


def _uniforms(generators: list[torch.Generator | None], device: torch.device) -> torch.Tensor:
    """One U[0, 1) per row from that row's own generator (the global one where None)."""
    draws = torch.cat([torch.rand(1, generator=g, device=g.device if g is not None else "cpu") for g in generators])
    if device.type == "cuda" and draws.device.type == "cpu":  # pinned: a pageable copy waits for the stream
        return draws.pin_memory().to(device, non_blocking=True)
    return draws.to(device)


def _top_logprobs(
    x: torch.Tensor, lse: torch.Tensor, batch: SamplingBatch
) -> tuple[torch.Tensor, torch.Tensor] | None:
    if not batch.logprob_rows.numel():
        return None
    rows = batch.logprob_rows
    values, ids = (x[rows] - lse[rows, None]).topk(batch.max_logprobs, dim=-1)
    shape = (x.shape[0], batch.max_logprobs)
    all_ids = torch.full(shape, -1, dtype=torch.long, device=ids.device)
    all_values = torch.full(shape, -math.inf, device=values.device)
    all_ids[batch.logprob_rows] = ids
    all_values[batch.logprob_rows] = values
    return all_ids, all_values
