"""nbllm.gguf.quants against gguf-py's numpy reference: bit-exact on random blocks and on the default model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as ref_dequantize
from gguf.quants import quantize as ref_quantize
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbllm.errors import ModelLoadError, UnsupportedQuantError
from nbllm.gguf.quants import SUPPORTED_TYPES, dequantize, quant_nbytes

LEGACY = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0]
KQUANTS = [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]
BLOCKED = LEGACY + KQUANTS
PLAIN = [Q.F32, Q.F16, Q.BF16]

# byte offsets of the f16 scale / min fields inside one block (from the ggml block structs)
F16_FIELDS = {
    Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q8_0: [0],
    Q.Q2_K: [80, 82], Q.Q3_K: [108], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208],
}  # fmt: skip


def random_halves(rng: np.random.Generator, n: int) -> np.ndarray:
    """Finite f16 values across the whole range: normals of every exponent, subnormals, zeros, both signs."""
    bits = rng.integers(0, 1 << 16, size=n, dtype=np.uint16)
    exp = (bits >> 10) & 0x1F
    bits = np.where(exp == 0x1F, bits & ~np.uint16(0x4000), bits)  # inf/nan -> finite (exponent 15 or below)
    return bits.astype(np.uint16).view(np.float16)


def random_blocks(qtype: Q, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Random bytes for every quant bit, finite random halves in the scale fields; returns (rows..., bytes)."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n_blocks = int(np.prod(shape)) // block_size
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        blocks[:, off : off + 2] = random_halves(rng, n_blocks).view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(*shape[:-1], shape[-1] // block_size * type_size)


def assert_matches_reference(data: np.ndarray, qtype: Q, shape: tuple[int, ...]) -> None:
    expected = torch.from_numpy(np.ascontiguousarray(ref_dequantize(data, qtype))).reshape(shape)
    got = dequantize(torch.from_numpy(data.reshape(-1).copy()), qtype, shape, tensor_name="t")
    assert got.dtype == torch.float32 and got.shape == shape
    assert torch.equal(got, expected), (qtype.name, shape, (got - expected).abs().max())


SHAPES = [(1, 1), (3, 2), (2, 3, 4), (17, 5)]  # (rows..., blocks per row)


def _shape(qtype: Q, spec: tuple[int, ...]) -> tuple[int, ...]:
    return (*spec[:-1], spec[-1] * GGML_QUANT_SIZES[qtype][0])


@pytest.mark.parametrize("qtype", BLOCKED, ids=lambda q: q.name)
@pytest.mark.parametrize("spec", SHAPES, ids=str)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_blocks_bit_exact(qtype: Q, spec: tuple[int, ...], seed: int) -> None:
    shape = _shape(qtype, spec)
    rng = np.random.default_rng([seed, int(qtype)])
    assert_matches_reference(random_blocks(qtype, shape, rng), qtype, shape)


@pytest.mark.parametrize("qtype", LEGACY, ids=lambda q: q.name)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_quantized_floats_bit_exact(qtype: Q, seed: int) -> None:
    """Realistic blocks: random floats (incl. all-zero and constant rows) through gguf's own quantizer."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((9, 256)) * rng.uniform(1e-3, 1e2, size=(9, 1))).astype(np.float32)
    x[0] = 0.0
    x[1] = 0.5
    x[2, ::3] = 0.0
    data = ref_quantize(x, qtype)
    assert_matches_reference(data, qtype, x.shape)
    # sanity: it really is a quantization of x, not only equal to the reference
    got = dequantize(torch.from_numpy(data.reshape(-1).copy()), qtype, x.shape)
    assert torch.allclose(got, torch.from_numpy(x), rtol=0.2, atol=float(np.abs(x).max()) * 0.1)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    qtype=st.sampled_from(BLOCKED),
    rows=st.lists(st.integers(1, 5), min_size=0, max_size=2),
    blocks=st.integers(1, 6),
    seed=st.integers(0, 2**32 - 1),
)
def test_hypothesis_bit_exact(qtype: Q, rows: list[int], blocks: int, seed: int) -> None:
    shape = _shape(qtype, (*rows, blocks))
    assert_matches_reference(random_blocks(qtype, shape, np.random.default_rng(seed)), qtype, shape)


