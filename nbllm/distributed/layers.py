"""The communicating parts of a tensor-parallel model, put around the layers a sharded `WeightSource` built.

Column-parallel layers need no wrapper: a shard of q/k/v or gate/up is an ordinary linear over local heads or
local intermediate features. What does communicate:
- `RowParallelLinear`: the attention output and MLP down projections see a slice of their input features, so each
  rank's product is a partial sum; one all-reduce per projection (two a layer) makes it whole on every rank;
- `VocabParallelHead`: each rank scores its slice of the vocabulary; the slices are gathered (and the padding
  dropped) so the sampler on rank 0 sees the full logits;
- the vocab-parallel token lookup (`tensor_parallel_class`): a rank looks up the ids in its slice, zeros the
  others, and the all-reduce assembles every row.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from nbllm.distributed.group import TensorParallelGroup
from nbllm.kernels.placeholders import resolve_placeholders
from nbllm.models.base import CausalLM
from nbllm.models.layers import Attention, GatedMLP


class RowParallelLinear(nn.Module):
    """A linear over this rank's input features whose output is summed over the ranks."""

    def __init__(self, local: nn.Module, group: TensorParallelGroup) -> None:
        super().__init__()
        self.local, self.group = local, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.all_reduce(self.local(x))


class VocabParallelHead(nn.Module):
    """Logits over this rank's vocabulary slice, gathered into `[N, vocab_size]` on every rank."""

    def __init__(self, local: nn.Module, group: TensorParallelGroup, vocab_size: int) -> None:
        super().__init__()
        self.local, self.group, self.vocab_size = local, group, vocab_size

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.group.all_gather(self.local(hidden))[..., : self.vocab_size]


class _VocabParallelLookup:
    """Mixed in before an architecture's `CausalLM`: the token lookup over a vocab-sharded table."""

    tp_group: TensorParallelGroup
    vocab_start: int

    def embed(self, input_ids: torch.Tensor, placeholders: torch.Tensor | None = None) -> torch.Tensor:
        if placeholders is not None:
            input_ids = resolve_placeholders(input_ids.clone(), placeholders)
        local = input_ids - self.vocab_start
        inside = (local >= 0) & (local < self.config.vocab_size)  # type: ignore[attr-defined]
        rows = super().embed(torch.where(inside, local, 0))  # type: ignore[misc]
        return self.tp_group.all_reduce(rows.masked_fill(~inside[:, None], 0))


@functools.cache
def tensor_parallel_class(model_class: type[CausalLM]) -> type[CausalLM]:
    """`model_class` with the vocab-parallel token lookup (one class per architecture)."""
    return type(f"TensorParallel{model_class.__name__}", (_VocabParallelLookup, model_class), {})


def parallelize(model: CausalLM, group: TensorParallelGroup, vocab_size: int) -> CausalLM:
    """Put the all-reduces and the logits gather around a shard built by `tensor_parallel_class` from sharded
    weights; `vocab_size` is the full model's."""
    model.tp_group = group
    model.vocab_start = group.rank * model.config.vocab_size
    for module in list(model.modules()):
        if isinstance(module, Attention):
            module.o_proj = RowParallelLinear(module.o_proj, group)
        elif isinstance(module, GatedMLP):
            module.down = RowParallelLinear(module.down, group)
    model.lm_head = VocabParallelHead(model.lm_head, group, vocab_size)
    return model
