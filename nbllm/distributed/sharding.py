"""Each tensor-parallel rank reads only its slice of every weight: sharding happens at load time, in the
`WeightSource` the model is built from, so the architecture code builds a smaller model without knowing it.

Megatron's split, as vLLM's `ColumnParallelLinear` / `RowParallelLinear` / `VocabParallelEmbedding` do it:
- column-parallel (q, k, v, gate, up): rank r keeps output rows `[r * out / n, (r + 1) * out / n)` — whole heads
  for q/k/v, so attention runs on local heads with no communication;
- row-parallel (attention output, down): rank r keeps the matching input columns; the partial products are summed
  across ranks (`layers.RowParallelLinear`); a bias is added once, by rank 0;
- vocab-parallel (token table, output head): rank r keeps `ceil(vocab / n)` rows, the last rank's padded with
  zeros; everything else (norms, rope tables) is replicated.
The model is then built from `shard_config` (heads, kv heads, intermediate size and vocab divided by n).
"""

from __future__ import annotations

import re
from dataclasses import replace

import torch
from gguf import GGMLQuantizationType

from nbllm.distributed.errors import ParallelConfigError
from nbllm.gguf.repack import Int8Weight
from nbllm.models.config import ModelConfig
from nbllm.models.weights import WeightSource

_COLUMN = {"attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up"}
_ROW = {"attn_output", "ffn_down"}
_VOCAB = {"token_embd", "output"}
_NAME = re.compile(r"(?:blk\.\d+\.)?(\w+)\.(weight|bias)")


def check_tensor_parallel(config: ModelConfig, size: int) -> None:
    """Raise `ParallelConfigError` unless `size` ranks can split this model's heads and MLP evenly."""
    if size < 1:
        raise ParallelConfigError(f"tensor_parallel_size must be at least 1, got {size}")
    for what, count in (("attention heads", config.num_heads), ("kv heads", config.num_kv_heads),
                        ("MLP intermediate size", config.intermediate_size)):
        if count % size:
            raise ParallelConfigError(
                f"tensor_parallel_size={size} does not divide the model's {count} {what}; use a divisor of {count}")


def vocab_shard_size(vocab_size: int, size: int) -> int:
    return -(-vocab_size // size)


def shard_config(config: ModelConfig, size: int) -> ModelConfig:
    """The config of one rank's shard (what its layers and its KV pool are built from)."""
    check_tensor_parallel(config, size)
    return replace(config, num_heads=config.num_heads // size, num_kv_heads=config.num_kv_heads // size,
                   intermediate_size=config.intermediate_size // size,
                   vocab_size=vocab_shard_size(config.vocab_size, size))


class ShardedWeights(WeightSource):
    """Rank `rank` of `size`'s view of `inner`: every tensor already sliced for this rank (fixups applied first,
    since they work on whole tensors: llama.cpp's q/k row permutation is per head of the full matrix)."""

    def __init__(self, inner: WeightSource, rank: int, size: int) -> None:
        super().__init__(inner.path, dtype=inner.dtype, device=inner.device, fixups=None,
                         llamacpp_numerics=inner.llamacpp_numerics, int8=inner.int8)
        self.inner, self.rank, self.size = inner, rank, size

    def names(self) -> frozenset[str]:
        return self.inner.names()

    def ggml_type(self, name: str) -> GGMLQuantizationType:
        return self.inner.ggml_type(name)

    def shape(self, name: str) -> tuple[int, ...]:
        shape = list(self.inner.shape(name))
        kind, part = _split(name)
        if kind in _COLUMN:
            shape[0] //= self.size
        elif kind in _ROW and part == "weight":
            shape[1] //= self.size
        elif kind in _VOCAB:
            shape[0] = vocab_shard_size(shape[0], self.size)
        return tuple(shape)

    def _read(self, name: str) -> torch.Tensor:
        t = self.inner._read(name)
        if self.inner.fixups is not None:
            t = self.inner.fixups(name, t)
        kind, part = _split(name)
        if kind in _ROW and part == "bias":
            return t if self.rank == 0 else torch.zeros_like(t)  # summed over the ranks: added once
        return self._slice(name, t)

    def _int8_weight(self, name: str) -> Int8Weight | None:
        packed = self.inner._int8_weight(name)
        if packed is None:
            return None
        if self.inner.fixups is not None:
            packed = packed.map(lambda t: self.inner.fixups(name, t))
        kind, _ = _split(name)
        if kind in _ROW:
            group = packed.q.shape[1] // packed.scale.shape[1]
            if (packed.q.shape[1] // self.size) % group:
                return None  # the split falls inside a quant group: this weight loads dense
        return packed.map(lambda t: self._slice(name, t))  # codes and group tables split at the same columns

    def _slice(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """This rank's part of `t` (a weight, a bias, or an int8 weight's codes or group table)."""
        kind, _ = _split(name)
        r, n = self.rank, self.size
        if kind in _COLUMN:
            rows = t.shape[0] // n
            return t[r * rows : (r + 1) * rows].contiguous()
        if kind in _ROW:
            cols = t.shape[1] // n
            return t[:, r * cols : (r + 1) * cols].contiguous()
        if kind in _VOCAB:
            rows = vocab_shard_size(t.shape[0], n)
            part = t[r * rows : (r + 1) * rows]
            if part.shape[0] < rows:  # the last rank's padding: rows no token id maps to
                part = torch.cat([part, part.new_zeros((rows - part.shape[0], *part.shape[1:]))])
            return part.contiguous()
        return t

    def finish(self) -> None:
        self.inner.finish()


def _split(name: str) -> tuple[str, str]:
    """(`attn_q`, `weight`) for `blk.3.attn_q.weight`; (`name`, ``) for names of no known form."""
    m = _NAME.fullmatch(name)
    return (m.group(1), m.group(2)) if m else (name, "")
