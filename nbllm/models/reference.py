"""The plain, unpaged generate loop: the reference the engine's contract tests compare against."""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

from nbllm.errors import NbllmError
from nbllm.models.attention import DenseKVCache
from nbllm.models.base import CausalLM


@torch.inference_mode()
def greedy_generate(
    model: CausalLM,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    eos_ids: Collection[int] = (),
) -> list[int]:
    """Prefill `prompt_ids`, then decode argmax tokens one at a time; stops after an EOS id (which is returned)."""
    if not prompt_ids:
        raise NbllmError("greedy_generate needs a non-empty prompt")
    cache = DenseKVCache()
    device = model.device
    out: list[int] = []
    feed, start = list(prompt_ids), 0
    while len(out) < max_new_tokens:
        cache.prepare([0], [len(feed)])
        ids = torch.tensor(feed, dtype=torch.long, device=device)
        positions = torch.arange(start, start + len(feed), device=device)
        hidden = model(ids, positions, cache)
        token = int(model.compute_logits(hidden[-1:]).argmax(dim=-1).item())
        out.append(token)
        if token in eos_ids:
            break
        start += len(feed)
        feed = [token]
    return out
