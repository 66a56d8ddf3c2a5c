"""`AsyncLLM`: streaming generation for asyncio code and notebooks (top-level `await` / `async for`).

The engine core is synchronous and not thread-safe, so it gets one thread of its own: callers on the event
loop send it commands (add, abort) through a queue; it drains them between steps, runs steps while there is
work, and hands each request's outputs back to that request's asyncio queue with `call_soon_threadsafe`.
The event loop therefore stays free (a notebook keeps rendering) while the model computes, and many
`generate` calls in flight share every step's batch.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from nbllm.engine.llm import LLM, Prompt
from nbllm.engine.outputs import RequestOutput
from nbllm.engine.sampling_params import SamplingParams
from nbllm.errors import NbllmError


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException]

    def put(self, item: RequestOutput | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncLLM:
    """Wraps an `LLM` (or builds one from the same arguments) and serves it from a background thread."""

    def __init__(self, llm: LLM | None = None, **llm_kwargs: Any) -> None:
        self.llm = llm if llm is not None else LLM(**llm_kwargs)
        self.engine = self.llm.engine
        self._commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._ids = itertools.count()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="nbllm-engine", daemon=True)
        self._thread.start()

    async def generate(
        self, prompt: Prompt, sampling_params: SamplingParams | None = None, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's state after every step that changed it (`.outputs[i].text_delta` is what is new);
        the last one has `finished=True`. Leaving the loop early aborts the request."""
        if self._closed:
            raise NbllmError("this AsyncLLM is shut down; create a new one")
        request_id = request_id or f"async-{next(self._ids)}"
        text, token_ids = self.llm._encode(prompt)
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._commands.put(("add", (request_id, token_ids, sampling_params or SamplingParams(), text, stream)))
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self._commands.put(("abort", request_id))

    async def abort(self, request_id: str) -> None:
        """Stop a request; its stream ends with a final output whose finish reason is "abort"."""
        self._commands.put(("abort", request_id))

    def shutdown(self) -> None:
        """Stop the engine thread (pending requests are aborted)."""
        self._closed = True
        self._commands.put(("stop", None))
        self._thread.join(timeout=10)

    # ------------------------------------------------------------------ the engine thread

    def _run(self) -> None:
        while True:
            block = not self.engine.has_unfinished()
            try:
                while True:
                    command, arg = self._commands.get(block=block)
                    block = False
                    if command == "stop":
                        for request_id in list(self._streams):
                            self._abort(request_id)
                        return
                    if command == "add":
                        self._add(arg)
                    else:
                        self._abort(arg)
            except queue.Empty:
                pass
            if self.engine.has_unfinished():
                self._step()

    def _add(self, arg: tuple[str, list[int], SamplingParams, str | None, _Stream]) -> None:
        request_id, token_ids, params, text, stream = arg
        try:
            self.engine.add_request(request_id, token_ids, params, prompt=text)
        except Exception as exc:  # a bad request fails its own caller only
            stream.put(exc)
            return
        self._streams[request_id] = stream

    def _abort(self, request_id: str) -> None:
        request = self.engine.requests.get(request_id)
        stream = self._streams.pop(request_id, None)
        if request is None:
            return
        self.engine.abort(request_id)
        if stream is not None:
            stream.put(request.output(final=True))

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:  # the step failed for everyone in it: tell them, keep serving
            for request_id, stream in list(self._streams.items()):
                self.engine.abort(request_id)
                stream.put(exc)
            self._streams.clear()
            return
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.put(out)
                if out.finished:
                    del self._streams[out.request_id]
