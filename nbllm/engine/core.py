"""`EngineCore.step()`: schedule → run → sample → update → finish. The loop every front-end drives.

The core is synchronous and single-threaded on purpose: `LLM.generate` calls `step()` until its requests are
done, `AsyncLLM` calls it from a background thread. Each step is one batched forward over every scheduled
sequence and one batched sampling call; per-token Python work is limited to appending ids, feeding the
incremental detokenizer and checking stops.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from nbllm.engine.block_manager import BlockManager, BlockTable
from nbllm.engine.kv_offload import HostKVPool
from nbllm.engine.model_runner import KVPool, ModelRunner
from nbllm.engine.outputs import RequestMetrics, RequestOutput
from nbllm.engine.overlap import OverlapLoop
from nbllm.engine.radix_cache import RadixCache, host_tier_stats
from nbllm.engine.sampler import Sampler, SampleResult, SamplingBatch
from nbllm.engine.sampling_params import RequestOutputKind, SamplingParams
from nbllm.engine.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from nbllm.engine.sequence import Request, Sequence
from nbllm.engine.spec_decode import SpeculativeConfig, num_accepted, propose_ngram
from nbllm.engine.stop import StopChecker
from nbllm.errors import NbllmError
from nbllm.models.base import CausalLM
from nbllm.models.config import ModelConfig
from nbllm.tokenizer import Detokenizer, Tokenizer

if TYPE_CHECKING:
    from nbllm.constrain.matcher import Matcher


class PromptTooLongError(NbllmError, ValueError):
    """A prompt that cannot fit the model's context or the KV cache."""


@dataclass
class EngineStats:
    """Running totals the notebook dashboards draw; plain numbers, no widget knowledge here."""

    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_tokens_computed: int = 0
    prefill_seconds: float = 0.0
    decode_tokens_computed: int = 0
    decode_seconds: float = 0.0
    steps: int = 0
    preemptions: int = 0
    spec_proposed: int = 0  # draft tokens verified
    spec_accepted: int = 0  # of those, confirmed by the target model
    constrained_tokens: int = 0  # output tokens of requests with json_schema/regex/choices/grammar
    jump_forward_tokens: int = 0  # of those, appended without sampling (forced by the grammar)


