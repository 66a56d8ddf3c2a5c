"""Where model code gets its tensors: checked by name and shape, fixed up for the format, placed on a device.

Models name tensors the GGUF way (`blk.3.attn_q.weight`) whatever the file format; a source for another format
maps its own names onto those (see `nbllm.loader`). Before a byte is read, the source checks that the tensor
exists and has the shape the model expects, so a wrong or truncated file fails with one line naming the file,
the tensor and both shapes. Format quirks an architecture declares (`ArchSpec`) are undone here, once, as
`fixups`: llama.cpp's permuted Llama q/k rows, HF Gemma's `w` stored for `(1 + w)` norms.

With `int8=True` a source that has the quantized bytes (GGUF) builds `Int8Linear`s from them (the CPU int8 kernels,
`nbllm.gguf.repack`); every other weight, and every weight of other sources, stays dense.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

import torch
from gguf import GGMLQuantizationType

from nbllm.errors import ModelLoadError
from nbllm.models.layers import Linear
from nbllm.gguf.repack import ACTIVATION_BLOCK, Int8Weight
from nbllm.models.llamacpp_numerics import activation_rounding
from nbllm.models.quantized_linear import Int8Linear

Fixup = Callable[[str, torch.Tensor], torch.Tensor]


class WeightSource(ABC):
    """Tensors of one model file, by GGUF name, as `dtype` on `device`.

    `llamacpp_numerics`: the linears it builds round their input as llama.cpp does for each weight's stored type
    (`nbllm.models.llamacpp_numerics`); the tensors themselves are the same either way. `int8`: build quantized
    weights as `Int8Linear` where the source can (the caller checked the kernels run: fp32 on the CPU);
    `int8_activations`: those round their input to int8 as llama.cpp does for the weight's type (numerics="fast").
    """

    def __init__(
        self,
        path: Path,
        *,
        dtype: torch.dtype,
        device: torch.device,
        fixups: Fixup | None = None,
        llamacpp_numerics: bool = False,
        int8: bool = False,
        int8_activations: bool = False,
    ) -> None:
        self.path = path
        self.int8 = int8
        # Keep quantized blocks in their packed bits on a GPU, where the source can (GGUF): the layer-offload
        # path sets it (VRAM is what offloading is short of); a whole-model GPU load stays in `dtype` (faster).
        self.packed_on_gpu = False
        self.int8_activations = int8_activations
        self.dtype = dtype
        self.device = torch.device(device)
        self.fixups = fixups
        self.llamacpp_numerics = llamacpp_numerics

    @abstractmethod
    def names(self) -> frozenset[str]:
        """Every tensor name (GGUF naming) this source holds."""

    @abstractmethod
    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape of `name` (torch order), read without loading the tensor."""

    @abstractmethod
    def ggml_type(self, name: str) -> GGMLQuantizationType:
        """How `name` is stored, as a GGML type (an unquantized tensor: its float type)."""

    @abstractmethod
    def _read(self, name: str) -> torch.Tensor:
        """The tensor decoded to a float dtype on the CPU, safe to keep: never a view of a read-only mapping."""

    def _int8_weight(self, name: str) -> Int8Weight | None:
        """`name` in int8 form, before fixups; None where this source has none (the default: dense only)."""
        return None

    def finish(self) -> None:
        """Called once the model is built: a source may persist what it decoded (see `DequantCache`)."""

    def has(self, name: str) -> bool:
        return name in self.names()

    def tensor(self, name: str, shape: tuple[int, ...], *, dtype: torch.dtype | None = None) -> torch.Tensor:
        """`name` checked against `shape`, fixed up, and converted to `dtype` (default: the model's) and device."""
        self._check(name, shape)
        t = self._read(name)
        if self.fixups is not None:
            t = self.fixups(name, t)
        return t.to(device=self.device, dtype=dtype or self.dtype)

    def _check(self, name: str, shape: tuple[int, ...]) -> None:
        if not self.has(name):
            raise ModelLoadError(f"{self.path}: tensor {name!r} (expected shape {tuple(shape)}) is missing")
        actual = tuple(self.shape(name))
        if actual != tuple(shape):
            raise ModelLoadError(f"{self.path}: tensor {name!r} has shape {actual}, expected {tuple(shape)}")

    def linear(
        self, prefix: str, out_features: int, in_features: int, *, bias: bool | None = None
    ) -> Linear | Int8Linear:
        """The linear layer `{prefix}.weight` `[out, in]` plus `{prefix}.bias` `[out]`.

        `bias=True` requires the bias, `False` ignores it, `None` takes it when the file has it (llama.cpp loads
        Llama's attention biases the same way: optional).
        """
        name = f"{prefix}.weight"
        if bias is None:
            bias = self.has(f"{prefix}.bias")
        bias_tensor = self.tensor(f"{prefix}.bias", (out_features,)) if bias else None
        round_input = activation_rounding(self.ggml_type(name)) if self.llamacpp_numerics else None
        self._check(name, (out_features, in_features))
        packed = self._int8_weight(name) if self.int8 else None
        if packed is not None:
            if self.fixups is not None:
                packed = packed.map(lambda t: self.fixups(name, t))
            return Int8Linear(packed.map(lambda t: t.contiguous()), bias_tensor, round_input=round_input,
                              activation_block=ACTIVATION_BLOCK.get(self.ggml_type(name)) if self.int8_activations
                              else None)
        return Linear(self.tensor(name, (out_features, in_features)), bias_tensor, round_input=round_input)


def unpermute_qk_rows(num_heads: int, num_kv_heads: int) -> Fixup:
    """Undo llama.cpp's `LlamaModel.permute` on `attn_q`/`attn_k` weights and biases.

    The converter reorders each head's rows from rotate-half order to interleaved pairs (for GGML's normal
    rope); reversing that lets one NeoX-style rotary serve every file. Rows are whole quant blocks apart, so
    the same row permutation is valid on quantized data too.
    """

    def fixup(name: str, t: torch.Tensor) -> torch.Tensor:
        if ".attn_q." in name:
            heads = num_heads
        elif ".attn_k." in name:
            heads = num_kv_heads
        else:
            return t
        rows = t.shape[0]
        return t.reshape(heads, rows // heads // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)

    return fixup


def shift_norms(delta: float) -> Fixup:
    """Add `delta` to every RMSNorm weight: HF Gemma stores `w` and computes `x * (1 + w)`."""

    def fixup(name: str, t: torch.Tensor) -> torch.Tensor:
        return t.float() + delta if name.endswith("norm.weight") else t

    return fixup
