"""What the engine hands back: vLLM's `RequestOutput` / `CompletionOutput`, plus per-request metrics.

The same objects serve the blocking `LLM.generate` (final state) and the streaming `AsyncLLM.generate`
(each one carries the text and tokens so far, plus the delta since the previous one).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestMetrics:
    """Timings and token counts of one request; times are `time.perf_counter()` seconds."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    generated_tokens: int = 0

    @property
    def ttft(self) -> float | None:
        """Time to first token, from arrival."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def decode_tok_s(self) -> float | None:
        """Generated tokens per second after the first one."""
        if self.finished_time is None or self.first_token_time is None or self.generated_tokens < 2:
            return None
        span = self.finished_time - self.first_token_time
        return (self.generated_tokens - 1) / span if span > 0 else None


@dataclass
class CompletionOutput:
    """One generated sequence of a request (`n > 1` gives several)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None = None  # "stop" (EOS, stop id or stop string), "length", "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    text_delta: str = ""
    token_ids_delta: list[int] = field(default_factory=list)

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """The state of one request: its prompt, its completions, whether it is done, and its metrics."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
