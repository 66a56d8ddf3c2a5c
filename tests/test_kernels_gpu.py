"""The Triton kernels against their torch references, on fresh random inputs with NaN-poisoned pools.

They run on CUDA; without it, on the CPU through Triton's interpreter (tests/conftest.py sets `TRITON_INTERPRET=1`
where there is no GPU and mends the one line of Triton 3.6's interpreter that fails with NumPy 2): slow, so the
shapes shrink there.
Batches come from `test_paged_attention.make_batch`: shuffled non-contiguous blocks, a shared prefix, garbage
in unused block-table entries and NaN in every never-written slot.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from test_paged_attention import make_batch

triton = pytest.importorskip("triton")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not torch.cuda.is_available() and not INTERPRET:
    pytest.skip("needs CUDA (or TRITON_INTERPRET=1 for the CPU interpreter)", allow_module_level=True)

from nbllm.kernels.activation import gated_activation, gated_activation_reference
from nbllm.kernels.argmax_logsumexp import argmax_logsumexp, argmax_logsumexp_reference
from nbllm.kernels.arrival import counters
from nbllm.kernels.embedding import embedding, embedding_reference
from nbllm.kernels.decode_attention import DecodeRope, decode_attention
from nbllm.kernels.extend_attention import extend_attention
from nbllm.kernels.next_inputs import next_inputs_reference
from nbllm.kernels.paged_attention import paged_attention
from nbllm.kernels.paged_attention import store_kv as store_kv_reference
from nbllm.kernels.rmsnorm import add_rms_norm, rms_norm, rms_norm_reference
from nbllm.kernels.rotary import rotary_embedding, rotary_qk, rotary_reference
from nbllm.kernels.store_kv import store_kv

pytestmark = pytest.mark.gpu
DEVICE = torch.device("cpu" if INTERPRET else "cuda")
# Context lengths: long enough for several key tiles and splits on a GPU, a few tiles under the interpreter.
LONG = 150 if INTERPRET else 2000
HEAD_DIM = 32 if INTERPRET else 128
DTYPES = [torch.float32] if INTERPRET else [torch.float32, torch.bfloat16]


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}


def reference(batch, scale: float, window: int | None) -> torch.Tensor:
    """The torch paged attention on the CPU in fp32 over the same (possibly bf16-rounded) values."""
    return paged_attention(batch.q.float(), batch.k_cache.float(), batch.v_cache.float(),
                           block_tables=batch.block_tables, cu_query_lens=batch.cu_query_lens,
                           context_lens=batch.context_lens, scale=scale, sliding_window=window)


def on_device(batch):
    return {name: getattr(batch, name).to(DEVICE) for name in
            ("q", "k_cache", "v_cache", "block_tables", "cu_query_lens", "context_lens")}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 2, 8])
@pytest.mark.parametrize("window", [None, 7, 100])
@pytest.mark.parametrize("num_splits", [1, 5])
def test_decode_attention_matches_paged_reference(dtype, group, window, num_splits) -> None:
    seqs = [(LONG, 1), (1, 1), (17, 1), (64, 1), (LONG // 3, 1)]
    kv_heads = 2
    batch = make_batch(seqs, block_size=16, heads=kv_heads * group, kv_heads=kv_heads, head_dim=HEAD_DIM,
                       shared_blocks=2, dtype=dtype, seed=group * 100 + num_splits + (window or 0))
    d = on_device(batch)
    out = torch.full_like(d["q"], float("nan"))
    decode_attention(d["q"], d["k_cache"], d["v_cache"], block_tables=d["block_tables"],
                     context_lens=d["context_lens"], scale=HEAD_DIM**-0.5, sliding_window=window,
                     num_splits=num_splits, out=out)
    torch.testing.assert_close(out.cpu().float(), reference(batch, HEAD_DIM**-0.5, window), **tolerance(dtype))


def test_decode_attention_padding_rows_give_zeros() -> None:
    """A CUDA-graph batch padded past its real sequences: context 0 reads nothing and writes zeros."""
    batch = make_batch([(40, 1), (9, 1)], block_size=16, heads=4, kv_heads=2, head_dim=HEAD_DIM, seed=3)
    d = on_device(batch)
    d["context_lens"][1] = 0
    out = decode_attention(d["q"], d["k_cache"], d["v_cache"], block_tables=d["block_tables"],
                           context_lens=d["context_lens"], scale=0.2, sliding_window=None, num_splits=4)
    assert torch.equal(out[1].cpu(), torch.zeros_like(out[1].cpu()))
    assert torch.isfinite(out[0]).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("window", [None, 5, 40])
@pytest.mark.parametrize("block_size", [1, 16])
def test_extend_attention_matches_paged_reference(dtype, group, window, block_size) -> None:
    """Prefill, extend over a shared prefix, speculative-sized and decode rows in one launch."""
    seqs = [(LONG, 1), (33, 33), (90, 20), (LONG, LONG - 64), (64, 3), (17, 1), (50, 9)]
    kv_heads = 2
    batch = make_batch(seqs, block_size=block_size, heads=kv_heads * group, kv_heads=kv_heads, head_dim=HEAD_DIM,
                       shared_blocks=32 // block_size, dtype=dtype, seed=group * 10 + block_size + (window or 0))
    d = on_device(batch)
    out = torch.full_like(d["q"], float("nan"))
    extend_attention(d["q"], d["k_cache"], d["v_cache"], block_tables=d["block_tables"],
                     cu_query_lens=d["cu_query_lens"], context_lens=d["context_lens"],
                     max_query_len=max(n for _, n in seqs), scale=0.3, sliding_window=window, out=out)
    torch.testing.assert_close(out.cpu().float(), reference(batch, 0.3, window), **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_store_kv_matches_reference_and_skips_padding(dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    blocks, block_size, hkv, d = 9, 16, 2, HEAD_DIM
    tokens = 70
    slots = torch.randperm(blocks * block_size, generator=gen)[:tokens].int()
    slots[::7] = -1
    # k and v as column slices of one projection output, as the model produces them.
    kv = torch.randn(tokens, 2 * hkv * d + 8, generator=gen).to(dtype)
    k, v = kv[:, : hkv * d].view(tokens, hkv, d), kv[:, hkv * d : 2 * hkv * d].view(tokens, hkv, d)
    want_k = torch.full((blocks, block_size, hkv, d), float("nan"), dtype=dtype)
    want_v = want_k.clone()
    store_kv_reference(want_k, want_v, k, v, slots)
    got_k, got_v = want_k.new_full(want_k.shape, float("nan")).to(DEVICE), want_v.new_full(want_v.shape, float("nan")).to(DEVICE)
    store_kv(got_k, got_v, k.to(DEVICE), v.to(DEVICE), slots.to(DEVICE))
    assert torch.equal(got_k.cpu().nan_to_num(7.0), want_k.nan_to_num(7.0))
    assert torch.equal(got_v.cpu().nan_to_num(7.0), want_v.nan_to_num(7.0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [HEAD_DIM, 1000])
def test_rms_norm_and_fused_residual_match_reference(dtype, width) -> None:
    gen = torch.Generator().manual_seed(width)
    x = (torch.randn(37, width, generator=gen) * 3).to(dtype)
    residual = torch.randn(37, width, generator=gen).to(dtype)
    w = (1 + 0.3 * torch.randn(width, generator=gen)).to(dtype)
    out = rms_norm(x.to(DEVICE), w.to(DEVICE), 1e-6)
    torch.testing.assert_close(out.cpu(), rms_norm_reference(x, w, 1e-6), **tolerance(dtype))
    normed, total = add_rms_norm(x.to(DEVICE), residual.to(DEVICE), w.to(DEVICE), 1e-6)
    assert torch.equal(total.cpu(), x + residual)
    torch.testing.assert_close(normed.cpu(), rms_norm_reference(x + residual, w, 1e-6), **tolerance(dtype))
    # Per-head norms (Qwen3's q/k norm) go through the same kernel over a strided 3-d view.
    heads = torch.randn(5, 2 * 3 * HEAD_DIM, generator=gen).to(dtype)[:, : 3 * HEAD_DIM].view(5, 3, HEAD_DIM)
    wh = w[:HEAD_DIM] if width >= HEAD_DIM else w
    torch.testing.assert_close(rms_norm(heads.to(DEVICE), wh.to(DEVICE), 1e-6).cpu(),
                               rms_norm_reference(heads, wh, 1e-6), **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_matches_reference(dtype) -> None:
    gen = torch.Generator().manual_seed(5)
    d, heads, tokens, max_pos = HEAD_DIM, 6, 29, 500
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    freqs = torch.arange(max_pos).float()[:, None] * inv_freq[None]
    cos, sin = freqs.cos(), freqs.sin()
    # A column slice of a wider projection: the token stride is not heads * d.
    x = torch.randn(tokens, (heads + 2) * d, generator=gen).to(dtype)[:, : heads * d].view(tokens, heads, d)
    positions = torch.randint(0, max_pos, (tokens,), generator=gen)
    out = rotary_embedding(x.to(DEVICE), positions.to(DEVICE), cos.to(DEVICE), sin.to(DEVICE))
    torch.testing.assert_close(out.cpu(), rotary_reference(x, positions, cos, sin), **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", [False, True])
def test_fused_qk_norm_rotary_matches_norm_then_rotary(dtype, norm) -> None:
    """Qwen3's per-head q/k RMSNorm then rope, one launch, on column slices of one qkv projection output."""
    gen = torch.Generator().manual_seed(6)
    d, hq, hkv, tokens, max_pos = HEAD_DIM, 6, 2, 23, 300
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, d, 2).float() / d))
    freqs = torch.arange(max_pos).float()[:, None] * inv_freq[None]
    cos, sin = freqs.cos(), freqs.sin()
    qkv = (torch.randn(tokens, (hq + 2 * hkv) * d, generator=gen) * 2).to(dtype)
    q, k = qkv[:, : hq * d].view(tokens, hq, d), qkv[:, hq * d : (hq + hkv) * d].view(tokens, hkv, d)
    qw, kw = (1 + 0.3 * torch.randn(d, generator=gen)).to(dtype), (1 + 0.3 * torch.randn(d, generator=gen)).to(dtype)
    positions = torch.randint(0, max_pos, (tokens,), generator=gen)
    want_q = rms_norm_reference(q, qw, 1e-6) if norm else q
    want_k = rms_norm_reference(k, kw, 1e-6) if norm else k
    got_q, got_k = rotary_qk(q.to(DEVICE), k.to(DEVICE), positions.to(DEVICE), cos.to(DEVICE), sin.to(DEVICE),
                             q_weight=qw.to(DEVICE) if norm else None, k_weight=kw.to(DEVICE) if norm else None,
                             eps=1e-6)
    torch.testing.assert_close(got_q.cpu(), rotary_reference(want_q, positions, cos, sin), **tolerance(dtype))
    torch.testing.assert_close(got_k.cpu(), rotary_reference(want_k, positions, cos, sin), **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_gated_activation_matches_reference(dtype, activation) -> None:
    gen = torch.Generator().manual_seed(9)
    gate_up = (torch.randn(19, 2 * 5000, generator=gen) * 3).to(dtype)
    out = gated_activation(gate_up.to(DEVICE), activation)
    torch.testing.assert_close(out.cpu(), gated_activation_reference(gate_up, activation), **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 9000), (3, 4096), (5, 151936 if not INTERPRET else 10000)])
