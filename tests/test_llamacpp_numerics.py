"""llama.cpp-compatible numerics: each rounding against a transcription of the ggml C code it copies.

The transcriptions are plain numpy, written line by line from ggml (`quantize_row_q8_0` in
`ggml-cpu/arch/x86/quants.c`, `quantize_row_q8_K_ref` in `ggml-quants.c`, `ggml_compute_forward_rms_norm_f32` in
`ggml-cpu/ops.cpp`), with numpy's correctly rounded float32 arithmetic standing in for C's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from nbllm.loader import load_model
from nbllm.models import DenseKVCache, causal_attention
from nbllm.models.layers import Linear, RMSNorm, RotaryEmbedding, rope_inv_freq
from nbllm.models.llamacpp_numerics import (
    LlamaCppRMSNorm,
    LlamaCppRotary,
    activation_rounding,
    gelu_tanh_f16,
    rms_norm,
    round_f16,
    round_q8_0,
    round_q8_K,
)

Q = GGMLQuantizationType


def activations(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Activation-like rows: mostly small, a few large outliers (as in Gemma's residual stream), some zeros."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    x[rng.random((rows, cols)) < 0.01] *= 100
    x[0, :32] = 0  # an all-zero block
    return x


def q8_0_avx2(x: np.ndarray) -> np.ndarray:
    """x86 `quantize_row_q8_0` (AVX2) then `dequantize_row_q8_0`."""
    b = x.reshape(-1, 32)
    amax = np.abs(b).max(axis=1, keepdims=True)
    d = (amax / np.float32(127)).astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(amax != 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    return (np.rint(b * inv) * d).reshape(x.shape)


def q8_K_ref(x: np.ndarray) -> np.ndarray:
    """`quantize_row_q8_K_ref` then the block value `d * q`."""
    out = np.empty_like(x.reshape(-1, 256))
    for i, block in enumerate(x.reshape(-1, 256)):
        amax, vmax = np.float32(0), np.float32(0)
        for v in block:
            if abs(v) > amax:
                amax, vmax = abs(v), v
        if amax == 0:
            out[i] = 0
            continue
        iscale = np.float32(-127) / vmax
        q = np.minimum(127, np.rint(iscale * block))  # nearest_int: round half to even
        out[i] = q * (np.float32(1) / iscale)
    return out.reshape(x.shape)


def rms_norm_ggml(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    out = np.empty_like(x)
    for r, row in enumerate(x):
        total = 0.0  # ggml_float: double
        for v in row:
            total += float(v * v)
        mean = np.float32(total / row.shape[0])
        scale = np.float32(1) / np.sqrt(mean + np.float32(eps), dtype=np.float32)
        out[r] = (row * scale) * w
    return out


def test_round_q8_0_is_the_avx2_kernel():
    x = activations(16, 640)
    assert np.array_equal(round_q8_0(torch.from_numpy(x)).numpy(), q8_0_avx2(x))


def test_round_q8_0_against_gguf_reference():
    """gguf-py copies the scalar reference (`x * (1/d)`, round half away from zero); the AVX2 kernel llama.cpp
    runs on x86 multiplies by `127/amax` and rounds half to even. They agree except on such ties (rare in random
    data, but exact ties are common in real activations), and never by more than one step."""
    x = activations(64, 640)
    ours = round_q8_0(torch.from_numpy(x)).numpy()
    ref = gguf_dequantize(gguf_quantize(x, Q.Q8_0), Q.Q8_0)
    step = np.abs(x.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
    diff = np.abs(ours - ref).reshape(-1, 32)
    assert (diff <= step * 1.01).all()
    assert (diff > 0).mean() < 1e-3
    tie = np.zeros((1, 32), np.float32)
    tie[0, :2] = [127.0, 2.5]  # d = 1: 2.5 rounds to 2 (half to even) on AVX2, to 3 in the reference
    assert round_q8_0(torch.from_numpy(tie))[0, 1] == 2.0
    assert gguf_dequantize(gguf_quantize(tie, Q.Q8_0), Q.Q8_0)[0, 1] == 3.0


def test_round_q8_K_is_the_reference():
    x = activations(4, 1024, seed=1)
    x[1, 256:512] *= -1  # signed max negative in some blocks
    assert np.array_equal(round_q8_K(torch.from_numpy(x)).numpy(), q8_K_ref(x))


def test_rounding_keeps_shape_and_exact_values():
    x = torch.from_numpy(activations(3, 512)).reshape(3, 2, 256)
    for rounding in (round_q8_0, round_q8_K, round_f16):
        assert rounding(x).shape == x.shape
        assert torch.equal(rounding(rounding(x)), rounding(x))  # idempotent: rounded values are representable


def test_activation_rounding_per_weight_type():
    assert activation_rounding(Q.F32) is None
    assert activation_rounding(Q.F16) is round_f16
    for t in (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0):
        assert activation_rounding(t) is round_q8_0
    for t in (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K):
        assert activation_rounding(t) is round_q8_K


def test_rms_norm_is_ggml_bit_for_bit():
    x = activations(32, 640, seed=2) * 30
    w = np.random.default_rng(3).standard_normal(640).astype(np.float32)
    ours = rms_norm(torch.from_numpy(x), torch.from_numpy(w), 1e-6).numpy()
    assert np.array_equal(ours, rms_norm_ggml(x, w, 1e-6))
    module = LlamaCppRMSNorm(torch.from_numpy(w), 1e-6)
    assert torch.equal(module(torch.from_numpy(x)), torch.from_numpy(ours))


def test_gelu_f16_table():
    x = torch.linspace(-12, 12, 20001)
    y = gelu_tanh_f16(x)
    exact = torch.nn.functional.gelu(x.double(), approximate="tanh")
    inside = x.abs() < 10
    assert torch.equal(y[x <= -10], torch.zeros_like(y[x <= -10]))
    assert torch.equal(y[x >= 10], x[x >= 10])
    # f16 input and f16 output: within a couple of f16 steps of the exact function
    assert ((y.double() - exact).abs()[inside] <= 2e-3 * exact.abs()[inside] + 1e-4).all()
    assert torch.equal(round_f16(y[inside]), y[inside])


def test_llamacpp_rotary_close_to_ours_and_exact_at_zero():
    ours = RotaryEmbedding(rope_inv_freq(256, 10_000.0), 2048)
    ggml = LlamaCppRotary(10_000.0, 256, 2048)
    assert torch.equal(ggml.cos[0], torch.ones(128)) and torch.equal(ggml.sin[0], torch.zeros(128))
    assert (ggml.cos - ours.cos).abs().max() < 1e-3  # angles up to 2047 rad, fp32: both drift by ulps
    x = torch.randn(5, 2, 256)
    positions = torch.tensor([0, 1, 7, 100, 2000])
    assert (ggml(x, positions) - ours(x, positions)).abs().max() < 1e-2
    assert torch.equal(ggml(x, torch.zeros(5, dtype=torch.long)), x)


def test_f16_kv_cache_rounds_like_llama_cpp():
    """An f16 cache stores f16 k/v; q (pre-scaled) and the probabilities are rounded to f16, sums stay fp32."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(6, n, 16, generator=g) for n in (4, 2, 2))
    cache = DenseKVCache(kv_dtype=torch.float16)
    cache.prepare([0], [6])
    out = cache.forward(0, q, k, v, scale=0.25, sliding_window=None)
    assert out.dtype == torch.float32 and cache._kv[0][0][0].dtype == torch.float16
    qh = round_f16(q * 0.25).reshape(6, 2, 2, 16)
    scores = torch.einsum("tkgd,skd->kgts", qh, round_f16(k))
    scores = scores.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
    expected = torch.einsum("kgts,skd->tkgd", round_f16(torch.softmax(scores, -1)), round_f16(v)).reshape(6, 4, 16)
    assert (out - expected).abs().max() < 1e-6
    exact = causal_attention(q, k, v, past=0, scale=0.25, sliding_window=None)
    assert 0 < (out - exact).abs().max() < 1e-2


