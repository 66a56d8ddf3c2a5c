"""Placeholder token ids: with overlap scheduling a step is launched before the host has seen the tokens the step
before it sampled, so its input names each such token by where it lies on the device: the id `-1 - r` stands for
row `r` of the previous step's sampled ids (`nbllm.engine.overlap`; token ids are >= 0). The token lookup resolves
them (`nbllm.kernels.embedding` on CUDA, in the same launch); this is the torch form, for every other device."""

from __future__ import annotations

import torch

__all__ = ["resolve_placeholders"]


def resolve_placeholders(ids: torch.Tensor, placeholders: torch.Tensor) -> torch.Tensor:
    """In place: each placeholder id `-1 - r` in `ids` becomes `placeholders[r]`."""
    rows = (-1 - ids).clamp_(0, placeholders.numel() - 1)
    return torch.where(ids < 0, placeholders[rows], ids, out=ids)
