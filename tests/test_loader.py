"""Loader and config: clear `ModelLoadError`s for bad inputs, and configs read the same from every layout."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import build_hf_model, llamacpp_permute, save_hf_dir, write_gguf

from nbllm.errors import ModelLoadError
from nbllm.loader import load_model
from nbllm.models import ModelConfig
from nbllm.models.config import MAX_ROPE_POSITIONS
from nbllm.models.weights import unpermute_qk_rows


def gemma_metadata(**overrides) -> dict:
    base = {
        "general.architecture": "gemma3",
        "gemma3.context_length": 32768,
        "gemma3.embedding_length": 640,
        "gemma3.block_count": 18,
        "gemma3.feed_forward_length": 2048,
        "gemma3.attention.head_count": 4,
        "gemma3.attention.head_count_kv": 1,
        "gemma3.attention.key_length": 256,
        "gemma3.attention.value_length": 256,
        "gemma3.attention.layer_norm_rms_epsilon": 1e-6,
        "gemma3.rope.freq_base": 1e6,
        "gemma3.attention.sliding_window": 512,
        "tokenizer.ggml.tokens": ["t"] * 1000,
    }
    return base | overrides


def test_gemma3_gguf_config_follows_llama_cpp():
    c = ModelConfig.from_gguf_metadata(gemma_metadata())
    assert (c.arch, c.vocab_size, c.num_layers, c.head_dim, c.num_kv_heads) == ("gemma3", 1000, 18, 256, 1)
    assert [i for i, s in enumerate(c.layer_is_sliding) if not s] == [5, 11, 17]  # every 6th layer is global
    assert (c.rope_theta, c.rope_local_theta, c.sliding_window) == (1e6, 10000.0, 512)
    assert c.query_scale == 256**-0.5 and c.embedding_multiplier == 640**0.5
    assert c.activation == "gelu_tanh" and c.qk_norm and c.final_logit_softcapping is None


def test_gguf_sliding_window_pattern_key_is_honoured():
    c = ModelConfig.from_gguf_metadata(gemma_metadata(**{"gemma3.attention.sliding_window_pattern": 3}))
    assert [i for i, s in enumerate(c.layer_is_sliding) if not s] == [2, 5, 8, 11, 14, 17]


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("gemma3.attention.head_count", 0, "must be positive"),
        ("gemma3.embedding_length", -5, "hidden_size"),
        ("gemma3.block_count", None, "block_count' is missing"),
        ("gemma3.feed_forward_length", np.array([1, 2]), "single integer"),
        ("gemma3.attention.head_count_kv", 3, "not a multiple"),
        ("gemma3.rope.dimension_count", 128, "partial rotary"),
        ("gemma3.rope.scaling.type", "yarn", "rope scaling 'yarn'"),
        ("general.architecture", "mamba", "'mamba' is not supported.*gemma3"),
    ],
)
def test_bad_gguf_metadata_is_a_model_load_error(key, value, match):
    md = gemma_metadata(**{key: value})
    if value is None:
        del md[key]
    with pytest.raises(ModelLoadError, match=match):
        ModelConfig.from_gguf_metadata(md, source="bad.gguf")


def test_absurd_context_length_allocates_no_giant_rope_table():
    c = ModelConfig.from_gguf_metadata(gemma_metadata(**{"gemma3.context_length": 1 << 40}))
    assert c.max_positions == MAX_ROPE_POSITIONS


def test_hf_config_old_and_new_layouts_agree():
    """transformers 4 keys (rope_theta, rope_scaling, rope_local_base_freq, sliding_window_pattern) == 5's."""
    hf = build_hf_model("gemma3").config.to_dict() | {"architectures": ["Gemma3ForCausalLM"]}
    new = ModelConfig.from_hf_config(hf)
    old = {k: v for k, v in hf.items() if k not in ("rope_parameters", "layer_types")}
    old |= {"rope_theta": 1e6, "rope_local_base_freq": 1e4, "sliding_window_pattern": 6}
    assert ModelConfig.from_hf_config(old) == new

    llama = build_hf_model("llama").config.to_dict() | {"architectures": ["LlamaForCausalLM"]}
    rope = llama.pop("rope_parameters")
    llama |= {"rope_theta": rope.pop("rope_theta"), "rope_scaling": rope}
    assert ModelConfig.from_hf_config(llama).rope_scaling["rope_type"] == "llama3"


def test_unpermute_inverts_llama_cpp_permute():
    w = torch.randn(4 * 8, 5)
    fix = unpermute_qk_rows(num_heads=4, num_kv_heads=2)
    permuted = torch.from_numpy(llamacpp_permute(w.numpy(), 4))
    assert torch.equal(fix("blk.0.attn_q.weight", permuted), w)
    k = torch.randn(2 * 8)
    assert torch.equal(fix("blk.3.attn_k.bias", torch.from_numpy(llamacpp_permute(k.numpy(), 2))), k)
    assert fix("blk.0.attn_v.weight", permuted) is permuted


def test_missing_tensor_names_file_tensor_and_shape(tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(build_hf_model("qwen2"), "qwen2", path, drop=frozenset({"blk.1.attn_k.bias"}))
    with pytest.raises(ModelLoadError, match=r"m\.gguf: tensor 'blk\.1\.attn_k\.bias' \(expected shape \(128,\)\) is missing"):
        load_model(path)


def test_wrong_shape_names_both_shapes(tmp_path):
    d = save_hf_dir(build_hf_model("llama"), tmp_path / "m")
    (st,) = d.glob("*.safetensors")
    tensors = load_file(st)
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(100, 256)
    save_file(tensors, st, metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"tensor 'blk\.0\.ffn_up\.weight' has shape \(100, 256\), expected \(512, 256\)"):
        load_model(d)


def test_directory_without_config_json(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)


def test_missing_path_and_garbage_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        load_model(tmp_path / "nope.gguf")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot read"):
        load_model(tmp_path)


def test_unknown_hf_architecture_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MambaForCausalLM"]}))
    with pytest.raises(ModelLoadError, match=r"config\.json: architecture 'MambaForCausalLM' is not supported.*Qwen3ForCausalLM"):
        load_model(tmp_path)


def test_unknown_gguf_architecture_lists_supported(tmp_path):
    path = tmp_path / "x.gguf"
    w = gguf.GGUFWriter(str(path), "mamba")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError, match=r"x\.gguf: architecture 'mamba' is not supported \(supported: llama, qwen2, qwen3, gemma3\)"):
        load_model(path)


def test_hf_dir_without_safetensors(tmp_path):
    config = build_hf_model("qwen3").config.to_dict() | {"architectures": ["Qwen3ForCausalLM"]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        load_model(tmp_path)


def test_gguf_weights_are_writable_not_views_of_the_read_only_mapping(tiny_model):
    """An in-place op on a loaded weight must not touch the file's read-only mmap (that would kill the process)."""
    path, _ = tiny_model("qwen2", "f32")
    model, _ = load_model(path)
    model.norm.weight.add_(1.0)
    model.layers[0].attn.q_proj.bias.mul_(2.0)
    assert torch.isfinite(model.norm.weight).all()
