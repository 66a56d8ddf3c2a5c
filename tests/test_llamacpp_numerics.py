"""llama.cpp-compatible numerics: each rounding against a transcription of the ggml C code it copies, the exact
matmul and attention pieces against exact arithmetic, and the whole default model against llama.cpp's recorded
greedy continuations (`tests/data/llamacpp_greedy.json`).

The transcriptions are plain numpy, written line by line from ggml (`quantize_row_q8_0` in
`ggml-cpu/arch/x86/quants.c`, `quantize_row_q8_K_ref` in `ggml-quants.c`, `ggml_compute_forward_rms_norm_f32` in
`ggml-cpu/ops.cpp`), with numpy's correctly rounded float32 arithmetic standing in for C's. The kernels' float
orders were checked op by op against the intermediate tensors of llama-cpp-python 0.3.36 (AVX2 build) on the
default model; here the end-to-end test stands for them: 16 greedy tokens on each prompt, near-ties included,
and the top-2 logits of every step to the 4 recorded decimals.
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from nbllm.errors import NbllmError
from nbllm.loader import load_model
from nbllm.models import DenseKVCache, causal_attention
from nbllm.models.layers import Linear, RMSNorm, RotaryEmbedding, rope_inv_freq
from nbllm.models.llamacpp_attention import LlamaCppKVCache, dot_f16, expf_avx2, soft_max
from nbllm.models.llamacpp_forward import llamacpp_logits
from nbllm.models.llamacpp_matmul import EXACT_TYPES, QuantLinear, fma32, unpack
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
    x = torch.randn(5, 2, 256)
    positions = torch.tensor([0, 1, 7, 100, 2000])
    assert (ggml(x, positions) - ours(x, positions)).abs().max() < 1e-2
    assert ggml.cos.shape[0] == 2001  # the table grows with the positions seen
    assert torch.equal(ggml.cos[0], torch.ones(128, dtype=ggml.cos.dtype))
    assert (ggml.cos - ours.cos[:2001]).abs().max() < 1e-3  # angles up to 2000 rad, fp32: both drift by ulps
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
    exact, _ = load_model(path, numerics="exact", int8=False)  # llama.cpp numerics keep dense weights
    model, _ = load_model(path, numerics="llamacpp")
    from nbllm.gguf import open_gguf

    tensors = open_gguf(path).tensors
    for name, module in exact.named_modules():
        if isinstance(module, Linear):
            assert module.round_input is None, name
    linears = 0
    for layer, block in enumerate(model.layers):
        for attr, tensor in (("attn.q_proj", "attn_q"), ("attn.o_proj", "attn_output"), ("mlp.down", "ffn_down")):
            module, qtype = block.get_submodule(attr), tensors[f"blk.{layer}.{tensor}.weight"].qtype
            if qtype in EXACT_TYPES and (qtype != Q.Q4_K or module.out_features % 8 == 0):
                assert isinstance(module, QuantLinear) and module.qtype == qtype  # llama.cpp's own matmul
            else:
                assert module.round_input is activation_rounding(qtype)
            linears += 1
    assert linears > 0
    head_type = tensors["token_embd.weight"].qtype
    assert isinstance(model.lm_head, QuantLinear) or model.lm_head.round_input is activation_rounding(head_type)
    assert not any(type(m) is RMSNorm for m in model.modules())
    assert all(isinstance(layer.attn.rotary, LlamaCppRotary) for layer in model.layers)
    for a, b in zip(exact.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # the same weights: only activations are rounded

    ids = [2, 5, 9, 4, 7, 1, 3]
    cache = DenseKVCache()
    cache.prepare([0], [len(ids)])
    with torch.inference_mode():
        reference = exact.compute_logits(exact(torch.tensor(ids), torch.arange(len(ids)), cache))
    logits = llamacpp_logits(model, ids, 0, LlamaCppKVCache(), all_logits=True, margin=None)
    diff = (reference - logits).abs().max().item()
    assert 0 < diff < 0.05 * reference.abs().max().item()


def _exact_f32(a: float, b: float, c: float) -> np.float32:
    """`a*b + c` rounded once to float32 (half to even), from the exact rational value."""
    exact = Fraction(a) * Fraction(b) + Fraction(c)
    near = np.float32(float(exact))
    candidates = [near, np.nextafter(near, np.float32(np.inf)), np.nextafter(near, np.float32(-np.inf))]
    return min(candidates, key=lambda f: (abs(Fraction(float(f)) - exact), int(np.float32(f).view(np.int32)) & 1))


def test_fma32_rounds_once():
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(3000, generator=g) * s for s in (1.0, 1.0, 1e-3))
    expected = torch.tensor([_exact_f32(*v) for v in zip(a.tolist(), b.tolist(), c.tolist(), strict=True)])
    assert torch.equal(fma32(a, b, c), expected)
    assert not torch.equal(a * b + c, expected)  # two roundings differ: the test can tell
    ties = torch.tensor([1 + 2**-24, 1.0]), torch.tensor([1.0, 1 + 2**-23]), torch.tensor([2**-60, 2**-24])
    assert torch.equal(fma32(*ties), torch.tensor([_exact_f32(*v) for v in zip(*(t.tolist() for t in ties))]))


def quantized(qtype: GGMLQuantizationType, rows: int, cols: int, seed: int) -> np.ndarray:
    """A `[rows, cols]` weight's GGUF bytes: gguf-py's quantization, or (K-quants, which it cannot quantize)
    random blocks, valid once their f16 scales are sane."""
    rng = np.random.default_rng(seed)
    if qtype in (Q.Q8_0, Q.Q5_0):
        return gguf_quantize(rng.standard_normal((rows, cols)).astype(np.float32), qtype)
    size = {Q.Q4_K: 144, Q.Q6_K: 210}[qtype]
    raw = rng.integers(0, 256, (rows, cols // 256, size), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.01, (rows, cols // 256, 2)).astype(np.float16)
    if qtype == Q.Q4_K:
        raw[..., :4] = scales.view(np.uint8)
    else:
        raw[..., 208:] = scales[..., :1].view(np.uint8)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q5_0, Q.Q4_K, Q.Q6_K])
def test_unpack_reassembles_the_dequantized_tensor(qtype):
    rows, cols = 16, 512
    raw = quantized(qtype, rows, cols, seed=int(qtype))
    parts = {k: v.numpy().astype(np.float32) for k, v in unpack(qtype, raw, rows, cols).items()}
    q = parts["q"].reshape(rows, cols // 32, 32)
    if qtype in (Q.Q8_0, Q.Q5_0):
        w = q * parts["d"][..., None]
    elif qtype == Q.Q4_K:
        d = (parts["d"][..., None] * parts["sc"]).reshape(rows, -1, 1)
        m = (parts["dmin"][..., None] * parts["m"]).reshape(rows, -1, 1)
        w = q * d - m
    else:
        d = (parts["d"][..., None] * parts["sc"]).reshape(rows, -1, 1)
        w = (q.reshape(rows, -1, 16) - 32) * d
    assert np.array_equal(w.reshape(rows, cols), gguf_dequantize(raw, qtype))


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q5_0, Q.Q4_K, Q.Q6_K])
@pytest.mark.parametrize("tokens", [1, 5, 8, 13])  # lanes, Q4_K's gemv, gemm and both, Q6_K's tiled path
def test_quant_linear_is_the_rounded_matmul_up_to_summation_order(qtype, tokens):
    out_features, in_features = 24, 512
    raw = quantized(qtype, out_features, in_features, seed=4)
    dense = torch.from_numpy(gguf_dequantize(raw, qtype))
    layer = QuantLinear(qtype, unpack(qtype, raw, out_features, in_features), dense)
    x = torch.from_numpy(activations(tokens, in_features, seed=5))
    expected = (activation_rounding(qtype)(x).double() @ dense.double().T).float()
    ours = layer(x)
    assert ((ours - expected).abs() <= 1e-6 * expected.abs().max()).all()
    if qtype in (Q.Q8_0, Q.Q5_0):
        rows = torch.tensor([3, 17, 5])
        assert torch.equal(layer(x, rows=rows), ours[:, rows])


def test_expf_avx2_and_soft_max():
    x = torch.cat((torch.linspace(-87, 0, 10001), torch.tensor([float("-inf"), 0.0, -100.0])))
    y = expf_avx2(x)
    exact = torch.exp(x.double())
    normal = slice(0, 10001)  # ggml's polynomial: within ~1 ulp of exp where the result is a normal float
    assert ((y[normal].double() - exact[normal]).abs() <= 2 * 2**-23 * exact[normal]).all()
    assert y[-3] == 0 and y[-2] == 1 and 0 < y[-1] < 1e-43
    scores = torch.randn(3, 4, 37) * 5
    scores[..., 30:] = float("-inf")
    probs = soft_max(scores)
    assert ((probs - torch.softmax(scores, -1)).abs() < 1e-6).all() and (probs[..., 30:] == 0).all()


@pytest.mark.parametrize("batched", [False, True])
def test_dot_f16_sums_exact_products_in_fp32(batched):
    g = torch.Generator().manual_seed(1)
    x, y = (torch.randn(6, 256, generator=g).half().float() for _ in range(2))
    ours = dot_f16(x[:, None], y[None], batched=batched)
    exact = x.double() @ y.double().T
    assert ((ours - exact).abs() < 1e-5).all()


def test_llamacpp_kv_cache_close_to_the_f16_dense_cache():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(9, n, 256, generator=g) for n in (4, 1, 1))
    outs = []
    for cache in (DenseKVCache(kv_dtype=torch.float16), LlamaCppKVCache()):
        cache.prepare([0], [8])
        first = cache.forward(0, q[:8], k[:8], v[:8], scale=0.0625, sliding_window=None)
        cache.prepare([0], [1])  # then one token: the other dot-product order
        outs.append(torch.cat((first, cache.forward(0, q[8:], k[8:], v[8:], scale=0.0625, sliding_window=None))))
    assert (outs[0] - outs[1]).abs().max() < 1e-5
    cache.prepare([0, 1], [1, 1])
    with pytest.raises(NbllmError, match="one sequence"):
        cache.forward(0, q[:2], k[:2], v[:2], scale=0.0625, sliding_window=None)


def test_load_model_rejects_unknown_numerics(tiny_model):
    from nbllm.errors import ModelLoadError

    path, _ = tiny_model("gemma3", "f32")
    with pytest.raises(ModelLoadError, match="numerics"):
        load_model(path, numerics="bitexact")
    with pytest.raises(ModelLoadError, match="float32"):
        load_model(path, numerics="llamacpp", dtype=torch.bfloat16)


LLAMACPP_GREEDY = Path(__file__).parent / "data" / "llamacpp_greedy.json"


def _greedy_cases() -> list:
    if not LLAMACPP_GREEDY.exists():
        return []
    data = json.loads(LLAMACPP_GREEDY.read_text(encoding="utf-8"))
    return [pytest.param(case, data["eog_token_ids"], id=case["name"]) for case in data["results"]]


@pytest.fixture(scope="module")
def default_llamacpp_model(default_model_path):
    model, _ = load_model(default_model_path, numerics="llamacpp")
    return model


@pytest.mark.slow
@pytest.mark.skipif(not LLAMACPP_GREEDY.exists(), reason="tests/data/llamacpp_greedy.json not generated yet")
@pytest.mark.parametrize(("case", "eog"), _greedy_cases())
def test_greedy_equals_llama_cpp(default_llamacpp_model, case, eog):
    """The default model with llama.cpp's numerics, run as llama-cpp-python ran it for the reference (the prompt
    as one batch, then a token at a time), picks llama.cpp's first 16 greedy tokens on every recorded prompt,
    near-ties included, and its top-2 logits at each step are llama.cpp's (recorded to 4 decimals)."""
    model, expected = default_llamacpp_model, case["generated_token_ids"][:16]
    cache, feed, start, ours = LlamaCppKVCache(), list(case["prompt_token_ids"]), 0, []
    for (best, best_logit), (second, second_logit) in case["top2"][: len(expected)]:
        logits = llamacpp_logits(model, feed, start, cache)[-1]
        ours.append(int(logits.argmax()))
        # recorded to 4 decimals (5e-5); a runner-up outside the exact head's margin adds the approximation's ~1e-5
        assert abs(logits[best].item() - best_logit) < 1e-4 and abs(logits[second].item() - second_logit) < 1e-4
        if ours[-1] != best or ours[-1] in eog:
            break
        start, feed = start + len(feed), [ours[-1]]
    assert ours == expected
