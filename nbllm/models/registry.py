"""Which architectures nbllm runs, how files name them, and what each format needs undone at load.

One `ArchSpec` per architecture we support. GGUF files are matched by `general.architecture`, HF directories
by `architectures[0]` in config.json. Anything else is a `ModelLoadError` that names the file and lists what
is supported.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nbllm.errors import ModelLoadError
from nbllm.models import gemma3
from nbllm.models.base import CausalLM
from nbllm.models.gemma3 import Gemma3ForCausalLM
from nbllm.models.llama import LlamaForCausalLM

if TYPE_CHECKING:
    from nbllm.models.config import ConfigReader, ModelConfig

ConfigHook = Callable[["ConfigReader", "ModelConfig"], dict[str, Any]]


@dataclass(frozen=True)
class ArchSpec:
    name: str  # our name, equal to the GGUF `general.architecture`
    hf_architectures: tuple[str, ...]
    model_class: type[CausalLM]
    attention_bias: bool = False  # q/k/v projections always carry biases (Qwen2)
    qk_norm: bool = False  # RMSNorm over each q/k head before rope (Qwen3)
    gguf_qk_permuted: bool = False  # llama.cpp's converter permuted attn_q/attn_k rows (LlamaModel.permute)
    hf_norm_shift: float = 0.0  # HF stores norm weights w for x * (shift + w)
    gguf_config: ConfigHook | None = None  # architecture facts beyond the common GGUF keys
    hf_config: ConfigHook | None = None  # architecture facts beyond the common HF keys


ARCHITECTURES: tuple[ArchSpec, ...] = (
    ArchSpec("llama", ("LlamaForCausalLM", "MistralForCausalLM"), LlamaForCausalLM, gguf_qk_permuted=True),
    ArchSpec("qwen2", ("Qwen2ForCausalLM",), LlamaForCausalLM, attention_bias=True),
    ArchSpec("qwen3", ("Qwen3ForCausalLM",), LlamaForCausalLM, qk_norm=True),
    ArchSpec("gemma3", ("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"), Gemma3ForCausalLM,
             hf_norm_shift=1.0, gguf_config=gemma3.gguf_config, hf_config=gemma3.hf_config),
)


def spec_for_gguf(arch: Any, source: str) -> ArchSpec:
    for spec in ARCHITECTURES:
        if spec.name == arch:
            return spec
    supported = ", ".join(s.name for s in ARCHITECTURES)
    raise ModelLoadError(f"{source}: architecture {arch!r} is not supported (supported: {supported})")


def spec_for_hf(architectures: Sequence[str], source: str) -> ArchSpec:
    name = architectures[0] if architectures else None
    for spec in ARCHITECTURES:
        if name in spec.hf_architectures:
            return spec
    supported = ", ".join(a for s in ARCHITECTURES for a in s.hf_architectures)
    raise ModelLoadError(f"{source}: architecture {name!r} is not supported (supported: {supported})")
