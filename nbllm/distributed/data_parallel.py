"""Data parallel: whole-model replicas, each an engine in its own process, behind one front-end.

SGLang's `DataParallelController` shape: the front-end tokenizes, routes each request to a replica
(`PrefixRouter`: the longest cached prefix, else the least loaded) and forwards it; each replica runs its own
scheduler, KV pool and prefix cache and streams `RequestOutput`s back. Replicas share nothing, so they need no
collectives: the front-end talks to each over a pipe. `DataParallelEngine` offers the engine methods `LLM` drives
(`add_request`, `step`, `abort`, `stats`, `reset_prefix_cache`), so `generate`, `stream` and `chat` work unchanged.
A replica may itself be tensor parallel (it then starts its own workers, so replica processes are not daemons).
"""

from __future__ import annotations

import os
import traceback
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from nbllm.distributed.errors import ParallelConfigError, WorkerError
from nbllm.distributed.interrupts import ignore_interrupts, interrupts_deferred
from nbllm.distributed.router import PrefixRouter
from nbllm.engine.outputs import RequestOutput
from nbllm.engine.sampling_params import SamplingParams
from nbllm.gguf import open_gguf
from nbllm.models.config import ModelConfig
from nbllm.tokenizer import Tokenizer

# Numbers that are the same on every replica, not summed in `stats()`.
_SHARED_STATS = {"block_size"}


class DataParallelEngine:
    """`size` replicas of the model at `path`; replica i runs on the CPU or on GPUs `base + i * tp ...`."""

    def __init__(self, path: Path, size: int, device: torch.device, replica_args: dict[str, Any]) -> None:
        tp = replica_args.get("tensor_parallel_size", 1)
        if size < 1:
            raise ParallelConfigError(f"data_parallel_size must be at least 1, got {size}")
        if device.type == "cuda" and (device.index or 0) + size * tp > torch.cuda.device_count():
            raise ParallelConfigError(f"data_parallel_size={size} x tensor_parallel_size={tp} needs {size * tp} GPUs "
                                      f"from {device}, but {torch.cuda.device_count()} are visible")
        file = open_gguf(path)
        self.config = ModelConfig.from_gguf_metadata(file.metadata, source=str(path))
        self.tokenizer = Tokenizer.from_metadata(file.metadata)
        threads = max(1, (os.cpu_count() or 1) // (size * tp))
        ctx = mp.get_context("spawn")
        self._conns: list[Connection] = []
        self._procs = []
        self._owner: dict[str, tuple[int, list[int]]] = {}  # request id -> (replica, prompt ids)
        self._buffered: list[RequestOutput] = []
        self.failure: WorkerError | None = None
        try:
            for i in range(size):
                here, there = ctx.Pipe()
                replica_device = device if device.type == "cpu" else torch.device("cuda", (device.index or 0) + i * tp)
                proc = ctx.Process(target=_replica_main, args=(str(path), str(replica_device), replica_args, threads,
                                                               there), name=f"nbllm-dp-replica{i}")
                proc.start()
                there.close()
                self._conns.append(here)
                self._procs.append(proc)
            blocks = [self._receive_reply(i) for i in range(size)]
        except BaseException:
            self.close()
            raise
        self.router = PrefixRouter(size, replica_args["block_size"], capacity_blocks=min(blocks))

    # ------------------------------------------------------------------ the engine interface of `LLM`

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prompt: str | None = None) -> int:
        """Route and forward a request; returns the replica it went to. Errors in the request (a prompt too long,
        a bad schema) come back from the replica and are raised by the next `step`."""
        if request_id in self._owner:
            raise ParallelConfigError(f"request id {request_id!r} is already in use; pick a unique id")
        replica = self.router.route(prompt_token_ids)
        self._owner[request_id] = (replica, list(prompt_token_ids))
        self._send(replica, ("add", request_id, list(prompt_token_ids), params, prompt))
        return replica

    def step(self) -> list[RequestOutput]:
        """Outputs from the replicas: waits for at least one message while any request is in flight."""
        if self.failure is not None:
            raise self.failure
        outputs, self._buffered = self._buffered, []
        if not outputs and self._owner:
            busy = {self._owner[r][0] for r in self._owner}
            for conn in wait([self._conns[i] for i in busy]):
                outputs.extend(self._handle(self._conns.index(conn), self._recv(self._conns.index(conn))))
            for i in busy:  # whatever else already arrived, without waiting
                while self._conns[i].poll():
                    outputs.extend(self._handle(i, self._recv(i)))
        return [out for out in outputs if self._track(out)]

    def abort(self, request_id: str) -> None:
        owned = self._owner.pop(request_id, None)
        if owned is not None:
            self.router.finished(owned[0], owned[1])
            if self.failure is None:
                self._send(owned[0], ("abort", request_id))

    def has_unfinished(self) -> bool:
        return bool(self._owner)

    def stats(self) -> dict[str, float | int]:
        """Every replica's counters summed (throughputs too: the replicas run side by side)."""
        per = self.replica_stats()
        return {k: per[0][k] if k in _SHARED_STATS else sum(s[k] for s in per) for k in per[0]}

    def replica_stats(self) -> list[dict[str, float | int]]:
        return [self._call(i, "stats") for i in range(len(self._conns))]

    def reset_prefix_cache(self) -> None:
        for i in range(len(self._conns)):
            self._call(i, "reset_prefix_cache")
        self.router.reset()

    def close(self) -> None:
        """Stop the replicas (each closes its own tensor-parallel workers) and wait for them."""
        for conn in self._conns:
            try:
                conn.send(("close",))
            except OSError:
                pass
        for proc in self._procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()
                proc.join()
        for conn in self._conns:
            conn.close()
        self._conns, self._procs = [], []

    # ------------------------------------------------------------------ messages

    def _track(self, out: RequestOutput) -> bool:
        """Keep outputs of requests still owned (an aborted request's last outputs may still be in the pipe)."""
        owned = self._owner.get(out.request_id)
        if owned is None:
            return False
        if out.finished:
            del self._owner[out.request_id]
            self.router.finished(owned[0], owned[1] + list(out.outputs[0].token_ids))
        return True

    def _handle(self, replica: int, message: tuple) -> list[RequestOutput]:
        kind, *rest = message
        if kind == "outputs":
            return rest[0]
        if kind == "failed":  # a request the replica refused
            request_id, error = rest
            self.abort(request_id)
            raise error
        raise WorkerError(f"data-parallel replica {replica} sent an unexpected {kind!r} message")

    def _call(self, replica: int, name: str) -> Any:
        self._send(replica, ("call", name))
        return self._receive_reply(replica)

    def _receive_reply(self, replica: int) -> Any:
        """The replica's next reply; outputs arriving first are kept for `step`."""
        while True:
            message = self._recv(replica)
            if message[0] == "reply":
                return message[1]
            self._buffered.extend(self._handle(replica, message))

    def _send(self, replica: int, message: tuple) -> None:
        try:
            with interrupts_deferred():  # never half a message in the pipe
                self._conns[replica].send(message)
        except OSError:
            raise self._failed(replica) from None

    def _recv(self, replica: int) -> tuple:
        try:
            with interrupts_deferred():
                message = self._conns[replica].recv()
        except (EOFError, OSError):
            raise self._failed(replica) from None
        if message[0] == "fatal":
            raise self._failed(replica, message[1])
        return message

    def _failed(self, replica: int, text: str | None = None) -> WorkerError:
        proc = self._procs[replica]
        proc.join(timeout=5)
        if text:
            cause = text.strip().splitlines()[-1]
        else:
            cause = f"exited with code {proc.exitcode}" if not proc.is_alive() else "closed its pipe"
        self.failure = WorkerError(f"data-parallel replica {replica} failed: {cause}; create a new LLM")
        if text:
            self.failure.add_note(f"traceback of replica {replica}:\n{text}")
        return self.failure


