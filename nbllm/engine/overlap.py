"""Overlap scheduling: the host prepares step N+1 while the device still runs step N.

A synchronous engine step samples, waits for the sampled ids (`tolist`), appends them, checks stops, builds the
outputs, schedules and prepares the next batch, and only then launches it: on a GPU the device idles for all of
that host work (~8 ms of a ~17 ms step at 256 sequences). As in SGLang's overlap scheduler and vLLM's async
scheduling, `OverlapLoop.step` instead

1. schedules and launches step N+1 (forward and sampling, nothing read back), its inputs naming each token
   sampled by step N by a *placeholder*: `-1 - row`, the row of step N's sampled-ids tensor, which stays on
   the device and is looked up there by the model's token lookup (`CausalLM.forward`'s `placeholders`, one
   kernel with the embedding on CUDA: `nbllm.kernels.embedding`);
2. then waits for step N's sampled ids only (copied into pinned host memory behind an event when step N was
   launched, or written there by its decode graph itself, so by now they are usually there), replaces each sequence's placeholder with its token and runs
   the engine's usual per-token work (`EngineCore._append`: detokenize, stop checks, finish);
3. and returns step N's outputs: stops are seen one step late. A sequence that finished at step N's token was
   computed once more in step N+1; that token is dropped, and its blocks, released at the finish, are only
   reused by steps queued after N+1 on the same stream.

Every sequence has at most one placeholder, always its last token, between the launch that samples it and the
next step's resolution. The loop runs only while every request is plain (n = 1, no penalties, no grammar, no
speculative drafts, no tensor-parallel broadcast), since those need the sampled history on the host before the
next step; otherwise `EngineCore.step` drains the step in flight and runs synchronously. The logic is device
agnostic (on the CPU everything is simply ready at once), so the CPU tests check it against the synchronous
engine; it is on by default on CUDA only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from nbllm.engine.sampler import SampleResult
from nbllm.errors import NbllmError

if TYPE_CHECKING:
    from nbllm.engine.core import EngineCore
    from nbllm.engine.outputs import RequestOutput
    from nbllm.engine.scheduler import ScheduledBatch
    from nbllm.engine.sequence import Request, Sequence


def placeholder(row: int) -> int:
    """The input id standing for row `row` of the previous step's sampled ids (token ids are >= 0)."""
    return -1 - row


@dataclass
class InflightStep:
    """A launched step whose sampled ids are not yet on the host."""

    seqs: list[Sequence]  # the sequences it samples for, one row each, in row order
    sampled: torch.Tensor  # [R] long on the device: the next step's placeholders index it
    host: SampleResult  # the same result in host memory, valid once `ready` has fired
    ready: torch.cuda.Event | None  # None on the CPU, where `host` is valid at once

    @property
    def live(self) -> bool:
        """Some sequence still waits for its token (aborted and finished ones do not)."""
        return any(not seq.is_finished for seq in self.seqs)


def to_host(result: SampleResult, staging: tuple[torch.Tensor, torch.Tensor] | None = None
            ) -> tuple[SampleResult, torch.cuda.Event | None]:
    """Start copying `result` to pinned host memory (the token ids and their log-probabilities into `staging`, a
    pair of pinned buffers at least as long, when given); the event fires when the copies are done."""
    if result.token_ids.device.type != "cuda":
        return result, None
    top = result.top_logprobs
    rows = result.token_ids.numel()
    ids, logprobs = ((staging[0][:rows].copy_(result.token_ids, non_blocking=True),
                      staging[1][:rows].copy_(result.logprobs, non_blocking=True)) if staging is not None else
                     (result.token_ids.to("cpu", non_blocking=True), result.logprobs.to("cpu", non_blocking=True)))
    host = SampleResult(ids, logprobs, None if top is None else (top[0].to("cpu", non_blocking=True),
                                                                 top[1].to("cpu", non_blocking=True)))
    event = torch.cuda.Event()
    event.record()
    return host, event


