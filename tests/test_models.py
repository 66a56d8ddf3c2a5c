"""Model forwards against transformers fp32: every architecture, from HF dirs and from GGUF (F32 and quantized).

Each test flattens several prompts of different lengths into one forward through `DenseKVCache`, as the
engine does, and compares every token's logits with transformers run on each prompt alone.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import GGUF_ARCH, TINY_ARCHS, build_hf_model, hf_logits, random_prompts

from nbllm.gguf import open_gguf
from nbllm.loader import load_model
from nbllm.errors import NbllmError
from nbllm.models import DenseKVCache, causal_attention, greedy_generate

PROMPT_LENGTHS = [5, 17, 1, 12]  # 17 > gemma3's window 4 and > mistral's window 4, so windows matter
TOL = 1e-4


def flat_logits(model, prompts: list[list[int]]) -> torch.Tensor:
    """Logits of every token of all `prompts` run as one token-flattened batch."""
    cache = DenseKVCache()
    cache.prepare(list(range(len(prompts))), [len(p) for p in prompts])
    ids = torch.tensor([t for p in prompts for t in p])
    positions = torch.cat([torch.arange(len(p)) for p in prompts])
    with torch.inference_mode():
        return model.compute_logits(model(ids, positions, cache))


def assert_matches_transformers(path, reference) -> float:
    model, _ = load_model(path, numerics="exact")
    prompts = random_prompts(PROMPT_LENGTHS)
    ours = flat_logits(model, prompts)
    theirs = torch.cat([hf_logits(reference, p) for p in prompts])
    diff = (ours - theirs).abs().max().item()
    assert diff <= TOL, f"max abs logit diff {diff:.2e} (logits up to {theirs.abs().max():.1f})"
    return diff


@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_hf_dir_matches_transformers(tiny_model, arch):
    assert_matches_transformers(*tiny_model(arch, "hf"))


# Quantized files of every architecture are slow-marked except the two whose GGUF layout differs most
# (gemma3: norm +1, llama: permuted q/k rows, rope_freqs); the F32 file of every architecture runs always.
_QUANT_FAST = {"gemma3", "llama"}
GGUF_CASES = [
    pytest.param(arch, fmt, marks=() if fmt == "f32" or arch in _QUANT_FAST else pytest.mark.slow)
    for arch in sorted(GGUF_ARCH)
    for fmt in ("f32", "q8_0", "q4_k")
]


@pytest.mark.parametrize(("arch", "fmt"), GGUF_CASES)
def test_gguf_matches_transformers_on_decoded_weights(tiny_model, arch, fmt):
    path, reference = tiny_model(arch, fmt)
    if fmt != "f32":  # the file really holds quantized weights, and the reference really differs from F32
        qtypes = {info.qtype.name for info in open_gguf(path).tensors.values()}
        assert fmt.upper() in qtypes
        assert reference is not tiny_model(arch, "f32")[1]
    assert_matches_transformers(path, reference)


def test_gemma3_layout_and_hf_only_query_scale(tmp_path):
    """Every 6th Gemma 3 layer is global; query_pre_attn_scalar (HF only: GGUF has no key for it) is honoured."""
    from tiny_models import save_hf_dir

    hf = build_hf_model("gemma3", query_pre_attn_scalar=48)
    _, config = load_model(save_hf_dir(hf, tmp_path / "g"))
    assert config.layer_is_sliding == (True,) * 5 + (False, True)
    assert config.rope_local_theta == 10000.0 and config.rope_theta == 1e6
    assert config.query_scale == pytest.approx(48**-0.5)
    assert_matches_transformers(tmp_path / "g", hf)


@pytest.mark.parametrize("arch", ["gemma3", "llama", "mistral", "qwen3"])
def test_chunked_prefill_and_decode_equal_full_forward(tiny_model, arch):
    """Sequences advanced in uneven chunks, batched with each other, see exactly what one full forward sees."""
    path, _ = tiny_model(arch, "hf")
    model, _ = load_model(path, numerics="exact")
    a, b = random_prompts([14, 11], seed=3)
    full_a, full_b = flat_logits(model, [a]), flat_logits(model, [b])
    cache = DenseKVCache()
    # step: list of (seq_id, start, stop) slices of a/b
    steps = [[(0, 0, 6)], [(1, 0, 9), (0, 6, 7)], [(0, 7, 13), (1, 9, 10)], [(1, 10, 11), (0, 13, 14)]]
    seqs, fulls = {0: a, 1: b}, {0: full_a, 1: full_b}
    for step in steps:
        cache.prepare([s for s, _, _ in step], [stop - start for _, start, stop in step])
        ids = torch.tensor([t for s, start, stop in step for t in seqs[s][start:stop]])
        positions = torch.cat([torch.arange(start, stop) for _, start, stop in step])
        with torch.inference_mode():
            logits = model.compute_logits(model(ids, positions, cache))
        offset = 0
        for s, start, stop in step:
            n = stop - start
            torch.testing.assert_close(logits[offset : offset + n], fulls[s][start:stop], atol=1e-5, rtol=0)
            offset += n
    assert cache.seq_len(0) == 14 and cache.seq_len(1) == 11


@pytest.mark.parametrize("arch", ["gemma3", "llama"])
def test_greedy_generate_matches_transformers_generate(tiny_model, arch):
    path, reference = tiny_model(arch, "hf")
    model, _ = load_model(path, numerics="exact")
    prompt = random_prompts([9], seed=5)[0]
    ours = greedy_generate(model, prompt, 12)
    with torch.no_grad():
        theirs = reference.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                    eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert ours == theirs


def test_greedy_generate_stops_at_eos(tiny_model):
    path, _ = tiny_model("llama", "hf")
    model, _ = load_model(path, numerics="exact")
    prompt = random_prompts([6], seed=1)[0]
    free = greedy_generate(model, prompt, 8)
    stopped = greedy_generate(model, prompt, 8, eos_ids={free[2]})
    assert stopped == free[: free.index(free[2]) + 1]


def test_bfloat16_load_runs_close_to_fp32(tiny_model):
    path, _ = tiny_model("gemma3", "hf")
    model, _ = load_model(path, dtype=torch.bfloat16)
    assert model.embed_tokens.dtype == torch.bfloat16 and model.layers[0].mlp.up.weight.dtype == torch.bfloat16
    prompts = random_prompts([9, 4])
    fp32 = flat_logits(load_model(path, numerics="exact")[0], prompts)
    bf16 = flat_logits(model, prompts)
    assert bf16.dtype == torch.float32
    assert (bf16 - fp32).abs().max().item() < 0.1 * fp32.abs().max().item()


def test_dense_kv_cache_bookkeeping():
    cache = DenseKVCache()
    with pytest.raises(NbllmError):
        cache.prepare([0, 0], [1, 1])
    with pytest.raises(NbllmError):
        cache.prepare([0], [0])
    cache.prepare([7], [3])
    q, kv = torch.randn(3, 4, 8), torch.randn(3, 2, 8)
    out = cache.forward(0, q, kv, kv, scale=0.5, sliding_window=None)
    assert out.shape == (3, 4, 8) and cache.seq_len(7) == 3
    with pytest.raises(NbllmError, match="declared 3"):
        cache.forward(1, q[:2], kv[:2], kv[:2], scale=0.5, sliding_window=None)
    cache.free(7)
    assert cache.seq_len(7) == 0


def test_sliding_window_sees_exactly_the_last_w_positions():
    """Key p is visible to query q iff q - w < p <= q: with one-hot values the output reveals the weights."""
    n, w = 7, 3
    q = torch.zeros(n, 1, n)
    k = torch.zeros(n, 1, n)
    v = torch.eye(n).reshape(n, 1, n)
    probs = causal_attention(q, k, v, past=0, scale=1.0, sliding_window=w)[:, 0]
    for qpos in range(n):
        visible = [p for p in range(n) if qpos - w < p <= qpos]
        torch.testing.assert_close(probs[qpos], torch.zeros(n).index_fill_(0, torch.tensor(visible), 1 / len(visible)))
