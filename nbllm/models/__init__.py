"""Model forwards over token-flattened batches, built from GGUF or HF safetensors weights.

`nbllm.loader.load_model` turns a file into one of these; `AttentionBackend` is the seam a KV cache plugs into.
"""

from nbllm.models.attention import AttentionBackend, DenseKVCache, causal_attention
from nbllm.models.base import CausalLM
from nbllm.models.config import ModelConfig
from nbllm.models.reference import greedy_generate
from nbllm.models.registry import ARCHITECTURES, ArchSpec

__all__ = [
    "ARCHITECTURES",
    "ArchSpec",
    "AttentionBackend",
    "CausalLM",
    "DenseKVCache",
    "ModelConfig",
    "causal_attention",
    "greedy_generate",
]
