"""Quantized CPU weights: the lossless int8 repack of every GGUF block type, the AVX2 kernel against the dense fp32
matmul over the dequantized weights, the repack cache (stale entries rebuilt), and int8 models against dense ones."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from nbllm.errors import ModelLoadError
from nbllm.gguf import open_gguf
from nbllm.gguf.quants import dequantize
from nbllm.gguf.repack import GROUP_SIZE, Int8Weight, repack
from nbllm.kernels.cpu_int8_gemm import int8_dequantize, int8_linear, unavailable_reason
from nbllm.loader import load_model
from nbllm.models.attention import DenseKVCache
from nbllm.models.quantized_linear import DENSE_MIN_ROWS, Int8Linear
from nbllm.models.reference import greedy_generate

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=f"int8 kernels: {unavailable_reason()}")

# byte offsets of the f16 scale / min fields inside one block (ggml's block structs)
F16_FIELDS = {
    Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q8_0: [0],
    Q.Q2_K: [80, 82], Q.Q3_K: [108], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208],
}  # fmt: skip


def quantizer_like_blocks(qtype: Q, rows: int, cols: int, rng: np.random.Generator) -> torch.Tensor:
    """Random codes and sub-scales, with super-scales of one magnitude (1e-3..1e-1, both signs where a format's
    quantizer writes them) as quantizers write them; uint8 bytes of a `[rows, cols]` tensor."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n = rows * cols // block_size
    blocks = rng.integers(0, 256, size=(n, type_size), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        halves = (rng.uniform(1e-3, 1e-1, n) * rng.choice([-1, 1], n)).astype(np.float16)
        blocks[:, off : off + 2] = halves.view(np.uint8).reshape(n, 2)
    return torch.from_numpy(blocks.reshape(-1))


@pytest.mark.parametrize("qtype", sorted(GROUP_SIZE, key=int), ids=lambda q: q.name)
def test_repack_is_lossless_and_kernel_matches_dense(qtype: Q) -> None:
    rng = np.random.default_rng(int(qtype))
    rows, cols = 37, 2 * 256  # rows not a multiple of the kernel's 4-row tile
    raw = quantizer_like_blocks(qtype, rows, cols, rng)
    dense = dequantize(raw, qtype, (rows, cols))
    packed = repack(raw, qtype, (rows, cols))
    assert packed is not None and packed.q.dtype == torch.int8
    assert packed.q.shape[1] // packed.scale.shape[1] == GROUP_SIZE[qtype]
    assert torch.equal(packed.dequantize(), dense)
    assert torch.equal(int8_dequantize(packed.q, packed.scale, packed.offset), dense)
    for m in (1, 2, 3, 5, 8, 33):
        x = torch.randn(m, cols, generator=torch.Generator().manual_seed(m))
        got, want = int8_linear(x, packed.q, packed.scale, packed.offset), F.linear(x, dense)
        # fp32 summation order only: bounded by a few ulps of the sum of |products|
        bound = 1e-6 * (x.abs() @ dense.abs().T) + 1e-30
        assert ((got - want).abs() <= bound).all(), (qtype.name, m, ((got - want).abs() / bound).max())


def test_gguf_reference_quantizer_blocks_repack() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 256)).astype(np.float32)
    import gguf.quants

    for qtype in (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0):
        raw = torch.from_numpy(gguf.quants.quantize(w, qtype).reshape(-1).copy())
        packed = repack(raw, qtype, w.shape)
        assert packed is not None and torch.equal(packed.dequantize(), dequantize(raw, qtype, w.shape)), qtype.name


def test_rows_are_batch_invariant_and_large_batches_take_the_dense_path() -> None:
    rng = np.random.default_rng(1)
    raw = quantizer_like_blocks(Q.Q4_K, 64, 512, rng)
    layer = Int8Linear(repack(raw, Q.Q4_K, (64, 512)))
    dense = dequantize(raw, Q.Q4_K, (64, 512))
    x = torch.randn(DENSE_MIN_ROWS + 3, 512)
    alone = torch.cat([layer(x[i : i + 1]) for i in range(7)])
    assert torch.equal(layer(x[:7]), alone)  # a row's sum does not depend on the batch around it
    torch.testing.assert_close(layer(x), F.linear(x, dense), atol=1e-5, rtol=1e-5)
    ids = torch.tensor([[5, 0], [63, 5]])
    assert torch.equal(layer.rows(ids), dense[ids])


def test_non_repackable_tensors_stay_dense() -> None:
    raw = torch.from_numpy(np.ones((4, 32), dtype=np.float32).view(np.uint8).reshape(-1).copy())
    assert repack(raw, Q.F32, (4, 32)) is None
    # codes that cannot reproduce the decoded weights exactly (here: a NaN scale) are refused, never approximated
    blocks = quantizer_like_blocks(Q.Q4_K, 1, 256, np.random.default_rng(2)).view(-1, 144).clone()
    blocks[0, 0:2] = torch.tensor([np.float16("nan")]).view(torch.uint8)
    assert repack(blocks.reshape(-1), Q.Q4_K, (1, 256)) is None


