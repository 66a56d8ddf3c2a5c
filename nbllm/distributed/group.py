"""A tensor-parallel process group: the collectives the sharded model and the step broadcast need.

Built on `torch.distributed` backends created directly over a `TCPStore` rather than the global default group, so a
notebook can hold several parallel `LLM`s (and close and reopen them) without process-global state. Activations go
through the device's backend (NCCL on CUDA, gloo on the CPU); step messages (pickled numpy arrays) always go through
gloo, from host memory. Timeouts are long on purpose: a worker waits for the next step for as long as the user
leaves the notebook idle. A rank that dies closes its sockets, so gloo collectives fail at once; rank 0 turns that
failure into a `WorkerError` naming the cause (`on_failure`).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

_TIMEOUT = timedelta(days=365)
#: How long ranks wait for each other to join.
JOIN_TIMEOUT = timedelta(minutes=5)


def create_store(size: int) -> dist.TCPStore:
    """The rendezvous store on rank 0, on a free local port (`store.port` tells the workers where)."""
    return dist.TCPStore("127.0.0.1", 0, size, is_master=True, timeout=JOIN_TIMEOUT, wait_for_workers=False)


def connect_store(port: int, size: int) -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", port, size, is_master=False, timeout=JOIN_TIMEOUT)


class TensorParallelGroup:
    """Rank `rank` of `size` processes serving one model; `device` is this rank's device."""

    def __init__(self, store: dist.Store, rank: int, size: int, device: torch.device, *,
                 on_failure: Callable[[Exception], Exception] | None = None) -> None:
        self.rank, self.size, self.device = rank, size, torch.device(device)
        self.on_failure = on_failure
        self.failure: Exception | None = None
        self._cpu = dist.ProcessGroupGloo(dist.PrefixStore("cpu", store), rank, size, _TIMEOUT)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            self._dev = dist.ProcessGroupNCCL(dist.PrefixStore("dev", store), rank, size)
        else:
            self._dev = self._cpu

    # ------------------------------------------------------------------ activations

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's `x` (in place; returns `x`)."""
        self._wait(self._dev.allreduce([x]))
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's `x` side by side along the last dimension (equal shapes on every rank)."""
        parts = [torch.empty_like(x) for _ in range(self.size)]
        self._wait(self._dev.allgather([parts], [x.contiguous()]))
        return torch.cat(parts, dim=-1)

    # ------------------------------------------------------------------ host messages

    def broadcast_object(self, obj: Any = None) -> Any:
        """Rank 0's `obj` on every rank (other ranks pass nothing): a length, then the pickled bytes."""
        if self.rank == 0:
            data = torch.frombuffer(bytearray(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)), dtype=torch.uint8)
            length = torch.tensor([data.numel()], dtype=torch.int64)
        else:
            length = torch.zeros(1, dtype=torch.int64)
        self._broadcast(length)
        if self.rank != 0:
            data = torch.empty(int(length), dtype=torch.uint8)
        self._broadcast(data)
        return obj if self.rank == 0 else pickle.loads(data.numpy().tobytes())

    def min_int(self, value: int) -> int:
        """The smallest `value` over the ranks (e.g. how many KV blocks every rank can hold)."""
        t = torch.tensor([value], dtype=torch.int64)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MIN
        self._wait(self._cpu.allreduce([t], opts))
        return int(t)

    def _broadcast(self, t: torch.Tensor) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self._wait(self._cpu.broadcast([t], opts))

    def _wait(self, work: Any) -> None:
        if self.failure is not None:
            raise self.failure
        try:
            work.wait()
        except RuntimeError as exc:
            if self.on_failure is None:
                raise
            self.failure = self.on_failure(exc)
            raise self.failure from None

