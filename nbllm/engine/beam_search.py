"""Beam search over the engine: every beam is an engine sequence, and beams share KV blocks.

Each round runs the live beams of all prompts as one batch (`EngineCore.forward`: one forward, with the usual
scheduling, chunked prefill, prefix cache and preemption), then per prompt ranks candidates by summed raw
log-probabilities (log-softmax of the logits, as vLLM and HF do): each beam offers its top `2 * beam_width`
next tokens; as in HF, a candidate ending in EOS that ranks among the best `beam_width` is set aside as
finished (vLLM keeps every EOS candidate), and the best `beam_width` others become the next beams. A new beam forks its parent's block table (`BlockManager.fork`: no K/V is copied); when it writes
its next token into the last, partly filled block it shares with siblings, copy-on-write gives it a private copy
of that one block. The parents' tables are then released, so a block lives exactly as long as some beam
descends from it: beams cost their common prefix once.

Ranking of finished beams follows HF's `length_penalty`: `cum_logprob / num_generated_tokens ** length_penalty`
(EOS counted). vLLM divides by the length including the prompt and excluding EOS; HF's form leaves the prompt
out of a comparison between its continuations. A prompt stops early only when no live beam can still enter the
top `beam_width` (a bound, not a heuristic: the result equals running all `max_tokens` rounds); otherwise beams
run to `max_tokens` and the final live beams are ranked with the finished ones.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from nbllm.engine.core import EngineCore
from nbllm.engine.sampling_params import SamplingParams
from nbllm.engine.sequence import Request, Sequence, SequenceStatus
from nbllm.errors import NbllmError

_search_ids = itertools.count()


@dataclass
class BeamSearchSequence:
    """One returned beam (vLLM's names): `tokens` are prompt + generated ids, `logprobs` one `{token: logprob}`
    per generated token, `text` the generated text."""

    tokens: list[int]
    logprobs: list[dict[int, float]]
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None  # "stop" (EOS) or "length"
    stop_reason: int | None = None  # the EOS id that ended it
    num_prompt_tokens: int = 0
    score: float = 0.0  # the length-penalized ranking score

    @property
    def output_token_ids(self) -> list[int]:
        return self.tokens[self.num_prompt_tokens :]


@dataclass
class BeamSearchOutput:
    """The best `beam_width` beams of one prompt, best first."""

    sequences: list[BeamSearchSequence] = field(default_factory=list)


def beam_score(cum_logprob: float, num_generated: int, length_penalty: float) -> float:
    """HF's length-penalized score: higher `length_penalty` favours longer sequences."""
    return cum_logprob / num_generated**length_penalty


class _PromptBeams:
    """The beam state of one prompt: its request (whose `seqs` are the live beams) and the finished beams."""

    def __init__(self, request: Request, beam_width: int, max_len: int) -> None:
        self.request = request
        self.beam_width = beam_width
        self.max_len = max_len  # generated tokens at most (max_tokens, or what the context leaves)
        self.finished: list[BeamSearchSequence] = []

    @property
    def live(self) -> list[Sequence]:
        return self.request.seqs

    def result(self, seq: Sequence, token: int | None, logprob: float, reason: str, penalty: float,
               eos: int | None = None) -> BeamSearchSequence:
        tokens = seq.token_ids + ([token] if token is not None else [])
        logprobs = seq.logprobs + ([{token: logprob}] if token is not None else [])
        cum = seq.cumulative_logprob + logprob
        n_prompt = seq.num_prompt_tokens
        return BeamSearchSequence(tokens, logprobs, cum, finish_reason=reason, stop_reason=eos,
                                  num_prompt_tokens=n_prompt, score=beam_score(cum, len(tokens) - n_prompt, penalty))

    def cannot_improve(self, length_penalty: float) -> bool:
        """True when `beam_width` beams have finished and no live beam can beat the worst of the best of them:
        log-probs only fall, so a live beam's best possible score is its current sum over the most favourable
        length (the longest when the penalty is positive, the next one otherwise)."""
        if len(self.finished) < self.beam_width or not self.live:
            return not self.live
        worst_kept = sorted((b.score for b in self.finished), reverse=True)[self.beam_width - 1]
        generated = len(self.live[0].token_ids) - self.live[0].num_prompt_tokens
        length = self.max_len if length_penalty > 0 else generated + 1
        best = max(s.cumulative_logprob for s in self.live) / length**length_penalty
        return best <= worst_kept


class BeamSearch:
    """Drives `EngineCore.forward` for a set of prompts; `run()` returns one `BeamSearchOutput` per prompt."""

    def __init__(self, core: EngineCore, prompts: list[tuple[str | None, list[int]]], beam_width: int,
                 max_tokens: int, *, length_penalty: float = 1.0, ignore_eos: bool = False) -> None:
        if beam_width < 1 or max_tokens < 1:
            raise NbllmError(f"beam search needs beam_width >= 1 and max_tokens >= 1, got {beam_width}, {max_tokens}")
        if 2 * beam_width > core.config.vocab_size:
            raise NbllmError(f"beam_width {beam_width} needs 2 * beam_width <= the vocabulary ({core.config.vocab_size})")
        if core.has_unfinished():
            raise NbllmError("beam search needs an idle engine; wait for the running requests to finish")
        self.core = core
        self.beam_width, self.length_penalty = beam_width, length_penalty
        self.eos: set[int] = set() if ignore_eos else set(core.tokenizer.eos_token_ids)
        self.prompts = prompts
        self.max_tokens = max_tokens

    def run(self) -> list[BeamSearchOutput]:
        core = self.core
        params = SamplingParams(max_tokens=self.max_tokens, temperature=0.0)
        search = next(_search_ids)
        states: list[_PromptBeams] = []
        try:
            for i, (text, ids) in enumerate(self.prompts):
                request = core.add_request(f"beam-{search}-{i}", ids, params, prompt=text)
                request.forked = True  # beams are created here, not by the sampler's n > 1 fork
                request.seqs[0].logprobs = []
                room = core.scheduler.config.max_model_len - len(ids)
                states.append(_PromptBeams(request, self.beam_width, min(self.max_tokens, room)))
            self._search(states)
            return [self._output(state) for state in states]
        finally:
            for state in states:
                core.abort(state.request.request_id)  # releases the live beams' blocks, drops the request

    def _search(self, states: list[_PromptBeams]) -> None:
        core = self.core
        width = 2 * self.beam_width
        candidates: dict[int, tuple[list[float], list[int]]] = {}  # seq_id -> top log-probs and tokens
        active = list(states)
        while active:
            ready, logits = core.forward()
            if ready:
                top = torch.log_softmax(logits.float(), dim=-1).topk(width, dim=-1)
                values, ids = top.values.tolist(), top.indices.tolist()
                for seq, v, t in zip(ready, values, ids):
                    candidates[seq.seq_id] = (v, t)
            live = [s for state in active for s in state.live]
            # A beam preempted after its logits came out is recomputed; its row will come again.
            for seq in live:
                if seq.status is not SequenceStatus.RUNNING:
                    candidates.pop(seq.seq_id, None)
            if all(s.seq_id in candidates for s in live):
                for state in active:
                    self._advance(state, candidates)
                candidates.clear()
                for state in [s for s in active if s.cannot_improve(self.length_penalty)]:
                    self._retire(state)
                    active.remove(state)

    def _advance(self, state: _PromptBeams, candidates: dict[int, tuple[list[float], list[int]]]) -> None:
        """One round for one prompt (HF's rule): rank all candidates by summed log-prob; an EOS candidate among
        the top `beam_width` finishes, and the best `beam_width` non-EOS candidates fork from their parents."""
        core, penalty, width = self.core, self.length_penalty, self.beam_width
        ranked = sorted(
            ((parent.cumulative_logprob + logprob, parent, token, logprob)
             for parent in state.live for logprob, token in zip(*candidates[parent.seq_id])),
            key=lambda c: -c[0],
        )  # stable: ties keep beam order, then token rank
        children: list[Sequence] = []
        for rank, (_, parent, token, logprob) in enumerate(ranked):
            if token in self.eos:
                if rank < width:
                    state.finished.append(state.result(parent, token, logprob, "stop", penalty, eos=token))
            elif len(children) < width:
                children.append(self._fork(parent, token, logprob))
            if len(children) == width and rank >= width - 1:
                break
        for parent in state.live:
            core.scheduler.finish(parent)
        state.request.seqs = children
        if children and len(children[0].token_ids) - children[0].num_prompt_tokens >= state.max_len:
            state.finished.extend(state.result(c, None, 0.0, "length", penalty) for c in children)
            for child in children:
                core.scheduler.finish(child)
            state.request.seqs = []

    def _fork(self, parent: Sequence, token: int, logprob: float) -> Sequence:
        """A new beam: the parent's tokens plus `token`, sharing every block of the parent's table."""
        child = Sequence(
            request=parent.request,
            index=parent.index,
            token_ids=parent.token_ids + [token],
            table=self.core.blocks.fork(parent.table),
            generator=None,
            detokenizer=parent.detokenizer,  # unused: beams are decoded once, at the end
            stop_checker=parent.stop_checker,
            num_computed=parent.num_computed,
            cumulative_logprob=parent.cumulative_logprob + logprob,
            logprobs=parent.logprobs + [{token: logprob}],
        )
        self.core.scheduler.add_running(child)
        return child

    def _retire(self, state: _PromptBeams) -> None:
        """A prompt whose live beams can no longer matter: release them."""
        for seq in state.live:
            self.core.scheduler.finish(seq)
        state.request.seqs = []

    def _output(self, state: _PromptBeams) -> BeamSearchOutput:
        best = sorted(state.finished, key=lambda b: -b.score)[: self.beam_width]
        for beam in best:
            out = beam.output_token_ids
            beam.text = self.core.tokenizer.decode(out[:-1] if beam.finish_reason == "stop" else out)
        return BeamSearchOutput(best)