def test_argmax_logsumexp_matches_torch_and_keeps_the_first_maximum(dtype, shape) -> None:
    """Ties across chunk boundaries: the first maximum wins, as torch's argmax (and the CPU kernel) decide."""
    torch.manual_seed(shape[0])
    x = (torch.randn(shape) * 4).to(dtype)
    x[0, shape[1] - 5] = x[0, 7] = x[0].max() + 1  # the same maximum in the first and the last chunk
    ids, lse, logprob = argmax_logsumexp(x.to(DEVICE))
    ref_ids, ref_lse, ref_logprob = argmax_logsumexp_reference(x)
    assert torch.equal(ids.cpu(), ref_ids) and ids[0].item() == 7
    torch.testing.assert_close(lse.cpu(), ref_lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logprob.cpu(), ref_logprob, rtol=1e-5, atol=1e-5)


def test_argmax_logsumexp_writes_each_row_into_its_half_of_pinned_host_memory() -> None:
    """The host mirror of a decode graph's greedy step: row b lands in half `halves[b]` of the pinned buffers,
    the same values as on the device, and the other half keeps what it held (the previous launch's results)."""
    torch.manual_seed(5)
    x = torch.randn(3, 9000).to(DEVICE)
    buffers = [torch.full((2, 4), -7, dtype=torch.int64), torch.full((2, 4), -7.0)]
    host_ids, host_lp = (b.pin_memory() for b in buffers) if DEVICE.type == "cuda" else buffers
    halves = torch.tensor([1, 0, 1], device=DEVICE)
    ids, _, logprob = argmax_logsumexp(x, host=(host_ids, host_lp, halves))
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    rows = torch.arange(3)
    assert torch.equal(host_ids[halves.cpu(), rows], ids.cpu())
    assert torch.equal(host_lp[halves.cpu(), rows], logprob.cpu())
    assert torch.equal(host_ids[1 - halves.cpu(), rows], torch.full((3,), -7))
    assert torch.equal(host_ids[:, 3], torch.full((2,), -7))


