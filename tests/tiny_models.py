"""Tiny random models in every supported architecture, as HF safetensors dirs and as GGUF files.

No hub access here, so models are built in code: a transformers config with small sizes, weights redrawn at
scales that make activations O(1) (default inits give near-zero logits that would hide bugs), and a GGUF
written the way llama.cpp's `convert_hf_to_gguf.py` writes that architecture (metadata keys, tensor names,
Gemma's norm + 1, Llama's q/k row permutation, llama3 `rope_freqs`). Quantized GGUFs come with the HF model
rebuilt from the *dequantized* weights (gguf-py's reference decoder), so logits must agree to fp32 rounding.

Engine tests reuse these builders: `build_hf_model`, `save_hf_dir`, `write_gguf`, `hf_logits`.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import gguf
import numpy as np
import torch
import transformers
from gguf import GGMLQuantizationType as Q

VOCAB = 320
HIDDEN = 256  # a multiple of 256 so Q4_K (256-element blocks) applies to most weights

_COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=512, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)

# name -> (config class, model class, config kwargs)
TINY_ARCHS: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_hidden_layers=2, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=64))),
    "smollm": ("LlamaConfig", "LlamaForCausalLM", dict(  # Llama with a tied head and plain rope
        num_hidden_layers=2, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="default", rope_theta=100000.0))),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(
        num_hidden_layers=2, rms_norm_eps=1e-5, sliding_window=4, tie_word_embeddings=False, head_dim=64)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        num_hidden_layers=2, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0))),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(  # head_dim * heads != hidden, as in real Qwen3
        num_hidden_layers=2, head_dim=32, rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0))),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        num_hidden_layers=7, head_dim=64, query_pre_attn_scalar=64, sliding_window=4, rms_norm_eps=1e-6,
        final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh",
        rope_parameters={"full_attention": dict(rope_type="default", rope_theta=1000000.0),
                         "sliding_attention": dict(rope_type="default", rope_theta=10000.0)})),
}
# GGUF cannot express these (llama.cpp would run them differently), so they are tested from HF dirs only.
HF_ONLY_ARCHS = {"mistral"}
GGUF_ARCH = {"llama": "llama", "smollm": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3"}


def build_hf_model(arch: str, *, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A random fp32 HF model of `arch` (a key of `TINY_ARCHS`) with eager attention."""
    config_cls, model_cls, kwargs = TINY_ARCHS[arch]
    config = getattr(transformers, config_cls)(**(_COMMON | kwargs | overrides))
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    gemma = "Gemma" in model_cls
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.1 if "embed" in name else p.shape[-1] ** -0.5)
            elif name.endswith("norm.weight"):
                p.normal_(0.0 if gemma else 1.0, 0.3)
            else:  # biases
                p.normal_(0.0, 0.5)
    return model


def save_hf_dir(model: transformers.PreTrainedModel, directory: Path) -> Path:
    model.save_pretrained(directory, safe_serialization=True)
    return directory


@torch.no_grad()
def hf_logits(model: transformers.PreTrainedModel, prompt: list[int]) -> torch.Tensor:
    """Logits `[len(prompt), vocab]` of one unpadded prompt."""
    return model(torch.tensor([prompt])).logits[0].float()


