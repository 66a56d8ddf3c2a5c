"""Holding back Ctrl-C while the processes of a parallel engine are in lockstep.

An interrupt that lands between two collectives of a tensor-parallel step would leave the workers waiting in the
middle of that step while rank 0 starts the next one: the group would deadlock or mix up steps. One that lands in
the middle of reading a message from a replica would leave half a message in the pipe. So those sections finish
first, and the interrupt is raised right after them (the engine's usual interrupt handling then aborts the
requests). Workers and replicas ignore SIGINT altogether: a terminal's Ctrl-C reaches the whole process group, and
only the front-end decides what an interrupt stops.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Run the block whole; a SIGINT that arrives meanwhile is raised as KeyboardInterrupt when it ends.

    Only the main thread receives signals, so elsewhere (an `AsyncLLM` stepping thread) this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def ignore_interrupts() -> None:
    """For a worker or replica process: Ctrl-C is the front-end's to handle."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