@pytest.mark.parametrize("fmt", ["f32", "q8_0", "q4_k"])
def test_load_model_llamacpp_numerics(tiny_model, fmt):
    path, _ = tiny_model("gemma3", fmt)
    exact, _ = load_model(path, int8=False)  # llama.cpp numerics keep dense weights: compare like with like
    model, _ = load_model(path, numerics="llamacpp")
    from nbllm.gguf import open_gguf

    tensors = open_gguf(path).tensors
    for name, module in exact.named_modules():
        if isinstance(module, Linear):
            assert module.round_input is None, name
    linears = 0
    for layer, block in enumerate(model.layers):
        for attr, tensor in (("attn.q_proj", "attn_q"), ("attn.o_proj", "attn_output"), ("mlp.down", "ffn_down")):
            module = block.get_submodule(attr)
            assert module.round_input is activation_rounding(tensors[f"blk.{layer}.{tensor}.weight"].qtype)
            linears += 1
    assert linears > 0
    assert model.lm_head.round_input is activation_rounding(tensors["token_embd.weight"].qtype)
    assert not any(type(m) is RMSNorm for m in model.modules())
    assert all(isinstance(layer.attn.rotary, LlamaCppRotary) for layer in model.layers)
    for a, b in zip(exact.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # the same weights: only activations are rounded

    ids = torch.tensor([2, 5, 9, 4, 7, 1, 3])
    logits = []
    for m, kv in ((exact, None), (model, torch.float16)):
        cache = DenseKVCache(kv_dtype=kv)
        cache.prepare([0], [len(ids)])
        with torch.inference_mode():
            logits.append(m.compute_logits(m(ids, torch.arange(len(ids)), cache)))
    diff = (logits[0] - logits[1]).abs().max().item()
    assert 0 < diff < 0.05 * logits[0].abs().max().item()


def test_load_model_rejects_unknown_numerics(tiny_model):
    from nbllm.errors import ModelLoadError

    path, _ = tiny_model("gemma3", "f32")
    with pytest.raises(ModelLoadError, match="numerics"):
        load_model(path, numerics="bitexact")
    with pytest.raises(ModelLoadError, match="float32"):
        load_model(path, numerics="llamacpp", dtype=torch.bfloat16)