def _replica_main(path: str, device: str, args: dict[str, Any], threads: int, conn: Connection) -> None:
    """One replica: an `LLM` of its own, stepped whenever it has work, taking commands between steps."""
    from nbllm.engine.llm import LLM
    from nbllm.errors import NbllmError

    try:
        ignore_interrupts()
        torch.set_num_threads(threads)
        if torch.device(device).type == "cuda":
            torch.cuda.set_device(torch.device(device))  # Triton launches on the current device, not the tensors'
        with LLM(path, device=device, **args) as llm:
            engine = llm.engine
            conn.send(("reply", engine.blocks.num_blocks))
            while True:
                while conn.poll() or not engine.has_unfinished():
                    kind, *rest = conn.recv()
                    if kind == "close":
                        return
                    if kind == "add":
                        request_id, token_ids, params, prompt = rest
                        try:
                            engine.add_request(request_id, token_ids, params, prompt=prompt)
                        except NbllmError as exc:
                            conn.send(("failed", request_id, exc))
                    elif kind == "abort":
                        engine.abort(rest[0])
                    elif kind == "call":
                        conn.send(("reply", getattr(engine, rest[0])()))
                outputs = engine.step()
                if outputs:
                    conn.send(("outputs", outputs))
    except EOFError:  # the front-end went away
        return
    except BaseException:  # noqa: BLE001 - reported to the front-end, which raises it as a WorkerError
        try:
            conn.send(("fatal", traceback.format_exc()))
        except OSError:
            pass
        raise SystemExit(1) from None
