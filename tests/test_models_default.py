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
    model, _ = load_model(default_model_path)
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


@pytest.mark.slow
@pytest.mark.skipif(not LLAMACPP_GREEDY.exists(), reason="tests/data/llamacpp_greedy.json not generated yet")
def test_default_model_greedy_matches_llama_cpp(default_model):
    """Fed llama.cpp's own prompt ids, our first 16 greedy tokens equal llama.cpp's.

    A divergence is only accepted at a step where llama.cpp's top two logits are within float noise of
    each other (its Q8 activations may legitimately flip a near-tie); the comparison stops there.
    """
    data = json.loads(LLAMACPP_GREEDY.read_text(encoding="utf-8"))
    for case in data["results"]:
        expected = case["generated_token_ids"][:16]
        ours = greedy_generate(default_model, case["prompt_token_ids"], len(expected), eos_ids=data["eog_token_ids"])
        for step, (a, b) in enumerate(zip(ours, expected)):
            if a != b:
                (_, best), (_, runner_up) = case["top2"][step]
                assert best - runner_up < 0.05, f"{case['name']}: step {step}: ours {a}, llama.cpp {b}"
                break
        else:
            assert ours == expected, case["name"]
