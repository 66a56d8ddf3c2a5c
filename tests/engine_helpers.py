"""Helpers shared by the engine-level tests: a CPU engine on a tiny model, the no-leak check, an interrupt."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from nbllm import LLM


def make_llm(path, **kwargs) -> LLM:
    kwargs.setdefault("kv_cache_tokens", 4096)
    return LLM(path, device="cpu", **kwargs)


def assert_no_leak(llm: LLM) -> None:
    """Every request has ended: only the prefix cache may hold blocks, and clearing it frees them all."""
    engine = llm.engine
    assert not engine.scheduler.running and not engine.scheduler.waiting
    cached = engine.radix.cached_blocks() if engine.radix else 0
    assert engine.blocks.num_used_blocks == cached
    llm.reset_prefix_cache()
    assert engine.blocks.num_used_blocks == 0
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


@contextmanager
def interrupt_at_step(engine, step: int) -> Iterator[None]:
    """Raise KeyboardInterrupt from the model runner on its `step`-th call, as Ctrl-C mid-generation would."""
    original = engine.runner.execute
    calls = 0

    def interrupting(batch):
        nonlocal calls
        calls += 1
        if calls == step:
            raise KeyboardInterrupt
        return original(batch)

    engine.runner.execute = interrupting
    try:
        yield
    finally:
        engine.runner.execute = original
