"""llama.cpp-compatible numerics: a forward that computes what llama.cpp's CPU backend computes, bit for bit.

Why: the exact fp32 forward (the default; it equals transformers) and llama.cpp differ by ~0.1-0.5 in the logits,
mostly because llama.cpp rounds activations to 8 bits before its matmuls, and an 8-bit-rounding forward is
chaotic: a one-ulp difference anywhere moves some value across a rounding step, and the steps cascade (1e-7 of
relative noise moves the logits by ~0.2). So reproducing llama.cpp's greedy picks at its near-ties takes every op
bit for bit. This mode does that for llama.cpp's ggml-cpu backend as llama-cpp-python builds it on x86 with AVX2
(no AVX-512; flash attention off, f16 KV cache: its defaults), checked op by op against the intermediate tensors
of that build on the default model (Gemma 3 270M Q4_K_M) and end to end on the recorded greedy continuations.
Weights are the same dequantized tensors; the ops:

- Matmuls against Q8_0, Q5_0, Q4_K, Q6_K weights: `nbllm.models.llamacpp_matmul` (the activation rounding to the
  weight's `vec_dot_type`, integer block dots, the kernel's float order). Other types keep the rounded-input
  approximation below (`activation_rounding`: the fp32 matmul of the rounded activation, ~1e-7 off).
- Attention: `nbllm.models.llamacpp_attention` (`LlamaCppKVCache`).
- RMSNorm sums `x*x` (fp32 products) in double, then `scale = 1.0f / sqrtf(mean + eps)`, `y = x * scale`, and
  multiplies the weight (`ggml_compute_forward_rms_norm_f32`): `rms_norm`.
- GELU (GeGLU) looks `gelu(x)` up in an f16 table indexed by `f16(x)` (`GGML_GELU_FP16`, `ggml_vec_geglu_f32`):
  `gelu_tanh_f16`.
- Rope angles are `pos * theta_scale**i` by repeated fp32 multiplication with `theta_scale =
  powf(base, -2/n_dims)`, then the C library's `cosf`/`sinf`, and the rotation compiles to fused multiply-adds
  (`ggml_rope_cache_init`, `rotate_pairs`): `LlamaCppRotary`.
- The graph keeps only the rows whose logits are wanted after the last layer's attention:
  `nbllm.models.llamacpp_forward.llamacpp_logits`, which runs a batch as llama.cpp does.

Where IEEE results matter to the last bit (q8 scales, the norm's scale), the divisions and square roots are taken
in float64 and rounded once to float32: that equals C's correctly rounded float ops, whereas torch's float32
`scalar / tensor` multiplies by a reciprocal and its float32 `sqrt` may be off by an ulp.

Not reproduced: other CPUs' kernels (AVX-512, ARM), flash attention, multi-sequence batches, the SiLU of SwiGLU
models (its own `expf`), scaled rope (linear/llama3 `rope_freqs`: those layers keep our rotary), Q8_1's f16 block
sum, and the other layer layouts' row selection (`llamacpp_logits` spells out Gemma 3's).

Use it through `load_model(path, numerics="llamacpp")` and `nbllm.models.llamacpp_forward.llamacpp_logits` (greedy:
the prompt as one batch, then a token at a time, as `tests/test_llamacpp_numerics.py` does).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable
from functools import cache
from typing import TYPE_CHECKING

import numpy as np
import torch
from gguf import GGMLQuantizationType
from torch import nn

from nbllm.models.layers import Attention, GatedMLP, Linear, RMSNorm, RotaryEmbedding
from nbllm.models.llamacpp_matmul import EXACT_TYPES, QuantLinear, div32, fma32, quantize_q8_0, quantize_q8_K, unpack

if TYPE_CHECKING:
    from nbllm.models.weights import WeightSource

__all__ = [
    "LlamaCppRMSNorm",
    "LlamaCppRotary",
    "activation_rounding",
    "apply_llamacpp_numerics",
    "gelu_tanh_f16",
    "rms_norm",
    "round_f16",
    "round_q8_0",
    "round_q8_K",
]

Rounding = Callable[[torch.Tensor], torch.Tensor]
Q = GGMLQuantizationType
QK8_0 = 32
QK_K = 256


def round_f16(x: torch.Tensor) -> torch.Tensor:
    """`x` through f16 and back (round to nearest even, like F16C's `vcvtps2ph`)."""
    return x.to(torch.float16).to(x.dtype)


def round_bf16(x: torch.Tensor) -> torch.Tensor:
    """`x` through bf16 and back (round to nearest even, like `GGML_FP32_TO_BF16`)."""
    return x.to(torch.bfloat16).to(x.dtype)


def round_q8_0(x: torch.Tensor) -> torch.Tensor:
    """`x` quantized to Q8_0 along the last dim as ggml's x86 `quantize_row_q8_0` does, and dequantized
    (`llamacpp_matmul.quantize_q8_0`)."""
    q, d = quantize_q8_0(x)
    return (q.reshape(*d.shape, QK8_0) * d[..., None]).reshape(x.shape).to(x.dtype)


def round_q8_K(x: torch.Tensor) -> torch.Tensor:
    """`x` quantized to Q8_K along the last dim as `quantize_row_q8_K_ref` does, and dequantized
    (`llamacpp_matmul.quantize_q8_K`)."""
    q, d = quantize_q8_K(x)
    return (q.reshape(*d.shape, QK_K) * d[..., None]).reshape(x.shape).to(x.dtype)


# The activation rounding of a matmul against a weight of each type (its `vec_dot_type` in ggml-cpu.c).
_VEC_DOT_ROUNDING: dict[GGMLQuantizationType, Rounding | None] = {
    Q.F32: None,
    Q.F16: round_f16,
    Q.BF16: round_bf16,
    **dict.fromkeys((Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0), round_q8_0),
    **dict.fromkeys((Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K), round_q8_K),
}


def activation_rounding(weight_type: GGMLQuantizationType) -> Rounding | None:
    """How llama.cpp rounds the input of a matmul with a `weight_type` weight (None: not at all)."""
    return _VEC_DOT_ROUNDING[weight_type]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`ggml_rms_norm` then `ggml_mul` by `weight`, bit for bit: double sum of fp32 squares, float scale."""
    x = x.float()
    mean = ((x * x).double().sum(-1, keepdim=True) / x.shape[-1]).float()
    root = torch.sqrt((mean + torch.tensor(eps, dtype=torch.float32)).double()).float()
    return x * div32(1.0, root) * weight.float()


class LlamaCppRMSNorm(RMSNorm):
    """RMSNorm computed as llama.cpp computes it (`rms_norm`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps).to(x.dtype)


@cache
def _gelu_f16_table() -> torch.Tensor:
    """ggml's `ggml_table_gelu_f16`: for every f16 bit pattern, `f16(gelu_tanh(x))` in fp32 arithmetic.

    `0.5f*x*(1.0f + tanhf(SQRT_2_OVER_PI*x*(1.0f + GELU_COEF_A*x*x)))`, where gcc contracts
    `1.0f + GELU_COEF_A*x*x` into one fma; tanh is taken in double and rounded once (glibc's tanhf is within an
    ulp, and the result is rounded to f16 anyway).
    """
    x = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        inner = ((np.float32(0.044715) * x).astype(np.float64) * x + 1.0).astype(np.float32)
        arg = (np.float32(0.7978845608028654) * x) * inner
        t = np.tanh(arg.astype(np.float64)).astype(np.float32)
        y = (np.float32(0.5) * x) * (np.float32(1.0) + t)
    return torch.from_numpy(y.astype(np.float16).astype(np.float32))


def gelu_tanh_f16(x: torch.Tensor) -> torch.Tensor:
    """ggml's GELU on fp32 (`ggml_vec_gelu_f32` with `GGML_GELU_FP16`): 0 below -10, x above 10, else the f16 table."""
    table = _gelu_f16_table().to(x.device)
    index = x.float().to(torch.float16).view(torch.int16).long() & 0xFFFF
    y = table[index]
    return torch.where(x <= -10.0, 0.0, torch.where(x >= 10.0, x.float(), y)).to(x.dtype)


@cache
def _libm() -> ctypes.CDLL | None:
    """glibc's libm, whose `cosf`/`sinf`/`powf` llama.cpp calls (not always correctly rounded), or None; looked up
    on first use (`find_library` runs a subprocess: not at import)."""
    name = ctypes.util.find_library("m")
    if name is None:
        return None
    lib = ctypes.CDLL(name)
    for fn, args in (("cosf", 1), ("sinf", 1), ("powf", 2)):
        getattr(lib, fn).restype = ctypes.c_float
        getattr(lib, fn).argtypes = [ctypes.c_float] * args
    return lib


class LlamaCppRotary(RotaryEmbedding):
    """NeoX rope with ggml's angles, its `cosf`/`sinf` and its fused multiply-adds.

    `theta_i = pos * theta_scale**i` is built by repeated fp32 multiplication from `theta_scale = powf(base,
    -2/head_dim)` (`ggml_rope_cache_init`), then passed to the C library's `cosf`/`sinf` (glibc's are not
    always correctly rounded, so they are called, not imitated; elsewhere: correctly rounded values). The table
    grows with the positions seen (a call per angle is slow). The rotation is `fma(x0, cos, -(x1*sin))`,
    `fma(x0, sin, x1*cos)`, what gcc emits for `rotate_pairs`.
    """

    def __init__(self, base: float, head_dim: int, max_positions: int) -> None:
        nn.Module.__init__(self)
        exponent = float(np.float32(-2.0) / np.float32(head_dim))
        libm = _libm()
        scale = libm.powf(base, exponent) if libm is not None else np.float64(base) ** exponent
        self.theta_scale = np.float32(scale)
        self.half, self.max_positions = head_dim // 2, max_positions
        # float64 tables (of float32 values): fused float32 rotary kernels, which would not rotate as ggml does,
        # decline them, so `Attention` calls this module
        self.register_buffer("cos", torch.empty(0, self.half, dtype=torch.float64), persistent=False)
        self.register_buffer("sin", torch.empty(0, self.half, dtype=torch.float64), persistent=False)

    def _extend(self, n: int) -> None:
        theta = np.arange(self.cos.shape[0], n, dtype=np.float32)
        cos = np.empty((len(theta), self.half), dtype=np.float32)
        sin = np.empty_like(cos)
        libm = _libm()
        for i in range(self.half):
            if libm is not None:
                cos[:, i] = [libm.cosf(t) for t in theta.tolist()]
                sin[:, i] = [libm.sinf(t) for t in theta.tolist()]
            else:
                cos[:, i], sin[:, i] = np.cos(theta.astype(np.float64)), np.sin(theta.astype(np.float64))
            theta = theta * self.theta_scale
        self.cos = torch.cat((self.cos, torch.from_numpy(cos).to(self.cos)))
        self.sin = torch.cat((self.sin, torch.from_numpy(sin).to(self.sin)))

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if len(positions) and int(positions.max()) >= self.cos.shape[0]:
            self._extend(int(positions.max()) + 1)
        cos = self.cos[positions][:, None, :].float()
        sin = self.sin[positions][:, None, :].float()
        x0, x1 = x.float().chunk(2, dim=-1)
        out0 = fma32(x0, cos.expand_as(x0), -(x1 * sin))
        out1 = fma32(x0, sin.expand_as(x0), x1 * cos)
        return torch.cat((out0, out1), dim=-1).to(x.dtype)


def apply_llamacpp_numerics(model: nn.Module, weights: WeightSource, *, scaled_rope: bool) -> None:
    """Switch a loaded model (built with llama.cpp activation rounding on its linears) to llama.cpp's other ops.

    Linears over GGUF weights of the types `llamacpp_matmul` copies become `QuantLinear`s (llama.cpp's matmul bit
    for bit); the others keep their rounded input. `scaled_rope`: the file scales rope (rope scaling or
    `rope_freqs`), which keeps our rotary on those layers.
    """
    config = model.config
    if config.tie_word_embeddings:
        model.lm_head.round_input = activation_rounding(weights.ggml_type("token_embd.weight"))
    _exact_linears(model, weights)
    rotaries: dict[float, LlamaCppRotary] = {}
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is RMSNorm:
                setattr(parent, name, LlamaCppRMSNorm(child.weight, child.eps))
        if isinstance(parent, GatedMLP) and parent.activation == "gelu_tanh":
            parent.act = gelu_tanh_f16
        if isinstance(parent, Attention):
            local = config.layer_is_sliding[parent.layer] and config.rope_local_theta is not None
            if not local and scaled_rope:
                continue
            base = config.rope_local_theta if local else config.rope_theta
            if base not in rotaries:
                rotaries[base] = LlamaCppRotary(base, config.head_dim, config.max_positions).to(model.device)
            parent.rotary = rotaries[base]


_LINEARS = {"attn.q_proj": "attn_q", "attn.k_proj": "attn_k", "attn.v_proj": "attn_v", "attn.o_proj": "attn_output",
            "mlp.gate": "ffn_gate", "mlp.up": "ffn_up", "mlp.down": "ffn_down"}


def _exact_linears(model: nn.Module, weights: WeightSource) -> None:
    """Replace each dense linear whose GGUF weight type `llamacpp_matmul` copies by a `QuantLinear` over the same
    (fixed-up) integers, sharing the dense weight tensor."""
    file = getattr(weights, "file", None)
    if file is None or model.device.type != "cpu":
        return
    targets = [(model, "lm_head", "token_embd" if model.config.tie_word_embeddings else "output")]
    for i, layer in enumerate(model.layers):
        for path, tensor in _LINEARS.items():
            parent, _, attr = path.rpartition(".")
            targets.append((layer.get_submodule(parent), attr, f"blk.{i}.{tensor}"))
    for parent, attr, tensor in targets:
        linear, name = getattr(parent, attr), f"{tensor}.weight"
        if type(linear) is not Linear or linear.bias is not None or not weights.has(name):
            continue
        qtype = weights.ggml_type(name)
        rows, cols = linear.weight.shape
        if qtype not in EXACT_TYPES or (qtype == Q.Q4_K and rows % 8):  # unrepacked Q4_K: another kernel
            continue
        parts = unpack(qtype, file.tensor_bytes(name), rows, cols)
        if weights.fixups is not None:
            parts = {k: weights.fixups(name, v) for k, v in parts.items()}
        setattr(parent, attr, QuantLinear(qtype, parts, linear.weight))
