"""A GGUF file or an HF safetensors directory → a model on a device, with its config.

Both formats become a `WeightSource` that serves tensors under GGUF names, so the architecture code is the
same whatever the file: the GGUF source decodes quantized tensors (`nbllm.gguf.quants`), the safetensors
source maps HF names through gguf's `TensorNameMap` and reads over mmap (`safe_open`). Per-architecture
format quirks come from the `ArchSpec` as fixups (llama.cpp's permuted Llama q/k rows, HF Gemma's norm offset).
On the CPU in fp32, a GGUF file's quantized weights stay quantized (int8 codes + group scales, repacked once and
cached like the dequantized tensors; `nbllm.gguf.repack`) and run on the int8 kernels. With `n_gpu_layers`, a CUDA
load splits the layers between the CPU and the GPU (`nbllm.models.placement`), and the GPU layers' weights of the
types the Triton kernels read (Q4_K, Q5_0, Q6_K, Q8_0) stay in their GGUF bits (`GGUFLinear`).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import replace
from functools import cache
from pathlib import Path
from typing import Literal

import gguf
import torch
from safetensors import safe_open
from torch import nn

from nbllm.errors import ModelLoadError
from nbllm.gguf import GGUFFile, open_gguf
from nbllm.gguf.dequant_cache import DequantCache, file_identity
from nbllm.gguf.quants import dequantize
from nbllm.gguf.repack import Int8Weight, repack
from nbllm.kernels.cpu_int8_gemm import unavailable_reason
from nbllm.models.base import CausalLM
from nbllm.models.config import ModelConfig
from nbllm.models.llamacpp_numerics import apply_llamacpp_numerics
from nbllm.models.placement import Place, build_placed_model, plan_layer_offload
from nbllm.models.registry import ArchSpec, spec_for_gguf, spec_for_hf
from nbllm.models.weights import Fixup, WeightSource, shift_norms, unpermute_qk_rows

# Multimodal checkpoints nest the text model; these prefixes are renamed to the text-only layout first.
_HF_PREFIXES = (
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
)


# safetensors dtype names -> the GGML type llama.cpp would keep them as.
_GGML_FLOAT_TYPES = {"F32": gguf.GGMLQuantizationType.F32, "F16": gguf.GGMLQuantizationType.F16,
                     "BF16": gguf.GGMLQuantizationType.BF16}

# Files smaller than this decode faster than a cache entry is written and checked.
_DEQUANT_CACHE_MIN_BYTES = 32 << 20


class GGUFWeights(WeightSource):
    def __init__(self, file: GGUFFile, *, dtype: torch.dtype, device: torch.device, fixups: Fixup | None,
                 llamacpp_numerics: bool = False, int8: bool = False, int8_activations: bool = False) -> None:
        super().__init__(file.path, dtype=dtype, device=device, fixups=fixups, llamacpp_numerics=llamacpp_numerics,
                         int8=int8, int8_activations=int8_activations)
        self.file = file
        self._names = frozenset(file.tensors)
        big = file.path.stat().st_size >= _DEQUANT_CACHE_MIN_BYTES
        identity = file_identity(file) if big else None
        self.cache = DequantCache(file, identity=identity) if big else None
        self.int8_cache = DequantCache(file, kind="int8", identity=identity) if big and int8 else None

    def names(self) -> frozenset[str]:
        return self._names

    def shape(self, name: str) -> tuple[int, ...]:
        return self.file.tensors[name].shape

    def ggml_type(self, name: str) -> gguf.GGMLQuantizationType:
        return self.file.tensors[name].qtype

    def _read(self, name: str) -> torch.Tensor:
        cached = self.cache.get(name) if self.cache is not None else None
        if cached is not None:
            return cached
        info = self.file.tensors[name]
        tensor = dequantize(self.file.tensor_bytes_torch(name), info.qtype, info.shape, tensor_name=name)
        if info.qtype == gguf.GGMLQuantizationType.F32:
            tensor = tensor.clone()  # F32 decodes to a view of the read-only mmap: a write there kills the process
        if self.cache is not None:
            self.cache.put(name, tensor)
        return tensor

    def linear(self, prefix: str, out_features: int, in_features: int, *, bias: bool | None = None) -> nn.Module:
        """With `packed_on_gpu` (offloaded GPU layers), a weight of a type the Triton kernels read keeps its GGUF
        bits (`GGUFLinear`: a quarter of bf16's bytes for Q4_K); everything else as `WeightSource.linear` builds
        it. The token table stays dense: it is also the embedding lookup. A whole-model GPU load stays dense: the
        packed GEMV beats bf16 at decode (41% of its roofline, 1.7x bf16 on the 8B shape) but the packed GEMM is
        8-10x slower than bf16 at prefill so far (benchmarks/RESULTS.md)."""
        name = f"{prefix}.weight"
        if (self.device.type != "cuda" or not self.packed_on_gpu or prefix == "token_embd" or self.llamacpp_numerics
                or not self.has(name) or self.ggml_type(name) not in _gpu_kernel_types()):
            return super().linear(prefix, out_features, in_features, bias=bias)
        from nbllm.models.gpu_quant_linear import GGUFLinear

        self._check(name, (out_features, in_features))
        if bias is None:
            bias = self.has(f"{prefix}.bias")
        bias_tensor = self.tensor(f"{prefix}.bias", (out_features,)) if bias else None
        fixups = self.fixups
        row_fixup = None if fixups is None else (lambda rows: fixups(name, rows))  # rows are whole blocks
        return GGUFLinear.from_gguf(self.file.tensor_bytes_torch(name), self.ggml_type(name),
                                    (out_features, in_features), bias=bias_tensor, device=self.device,
                                    row_fixup=row_fixup, tensor_name=name)

    def _int8_weight(self, name: str) -> Int8Weight | None:
        cache = self.int8_cache
        if cache is not None and (q := cache.get(f"{name}.q")) is not None:
            if q.numel() == 0:  # recorded as not repackable
                return None
            return Int8Weight(q, cache.get(f"{name}.scale"), cache.get(f"{name}.offset"))
        info = self.file.tensors[name]
        packed = repack(self.file.tensor_bytes_torch(name), info.qtype, info.shape, tensor_name=name)
        if cache is not None:
            parts = packed.tensors() if packed is not None else {"q": torch.empty(0, dtype=torch.int8)}
            for suffix, t in parts.items():
                cache.put(f"{name}.{suffix}", t)
        return packed

    def finish(self) -> None:
        for cache in (self.cache, self.int8_cache):
            if cache is not None:
                cache.save()


class SafetensorsWeights(WeightSource):
    def __init__(self, directory: Path, files: list[Path], arch: str, num_layers: int, *,
                 dtype: torch.dtype, device: torch.device, fixups: Fixup | None, llamacpp_numerics: bool = False) -> None:
        super().__init__(directory, dtype=dtype, device=device, fixups=fixups, llamacpp_numerics=llamacpp_numerics)
        name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], num_layers)
        self._handles = []
        self._where: dict[str, tuple[int, str]] = {}  # GGUF name -> (file index, HF name)
        for i, file in enumerate(files):
            try:
                handle = safe_open(str(file), framework="pt")
            except Exception as exc:  # safetensors raises its own error types for corrupt headers
                raise ModelLoadError(f"{file}: cannot read as safetensors: {exc}") from None
            self._handles.append(handle)
            for hf_name in handle.keys():
                name = hf_name
                for old, new in _HF_PREFIXES:
                    if name.startswith(old):
                        name = new + name[len(old):]
                mapped = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
                if mapped is not None:
                    self._where[mapped] = (i, hf_name)
        self._names = frozenset(self._where)

    def names(self) -> frozenset[str]:
        return self._names

    def shape(self, name: str) -> tuple[int, ...]:
        i, hf_name = self._where[name]
        return tuple(self._handles[i].get_slice(hf_name).get_shape())

    def ggml_type(self, name: str) -> gguf.GGMLQuantizationType:
        i, hf_name = self._where[name]
        return _GGML_FLOAT_TYPES[self._handles[i].get_slice(hf_name).get_dtype()]

    def _read(self, name: str) -> torch.Tensor:
        i, hf_name = self._where[name]
        return self._handles[i].get_tensor(hf_name)


Numerics = Literal["fast", "exact", "llamacpp"]


def load_model(
    path: str | Path | GGUFFile,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    numerics: Numerics = "fast",
    int8: bool | None = None,
    n_gpu_layers: int | None = None,
) -> tuple[CausalLM, ModelConfig]:
    """Load a GGUF file (a path, or one already open) or an HF safetensors directory; raises `ModelLoadError`
    naming the file on any problem.

    `numerics="fast"` (the default) is "exact" except that int8 CPU weights round their layer's input to int8 as
    llama.cpp does for the weight's type and multiply in integers (`Int8Linear`: llama.cpp's speed and rounding);
    `"exact"` computes in `dtype` over the dequantized weights (fp32: equal to transformers);
    `"llamacpp"` reproduces llama.cpp's AVX2 CPU backend bit for bit (`nbllm.models.llamacpp_numerics`; fp32 only,
    run through `nbllm.models.llamacpp_forward.llamacpp_logits` with a `LlamaCppKVCache`): slow, for agreement
    with llama.cpp's greedy picks.

    `int8`: keep a GGUF file's quantized weights quantized (`Int8Linear`: a quarter of the memory, faster decode;
    with exact numerics the same outputs up to fp32 summation order). None (default): when loading float32 to the
    CPU with fast or exact numerics and the kernels build here (else dense, with a warning saying why); True:
    required; False: dense.
    llama.cpp numerics stay dense by default: that mode exists to reproduce llama.cpp's picks at near-ties, where
    its 8-bit activation rounding turns any change of fp32 summation order into a different token.

    `n_gpu_layers` with a CUDA `device`: the last that many decoder layers and the output head on the GPU in
    `dtype`, the token table and the other layers on the CPU in float32 (`nbllm.models.placement`; None: all on
    the GPU, 0: all on the CPU, more than the model has: all, with a warning). Ignored on a CPU `device`.
    """
    device = torch.device(device)
    if n_gpu_layers is None or device.type == "cpu":
        weights, config, spec = open_weights(path, device=device, dtype=dtype, numerics=numerics, int8=int8)
        model = spec.model_class(config, weights)
    else:  # opened for the CPU first: the layer count decides what goes where
        weights, config, spec = open_weights(path, numerics=numerics, int8=int8)
        gpu = Place(_indexed(device), dtype)
        model = build_placed_model(spec.model_class, config, weights,
                                   plan_layer_offload(config.num_layers, n_gpu_layers, gpu))
    weights.finish()
    if numerics == "llamacpp":
        scaled_rope = config.rope_scaling is not None or weights.has("rope_freqs.weight")
        apply_llamacpp_numerics(model, weights, scaled_rope=scaled_rope)
    return model.eval(), config


def open_weights(
    path: str | Path | GGUFFile,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    numerics: Numerics = "fast",
    int8: bool | None = None,
) -> tuple[WeightSource, ModelConfig, ArchSpec]:
    """The weight source, config and architecture of a model file, before any weight is read (`load_model`'s
    arguments); a caller that builds the model itself (a tensor-parallel shard) starts here."""
    if numerics not in ("fast", "exact", "llamacpp"):
        raise ModelLoadError(f"unknown numerics {numerics!r}: use 'fast', 'exact' or 'llamacpp'")
    if numerics == "llamacpp" and dtype != torch.float32:
        raise ModelLoadError(f"numerics='llamacpp' computes in float32, not {dtype}")
    device = torch.device(device)
    llamacpp = numerics == "llamacpp"
    int8 = _use_int8(False if int8 is None and llamacpp else int8, device, dtype)
    if isinstance(path, GGUFFile):
        return _open_gguf(path, dtype, device, numerics, int8)
    if (path := Path(path)).is_dir():
        return _open_hf(path, dtype, device, llamacpp)
    if path.is_file():
        return _open_gguf(open_gguf(path), dtype, device, numerics, int8)
    raise ModelLoadError(f"{path}: no such file or directory")


@cache
def _gpu_kernel_types() -> frozenset[gguf.GGMLQuantizationType]:
    """The GGUF types `GGUFLinear` reads (imported on first CUDA use: the kernels need Triton)."""
    from nbllm.models.gpu_quant_linear import KERNEL_KINDS

    return frozenset(KERNEL_KINDS)


def _indexed(device: torch.device) -> torch.device:
    """`cuda` as `cuda:<current>`: the device tensors report, so places compare equal to it."""
    return device if device.index is not None else torch.device(device.type, torch.cuda.current_device())


def _use_int8(requested: bool | None, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this load keeps quantized weights as int8 (see `load_model`'s `int8`)."""
    if requested is False:
        return False
    where = None if (device.type == "cpu" and dtype == torch.float32) else f"{device.type}/{dtype}"
    if where is not None:
        if requested:
            raise ModelLoadError(f"int8 weights run on the CPU in float32, not {where}; pass int8=None or False")
        return False
    reason = unavailable_reason()
    if reason is not None:
        if requested:
            raise ModelLoadError(f"int8 weights need the CPU kernels, which cannot run here: {reason}")
        warnings.warn(f"nbllm: dense fp32 CPU weights (slower, 4x the memory): {reason}", stacklevel=4)
        return False
    return True


