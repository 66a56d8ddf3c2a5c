"""One `run`/`run_batch`: program threads that ask for generations, one engine driven from the caller's thread.

Why threads: a program is ordinary Python that may read `s["answer"]` and branch on it, so each program (and
each state's queue of expressions, see `state.py`) needs a stack of its own that can wait for the model.

Why one driver: the engine core is single-threaded. Threads never touch it; they hand requests (generate,
score) to the driver and wait. The driver steps the engine only when *every* thread of the run is waiting —
a barrier. So the branches of a `fork`, or the programs of a `run_batch`, that ask for text at the same point
join the same engine step and run as one batch: a 2-branch fork takes the steps of its longer branch, not the
sum. While any thread still runs Python (it may be about to ask for more), the driver waits for it.

Accounting: `_busy` counts threads running Python. A thread that waits on a `Slot` stops being busy; whoever
fills the slot makes it busy again (under the lock), so the driver never sees a gap between a wake-up and the
woken thread's next move. The driver runs in the thread that called `run`, so Ctrl-C in a notebook lands in it:
the run's requests are aborted and every waiting thread is released with `ProgramCancelled`.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from nbllm.engine.core import EngineCore
from nbllm.engine.llm import LLM
from nbllm.engine.outputs import RequestOutput
from nbllm.engine.sampling_params import SamplingParams
from nbllm.lang.errors import LangError, ProgramCancelled
from nbllm.tokenizer import Tokenizer

_run_ids = itertools.count()


class Slot:
    """A value one thread waits for and another provides (a future, with busy-accounting for the driver)."""

    def __init__(self) -> None:
        self.done = False
        self.waiting = False
        self.value: Any = None
        self.error: BaseException | None = None

    def result(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


@dataclass
class _Generate:
    slot: Slot
    text: str
    params: SamplingParams


@dataclass
class _Score:
    slot: Slot
    text: str
    choices: list[str]


class Runtime:
    """The threads and engine requests of one run; `drive` runs it to the end from the calling thread."""

    def __init__(self, llm: LLM) -> None:
        self.llm = llm
        self.lock = threading.Condition()
        self._busy = 0
        self._requests: list[_Generate | _Score] = []
        self._in_flight: dict[str, Slot] = {}
        self._prefix = f"lang-{next(_run_ids)}-"
        self._ids = itertools.count()
        self._cancelled: BaseException | None = None

    # ------------------------------------------------------------------ threads (any thread)

    def spawn(self, fn: Callable[[], Any], name: str) -> Slot:
        """Run `fn` in a new thread; the slot gets its result or its exception."""
        slot = Slot()

        def body() -> None:
            value, error = None, None
            try:
                value = fn()
            except BaseException as exc:  # handed to whoever waits on the slot
                error = exc
            with self.lock:
                self._busy -= 1
                self._fill(slot, value, error)

        with self.lock:
            self._busy += 1
        threading.Thread(target=body, name=name, daemon=True).start()
        return slot

    def wait(self, slot: Slot) -> Any:
        """Block the calling (busy) thread until `slot` is filled; the driver may step meanwhile."""
        with self.lock:
            if not slot.done:
                slot.waiting = True
                self._busy -= 1
                self.lock.notify_all()
                self.lock.wait_for(lambda: slot.done)
        return slot.result()

    def _fill(self, slot: Slot, value: Any, error: BaseException | None) -> None:
        """Under the lock: fill `slot`, and count its waiter as busy again before anyone else looks."""
        if slot.done:
            return
        slot.value, slot.error, slot.done = value, error, True
        if slot.waiting:
            self._busy += 1
        self.lock.notify_all()

    def generate(self, text: str, params: SamplingParams) -> RequestOutput:
        """The finished output of `text` under `params`, computed in a batch with every other waiting request."""
        return self.wait(self._submit(_Generate(Slot(), text, params)))

    def score(self, text: str, choices: list[str]) -> list[float]:
        """Each choice's mean token log-probability after `text` (see `choice_tokens`)."""
        return self.wait(self._submit(_Score(Slot(), text, choices)))

    def _submit(self, request: _Generate | _Score) -> Slot:
        with self.lock:
            if self._cancelled is not None:
                raise ProgramCancelled(f"the run was stopped ({self._cancelled!r}); run the program again")
            self._requests.append(request)
        return request.slot

    # ------------------------------------------------------------------ the driver (the caller's thread)

    def drive(self, roots: Sequence[Slot]) -> None:
        """Serve requests until every root slot is filled. Whatever ends this (done, an error, an interrupt),
        requests still open are aborted and their waiting threads released (a program that raised may leave
        branches behind)."""
        engine = self.llm.engine
        try:
            with self.lock:
                while True:
                    self.lock.wait_for(lambda: self._busy == 0)
                    if all(r.done for r in roots):
                        break
                    if not (self._requests or self._in_flight):
                        raise LangError("every program thread is waiting but nothing was asked of the engine; "
                                        "a program waits on itself (report this with the program)")
                    self._serve(engine)
        except BaseException as exc:
            self._cancel(exc)
            raise
        self._cancel(LangError("the program ended"))

    def _serve(self, engine: EngineCore) -> None:
        """Under the lock: queue the new generations, answer all scorings in one forward, then one engine step."""
        requests, self._requests = self._requests, []
        scorings = [r for r in requests if isinstance(r, _Score)]
        for request in requests:
            if isinstance(request, _Generate):
                request_id = f"{self._prefix}{next(self._ids)}"
                try:
                    engine.add_request(request_id, self.llm.tokenizer.encode(request.text), request.params,
                                       prompt=request.text)
                except Exception as exc:  # a user error (bad schema, prompt too long) goes to the asking thread
                    self._fill(request.slot, None, exc)
                else:
                    self._in_flight[request_id] = request.slot
        if scorings:
            self._answer_scorings(scorings)
        if self._in_flight and engine.has_unfinished():
            for out in engine.step():
                slot = self._in_flight.get(out.request_id)
                if slot is not None and out.finished:
                    del self._in_flight[out.request_id]
                    self._fill(slot, out, None)

    def _answer_scorings(self, scorings: list[_Score]) -> None:
        """Every pending `select` of the run (the branches of a fork, say) scored in one batched forward."""
        sequences, starts, counts = [], [], []
        for request in scorings:
            seqs, firsts = choice_tokens(self.llm.tokenizer, request.text, request.choices)
            sequences += seqs
            starts += firsts
            counts.append(len(seqs))
        try:
            logprobs = self.llm.token_logprobs(sequences, starts)
        except Exception as exc:  # e.g. a text longer than the model's context
            if len(scorings) == 1:
                self._fill(scorings[0].slot, None, exc)
            else:  # one at a time: only the asker at fault gets the error
                for request in scorings:
                    self._answer_scorings([request])
            return
        at = 0
        for request, count in zip(scorings, counts):
            self._fill(request.slot, [sum(lp) / len(lp) for lp in logprobs[at : at + count]], None)
            at += count

    def _cancel(self, reason: BaseException) -> None:
        with self.lock:
            self._cancelled = reason
            for request_id in self._in_flight:
                self.llm.engine.abort(request_id)
            stopped = ProgramCancelled(f"the run was stopped ({reason!r}); run the program again")
            for slot in [*self._in_flight.values(), *(r.slot for r in self._requests)]:
                self._fill(slot, None, stopped)
            self._in_flight.clear()
            self._requests.clear()


def choice_tokens(tokenizer: Tokenizer, text: str, choices: list[str]) -> tuple[list[list[int]], list[int]]:
    """The token ids of `text + choice` for each choice, and where the choice's own tokens start: past the
    longest common prefix with `text`'s tokens, so a choice that merges with the end of the text is scored on
    the tokens the model would really see. SGLang's default `select` score is their mean log-probability."""
    prefix = tokenizer.encode(text)
    sequences, starts = [], []
    for choice in choices:
        ids = tokenizer.encode(text + choice)
        common = 0
        while common < min(len(prefix), len(ids)) and prefix[common] == ids[common]:
            common += 1
        sequences.append(ids)
        starts.append(max(1, min(common, len(ids) - 1)))
    return sequences, starts