def test_argmax_logsumexp_advances_the_decode_inputs_as_the_host_predicts() -> None:
    """The decode graph's next inputs (`next_inputs`): a row within its block, one entering the next block of its
    table, one past its table's end (no slot), and a padding row, which only changes half; the host's numpy
    prediction gives the same array, and the host mirror uses the halves before they flip."""
    torch.manual_seed(6)
    x = torch.randn(4, 5000).to(DEVICE)
    inputs = np.array([[9, -2, 4, 0], [20, 31, 63, 0], [7 * 16 + 4, 3 * 16 + 15, 0, -1], [21, 32, 64, 0],
                       [1, 1, 1, 1]], dtype=np.int64)
    tables = np.array([[5, 7, 0, 0], [2, 3, 9, 1], [4, 4, 4, 4], [0, 0, 0, 0]], dtype=np.int32)
    device_inputs, device_tables = torch.tensor(inputs, device=DEVICE), torch.tensor(tables, device=DEVICE)
    host_ids, host_lp = torch.zeros((2, 4), dtype=torch.int64), torch.zeros((2, 4))
    if DEVICE.type == "cuda":
        host_ids, host_lp = host_ids.pin_memory(), host_lp.pin_memory()
    ids, _, _ = argmax_logsumexp(x, host=(host_ids, host_lp, device_inputs[4]),
                                 advance=(device_inputs, device_tables, 16))
    expected = next_inputs_reference(inputs, tables, 16, 4)
    assert np.array_equal(device_inputs.cpu().numpy(), expected)
    assert expected[:, 0].tolist() == [-1, 21, 7 * 16 + 5, 22, 0]  # the next slot of block 7
    assert expected[:, 1].tolist() == [-2, 32, 9 * 16, 33, 0]  # position 32: the first slot of block 9
    assert expected[:, 2].tolist() == [-3, 64, -1, 65, 0]  # block 4 of a four-block table: none
    assert expected[:, 3].tolist() == [0, 0, -1, 0, 0]  # padding: only the half flips
    assert torch.equal(host_ids[1].cpu(), ids.cpu())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [1.0, float(torch.tensor(640**0.5).to(torch.bfloat16))])
