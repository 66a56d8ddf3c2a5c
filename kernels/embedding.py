"""The token lookup in Triton: each token's row of the embedding table, scaled, placeholder ids resolved on the way.

A decode step begins with its tokens. With overlap scheduling some of them are not on the host yet: an id
`-1 - r` stands for row `r` of the previous step's sampled ids, still on the device (`.placeholders`). In
torch, resolving those, looking the rows up and scaling them (Gemma's sqrt(hidden)) take six or seven small
kernels, and at batch 1 each costs more to launch than to run: a few microseconds of a step that takes a few
hundred, each an ordinary launch that lets nothing after it start early. Here it is one launch, one program a
token, which lets the first layer's projection start fetching its weights at once (`pdl`). The lookup itself is
an ordinary launch: the programmatic-dependent chain of a step begins with it, after everything before it in the
stream (host copies, the previous step) has finished.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .pdl import enabled as pdl_enabled
from .placeholders import resolve_placeholders

__all__ = ["embedding", "embedding_reference", "supports"]


def embedding_reference(ids: torch.Tensor, table: torch.Tensor, scale: float = 1.0,
                        placeholders: torch.Tensor | None = None) -> torch.Tensor:
    """`table[ids] * scale` (rounded to the table's type) after `resolve_placeholders`, leaving `ids` as it is."""
    if placeholders is not None:
        ids = resolve_placeholders(ids.clone(), placeholders)
    rows = F.embedding(ids, table)
    return rows * scale if scale != 1.0 else rows


def supports(ids: torch.Tensor, table: torch.Tensor) -> bool:
    """Whether `embedding` serves this lookup: 1-D ids on the table's device, a table with unit inner stride."""
    return ids.dim() == 1 and table.dim() == 2 and table.stride(1) == 1 and ids.device == table.device


@triton.jit
def _embedding_kernel(ids_ptr, table_ptr, placeholders_ptr, out_ptr, num_placeholders, stride_t, stride_o, scale,
                      H: tl.constexpr, BLOCK: tl.constexpr, PLACEHOLDERS: tl.constexpr, SCALE: tl.constexpr,
                      PDL: tl.constexpr):
    t = tl.program_id(0)
    if PDL:  # let the first layer's programs start and fetch their weights
        tl.extra.cuda.gdc_launch_dependents()
    token = tl.load(ids_ptr + t)
    if PLACEHOLDERS:
        row = tl.minimum(tl.maximum(-1 - token, 0), num_placeholders - 1)
        token = tl.where(token < 0, tl.load(placeholders_ptr + row), token)
    cols = tl.arange(0, BLOCK)
    ok = cols < H
    x = tl.load(table_ptr + token.to(tl.int64) * stride_t + cols, mask=ok, other=0.0)
    if SCALE:
        x = (x.to(tl.float32) * scale).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + t.to(tl.int64) * stride_o + cols, x, mask=ok)


def embedding(ids: torch.Tensor, table: torch.Tensor, scale: float = 1.0,
              placeholders: torch.Tensor | None = None) -> torch.Tensor:
    """`embedding_reference` for `ids: [T]` (int64 or int32, `supports`) over `table: [V, H]` -> `[T, H]` in the
    table's type. Ids must lie in `[0, V)` once resolved (the engine checks prompts against the vocabulary).
    Launches only: a CUDA graph can capture it."""
    if not supports(ids, table):
        raise ValueError(f"embedding needs 1-D ids on the table's device and a table with unit inner stride, got "
                         f"{tuple(ids.shape)} on {ids.device} and {tuple(table.shape)} on {table.device}")
    tokens, hidden = ids.shape[0], table.shape[1]
    out = torch.empty((tokens, hidden), dtype=table.dtype, device=table.device)
    if tokens:
        pdl = pdl_enabled(table.device)
        _embedding_kernel[(tokens,)](
            ids, table, placeholders if placeholders is not None else ids, out,
            placeholders.numel() if placeholders is not None else 1, table.stride(0), out.stride(0), scale,
            H=hidden, BLOCK=triton.next_power_of_2(hidden), PLACEHOLDERS=placeholders is not None,
            SCALE=scale != 1.0, PDL=pdl, num_warps=4)
    return out