def _open_gguf(
    file: GGUFFile, dtype: torch.dtype, device: torch.device, numerics: Numerics, int8: bool = False
) -> tuple[WeightSource, ModelConfig, ArchSpec]:
    path = file.path
    spec = spec_for_gguf(file.architecture, str(path))
    config = ModelConfig.from_gguf_metadata(file.metadata, source=str(path))
    # The metadata cannot say whether the head is tied: llama.cpp ties it when output.weight is absent.
    config = replace(config, tie_word_embeddings="output.weight" not in file.tensors)
    fixups = unpermute_qk_rows(config.num_heads, config.num_kv_heads) if spec.gguf_qk_permuted else None
    weights = GGUFWeights(file, dtype=dtype, device=device, fixups=fixups, llamacpp_numerics=numerics == "llamacpp",
                          int8=int8, int8_activations=numerics == "fast")
    return weights, config, spec


def _open_hf(
    path: Path, dtype: torch.dtype, device: torch.device, llamacpp: bool
) -> tuple[WeightSource, ModelConfig, ArchSpec]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{path}: not a model directory (no config.json); pass a GGUF file or an HF model folder")
    try:
        hf = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{config_file}: cannot read: {exc}") from None
    if not isinstance(hf, dict):
        raise ModelLoadError(f"{config_file}: expected a JSON object")
    spec = spec_for_hf(hf.get("architectures") or [], str(config_file))
    config = ModelConfig.from_hf_config(hf, source=str(config_file))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path}: no *.safetensors files (PyTorch .bin checkpoints are not supported)")
    fixups = shift_norms(spec.hf_norm_shift) if spec.hf_norm_shift else None
    weights = SafetensorsWeights(path, files, spec.name, config.num_layers, dtype=dtype, device=device, fixups=fixups,
                                 llamacpp_numerics=llamacpp)
    return weights, config, spec
