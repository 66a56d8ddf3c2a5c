"""One tensor-parallel rank's model: its shard of the weights, read and built in its own process."""

from __future__ import annotations

from pathlib import Path

import torch

from nbllm.distributed.group import TensorParallelGroup
from nbllm.distributed.layers import parallelize, tensor_parallel_class
from nbllm.distributed.sharding import ShardedWeights, shard_config
from nbllm.gguf import GGUFFile
from nbllm.loader import Numerics, open_weights
from nbllm.models.base import CausalLM
from nbllm.models.config import ModelConfig


def load_shard(path: str | Path | GGUFFile, group: TensorParallelGroup, *, dtype: torch.dtype,
               numerics: Numerics = "fast") -> tuple[CausalLM, ModelConfig]:
    """This rank's model on `group.device` and the full model's config; the model's own `config` is the shard's
    (its heads, its vocabulary slice)."""
    weights, config, spec = open_weights(path, device=group.device, dtype=dtype, numerics=numerics)
    local = shard_config(config, group.size)
    model = tensor_parallel_class(spec.model_class)(local, ShardedWeights(weights, group.rank, group.size))
    weights.finish()
    return parallelize(model, group, config.vocab_size).eval(), config