@pytest.mark.parametrize("hidden", [640, 1024])
def test_embedding_gives_the_bits_of_lookup_then_scale_and_resolves_placeholders(dtype, scale, hidden) -> None:
    """Gemma's scale (sqrt(640), as the model rounds it) and a width that is no power of two; placeholders of the
    previous step's rows (one clamped past the end, as the torch resolution does), `ids` left as they were."""
    torch.manual_seed(hidden)
    table = torch.randn(300, hidden).to(dtype)
    ids = torch.tensor([5, -1, 299, -3, 0, -2, -9])
    sampled = torch.tensor([17, 250, 3])
    for placeholders in (sampled, None):
        given = ids.clamp(min=0) if placeholders is None else ids
        rows = embedding(given.to(DEVICE), table.to(DEVICE), scale,
                         None if placeholders is None else placeholders.to(DEVICE))
        assert torch.equal(rows.cpu(), embedding_reference(given, table, scale, placeholders))
    assert torch.equal(rows.cpu()[1], table[0] * scale if scale != 1.0 else table[0])
    assert torch.equal(embedding(ids.to(DEVICE), table.to(DEVICE), scale, sampled.to(DEVICE)).cpu()[6],
                       embedding_reference(torch.tensor([3]), table, scale)[0])  # -9: past the end, clamped
    assert embedding(ids[:0].to(DEVICE), table.to(DEVICE)).shape == (0, hidden)