@pytest.mark.parametrize("qtype", PLAIN, ids=lambda q: q.name)
@pytest.mark.parametrize("seed", [0, 1])
def test_plain_floats_every_bit_pattern(qtype: Q, seed: int) -> None:
    """F32/F16/BF16 from arbitrary bits (NaNs, infs, subnormals included)."""
    rng = np.random.default_rng(seed)
    itemsize = {Q.F32: 4, Q.F16: 2, Q.BF16: 2}[qtype]
    shape = (7, 64)
    raw = rng.integers(0, 256, size=int(np.prod(shape)) * itemsize, dtype=np.uint8)
    if qtype == Q.F16:  # every f16 bit pattern once
        raw = np.arange(1 << 16, dtype=np.uint16).view(np.uint8)
        shape = (1024, 64)
    ref = np.ascontiguousarray(ref_dequantize(raw.copy(), qtype)).reshape(shape)
    got = dequantize(torch.from_numpy(raw.copy()), qtype, shape).numpy()
    nan = np.isnan(ref)
    assert np.array_equal(nan, np.isnan(got))
    assert np.array_equal(ref.view(np.uint32)[~nan], got.view(np.uint32)[~nan])
    if qtype != Q.F16:  # f32 and bf16 keep NaN payloads too (pure bit moves)
        assert np.array_equal(ref.view(np.uint32), got.view(np.uint32))


def test_f32_result_does_not_alias_input() -> None:
    raw = torch.from_numpy(np.arange(8, dtype=np.float32).view(np.uint8).copy())
    out = dequantize(raw, Q.F32, (2, 4))
    out.fill_(-1)
    assert raw.view(torch.float32)[3].item() == 3.0


