"""The embedded default model (Gemma 3 270M Q4_K_M) against transformers and against llama.cpp."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nbllm.gguf import open_gguf
from nbllm.loader import load_model
from nbllm.models import DenseKVCache, ModelConfig, greedy_generate

LLAMACPP_GREEDY = Path(__file__).parent / "data" / "llamacpp_greedy.json"


def test_default_model_config(default_model_path):
    c = ModelConfig.from_gguf_metadata(open_gguf(default_model_path).metadata)
    assert (c.arch, c.vocab_size, c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (
        "gemma3", 262144, 640, 18, 4, 1, 256)
    assert [i for i, s in enumerate(c.layer_is_sliding) if not s] == [5, 11, 17]
    assert (c.sliding_window, c.rope_theta, c.rope_local_theta, c.query_scale) == (512, 1e6, 1e4, 256**-0.5)


@pytest.fixture(scope="module")
def default_model(default_model_path):
    """The default model in exact numerics (equal to transformers)."""
    model, _ = load_model(default_model_path, numerics="exact")
    model.numerics = "exact"
    return model


@pytest.fixture(scope="module", params=["exact", "fast"])
def any_numerics_model(default_model, default_model_path, request):
    """The default model in exact numerics and in the default "fast" ones (int8 weights times llama.cpp-rounded
    int8 activations)."""
    if request.param == "exact":
        return default_model
    model, _ = load_model(default_model_path, numerics=request.param)
    model.numerics = request.param
    return model


@pytest.mark.slow
def test_default_model_logits_match_transformers_gguf_loader(default_model_path, default_model):
    """transformers reads the same GGUF with its own metadata mapping and gguf-py's dequantizers."""
    pytest.importorskip("accelerate")  # transformers needs it to load GGUF files
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(
        default_model_path.parent, gguf_file=default_model_path.name, dtype=torch.float32,
        attn_implementation="eager",
    ).eval()
    g = torch.Generator().manual_seed(0)
    # The 600-token prompt crosses the 512-token sliding window of the local layers.
    prompts = [[2, 818, 5279, 9350, 238], [2] + torch.randint(3, 262144, (40,), generator=g).tolist(),
               [2] + torch.randint(3, 20000, (600,), generator=g).tolist()]
    cache = DenseKVCache()
    cache.prepare([0, 1, 2], [len(p) for p in prompts])
    with torch.inference_mode():
        ids = torch.tensor([t for p in prompts for t in p])
        positions = torch.cat([torch.arange(len(p)) for p in prompts])
        ours = default_model.compute_logits(default_model(ids, positions, cache))
        theirs = torch.cat([hf(torch.tensor([p])).logits[0].float() for p in prompts])
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
    assert (ours - theirs).abs().max().item() <= 1e-3


# llama.cpp multiplies quantized weights with 8-bit-quantized activations and keeps an f16 KV cache, so its
# logits sit ~0.1-0.3 (at most ~1) away from the exact fp32 forward, which ours is (it equals transformers').
# Two near-tied tokens can therefore swap order: where the two models' margins between llama.cpp's pick and
# ours add up to less than MAX_SWING, either token is a faithful greedy step.
MAX_SWING = 1.0
# Fast numerics round activations to 8 bits in llama.cpp's blocks but sum in another fp32 order: the rounding steps
# that order flips cascade, so single logits stray up to ~2 (the gap bound below) and so may a near-tie's swing.
FAST_MAX_SWING = 2.0
FAST_NEAR_TIE = 0.5


def _llamacpp_cases():
    """One param per reference prompt: (case, eog ids)."""
    if not LLAMACPP_GREEDY.exists():
        return []
    data = json.loads(LLAMACPP_GREEDY.read_text(encoding="utf-8"))
    return [pytest.param(case, data["eog_token_ids"], id=case["name"]) for case in data["results"]]


@pytest.mark.slow
@pytest.mark.skipif(not LLAMACPP_GREEDY.exists(), reason="tests/data/llamacpp_greedy.json not generated yet")
@pytest.mark.parametrize(("case", "eog"), _llamacpp_cases())
def test_default_model_greedy_matches_llama_cpp(any_numerics_model, case, eog):
    """Fed llama.cpp's own prompt ids (no tokenizer involved), we continue as llama.cpp does.

    Teacher-forced on llama.cpp's tokens: our logit for each of its picks is close to its own logit, and each
    pick is our argmax or a near-tie swap. Free-running: our first 16 greedy tokens equal llama.cpp's up to the
    first near-tie where the picks differ.
    """
    prompt, generated = case["prompt_token_ids"], case["generated_token_ids"]
    seq = prompt + generated
    cache = DenseKVCache()
    cache.prepare([0], [len(seq)])
    with torch.inference_mode():
        logits = any_numerics_model.compute_logits(
            any_numerics_model(torch.tensor(seq), torch.arange(len(seq)), cache))
    logits = logits[len(prompt) - 1 : len(seq) - 1]
    steps = torch.arange(len(generated))
    picked = logits[steps, torch.tensor(generated)]
    llamacpp_logit = torch.tensor([best_logit for (_, best_logit), _ in case["top2"]])
    gaps = (picked - llamacpp_logit).abs()
    # fast numerics: single logits stray further (see FAST_MAX_SWING) while the mean stays as close
    fast = any_numerics_model.numerics == "fast"
    assert gaps.mean() < 0.5 and gaps.max() < (2.0 if fast else 1.5), f"logits far from llama.cpp's: {gaps.tolist()}"
    our_margin = logits.max(-1).values - picked  # 0 where we pick the same token
    llamacpp_margin = torch.tensor([best - runner_up for (_, best), (_, runner_up) in case["top2"]])
    swing = torch.where(our_margin > 0, our_margin + llamacpp_margin, 0.0)
    assert (swing < (FAST_MAX_SWING if fast else MAX_SWING)).all(), f"picks differ beyond a near-tie: {swing.tolist()}"

    expected = generated[:16]
    differ = (logits.argmax(-1) != torch.tensor(generated)).tolist()[:16]
    if any_numerics_model.numerics == "fast":
        # 8-bit activation rounding turns the fp32 summation-order difference between this batched pass and
        # token-by-token decode into ~0.2 of logit noise (as in llama.cpp itself): free-running, a llama.cpp
        # near-tie below FAST_NEAR_TIE may go either way.
        differ = [d or m < FAST_NEAR_TIE for d, m in zip(differ, llamacpp_margin.tolist())]
    agree = differ.index(True) if True in differ else len(expected)
    ours = greedy_generate(any_numerics_model, prompt, len(expected), eos_ids=eog)
    assert ours[:agree] == expected[:agree]