class OverlapLoop:
    """The overlapped step of one `EngineCore`; `enabled` is the switch (default: on for CUDA engines)."""

    def __init__(self, core: EngineCore, *, enabled: bool) -> None:
        self.core = core
        self.enabled = enabled
        self.inflight: InflightStep | None = None
        # Host seconds spent waiting for sampled ids: near zero when the host is the bottleneck (benchmarks).
        self.wait_seconds = 0.0
        self._plain_at: int | None = None  # the request counter when every request was last found plain
        # Pinned buffers for the sampled ids and log-probabilities, two sets used in turn: a launch's copy lands in
        # one while the step before it, resolved after that launch, is still read from the other.
        self._staging: list[tuple[torch.Tensor, torch.Tensor] | None] = [None, None]
        self._turn = 0

    def eligible(self) -> bool:
        """Whether the next step may overlap: switched on, and every request plain (module docstring)."""
        core = self.core
        if not self.enabled or core.speculative is not None or core.runner.step_broadcast is not None:
            return False
        if self._plain_at == core._request_counter:  # no request added since all were plain (~1 us each)
            return True
        plain = all(r.params.n == 1 and not r.params.has_penalties and r.params.constraint is None
                    for r in core.requests.values())
        self._plain_at = core._request_counter if plain else None
        return plain

    def pending(self) -> bool:
        """A launched step still owes some sequence its token."""
        return self.inflight is not None and self.inflight.live

    def drain(self) -> list[RequestOutput]:
        """Finish the step in flight (before a synchronous step)."""
        inflight, self.inflight = self.inflight, None
        return self._resolve(inflight) if inflight is not None else []

    def step(self) -> list[RequestOutput]:
        """Launch the next step, then resolve the previous one; returns the previous step's outputs."""
        core = self.core
        batch = core.scheduler.schedule()
        launched = self._launch(batch) if batch.seqs else None
        if launched is None and not self.pending() and core.scheduler.has_work():
            raise NbllmError("the KV cache is too small to run any waiting request; raise kv_cache_tokens")
        outputs = self.drain()
        if batch.seqs:
            self._advance(batch, launched)
        self.inflight = launched if launched is not None and launched.live else None
        return outputs

    def _launch(self, batch: ScheduledBatch) -> InflightStep | None:
        """Forward and sampling of `batch`, queued on the device; None when no sequence samples this step."""
        core = self.core
        now = time.perf_counter()
        for seq, _ in batch.seqs:
            if seq.request.metrics.first_scheduled_time is None:
                seq.request.metrics.first_scheduled_time = now
        sampled = self.inflight.sampled if self.inflight is not None else None
        ready, logits = core.runner.execute(batch, placeholders=sampled)
        core._account(batch, time.perf_counter() - now)
        if not ready:
            return None
        for seq in ready:
            seq.request.forked = True  # n = 1: nothing to fork
        # Plain rows: no penalties, so no token history (the engine reuses the settings while the rows stay).
        sampling = core._sampling_batch(ready, [[]] * len(ready))
        taken = core.runner.graph_greedy() if sampling.plain_greedy else None  # the graph sampled already
        if taken is not None:
            result, host, event = taken
        else:
            result = core.sampler(logits, sampling)
            host, event = to_host(result, self._pinned(len(ready)) if result.token_ids.is_cuda else None)
        return InflightStep(ready, result.token_ids, host, event)

    def _pinned(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This launch's set of staging buffers, grown to `rows` (a `.to("cpu", non_blocking=True)` allocating pinned
        memory took ~40 us of host time a call in the batch-1 profile)."""
        self._turn ^= 1
        pair = self._staging[self._turn]
        if pair is None or pair[0].numel() < rows:
            size = max(rows, 256)
            pair = self._staging[self._turn] = (torch.empty(size, dtype=torch.long).pin_memory(),
                                                torch.empty(size, dtype=torch.float32).pin_memory())
        return pair

    def _resolve(self, inflight: InflightStep) -> list[RequestOutput]:
        """Replace the placeholders of `inflight`'s sequences with their sampled tokens; their outputs."""
        if inflight.ready is not None:
            start = time.perf_counter()
            inflight.ready.synchronize()
            self.wait_seconds += time.perf_counter() - start
        tokens, chosen = inflight.host.token_ids.tolist(), inflight.host.logprobs.tolist()
        touched: dict[str, Request] = {}
        for row, seq in enumerate(inflight.seqs):
            if seq.token_ids[-1] < 0:
                seq.token_ids.pop()
            if seq.is_finished:  # aborted while its token was on the way
                continue
            self.core._append(seq, tokens[row], chosen[row], inflight.host, row)  # no draft, no grammar here
            touched[seq.request.request_id] = seq.request
        return self.core._outputs(touched.values())

    def _advance(self, batch: ScheduledBatch, launched: InflightStep | None) -> None:
        """The host state after `batch` ran, as the synchronous step leaves it, with a placeholder where each
        sampled token will go; sequences that finished meanwhile keep their state (their token is dropped)."""
        scheduler = self.core.scheduler
        for seq, n in batch.seqs:
            if not seq.is_finished:
                seq.num_computed += n
                scheduler.cache_computed(seq)
        if launched is not None:
            for row, seq in enumerate(launched.seqs):
                if not seq.is_finished:
                    seq.token_ids.append(placeholder(row))