def _forward_logits(model, ids: list[int]) -> torch.Tensor:
    cache = DenseKVCache()
    cache.prepare([0], [len(ids)])
    with torch.inference_mode():
        hidden = model(torch.tensor(ids), torch.arange(len(ids)), cache)
        return model.compute_logits(hidden)


@pytest.mark.parametrize("fmt", ["q8_0", "q4_k"])
def test_tiny_int8_model_matches_dense(tiny_model, fmt: str) -> None:
    """Exact numerics: int8 weights give the dense model's outputs up to fp32 summation order."""
    path, _ = tiny_model("llama", fmt)
    int8, _ = load_model(path, numerics="exact")
    dense, _ = load_model(path, int8=False, numerics="exact")
    assert any(isinstance(m, Int8Linear) and m.activation_block is None for m in int8.modules())
    assert not any(isinstance(m, Int8Linear) for m in dense.modules())
    ids = list(range(3, 40))
    torch.testing.assert_close(_forward_logits(int8, ids), _forward_logits(dense, ids), atol=1e-5, rtol=1e-5)
    assert greedy_generate(int8, ids[:5], 12) == greedy_generate(dense, ids[:5], 12)


@pytest.mark.parametrize(("fmt", "block"), [("q8_0", 32), ("q4_k", 256)])
def test_fast_numerics_round_activations_like_llama_cpp(tiny_model, fmt: str, block: int) -> None:
    """The default ("fast") rounds each int8 layer's input as llama.cpp does for the weight type (Q8_0 / Q8_K
    blocks): the logits move by that rounding only -- a bounded relative error against the exact forward."""
    path, _ = tiny_model("llama", fmt)
    fast, _ = load_model(path)
    exact, _ = load_model(path, numerics="exact")
    blocks = {m.activation_block for m in fast.modules() if isinstance(m, Int8Linear)}
    assert block in blocks
    ids = list(range(3, 40))
    got, want = _forward_logits(fast, ids), _forward_logits(exact, ids)
    assert not torch.equal(got, want)  # the rounding happened
    relative = (got - want).norm() / want.norm()
    # Each rounded input is off by ~0.5% rms (d / sqrt(12), d = block max / 127); a dozen of them in two layers.
    assert relative < 0.05, relative


_Q8_CASES = [(32, 32, (-128, 128), False, 1024), (32, 32, (0, 16), True, 1024), (256, 16, (-32, 32), False, 1024),
             (256, 32, (0, 32), True, 1024), (256, 32, (-16, 16), False, 1024), (32, 32, (-128, 128), False, 96),
             (32, 16, (0, 16), True, 160)]


