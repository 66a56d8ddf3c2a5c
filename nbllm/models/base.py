"""The decoder-only skeleton every architecture shares: embed, N decoder layers, final norm, lm head.

An architecture file contributes its decoder layer (`layer_class`); the skeleton builds the rotary tables, the
standard attention and MLP blocks from GGUF-named tensors, and exposes the engine's interface:
`model(input_ids[T], positions[T], attn) -> hidden[T, H]` and `model.compute_logits(hidden[N, H])`. The final
norm belongs to the head: it runs only on the rows the caller wants logits of. (Not folded into the head's GEMV
on CUDA: the norm prologue takes 40-43 registers a thread where the plain GEMV takes 32, which would cut the
resident programs an SM from 16 to 12 in the step's biggest kernel; to be measured first.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from nbllm.kernels.placeholders import resolve_placeholders
from nbllm.models.attention import AttentionBackend
from nbllm.models.config import ModelConfig
from nbllm.models.layers import Attention, GatedMLP, RMSNorm, RotaryEmbedding, linear_fp32, rope_inv_freq
from nbllm.models.quantized_linear import Int8Linear
from nbllm.models.weights import WeightSource

if TYPE_CHECKING:
    from nbllm.models.native_cpu import NativeDecoder
    from nbllm.models.placement import LayerPlacement


def build_norm(config: ModelConfig, weights: WeightSource, name: str, dim: int | None = None) -> RMSNorm:
    return RMSNorm(weights.tensor(name, (dim or config.hidden_size,)), config.rms_norm_eps)


def build_attention(config: ModelConfig, weights: WeightSource, layer: int, rotary: RotaryEmbedding) -> Attention:
    c, p = config, f"blk.{layer}"
    qkv_bias = True if c.attention_bias else None
    q_dim, kv_dim = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    return Attention(
        layer=layer,
        q=weights.linear(f"{p}.attn_q", q_dim, c.hidden_size, bias=qkv_bias),
        k=weights.linear(f"{p}.attn_k", kv_dim, c.hidden_size, bias=qkv_bias),
        v=weights.linear(f"{p}.attn_v", kv_dim, c.hidden_size, bias=qkv_bias),
        o=weights.linear(f"{p}.attn_output", c.hidden_size, q_dim),
        q_norm=build_norm(c, weights, f"{p}.attn_q_norm.weight", c.head_dim) if c.qk_norm else None,
        k_norm=build_norm(c, weights, f"{p}.attn_k_norm.weight", c.head_dim) if c.qk_norm else None,
        rotary=rotary,
        num_heads=c.num_heads,
        num_kv_heads=c.num_kv_heads,
        head_dim=c.head_dim,
        scale=c.query_scale,
        sliding_window=c.window_of(layer),
    )


def build_mlp(config: ModelConfig, weights: WeightSource, layer: int) -> GatedMLP:
    c, p = config, f"blk.{layer}"
    return GatedMLP(
        gate=weights.linear(f"{p}.ffn_gate", c.intermediate_size, c.hidden_size, bias=False),
        up=weights.linear(f"{p}.ffn_up", c.intermediate_size, c.hidden_size, bias=False),
        down=weights.linear(f"{p}.ffn_down", c.hidden_size, c.intermediate_size, bias=False),
        activation=c.activation,
    )


class CausalLM(nn.Module):
    """A decoder-only language model over token-flattened batches; subclasses set `layer_class`."""

    layer_class: type[nn.Module]

    def __init__(self, config: ModelConfig, weights: WeightSource) -> None:
        super().__init__()
        c = self.config = config
        #: Set when the parts run on different devices (`nbllm.models.placement`); None: all on `device`.
        self.placement: LayerPlacement | None = None
        #: Whether a paged CPU step may run all layers in one C++ call where they qualify (bit-identical; False
        #: runs the modules, e.g. to compare or to step through them).
        self.use_native_cpu = True
        self._native_decoder: NativeDecoder | None | bool = False  # False: not looked for yet
        # The token table, built as a linear layer over it: a tied head *is* that layer, one copy of the biggest
        # tensor. Dense, it is kept as the tensor; int8 (CPU), as the `Int8Linear`, whose `rows` embed tokens.
        table = weights.linear("token_embd", c.vocab_size, c.hidden_size, bias=False)
        self.embed_tokens: torch.Tensor | Int8Linear
        if isinstance(table, Int8Linear):
            self.embed_tokens = table
        else:
            self.register_buffer("embed_tokens", table.weight)
        # Rounded to the compute dtype first, as HF does (sqrt(640) in bf16 is not sqrt(640)).
        self.embed_scale = float(torch.tensor(c.embedding_multiplier).to(weights.dtype))
        global_rotary = self._rotary(weights, c.rope_theta, c.rope_scaling, global_layers=True)
        local_rotary = None
        if c.rope_local_theta is not None and any(c.layer_is_sliding):
            local_rotary = self._rotary(weights, c.rope_local_theta, None, global_layers=False)
        self.layers = nn.ModuleList(
            self.layer_class(c, weights, i, local_rotary if c.layer_is_sliding[i] and local_rotary else global_rotary)
            for i in range(c.num_layers)
        )
        self.norm = build_norm(c, weights, "output_norm.weight")
        self.lm_head = table if c.tie_word_embeddings else weights.linear("output", c.vocab_size, c.hidden_size,
                                                                          bias=False)

    def _rotary(
        self, weights: WeightSource, theta: float, scaling: dict | None, *, global_layers: bool
    ) -> RotaryEmbedding:
        inv_freq = rope_inv_freq(self.config.head_dim, theta, scaling)
        if global_layers and weights.has("rope_freqs.weight"):
            # llama.cpp stores Llama 3 rope scaling as per-frequency divisors (convert_hf_to_gguf's rope_freqs).
            inv_freq = inv_freq / weights.tensor("rope_freqs.weight", inv_freq.shape, dtype=torch.float32).cpu()
        return RotaryEmbedding(inv_freq, self.config.max_positions).to(weights.device)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.device

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend,
                placeholders: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states `[T, H]` after the last layer (before the final norm, which `compute_logits` applies)
        for the flat batch `input_ids[T]` at `positions[T]`; an id `-1 - r` stands for `placeholders[r]` (`embed`)."""
        h = self.embed(input_ids, placeholders)
        native_step = getattr(attn, "native_step", None)  # a paged CPU backend's: all layers in one C++ call
        if native_step is not None and self.use_native_cpu and (decoder := self._native()) is not None and (
                step := native_step()) is not None:
            return decoder(h.contiguous(), positions, step)
        crossings = self.placement.crossings if self.placement is not None else {}
        for i, layer in enumerate(self.layers):
            if i in crossings:  # the hidden state moves to the next part's device
                h, positions = h.to(crossings[i].device, crossings[i].dtype), positions.to(crossings[i].device)
            h = layer(h, positions, attn)
        if (head := crossings.get(len(self.layers))) is not None:
            h = h.to(head.device, head.dtype)
        return h

    def _native(self) -> NativeDecoder | None:
        """The one-call CPU program for these layers (`nbllm.models.native_cpu`), built on first use: after the
        model runner has joined the q/k/v and gate/up projections."""
        if self._native_decoder is False:
            from nbllm.models.native_cpu import native_decoder

            self._native_decoder = native_decoder(self)
        return self._native_decoder

    def embed(self, input_ids: torch.Tensor, placeholders: torch.Tensor | None = None) -> torch.Tensor:
        """Token table rows `[T, H]` times `embed_scale`; an id `-1 - r` stands for `placeholders[r]`, a token
        the previous step sampled and the host has not seen yet (overlap scheduling; `input_ids` is left as it
        is). On CUDA one Triton launch (`nbllm.kernels.embedding`). Tensor parallelism overrides this with a
        vocab-parallel lookup."""
        table = self.embed_tokens
        if isinstance(table, torch.Tensor) and table.is_cuda:
            from nbllm.kernels.embedding import embedding, supports

            if supports(input_ids, table):
                return embedding(input_ids, table, self.embed_scale, placeholders)
        if placeholders is not None:
            input_ids = resolve_placeholders(input_ids.clone(), placeholders)
        rows = table.rows(input_ids) if isinstance(table, Int8Linear) else F.embedding(input_ids, table)
        return rows * self.embed_scale if self.embed_scale != 1.0 else rows

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits `[N, vocab]` of the final norm of the rows of `hidden` the caller wants (usually each
        sequence's last)."""
        logits = linear_fp32(self.lm_head, self.norm(hidden))
        cap = self.config.final_logit_softcapping
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits
