"""A request and its sequences: the engine's unit of bookkeeping.

A request with `n > 1` starts as one sequence; when its prompt is computed the engine forks it into n
sequences that share the prompt's KV blocks (copy-on-write on the last partial block). The scheduler only ever
sees sequences: how many tokens each has, how many of them already have KV in the cache, and its block table.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from nbllm.engine.block_manager import BlockTable
from nbllm.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from nbllm.engine.sampling_params import SamplingParams
from nbllm.engine.stop import StopChecker
from nbllm.tokenizer.detokenizer import Detokenizer

if TYPE_CHECKING:
    from nbllm.constrain.matcher import Matcher

_seq_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


# Looking a member up on its enum costs ~0.1 us on Python 3.11, and whether a sequence has finished is asked
# several times per sequence per step.
_FINISHED = SequenceStatus.FINISHED


@dataclass(eq=False)
class Sequence:
    """One token stream: prompt + output ids, the part of it whose KV is cached, and its decoding state."""

    request: Request
    index: int
    token_ids: list[int]
    table: BlockTable
    generator: torch.Generator | None
    detokenizer: Detokenizer
    stop_checker: StopChecker
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    num_computed: int = 0  # tokens whose K/V are stored in `table`'s blocks
    num_offered_blocks: int = 0  # full blocks of `table` already offered to the prefix cache
    # Speculative draft tokens to verify in the next step (see `spec_decode.py`): not part of `token_ids`; their
    # K/V is written after the pending token's, and the step rolls back the rejected ones.
    spec_token_ids: list[int] = field(default_factory=list)
    matcher: Matcher | None = None  # the grammar state of a constrained request (json_schema, regex, ...)
    status: SequenceStatus = SequenceStatus.WAITING
    text: str = ""
    emitted_text_len: int = 0  # how much of `text` has been streamed out
    emitted_tokens: int = 0
    cumulative_logprob: float = 0.0
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    waiting_since_step: int = 0

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_pending(self) -> int:
        """Tokens still without K/V: the whole uncached prompt when waiting, 1 when decoding."""
        return self.num_tokens - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.status is _FINISHED

    def completion(self, *, final: bool) -> CompletionOutput:
        """This sequence as a `CompletionOutput`, with the delta since the previous call."""
        text, emitted = self.text, self.emitted_text_len
        safe = len(text) if final or self.status is _FINISHED else self.stop_checker.safe_prefix_len(text)
        safe = max(safe, emitted)
        out_ids = self.token_ids[len(self.request.prompt_token_ids) :]  # a fresh list: the output's own
        out = CompletionOutput(
            index=self.index,
            text=text[:safe],
            token_ids=out_ids,
            cumulative_logprob=self.cumulative_logprob if self.request.params.logprobs is not None else None,
            logprobs=self.logprobs,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
            text_delta=text[emitted:safe],
            token_ids_delta=out_ids[self.emitted_tokens :],
        )
        self.emitted_text_len, self.emitted_tokens = safe, len(out_ids)
        return out


@dataclass(eq=False)
class Request:
    """What a user asked for: one prompt, its sampling parameters, and the `n` sequences answering it."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    seqs: list[Sequence] = field(default_factory=list)
    forked: bool = False  # whether the prompt is computed and the request split into its n sequences

    @property
    def finished(self) -> bool:
        for seq in self.seqs:  # a loop, not all() over a generator: asked for every request's output, every step
            if seq.status is not _FINISHED:
                return False
        return True

    def output(self, *, final: bool = False) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=[s.completion(final=final) for s in self.seqs],
            finished=self.finished,
            metrics=self.metrics,
        )
