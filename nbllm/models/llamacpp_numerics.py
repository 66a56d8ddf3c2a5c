"""llama.cpp-compatible numerics: a forward that rounds where llama.cpp's CPU backend rounds.

Why: the exact fp32 forward (the default; it equals transformers) and llama.cpp differ by ~0.1-0.5 in the logits,
mostly because llama.cpp rounds activations to 8 bits before its matmuls. This mode reproduces the rounding of
llama.cpp's ggml-cpu backend as built by llama-cpp-python on x86 with AVX2 (`-march=native`): fed the same
inputs, every op matches llama.cpp's output to ~1e-7 (the norms, the GELU and the embedding bit for bit), and a
short prompt's logits match to ~1e-5. Weights are the same dequantized tensors (the dequant cache is untouched);
only activations are rounded. What ggml does, and this module copies:

- Matmuls against a quantized weight first convert the activation row to the weight type's `vec_dot_type`
  (`ggml_compute_forward_mul_mat`; `type_traits_cpu` in `ggml-cpu.c`): Q8_0 blocks of 32 for Q4_0/Q5_0/Q8_0 (Q8_1
  for Q4_1/Q5_1: same rounding), Q8_K blocks of 256 for the K-quants, f16/bf16 for f16/bf16 weights, nothing for
  f32. The integer dot products are exact, so the result is the fp32 matmul of the *rounded* activations
  (`round_q8_0`, `round_q8_K`). The repacked (`REPACK`) and llamafile kernels quantize the same way.
- RMSNorm sums `x*x` (fp32 products) in double, then `scale = 1.0f / sqrtf(mean + eps)`, `y = x * scale`, and
  multiplies the weight in a separate op (`ggml_compute_forward_rms_norm_f32`): `rms_norm`.
- GELU (GeGLU) looks `gelu(x)` up in an f16 table indexed by `f16(x)` (`GGML_GELU_FP16`, `ggml_vec_geglu_f32`):
  `gelu_tanh_f16`.
- Rope angles are `pos * theta_scale**i` by repeated fp32 multiplication with `theta_scale =
  powf(base, -2/n_dims)`, then `cosf`/`sinf`, and the rotation compiles to fused multiply-adds
  (`ggml_rope_cache_init`, `rotate_pairs`): `LlamaCppRotary`.
- The KV cache is f16 (llama-cpp-python's default `type_k`/`type_v`; flash attention off), so K, V, the
  pre-scaled q (`K·q` runs on f16 inputs) and the softmax probabilities (`V·p` likewise) are rounded to f16,
  with fp32 accumulation: the attention backend does this when built with `kv_dtype=torch.float16`
  (`DenseKVCache(kv_dtype=torch.float16)`).

Where IEEE results matter to the last bit (q8 scales, the norm's scale), the divisions and square roots are taken
in float64 and rounded once to float32: that equals C's correctly rounded float ops, whereas torch's float32
`scalar / tensor` multiplies by a reciprocal and its float32 `sqrt` may be off by an ulp, and an ulp moves
values across a q8 rounding boundary often enough to matter (activations at exact .5 ties are common).

Not reproduced: the fp32 summation order inside llama.cpp's dot products (its lanes, blocks and repacked
kernels; ~1e-7 relative) and its softmax `expf` approximation; the SiLU of SwiGLU models (its own `expf`);
scaled rope (linear/llama3 `rope_freqs`: those layers keep our rotary); Q8_1's f16 block sum.

What that leaves: an 8-bit-rounding forward is chaotic. A one-ulp difference sometimes moves a value across a
rounding step, the step perturbs the next layer far more than an ulp, and so on: relative noise of 1e-7 on the
input changes this mode's logits by ~0.2 on average (the exact forward's: by ~5e-6). llama.cpp differs from
itself by as much between a batched and a token-by-token prompt. Longer prompts therefore land ~0.1-0.3 from
llama.cpp's logits, like the exact forward, and greedy picks at llama.cpp's near-ties are not reproduced; that
takes bit-exact copies of its kernels (for Q8_0/Q5_0 weights, emulating the AVX2 lane order does give
bit-equal outputs).

Use it through `load_model(path, numerics="llamacpp")` with an f16 `DenseKVCache`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import numpy as np
import torch
from gguf import GGMLQuantizationType
from torch import nn

from nbllm.models.layers import Attention, GatedMLP, RMSNorm, RotaryEmbedding

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


def _div(a: torch.Tensor | float, b: torch.Tensor) -> torch.Tensor:
    """`a / b` rounded once to float32, as C's float division is (torch's `scalar / tensor` is not)."""
    return torch.div(torch.as_tensor(a, dtype=torch.float64), b.double()).float()


def round_f16(x: torch.Tensor) -> torch.Tensor:
    """`x` through f16 and back (round to nearest even, like F16C's `vcvtps2ph`)."""
    return x.to(torch.float16).to(x.dtype)


def round_bf16(x: torch.Tensor) -> torch.Tensor:
    """`x` through bf16 and back (round to nearest even, like `GGML_FP32_TO_BF16`)."""
    return x.to(torch.bfloat16).to(x.dtype)


def round_q8_0(x: torch.Tensor) -> torch.Tensor:
    """`x` quantized to Q8_0 along the last dim (blocks of 32) and dequantized: ggml's x86 `quantize_row_q8_0`.

    Per block `amax = max|x|`, `d = amax / 127` (stored as f16), `q = round_half_even(x * (127 / amax))`; the value
    is `f16(d) * q`. The AVX2 kernel multiplies by `127 / amax`, not by `1 / d` as the scalar reference
    (`quantize_row_q8_0_ref`, gguf-py) does, and rounds half to even, not half away from zero: the two differ
    on ties and one-ulp cases.
    """
    blocks = x.float().reshape(*x.shape[:-1], -1, QK8_0)
    amax = blocks.abs().amax(-1, keepdim=True)
    d = round_f16(_div(amax.double(), torch.full_like(amax, 127.0)))
    inv = torch.where(amax == 0, 0.0, _div(127.0, amax))
    return (torch.round(blocks * inv) * d).reshape(x.shape).to(x.dtype)


def round_q8_K(x: torch.Tensor) -> torch.Tensor:
    """`x` quantized to Q8_K along the last dim (blocks of 256) and dequantized: `quantize_row_q8_K_ref`.

    x86 uses the reference for rows (and the same rounding in the repacked 4-row kernel): `max` is the signed value
    of largest magnitude, `iscale = -127 / max`, `q = min(127, nearest_int(iscale * x))` (half to even), and the
    block scale `d = 1 / iscale` stays float32.
    """
    blocks = x.float().reshape(*x.shape[:-1], -1, QK_K)
    signed_max = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))
    zero = signed_max == 0
    iscale = torch.where(zero, 0.0, _div(-127.0, torch.where(zero, 1.0, signed_max)))
    d = torch.where(zero, 0.0, _div(1.0, torch.where(zero, 1.0, iscale)))
    return (torch.round(blocks * iscale).clamp(max=127) * d).reshape(x.shape).to(x.dtype)


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
    return x * _div(1.0, root) * weight.float()


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