def test_merging_kernels_leave_their_arrival_counters_at_zero() -> None:
    """The last program of each group resets its counter, so a second launch (a CUDA graph replay) merges
    correctly and gives the same result."""
    batch = make_batch([(300, 1), (5, 1)], block_size=16, heads=4, kv_heads=2, head_dim=HEAD_DIM, seed=4)
    d = on_device(batch)
    runs = [decode_attention(d["q"], d["k_cache"], d["v_cache"], block_tables=d["block_tables"],
                             context_lens=d["context_lens"], scale=0.1, sliding_window=None, num_splits=3)
            for _ in range(2)]
    logits = torch.randn(2, 3 * 4096 + 1, device=DEVICE)
    greedy = [argmax_logsumexp(logits) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    assert all(torch.equal(a, b) for a, b in zip(*greedy))
    assert not counters(DEVICE, 1).any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("window", [40, None])
def test_decode_attention_with_rope_gives_the_bits_of_rotary_then_attention(dtype, norm, num_splits, window) -> None:
    """q/k norms, rotary and the K/V store inside the attention launch (`DecodeRope`): the same output and the
    same pools as `rotary_qk` with its store followed by `decode_attention`, bit for bit; a padding row (slot -1,
    context 0) stores nothing and gets zeros. Without the window and with one split, the 70-key sequence's new key
    lies in its split's second tile (the first is gathered before the new key exists); otherwise in the first."""
    bs, hkv, group = 16, 2, 2
    batch = make_batch([(70, 1), (16, 1), (1, 1), (5, 1)], block_size=bs, heads=hkv * group, kv_heads=hkv,
                       head_dim=HEAD_DIM, dtype=dtype, seed=11)
    gen = torch.Generator().manual_seed(12)
    d = on_device(batch)
    d["context_lens"][3] = 0
    positions = (d["context_lens"].long() - 1).clamp(min=0)
    blocks = d["block_tables"].long().gather(1, (positions // bs)[:, None]).squeeze(1)
    slots = torch.where(d["context_lens"] > 0, blocks * bs + positions % bs, -1)
    qkv = (torch.randn(4, (hkv * group + 2 * hkv) * HEAD_DIM, generator=gen) * 2).to(dtype).to(DEVICE)
    q, k, v = (part.view(4, -1, HEAD_DIM) for part in qkv.split((hkv * group * HEAD_DIM, hkv * HEAD_DIM,
                                                                  hkv * HEAD_DIM), dim=1))
    inv_freq = 1.0 / (1e4 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))
    freqs = torch.arange(128).float()[:, None] * inv_freq[None]
    cos, sin = freqs.cos().to(DEVICE), freqs.sin().to(DEVICE)
    norms = {"q_weight": (1 + 0.3 * torch.randn(HEAD_DIM, generator=gen)).to(dtype).to(DEVICE),
             "k_weight": (1 + 0.3 * torch.randn(HEAD_DIM, generator=gen)).to(dtype).to(DEVICE),
             "eps": 1e-6} if norm else {}
    pools = (d["k_cache"].clone(), d["v_cache"].clone())
    attend = {"block_tables": d["block_tables"], "context_lens": d["context_lens"], "scale": HEAD_DIM**-0.5,
              "sliding_window": window, "num_splits": num_splits}
    rq, _ = rotary_qk(q, k, positions, cos, sin, **norms, store=(v, *pools, slots))
    want = decode_attention(rq, *pools, **attend)
    got = decode_attention(q, d["k_cache"], d["v_cache"], **attend,
                           rope=DecodeRope(k, v, positions, cos, sin, slots, **norms))
    assert torch.equal(got, want) and not got[3].any()
    for mine, theirs in zip((d["k_cache"], d["v_cache"]), pools):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0, equal_nan=True)
