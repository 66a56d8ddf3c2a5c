"""Tensor-parallel workers: rank 0 is the engine's own process; ranks 1..n-1 are spawned here and run a loop.

nano-vllm's shape (`engine/model_runner.py`): the worker ranks hold no scheduler; each step, rank 0's model runner
broadcasts what it is about to run (copy-on-write block copies and the flat batch arrays: ids, positions, slot
mapping, block tables), and every rank runs `ModelRunner.run` on them over its shard and its own KV pool. Only
rank 0's logits are used (the head gathers them). A `None` step ends the loop.

A worker that fails reports its traceback on a queue and exits; its sockets close, rank 0's next collective fails,
and rank 0 raises a `WorkerError` carrying that traceback. `close()` stops the workers (and is what the `LLM`'s
finalizer calls, so none outlives it).
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.multiprocessing as mp

from nbllm.distributed.errors import ParallelConfigError, WorkerError
from nbllm.distributed.group import JOIN_TIMEOUT, TensorParallelGroup, connect_store, create_store
from nbllm.distributed.interrupts import ignore_interrupts, interrupts_deferred
from nbllm.distributed.loading import load_shard
from nbllm.distributed.sharding import check_tensor_parallel
from nbllm.engine.model_runner import KVPool, ModelRunner, StepInputs, gpu_kv_memory_bytes
from nbllm.gguf import GGUFFile
from nbllm.models.base import CausalLM
from nbllm.models.config import ModelConfig


@dataclass(frozen=True)
class ShardSpec:
    """What a worker needs to build its rank: the model file, the group size, the base device (rank r runs on
    `cuda:base+r`, or the CPU), dtype, KV block size, its number of CPU threads and the numerics (`load_model`'s)."""

    path: str
    size: int
    device: str
    dtype: torch.dtype
    block_size: int
    threads: int
    numerics: str = "fast"


def rank_device(base: torch.device, rank: int) -> torch.device:
    base = torch.device(base)
    return base if base.type == "cpu" else torch.device(base.type, (base.index or 0) + rank)


class TensorParallelWorkers:
    """Ranks 1..n-1 of a tensor-parallel group, seen from rank 0 (`group` is rank 0's end)."""

    def __init__(self, path: str | Path, size: int, device: torch.device, dtype: torch.dtype, block_size: int,
                 numerics: str = "fast") -> None:
        threads = max(1, (os.cpu_count() or 1) // size)
        self.spec = ShardSpec(str(path), size, str(device), dtype, block_size, threads, numerics)
        ctx = mp.get_context("spawn")
        self._store = create_store(size)
        self._errors = ctx.SimpleQueue()
        self._procs = [ctx.Process(target=_worker_main, args=(self.spec, rank, self._store.port, self._errors),
                                   name=f"nbllm-tp-rank{rank}", daemon=True) for rank in range(1, size)]
        self._serving = False
        for p in self._procs:
            p.start()
        try:
            self._await_workers()
            self.group = TensorParallelGroup(self._store, 0, size, rank_device(device, 0), on_failure=self._failure)
        except BaseException:
            self.close()
            raise

    def serve(self, runner: ModelRunner) -> None:
        """From now on `runner` (rank 0's) sends every step to the workers before running it."""
        runner.graphs = None  # decode graphs do not capture the collectives yet: tensor-parallel runs eagerly
        runner.step_broadcast = self._step
        self._serving = True

    @contextmanager
    def _step(self, copies: list[tuple[int, int]], inputs: StepInputs) -> Iterator[None]:
        """Send the step to the workers; rank 0 runs it inside, uninterrupted (`interrupts_deferred`)."""
        with interrupts_deferred():
            self.group.broadcast_object((copies, replace(inputs, ready=[])))
            yield

    def _await_workers(self) -> None:
        """Wait until every worker process reached the store, failing fast if one dies on the way."""
        deadline = time.monotonic() + JOIN_TIMEOUT.total_seconds()
        keys = [f"up{rank}" for rank in range(1, self.spec.size)]
        while not self._store.check(keys):
            if any(not p.is_alive() for p in self._procs):
                raise self._failure(None)
            if time.monotonic() > deadline:
                raise WorkerError(f"tensor-parallel workers did not start within {JOIN_TIMEOUT}; see their stderr")
            time.sleep(0.05)

    def _failure(self, exc: Exception | None) -> WorkerError:
        """The clearest account of why the group broke: a worker's own traceback, else how it exited."""
        for p in self._procs:
            p.join(timeout=5)  # a failing worker reports, then exits
        reports = []
        while not self._errors.empty():
            reports.append(self._errors.get())
        if reports:
            rank, text = min(reports)
            error = WorkerError(f"tensor-parallel rank {rank} failed: {text.strip().splitlines()[-1]}; "
                                "create a new LLM")
            error.add_note(f"traceback of rank {rank}:\n{text}")
            return error
        dead = [f"rank {i + 1} exited with code {p.exitcode}" for i, p in enumerate(self._procs) if not p.is_alive()]
        cause = ", ".join(dead) or f"communication failed ({exc})"
        return WorkerError(f"tensor-parallel worker failure: {cause}; create a new LLM")

    def close(self) -> None:
        """Stop every worker: serving ones finish their loop on a `None` step; others (a failed group, a start that
        did not finish) are terminated, since they may be waiting in a collective that will never complete."""
        stop = self._serving and self.group.failure is None
        self._serving = False
        if stop:
            try:
                self.group.broadcast_object(None)
            except WorkerError:  # it broke meanwhile: terminated below
                stop = False
        for p in self._procs:
            if stop:
                p.join(timeout=10)
            if p.is_alive():
                p.terminate()
            p.join()


def _worker_main(spec: ShardSpec, rank: int, port: int, errors) -> None:
    """A worker rank: join the group, load the shard, agree on the KV pool size, then run steps until told to stop."""
    try:
        ignore_interrupts()
        torch.set_num_threads(spec.threads)
        store = connect_store(port, spec.size)
        store.set(f"up{rank}", "1")
        device = rank_device(torch.device(spec.device), rank)
        group = TensorParallelGroup(store, rank, spec.size, device)
        model, config = load_shard(spec.path, group, dtype=spec.dtype, numerics=spec.numerics)
        capacity = sys.maxsize
        if device.type == "cuda":
            capacity = gpu_kv_memory_bytes(device) // KVPool.bytes_per_block(model.config, spec.block_size, spec.dtype)
        num_blocks = group.min_int(capacity)
        runner = ModelRunner(model, config, num_blocks, spec.block_size, cuda_graphs=False)
        while (step := group.broadcast_object()) is not None:
            runner.run(*step)
    except BaseException:  # noqa: BLE001 - reported to rank 0, which raises it as a WorkerError
        errors.put((rank, traceback.format_exc()))
        sys.exit(1)


def start_tensor_parallel(file: GGUFFile, size: int, device: torch.device, dtype: torch.dtype, block_size: int,
                          numerics: str = "fast") -> tuple[TensorParallelWorkers, CausalLM, ModelConfig]:
    """Check that `size` ranks fit this model and machine, start ranks 1..size-1, and load rank 0's shard here
    (the workers load theirs meanwhile). Returns the workers, rank 0's model and the full model's config."""
    check_tensor_parallel(ModelConfig.from_gguf_metadata(file.metadata, source=str(file.path)), size)
    if device.type == "cuda" and (device.index or 0) + size > torch.cuda.device_count():
        raise ParallelConfigError(f"tensor_parallel_size={size} needs {size} GPUs from {device}, but "
                                  f"{torch.cuda.device_count()} are visible; lower tensor_parallel_size")
    workers = TensorParallelWorkers(file.path, size, device, dtype, block_size, numerics)
    try:
        model, config = load_shard(file, workers.group, dtype=dtype, numerics=numerics)
    except BaseException:
        workers.close()
        raise
    return workers, model, config