class LlamaCppRotary(RotaryEmbedding):
    """NeoX rope with ggml's angles and its fused multiply-adds.

    `theta_i = pos * theta_scale**i` is built by repeated fp32 multiplication from `theta_scale = powf(base,
    -2/head_dim)` (`ggml_rope_cache_init`); cos/sin are correctly rounded (glibc's cosf/sinf nearly always are).
    The rotation is `fma(x0, cos, -(x1*sin))`, `fma(x0, sin, x1*cos)`, what gcc emits for `rotate_pairs`.
    """

    def __init__(self, base: float, head_dim: int, max_positions: int) -> None:
        nn.Module.__init__(self)
        theta_scale = np.float32(np.float64(base) ** np.float64(np.float32(-2.0) / np.float32(head_dim)))
        theta = np.arange(max_positions, dtype=np.float32)
        cos = np.empty((max_positions, head_dim // 2), dtype=np.float32)
        sin = np.empty_like(cos)
        for i in range(head_dim // 2):
            cos[:, i], sin[:, i] = np.cos(theta.astype(np.float64)), np.sin(theta.astype(np.float64))
            theta = theta * theta_scale
        self.register_buffer("cos", torch.from_numpy(cos), persistent=False)
        self.register_buffer("sin", torch.from_numpy(sin), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cos = self.cos[positions][:, None, :].double()
        sin = self.sin[positions][:, None, :].double()
        x0, x1 = x.float().chunk(2, dim=-1)
        # x0 * cos is exact in double, so one rounding of the double sum is the fma's single rounding.
        out0 = x0.double() * cos - (x1 * sin.float()).double()
        out1 = x0.double() * sin + (x1 * cos.float()).double()
        return torch.cat((out0, out1), dim=-1).float().to(x.dtype)


def apply_llamacpp_numerics(model: nn.Module, embedding_type: GGMLQuantizationType, *, scaled_rope: bool) -> None:
    """Switch a loaded model (built with llama.cpp activation rounding on its linears) to llama.cpp's other ops.

    `embedding_type`: the GGUF type of `token_embd.weight`, which a tied lm head multiplies with; `scaled_rope`:
    the file scales rope (rope scaling or `rope_freqs`), which keeps our rotary on those layers.
    """
    config = model.config
    if config.tie_word_embeddings:
        model.lm_head.round_input = activation_rounding(embedding_type)
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
