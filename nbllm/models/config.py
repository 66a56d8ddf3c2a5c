"""One architecture-neutral description of a decoder-only model, read from GGUF metadata or an HF config.json.

Both formats spell the same facts differently (GGUF `gemma3.attention.head_count` vs HF `num_attention_heads`,
HF's old `rope_theta`/`rope_scaling` vs transformers 5's `rope_parameters`), and some facts live in neither
(llama.cpp hard-codes Gemma 3's local rope theta). `ModelConfig` is the one place the model code reads, so the
architecture files never look at a file format. What differs per architecture is delegated to the `ArchSpec`
hooks in `registry.py`; everything read here is checked, because sizes from a file decide allocations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from nbllm.errors import ModelLoadError

# Positions beyond this are not precomputed for rotary tables; the engine caps context length to
# `ModelConfig.max_positions`. A file may claim any context length: we never allocate from it unchecked.
MAX_ROPE_POSITIONS = 1 << 17
_MAX_DIM = 1 << 20  # no real model has a hidden, head or vocab dimension anywhere near this
_MAX_COUNT = 4096  # nor this many layers or heads
ROPE_TYPES = ("linear", "llama3")


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    # Attention softmax scale; head_dim**-0.5 unless the architecture says otherwise (Gemma's query_pre_attn_scalar).
    query_scale: float
    # Rope theta of the sliding-window layers when it differs from `rope_theta` (Gemma 3: 10k local, 1M global).
    # Layers that use it get plain rope: `rope_scaling` applies to the global layers only, as in HF and llama.cpp.
    rope_local_theta: float | None = None
    # None, {"rope_type": "linear", "factor": f} or {"rope_type": "llama3", factor, low_freq_factor,
    # high_freq_factor, original_max_position_embeddings} (HF's names).
    rope_scaling: dict[str, Any] | None = None
    sliding_window: int | None = None
    layer_is_sliding: tuple[bool, ...] = ()
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    embedding_multiplier: float = 1.0
    final_logit_softcapping: float | None = None
    activation: str = "silu"  # "silu" (SwiGLU) or "gelu_tanh" (GeGLU)

    @property
    def max_positions(self) -> int:
        """Positions the model can run at (rotary tables are built this long)."""
        return min(self.max_position_embeddings, MAX_ROPE_POSITIONS)

    def window_of(self, layer: int) -> int | None:
        """The sliding window of `layer`, or None for a global-attention layer."""
        return self.sliding_window if self.layer_is_sliding[layer] else None

    # ---------------------------------------------------------------- GGUF

    @classmethod
    def from_gguf_metadata(cls, metadata: dict[str, Any], *, source: str = "<gguf>") -> ModelConfig:
        """Read a config the way llama.cpp reads the same keys (`{arch}.attention.head_count`, ...)."""
        from nbllm.models.registry import spec_for_gguf

        arch = metadata.get("general.architecture")
        spec = spec_for_gguf(arch, source)
        r = ConfigReader(metadata, source, prefix=f"{arch}.")
        hidden = r.int("embedding_length")
        heads = r.int("attention.head_count", positive=True)
        head_dim = r.int("attention.key_length", hidden // heads)
        if r.int("attention.value_length", head_dim) != head_dim:
            raise ModelLoadError(f"{source}: value length differs from key length; this layout is not supported")
        if r.int("rope.dimension_count", head_dim) != head_dim:
            raise ModelLoadError(f"{source}: partial rotary embeddings are not supported")
        vocab = metadata.get(f"{arch}.vocab_size")
        if vocab is None:
            tokens = metadata.get("tokenizer.ggml.tokens")
            vocab = len(tokens) if tokens is not None else None
        window = r.int("attention.sliding_window", 0) or None
        num_layers = r.count("block_count")
        config = cls(
            arch=spec.name,
            vocab_size=_check_dim(vocab, "vocab size", source),
            hidden_size=hidden,
            intermediate_size=r.int("feed_forward_length"),
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=r.int("attention.head_count_kv", heads),
            head_dim=head_dim,
            rms_norm_eps=r.float("attention.layer_norm_rms_epsilon"),
            rope_theta=r.float("rope.freq_base", 10000.0),
            rope_scaling=_gguf_rope_scaling(r),
            max_position_embeddings=r.int("context_length"),
            query_scale=r.float("attention.scale", head_dim**-0.5),
            sliding_window=window,
            layer_is_sliding=(window is not None,) * num_layers,
            attention_bias=spec.attention_bias,
            qk_norm=spec.qk_norm,
        )
        config.validated(source)  # before the architecture hook computes anything from these sizes
        if spec.gguf_config is not None:
            config = replace(config, **spec.gguf_config(r, config))
        return config.validated(source)

    # ---------------------------------------------------------------- HF

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], *, source: str = "<config.json>") -> ModelConfig:
        """Read an HF `config.json` (transformers 4 or 5 layout; a multimodal config's `text_config` is used)."""
        from nbllm.models.registry import spec_for_hf

        spec = spec_for_hf(hf.get("architectures") or [], source)
        text = {**hf, **hf["text_config"]} if isinstance(hf.get("text_config"), dict) else hf
        r = ConfigReader(text, source, prefix="")
        hidden = r.int("hidden_size")
        heads = r.int("num_attention_heads", positive=True)
        head_dim = r.int("head_dim") if text.get("head_dim") is not None else hidden // heads
        num_layers = r.count("num_hidden_layers")
        rope = hf_rope_parameters(text, source)
        global_rope = rope.get("full_attention", rope)
        layer_types = text.get("layer_types")
        window = text.get("sliding_window") if text.get("use_sliding_window", True) else None
        if layer_types is not None:
            sliding = tuple(t == "sliding_attention" for t in layer_types)
        else:
            sliding = (window is not None,) * num_layers
        config = cls(
            arch=spec.name,
            vocab_size=r.int("vocab_size"),
            hidden_size=hidden,
            intermediate_size=r.int("intermediate_size"),
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=r.int("num_key_value_heads", heads),
            head_dim=head_dim,
            rms_norm_eps=r.float("rms_norm_eps", 1e-6),
            rope_theta=float(global_rope.get("rope_theta", 10000.0)),
            rope_scaling=_hf_rope_scaling(global_rope, text, source),
            max_position_embeddings=r.int("max_position_embeddings", 4096),
            query_scale=head_dim**-0.5,
            sliding_window=int(window) if window and any(sliding) else None,
            layer_is_sliding=sliding,
            tie_word_embeddings=bool(text.get("tie_word_embeddings", hf.get("tie_word_embeddings", False))),
            attention_bias=spec.attention_bias or bool(text.get("attention_bias", False)),
            qk_norm=spec.qk_norm,
        )
        config.validated(source)  # before the architecture hook computes anything from these sizes
        if spec.hf_config is not None:
            config = replace(config, **spec.hf_config(r, config))
        return config.validated(source)

    def validated(self, source: str) -> ModelConfig:
        """Reject sizes that would make no model or an absurd allocation, before anything is allocated."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ModelLoadError(f"{source}: {name} is {value!r}; it must be a positive integer")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "head_dim"):
            _check_dim(getattr(self, name), name, source)
        if self.num_layers > _MAX_COUNT or self.num_heads > _MAX_COUNT:
            raise ModelLoadError(f"{source}: {self.num_layers} layers / {self.num_heads} heads is implausible")
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"{source}: {self.num_heads} query heads are not a multiple of {self.num_kv_heads} kv heads")
        if self.head_dim % 2:
            raise ModelLoadError(f"{source}: head_dim {self.head_dim} is odd; rotary embeddings need an even one")
        if len(self.layer_is_sliding) != self.num_layers:
            raise ModelLoadError(f"{source}: {len(self.layer_is_sliding)} layer types for {self.num_layers} layers")
        if any(self.layer_is_sliding) and not (isinstance(self.sliding_window, int) and self.sliding_window > 0):
            raise ModelLoadError(
                f"{source}: sliding-window layers need a positive sliding_window, got {self.sliding_window!r}")
        if not (self.rms_norm_eps >= 0 and self.rope_theta > 0 and self.query_scale > 0):
            raise ModelLoadError(f"{source}: rms_norm_eps, rope theta and attention scale must be positive")
        return self


class ConfigReader:
    """Typed, checked access to one config mapping, with errors that name the file and the key."""

    def __init__(self, data: dict[str, Any], source: str, prefix: str) -> None:
        self.data, self.source, self.prefix = data, source, prefix

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(self.prefix + key, default)

    def int(self, key: str, default: int | None = None, *, positive: bool = False) -> int:
        value = self.get(key, default)
        if value is None:
            raise ModelLoadError(f"{self.source}: required key {self.prefix + key!r} is missing")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            raise ModelLoadError(f"{self.source}: {self.prefix + key!r} is {value!r}; a single integer is needed "
                                 "(per-layer values are not supported)")
        if positive and value <= 0:
            raise ModelLoadError(f"{self.source}: {self.prefix + key!r} is {value!r}; it must be positive")
        return int(value)

    def count(self, key: str) -> int:
        """A layer count: checked before anything per-layer is built from it."""
        value = self.int(key, positive=True)
        if value > _MAX_COUNT:
            raise ModelLoadError(f"{self.source}: {self.prefix + key!r} is {value}; not a plausible layer count")
        return value

    def float(self, key: str, default: float | None = None) -> float:
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ModelLoadError(f"{self.source}: {self.prefix + key!r} is {value!r}; a finite number is needed")
        return float(value)


def _check_dim(value: Any, what: str, source: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= _MAX_DIM * 4:
        raise ModelLoadError(f"{source}: {what} is {value!r}; expected a positive integer of plausible size")
    return value


def _gguf_rope_scaling(r: ConfigReader) -> dict[str, Any] | None:
    """llama.cpp's `rope.scaling.type`/`.factor` (or the older `rope.scale_linear`); llama3 comes as rope_freqs."""
    kind = r.get("rope.scaling.type", "linear" if r.get("rope.scale_linear") is not None else "none")
    if kind == "none":
        return None
    if kind != "linear":
        raise ModelLoadError(f"{r.source}: rope scaling {kind!r} is not supported (supported: linear, and "
                             "llama3 through rope_freqs)")
    factor = r.float("rope.scaling.factor", r.get("rope.scale_linear", 1.0))
    return None if factor == 1.0 else {"rope_type": "linear", "factor": factor}


def hf_rope_parameters(text: dict[str, Any], source: str) -> dict[str, Any]:
    """transformers 5 `rope_parameters`, or the same built from the older `rope_theta` + `rope_scaling` keys."""
    rope = text.get("rope_parameters")
    if rope is None:
        rope = {"rope_type": "default", "rope_theta": text.get("rope_theta", 10000.0),
                **(text.get("rope_scaling") or {})}
        if "rope_local_base_freq" in text:
            rope = {"full_attention": rope, "sliding_attention": {"rope_theta": text["rope_local_base_freq"]}}
    if not isinstance(rope, dict):
        raise ModelLoadError(f"{source}: rope_parameters is {rope!r}; expected an object")
    return rope


def _hf_rope_scaling(rope: dict[str, Any], text: dict[str, Any], source: str) -> dict[str, Any] | None:
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return None
    if kind not in ROPE_TYPES:
        raise ModelLoadError(
            f"{source}: rope type {kind!r} is not supported (supported: default, {', '.join(ROPE_TYPES)})")
    try:
        scaling = {"rope_type": kind, "factor": float(rope["factor"])}
        if kind == "llama3":
            scaling |= {
                "low_freq_factor": float(rope["low_freq_factor"]),
                "high_freq_factor": float(rope["high_freq_factor"]),
                "original_max_position_embeddings": int(
                    rope.get("original_max_position_embeddings", text.get("max_position_embeddings", 8192))
                ),
            }
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"{source}: {kind} rope parameters are incomplete or malformed: {exc!r}") from None
    return scaling