def check_int8_activation_kernel(block: int, group: int, codes: tuple[int, int], offset: bool, k: int, rows: int,
                                 n: int = 37) -> None:
    """The int8-activation kernel equals: x rounded by llama.cpp's quantize_row_q8_0 / q8_K, then an exact
    product with the dequantized weight (only fp32 summation order differs)."""
    from nbllm.models.llamacpp_numerics import round_q8_0, round_q8_K

    gen = torch.Generator().manual_seed(block + group + rows + k)
    q = torch.randint(*codes, (n, k), dtype=torch.int8, generator=gen)
    s = torch.rand(n, k // group, generator=gen)
    o = torch.rand(n, k // group, generator=gen) if offset else None
    spread = torch.rand(rows, k // 32, generator=gen).repeat_interleave(32, 1)  # blocks of different magnitudes
    x = torch.randn(rows, k, generator=gen) * spread
    got = int8_linear(x, q, s, o, activation_block=block).double()
    rounded = (round_q8_0 if block == 32 else round_q8_K)(x).double()
    want = rounded @ Int8Weight(q, s, o).dequantize().double().T
    bound = 1e-6 * (rounded.abs() @ Int8Weight(q, s, o).dequantize().double().abs().T)
    assert ((got - want).abs() <= bound + 1e-30).all()
    s16 = s.half()  # scales exact in fp16 (as Q8_0/Q5_0/Q4_0 store them) give the same result read as fp16
    exact16 = Int8Weight(q, s16.float(), o)
    assert torch.equal(int8_linear(x, q, s16, o, activation_block=block),
                       int8_linear(x, exact16.q, exact16.scale, o, activation_block=block))
    alone = torch.cat([int8_linear(x[i : i + 1], q, s, o, activation_block=block) for i in range(rows)])
    assert torch.equal(alone, got.float())  # a row's bits do not depend on the rows around it


@pytest.mark.parametrize(("block", "group", "codes", "offset", "k"), _Q8_CASES)
@pytest.mark.parametrize("rows", [1, 2, 5, 9])
def test_int8_activation_kernel_is_llama_cpp_rounding_then_exact_products(block, group, codes, offset, k,
                                                                         rows) -> None:
    check_int8_activation_kernel(block, group, codes, offset, k, rows)


@pytest.mark.slow
def test_int8_activation_kernel_avx2_build(tmp_path) -> None:
    """The AVX2 code paths (no AVX-512; most laptops), built for `haswell` in a fresh process, pass the same check
    (the 16-row panels' tail included: 37 and 50 rows)."""
    script = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_int8_weights as t\n"
              "from nbllm.kernels.cpu_library import unavailable_reason\n"
              "assert unavailable_reason() is None, unavailable_reason()\n"
              f"for case in {_Q8_CASES!r}:\n"
              "    for rows in (1, 5):\n"
              "        for n in (37, 50):\n"
              "            t.check_int8_activation_kernel(*case, rows, n)\n"
              "print('ok')\n")
    env = os.environ | {"NBLLM_CPU_ARCH": "haswell", "NBLLM_CACHE_DIR": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_int8_needs_cpu_float32(tiny_model) -> None:
    path, _ = tiny_model("llama", "q8_0")
    with pytest.raises(ModelLoadError, match="CPU in float32"):
        load_model(path, dtype=torch.bfloat16, int8=True)
    model, _ = load_model(path, dtype=torch.bfloat16)  # the default just stays dense
    assert not any(isinstance(m, Int8Linear) for m in model.modules())


def test_without_kernels_the_model_stays_dense_with_a_warning(tiny_model, monkeypatch) -> None:
    import nbllm.loader

    path, _ = tiny_model("llama", "q8_0")
    monkeypatch.setattr(nbllm.loader, "unavailable_reason", lambda: "the CPU lacks AVX2")
    with pytest.warns(UserWarning, match="dense fp32 CPU weights.*AVX2"):
        model, _ = load_model(path)
    assert not any(isinstance(m, Int8Linear) for m in model.modules())
    with pytest.raises(ModelLoadError, match="cannot run here: the CPU lacks AVX2"):
        load_model(path, int8=True)


def test_repack_cache_is_reused_and_rebuilt_when_the_file_changes(tiny_model, tmp_path, monkeypatch) -> None:
    import nbllm.loader

    monkeypatch.setenv("NBLLM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(nbllm.loader, "_DEQUANT_CACHE_MIN_BYTES", 0)
    src, _ = tiny_model("llama", "q8_0")
    path = tmp_path / "model.gguf"
    shutil.copy(src, path)
    entries = lambda: sorted((tmp_path / "cache" / "int8").glob("*.pt"))  # noqa: E731

    first, _ = load_model(path)
    (entry,) = entries()
    again, _ = load_model(path)
    assert entries() == [entry] and torch.equal(again.layers[0].mlp.up.q, first.layers[0].mlp.up.q)

    # Rewrite one tensor's codes in place (same size, same header): the old entry must not be served.
    info = open_gguf(path).tensors["blk.0.ffn_up.weight"]
    data = bytearray(path.read_bytes())
    blocks = np.frombuffer(bytes(data[info.offset : info.offset + info.nbytes]), dtype=np.uint8).reshape(-1, 34).copy()
    blocks[:, 2:] = (blocks[:, 2:].view(np.int8) // 2).view(np.uint8)  # halve every code
    data[info.offset : info.offset + info.nbytes] = blocks.tobytes()
    mtime = path.stat().st_mtime_ns
    path.write_bytes(bytes(data))
    os.utime(path, ns=(mtime + 10**9, mtime + 10**9))

    changed, _ = load_model(path)
    got = changed.layers[0].mlp.up
    expected = dequantize(torch.from_numpy(blocks.reshape(-1)), Q.Q8_0, info.shape)
    assert torch.equal(Int8Weight(got.q, got.scale, got.offset).dequantize(), expected)
    (rebuilt,) = entries()  # the stale entry was replaced, not kept beside the new one
    assert rebuilt != entry


@pytest.mark.slow
def test_default_model_repacks_losslessly_and_keeps_greedy(default_model_path) -> None:
    file = open_gguf(default_model_path)
    int8, _ = load_model(file, numerics="exact")
    dense, _ = load_model(file, int8=False, numerics="exact")
    layers = [m for m in int8.modules() if isinstance(m, Int8Linear)]
    assert len(layers) == 18 * 7 + 1  # every projection and the tied output projection
    for name in ("token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_v.weight", "blk.0.attn_output.weight",
                 "blk.0.ffn_down.weight", "blk.3.ffn_down.weight"):
        info = file.tensors[name]
        rows = slice(0, 4096)  # the output projection's first rows; whole tensors for the others
        packed = repack(file.tensor_bytes_torch(name), info.qtype, info.shape)
        want = dequantize(file.tensor_bytes_torch(name), info.qtype, info.shape)
        assert packed is not None and torch.equal(packed.dequantize()[rows], want[rows]), name
    ids = [2, 818, 5279, 529, 7001, 563, 496, 1651, 236764]
    torch.testing.assert_close(_forward_logits(int8, ids), _forward_logits(dense, ids), atol=2e-4, rtol=1e-5)
    assert greedy_generate(int8, ids, 16) == greedy_generate(dense, ids, 16)