def llamacpp_permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute` (rotate-half rows -> interleaved pairs), on float or quantized rows."""
    return rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """A plain Q4_K encoder (gguf-py has none): per 32-block scale/min, 6-bit packed, 4-bit values.

    Only needs to produce valid blocks; the reference model is rebuilt from gguf-py's decoding of these bytes.
    """
    rows, cols = x.shape
    sub = x.reshape(-1, 8, 32).astype(np.float32)  # blocks of 256 = 8 sub-blocks of 32
    lo = np.minimum(sub.min(-1), 0.0)
    scale = (sub.max(-1) - lo) / 15.0
    mins = -lo
    d = (scale.max(-1) / 63.0).astype(np.float16)
    dmin = (mins.max(-1) / 63.0).astype(np.float16)
    df, dminf = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    sc = np.clip(np.round(np.divide(scale, df, out=np.zeros_like(scale), where=df > 0)), 0, 63).astype(np.uint8)
    m = np.clip(np.round(np.divide(mins, dminf, out=np.zeros_like(mins), where=dminf > 0)), 0, 63).astype(np.uint8)
    step = (df * sc)[..., None]
    q = np.divide(sub + (dminf * m)[..., None], step, out=np.zeros_like(sub), where=step > 0)
    q = np.clip(np.round(q), 0, 15).astype(np.uint8)  # [blocks, 8, 32]
    scales = np.zeros((sub.shape[0], 12), dtype=np.uint8)
    scales[:, :4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    scales[:, 4:8] = (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6)
    scales[:, 8:] = (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(-1, 128)  # each 64-chunk: low nibble sub 2c, high 2c+1
    block = np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), scales, qs], axis=1)
    return block.reshape(rows, -1)


def _quantize(w: np.ndarray, qtype: Q) -> np.ndarray:
    return quantize_q4_k(w) if qtype == Q.Q4_K else gguf.quants.quantize(w, qtype)


def write_gguf(
    model: transformers.PreTrainedModel, tiny_arch: str, path: Path, qtype: Q | None = None, *, drop: frozenset = frozenset()
) -> transformers.PreTrainedModel:
    """Write `model` (built as `tiny_arch`) as llama.cpp's converter would; return the HF model that matches
    the file's decoded weights (`model` itself when unquantized).

    With `qtype`, every 2-D weight whose last dim is a whole number of blocks is stored quantized (others F32).
    Tensors named (GGUF names) in `drop` are left out, to test the loader's errors.
    """
    cfg = model.config
    arch = GGUF_ARCH[tiny_arch]
    gemma = arch == "gemma3"
    reference = copy.deepcopy(model) if qtype is not None else model
    ref_params = dict(reference.named_parameters())
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.num_hidden_layers)

    writer = gguf.GGUFWriter(str(path), arch)
    _write_metadata(writer, arch, cfg)
    for hf_name, tensor in model.state_dict().items():
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if (hf_name == "lm_head.weight" and cfg.tie_word_embeddings) or name in drop:
            continue
        data = tensor.float().numpy()
        raw_dtype = None
        block = gguf.GGML_QUANT_SIZES[qtype][0] if qtype is not None else 0
        if qtype is not None and data.ndim == 2 and data.shape[-1] % block == 0:
            data = _quantize(data, qtype)
            decoded = gguf.quants.dequantize(data, qtype).reshape(tensor.shape)
            with torch.no_grad():
                ref_params[hf_name].copy_(torch.from_numpy(decoded))
            raw_dtype = qtype
        if gemma and name.endswith("norm.weight"):
            data = data + 1.0
        if arch == "llama" and ".attn_q." in name:
            data = llamacpp_permute(data, cfg.num_attention_heads)
        if arch == "llama" and ".attn_k." in name:
            data = llamacpp_permute(data, cfg.num_key_value_heads)
        writer.add_tensor(name, np.ascontiguousarray(data), raw_dtype=raw_dtype)
    for name, factors in _extra_tensors(arch, cfg):
        writer.add_tensor(name, factors)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return reference


def _write_metadata(w: gguf.GGUFWriter, arch: str, cfg) -> None:
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rope = cfg.rope_parameters.get("full_attention", cfg.rope_parameters)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    if arch == "llama":
        w.add_vocab_size(cfg.vocab_size)
        w.add_rope_dimension_count(head_dim)
    if arch == "gemma3":
        if cfg.final_logit_softcapping:
            w.add_final_logit_softcapping(cfg.final_logit_softcapping)
        w.add_sliding_window(cfg.sliding_window)
    w.add_tokenizer_model("llama")  # an SPM vocab of placeholder pieces: enough for id-level engine tests
    tokens, types = tiny_vocab(cfg.vocab_size)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores([-float(i) for i in range(cfg.vocab_size)])
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)


def tiny_vocab(size: int) -> tuple[list[str], list[int]]:
    """An SPM vocabulary that can spell any text: 4 control tokens, 256 byte-fallback tokens, then pieces."""
    control = ["<pad>", "<s>", "</s>", "<unk>"]
    pieces = [f"▁{w}" for w in "the a of to and in is it you that he was for on are with as I his they".split()]
    pieces += list("abcdefghijklmnopqrstuvwxyz") + ["▁"]
    tokens = control + [f"<0x{b:02X}>" for b in range(256)] + pieces
    tokens = (tokens + [f"<extra{i}>" for i in range(size)])[:size]
    types = [gguf.TokenType.CONTROL] * 4 + [gguf.TokenType.BYTE] * 256
    types = (types + [gguf.TokenType.NORMAL] * size)[:size]
    return tokens, [int(t) for t in types]


def _extra_tensors(arch: str, cfg) -> list[tuple[str, np.ndarray]]:
    """llama.cpp's `rope_freqs` for llama3 rope scaling (LlamaModel.generate_extra_tensors)."""
    rope = cfg.rope_parameters
    if arch != "llama" or rope.get("rope_type") != "llama3":
        return []
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_len = rope["original_max_position_embeddings"]
    freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_len / high:
            factors.append(1.0)
        elif wavelen > old_len / low:
            factors.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return [("rope_freqs.weight", np.array(factors, dtype=np.float32))]


def random_prompts(lengths: list[int], *, seed: int = 0, vocab: int = VOCAB) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]