@pytest.mark.parametrize("qtype", [*PLAIN, *BLOCKED], ids=lambda q: q.name)
def test_unaligned_numpy_and_out(qtype: Q) -> None:
    """raw at an odd address (a tensor inside an mmap need not be aligned), numpy input, and out=."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    shape = (3, 2 * block_size)
    n = quant_nbytes(qtype, shape)
    rng = np.random.default_rng(7)
    data = (
        random_blocks(qtype, shape, rng).reshape(-1)
        if qtype in BLOCKED
        else ref_quantize(rng.standard_normal(shape).astype(np.float32), qtype).view(np.uint8).reshape(-1)
        if qtype != Q.BF16
        else rng.integers(0, 0x3F00, size=n // 2, dtype=np.uint16).view(np.uint8)
    )
    expected = dequantize(torch.from_numpy(data.copy()), qtype, shape)
    buf = torch.zeros(n + 1, dtype=torch.uint8)
    buf[1:] = torch.from_numpy(data)
    assert torch.equal(dequantize(buf[1:], qtype, shape), expected)
    assert torch.equal(dequantize(data, qtype, shape), expected)  # numpy bytes
    ro = data.copy()
    ro.flags.writeable = False
    assert torch.equal(dequantize(ro, qtype, shape), expected)  # read-only (mmap-like) numpy bytes
    out = torch.full((shape[0] * shape[1],), 123.0)
    res = dequantize(buf[1:], qtype, shape, out=out)
    assert res.data_ptr() == out.data_ptr() and res.shape == shape
    assert torch.equal(res, expected)


@pytest.mark.parametrize("qtype", [*PLAIN, *BLOCKED], ids=lambda q: q.name)
def test_quant_nbytes_matches_gguf(qtype: Q) -> None:
    from gguf.quants import quant_shape_to_byte_shape

    block_size, _ = GGML_QUANT_SIZES[qtype]
    for shape in [(block_size,), (5, 3 * block_size), (2, 3, 4 * block_size)]:
        expected = int(np.prod(quant_shape_to_byte_shape(shape, qtype)))  # GGML_QUANT_SIZES[F32] == (1, 4)
        assert quant_nbytes(qtype, shape) == expected
        assert quant_nbytes(int(qtype), shape) == expected


@pytest.mark.parametrize("qtype", [q for q in Q if q not in SUPPORTED_TYPES], ids=lambda q: q.name)
def test_unsupported_type_is_a_clear_error(qtype: Q) -> None:
    with pytest.raises(UnsupportedQuantError) as info:
        dequantize(torch.zeros(1024, dtype=torch.uint8), qtype, (4, 256), tensor_name="blk.0.attn_q.weight")
    msg = str(info.value)
    assert "\n" not in msg
    assert qtype.name in msg and "blk.0.attn_q.weight" in msg and "llama-quantize" in msg
    with pytest.raises(UnsupportedQuantError):
        quant_nbytes(qtype, (4, 256))


def test_unknown_type_id() -> None:
    with pytest.raises(UnsupportedQuantError, match="999.*output.weight|output.weight.*999"):
        dequantize(torch.zeros(4, dtype=torch.uint8), 999, (1, 1), tensor_name="output.weight")
    assert isinstance(UnsupportedQuantError("x"), ModelLoadError)


def test_supported_types() -> None:
    assert SUPPORTED_TYPES == set(PLAIN + BLOCKED)


@pytest.mark.parametrize("qtype", [Q.F16, Q.Q8_0, Q.Q4_K], ids=lambda q: q.name)
@pytest.mark.parametrize("delta", [-1, 1, -34])
def test_wrong_byte_count(qtype: Q, delta: int) -> None:
    shape = (2, 256)
    n = quant_nbytes(qtype, shape)
    with pytest.raises(ModelLoadError) as info:
        dequantize(torch.zeros(n + delta, dtype=torch.uint8), qtype, shape, tensor_name="token_embd.weight")
    msg = str(info.value)
    assert "token_embd.weight" in msg and str(n) in msg and str(n + delta) in msg and "\n" not in msg


@pytest.mark.parametrize("qtype", BLOCKED, ids=lambda q: q.name)
def test_last_dim_not_whole_blocks(qtype: Q) -> None:
    block_size, _ = GGML_QUANT_SIZES[qtype]
    with pytest.raises(ModelLoadError, match=f"w.*{block_size + 1}"):
        quant_nbytes(qtype, (2, block_size + 1), tensor_name="w")
    with pytest.raises(ModelLoadError):
        dequantize(torch.zeros(10_000, dtype=torch.uint8), qtype, (2, block_size // 2), tensor_name="w")


def test_wrong_dtype_and_bad_out() -> None:
    with pytest.raises(ModelLoadError, match="uint8"):
        dequantize(torch.zeros(34, dtype=torch.int8), Q.Q8_0, (1, 32))
    with pytest.raises(ValueError):
        dequantize(torch.zeros(34, dtype=torch.uint8), Q.Q8_0, (1, 32), out=torch.empty(31))


def test_empty_tensor() -> None:
    for qtype in (Q.F32, Q.Q8_0, Q.Q6_K):
        block_size, _ = GGML_QUANT_SIZES[qtype]
        assert dequantize(torch.zeros(0, dtype=torch.uint8), qtype, (0, block_size)).shape == (0, block_size)


@pytest.mark.slow
def test_default_model_every_tensor_bit_exact(default_model_path) -> None:
    """Every tensor of the embedded Gemma 3 270M (F32, Q5_0, Q4_K, Q8_0, Q6_K) equals the numpy reference."""
    from nbllm.gguf import open_gguf

    f = open_gguf(default_model_path)
    seen = set()
    for name, info in f.tensors.items():
        seen.add(info.qtype)
        got = dequantize(f.tensor_bytes_torch(name), info.qtype, info.shape, tensor_name=name)
        raw = f.tensor_bytes(name)
        if info.qtype in BLOCKED:
            raw = raw.reshape(*info.shape[:-1], -1)
        expected = np.ascontiguousarray(ref_dequantize(raw, info.qtype)).reshape(info.shape)
        assert torch.equal(got, torch.from_numpy(expected)), name
        del got, expected
    assert {Q.F32, Q.Q5_0, Q.Q4_K, Q.Q8_0, Q.Q6_K} <= seen