class EngineCore:
    def __init__(
        self,
        model: CausalLM,
        config: ModelConfig,
        tokenizer: Tokenizer,
        *,
        num_blocks: int,
        block_size: int = 16,
        scheduler_config: SchedulerConfig,
        seed: int = 0,
        speculative: SpeculativeConfig | None = None,
        host_kv_blocks: int = 0,
    ) -> None:
        """`host_kv_blocks` > 0 gives the prefix cache a host-RAM tier of that many blocks (`kv_offload`)."""
        self.model, self.config, self.tokenizer = model, config, tokenizer
        self.block_size = block_size
        self.blocks = BlockManager(num_blocks, block_size)
        self.runner = ModelRunner(model, config, num_blocks, block_size)
        self.host_kv = HostKVPool(self.runner.pool, host_kv_blocks) if host_kv_blocks else None
        self.radix = RadixCache(self.blocks, self.host_kv) if scheduler_config.enable_prefix_caching else None
        self.scheduler = Scheduler(scheduler_config, self.blocks, self.radix)
        self.sampler = Sampler()
        self._sampling_reuse: tuple[list[int], SamplingBatch] | None = None  # `_sampling_batch`'s last rows, batch
        self.requests: dict[str, Request] = {}
        self.seed = seed
        self.speculative = speculative
        self._request_counter = 0
        self.totals = EngineStats()
        # Append the tokens a grammar forces without sampling them (`nbllm.constrain.jump_forward`).
        self.jump_forward = True
        # Prepare step N+1 while the device runs step N (`nbllm.engine.overlap`); `overlap.enabled` switches it.
        self.overlap = OverlapLoop(self, enabled=self.runner.device.type == "cuda")

    # ------------------------------------------------------------------ requests

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prompt: str | None = None) -> Request:
        """Queue a request; checks that it can ever fit before any work is done."""
        if request_id in self.requests:
            raise NbllmError(f"request id {request_id!r} is already in use; pick a unique id")
        limit = self.scheduler.config.max_model_len
        if not prompt_token_ids:
            raise PromptTooLongError("the prompt is empty; give at least one token")
        if len(prompt_token_ids) >= limit:
            raise PromptTooLongError(
                f"the prompt has {len(prompt_token_ids)} tokens but the context holds {limit}; shorten the prompt"
            )
        capacity = self.blocks.num_blocks * self.block_size
        if len(prompt_token_ids) + 1 > capacity:
            raise PromptTooLongError(
                f"the prompt needs {len(prompt_token_ids) + 1} KV slots but the cache has {capacity}; "
                "raise kv_cache_tokens or shorten the prompt"
            )
        vocab = self.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise NbllmError(f"prompt token ids must be in [0, {vocab}); got an id outside that range")
        self._matcher(params)  # compile now: a bad schema fails before any work, not mid-generation
        request = Request(request_id, prompt, list(prompt_token_ids), params,
                          RequestMetrics(arrival_time=time.perf_counter(), prompt_tokens=len(prompt_token_ids)))
        request.seqs.append(self._new_sequence(request, 0, list(prompt_token_ids)))
        self.requests[request_id] = request
        self.scheduler.add(request.seqs[0])
        self.totals.prompt_tokens += len(prompt_token_ids)
        return request

    def _new_sequence(self, request: Request, index: int, token_ids: list[int]) -> Sequence:
        params = request.params
        generator = None
        if not params.is_greedy:
            generator = torch.Generator(device="cpu")
            seed = params.seed if params.seed is not None else self.seed * 1_000_003 + self._request_counter
            generator.manual_seed(seed + index * 7919)
        self._request_counter += 1
        return Sequence(
            request=request,
            index=index,
            token_ids=token_ids,
            table=BlockTable(),
            generator=generator,
            detokenizer=Detokenizer(self.tokenizer, at_start=False),
            stop_checker=StopChecker(params.stop_strings, params.include_stop_str_in_output),
            logprobs=[] if params.logprobs is not None else None,
            matcher=self._matcher(params),
        )

    def _matcher(self, params: SamplingParams) -> Matcher | None:
        """A fresh matcher for the constraint of `params` (compiled once per content), or None for free text;
        raises `SchemaError` for a schema, pattern or grammar that cannot be compiled."""
        if params.constraint is None:
            return None
        from nbllm.constrain.matcher import matcher_for  # lazy: engines serving free text never load compilers

        return matcher_for(*params.constraint, self.tokenizer, jump_forward=self.jump_forward)

    def abort(self, request_id: str) -> None:
        """Stop a request now; its blocks are released (full blocks stay in the prefix cache)."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        for seq in request.seqs:
            if not seq.is_finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or self.overlap.pending()

    # ------------------------------------------------------------------ one step

    def step(self) -> list[RequestOutput]:
        """Advance every scheduled sequence by one forward; returns outputs of requests that changed (with
        overlap scheduling, those of the step before: `nbllm.engine.overlap`)."""
        if self.overlap.eligible():
            return self.overlap.step()
        if self.overlap.inflight is not None:  # a request the overlap cannot serve arrived: finish the last step
            return self.overlap.drain()
        ready, logits = self.forward()
        touched: dict[str, Request] = {}
        targets = self._expand_forks(ready)
        if targets:
            rows: list[int] = []
            seqs: list[Sequence] = []
            outputs: list[list[int]] = []
            for seq, first in targets:  # one row per draft token, plus the one after the last
                draft = seq.spec_token_ids
                for r in range(len(draft) + 1):
                    rows.append(first + r)
                    seqs.append(seq)
                    # the token history only feeds penalties: copying it for every row would cost O(length) a token
                    outputs.append(seq.output_token_ids + draft[:r] if seq.params.has_penalties else [])
            # index_select, not logits[rows]: advanced indexing of [rows, 262144] costs ~2 ms on a CPU
            picked = logits if rows == list(range(logits.shape[0])) else logits.index_select(
                0, torch.tensor(rows, device=logits.device))
            result = self.sampler(picked, self._sampling_batch(seqs, outputs), self._allowed_mask(seqs, logits))
            tokens = result.token_ids.tolist()
            chosen = result.logprobs.tolist()
            row = 0
            for seq, _ in targets:
                k = len(seq.spec_token_ids)
                self._accept(seq, tokens[row : row + k + 1], chosen, result, row)
                touched[seq.request.request_id] = seq.request
                row += k + 1
        return self._outputs(touched.values())

    def forward(self) -> tuple[list[Sequence], torch.Tensor]:
        """Schedule and run one batch: the sequences whose pending tokens are now all computed and their logits
        rows (`ModelRunner.execute`). K/V of draft tokens are written but not yet counted in `num_computed`:
        the caller accepts or rolls them back. `step()` samples from the rows; beam search ranks them."""
        batch = self.scheduler.schedule()
        if not batch.seqs:
            if self.scheduler.has_work():
                raise NbllmError("the KV cache is too small to run any waiting request; raise kv_cache_tokens")
            return [], torch.empty((0, self.config.vocab_size))
        now = time.perf_counter()
        for seq, _ in batch.seqs:
            if seq.request.metrics.first_scheduled_time is None:
                seq.request.metrics.first_scheduled_time = now
        ready, logits = self.runner.execute(batch)
        elapsed = time.perf_counter() - now
        self._account(batch, elapsed)
        for seq, n in batch.seqs:
            seq.num_computed += n - len(seq.spec_token_ids)
            self.scheduler.cache_computed(seq)
        return ready, logits

    def _accept(self, seq: Sequence, targets: list[int], logprobs: list[float], result: SampleResult,
                row: int) -> None:
        """Append the sampled token, or for a sequence with a draft the confirmed draft tokens plus the target's
        next one (`spec_decode.num_accepted`), or for a constrained one the sampled token and what the grammar
        forces after it (`Matcher.plan`), stopping token by token; roll rejected drafts' K/V back."""
        draft = seq.spec_token_ids
        accepted = num_accepted(draft, targets) if draft else 0
        if draft:
            self.totals.spec_proposed += len(draft)
            self.totals.spec_accepted += accepted
            # K/V stays for the accepted drafts only; the table releases the blocks it no longer needs.
            self.blocks.truncate(seq.table, seq.num_computed + accepted)
            seq.spec_token_ids = []
        emitted = targets[: accepted + 1]
        if seq.matcher is not None:  # (never a draft) the sampled token, and with jump-forward what it forces
            emitted = seq.matcher.plan(emitted[0])
        for i, token in enumerate(emitted):
            if i <= accepted:
                self._append(seq, token, logprobs[row + i], result, row + i)
            else:  # forced by the grammar: certain under the constraint, computed in the next step
                self.totals.jump_forward_tokens += 1
                self._append(seq, token, 0.0, None, row)
            if seq.is_finished:
                return
            if i < accepted:
                seq.num_computed += 1  # an accepted draft token: its K/V was computed this step
        if self.speculative is not None and seq.matcher is None:  # drafts would bypass the grammar's masks
            seq.spec_token_ids = self._propose(seq)

    def _propose(self, seq: Sequence) -> list[int]:
        """Draft tokens for the next step, never more than the output and context lengths leave room for (the
        step emits one token past the draft)."""
        spec = self.speculative
        room = min(spec.num_tokens, seq.params.max_tokens - seq.num_output_tokens - 1,
                   self.scheduler.config.max_model_len - seq.num_tokens - 1)
        return propose_ngram(seq.token_ids, room, spec.ngram_max, spec.ngram_min)

    def _account(self, batch: ScheduledBatch, elapsed: float) -> None:
        """Split the step's time between prefill and decode tokens (in proportion to their count). Called before
        the step's `num_computed` update: a decode sequence is one whose only pending token is an output token."""
        t = self.totals
        t.steps += 1
        t.preemptions += batch.num_preempted
        total = decode = 0
        for seq, n in batch.seqs:
            total += n
            if seq.num_computed == len(seq.token_ids) - 1 >= len(seq.request.prompt_token_ids):
                decode += n
        prefill = total - decode
        t.prefill_tokens_computed += prefill
        t.decode_tokens_computed += decode
        t.prefill_seconds += elapsed * prefill / total
        t.decode_seconds += elapsed * decode / total

    def _expand_forks(self, ready: list[Sequence]) -> list[tuple[Sequence, int]]:
        """Each ready sequence with the index of its first logits row; forks n > 1 requests after their prompt
        (the children sample from the parent's row)."""
        targets: list[tuple[Sequence, int]] = []
        row = 0
        for seq in ready:
            request = seq.request
            if not request.forked:
                request.forked = True
                for index in range(1, request.params.n):
                    child = self._new_sequence(request, index, list(seq.token_ids))
                    child.table = self.blocks.fork(seq.table)
                    child.num_computed = seq.num_computed
                    request.seqs.append(child)
                    self.scheduler.add_running(child)
                    targets.append((child, row))
            targets.append((seq, row))
            row += 1 + len(seq.spec_token_ids)
        return targets

    def _sampling_batch(self, seqs: Seq[Sequence], output_token_ids: Seq[list[int]]) -> SamplingBatch:
        """The sampling settings of `seqs`' rows. Decode steps sample the same sequences step after step, and
        without penalties nothing in their settings changes (parameters and generators belong to the sequence;
        only penalties read the token history), so the last batch is reused while its rows are the same."""
        rows = [seq.seq_id for seq in seqs]
        if self._sampling_reuse is not None and self._sampling_reuse[0] == rows:
            return self._sampling_reuse[1]
        batch = SamplingBatch.build(
            params=[s.params for s in seqs],
            generators=[s.generator for s in seqs],
            output_token_ids=list(output_token_ids),
            prompt_token_ids=[s.request.prompt_token_ids for s in seqs],
            device=self.runner.device,
        )
        self._sampling_reuse = None if any(s.params.has_penalties for s in seqs) else (rows, batch)
        return batch

    def _allowed_mask(self, seqs: Seq[Sequence], logits: torch.Tensor) -> torch.Tensor | None:
        """The sampler's `[rows, V]` allowed-token mask when some row is constrained (free rows allow all)."""
        if all(seq.matcher is None for seq in seqs):
            return None
        rows = np.ones((len(seqs), logits.shape[-1]), dtype=np.bool_)
        for row, seq in zip(rows, seqs):
            if seq.matcher is not None:
                mask = seq.matcher.mask()
                row[mask.vocab_size :] = False  # logits may be padded past the tokenizer's vocabulary
                mask.write(row[: mask.vocab_size])
        return torch.from_numpy(rows).to(logits.device)

    def _append(self, seq: Sequence, token: int, logprob: float, result: SampleResult | None, row: int) -> None:
        """Append one token (`result`'s `row` holds its top log-probabilities; None for a forced token) and
        finish the sequence if it ends here. Runs for every token, so it reads clock and lengths only where
        needed (no timestamp after the first token)."""
        request = seq.request
        params, metrics, matcher = request.params, request.metrics, seq.matcher
        if matcher is not None:
            if not matcher.advance(token):  # only when the mask left nothing to sample
                seq.finish_reason, seq.stop_reason = "abort", "no token of the vocabulary continues the constraint"
                self.scheduler.finish(seq)
                return
            self.totals.constrained_tokens += 1
        if metrics.first_token_time is None:
            metrics.first_token_time = time.perf_counter()
        token_ids = seq.token_ids
        token_ids.append(token)
        seq.cumulative_logprob += logprob
        if seq.logprobs is not None:
            entry = {token: logprob}
            if result is not None and result.top_logprobs is not None:
                ids, values = result.top_logprobs
                entry.update(zip(ids[row].tolist(), values[row].tolist()))
            seq.logprobs.append(entry)
        metrics.generated_tokens += 1
        self.totals.generated_tokens += 1
        # A constrained output ends where its grammar says, ignore_eos or not.
        is_eos = token in self.tokenizer.eos_token_ids and (not params.ignore_eos or matcher is not None)
        delta = "" if is_eos else seq.detokenizer.add(token)
        seq.text += delta
        if is_eos or (params.stop_token_ids and token in params.stop_token_ids):
            seq.finish_reason, seq.stop_reason = "stop", (None if is_eos else token)
        else:
            hit = seq.stop_checker.check(seq.text, len(delta))
            if hit is not None:
                seq.text = seq.text[: hit.truncate_at]
                seq.finish_reason, seq.stop_reason = "stop", hit.stop
            elif matcher is not None and matcher.complete:  # only EOS could follow: end without it
                seq.finish_reason = "stop"
            elif (len(token_ids) - len(request.prompt_token_ids) >= params.max_tokens
                  or len(token_ids) >= self.scheduler.config.max_model_len):
                seq.finish_reason = "length"
        if seq.finish_reason is not None:
            seq.text += seq.detokenizer.flush() if seq.finish_reason == "length" else ""
            self.scheduler.finish(seq)

    def _outputs(self, changed: Iterable[Request]) -> list[RequestOutput]:
        """The outputs of the requests a step changed: each one's new state, but a FINAL_ONLY request's only
        once it has finished (nothing is built for it before)."""
        return [self._output(r) for r in changed
                if r.finished or r.params.output_kind is not RequestOutputKind.FINAL_ONLY]

    def _output(self, request: Request) -> RequestOutput:
        out = request.output()
        if out.finished:
            request.metrics.finished_time = time.perf_counter()
            self.totals.cached_prompt_tokens += request.metrics.cached_prompt_tokens
            self.requests.pop(request.request_id, None)
        return out

    # ------------------------------------------------------------------ introspection

    def stats(self) -> dict[str, float | int]:
        t = self.totals
        return {
            "prompt_tokens": t.prompt_tokens,
            "cached_prompt_tokens": t.cached_prompt_tokens,
            "generated_tokens": t.generated_tokens,
            "kv_blocks_total": self.blocks.num_blocks,
            "kv_blocks_used": self.blocks.num_used_blocks,
            "kv_blocks_cached": self.radix.cached_blocks() if self.radix else 0,
            "block_size": self.block_size,
            "prefill_tok_s": t.prefill_tokens_computed / t.prefill_seconds if t.prefill_seconds else 0.0,
            "decode_tok_s": t.decode_tokens_computed / t.decode_seconds if t.decode_seconds else 0.0,
            "steps": t.steps,
            "preemptions": t.preemptions,
            "spec_proposed": t.spec_proposed,
            "spec_accepted": t.spec_accepted,
            "constrained_tokens": t.constrained_tokens,
            "jump_forward_tokens": t.jump_forward_tokens,
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            **host_tier_stats(self.radix),
        }

    def kv_snapshot(self) -> dict[str, Any]:
        """The KV pool as plain data for dashboards: each block's refcount, the blocks the prefix cache holds,
        and the radix tree's nodes."""
        nodes = list(self.radix.nodes()) if self.radix else []
        return {
            "refcounts": [self.blocks.refcount(b) for b in range(self.blocks.num_blocks)],
            "cached": {b for node in nodes for b in node.blocks},
            "nodes": nodes,
            "block_size": self.block_size,
        }

    def reset_prefix_cache(self) -> None:
        if self.radix is not None:
            self.radix.reset()


def num_blocks_for(config: ModelConfig, block_size: int, dtype: torch.dtype, *, kv_cache_tokens: int | None,
                   memory_bytes: int) -> int:
    """KV blocks from an explicit token count, else from a memory budget."""
    if kv_cache_tokens is not None:
        return max(1, -(-kv_cache_tokens // block_size))
    return max(1, memory_bytes // KVPool.bytes_per_block(config, block_size, dtype))
