"""Layer offload: which device (and dtype) each part of a model runs on when its layers are split between the CPU
and a GPU, as llama.cpp's `-ngl` does — `LLM(model, device="cuda", n_gpu_layers=N)`.

Why: a model that does not fit a small GPU still gains from the layers that do. The last N decoder layers and the
output head (final norm + projection) run on the GPU, the token table and the first layers on the CPU, so the
hidden state crosses once per forward, at the first GPU layer. llama.cpp counts its output layer as one of the N
(`-ngl 1` offloads the head alone, `n_layer + 1` everything); here N counts decoder layers only, the head goes
with the last one, and N = the layer count is the plain GPU model (token table included). A larger N is clamped
with a warning; N = 0 is the plain CPU model.

Placed parts compute where their weights are: CPU parts in float32 over the int8 weights where the kernels run
(`Int8Linear`), GPU parts in the requested dtype over what the source builds for a CUDA device (a GGUF file's
Q4_K/Q5_0/Q6_K/Q8_0 weights in their packed bits, `GGUFLinear`; others dense). Split models run eagerly (no CUDA
graphs) and hand their logits to the sampler on the CPU.
Each layer's K/V live in a KV pool on that layer's device (`nbllm.engine.model_runner.KVPool`): one block id
addresses the same slots in every layer's pool, so block tables, the block manager and the radix cache never
know about devices.

Nothing here is specific to CUDA: any two `Place`s work (the CPU tests split a model between float32 and float64).
"""

from __future__ import annotations

import copy
import re
import warnings
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import torch
from gguf import GGMLQuantizationType

from nbllm.errors import NbllmError
from nbllm.models.config import ModelConfig
from nbllm.models.layers import RotaryEmbedding
from nbllm.models.weights import WeightSource

if TYPE_CHECKING:
    from nbllm.models.base import CausalLM

_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.")
_HEAD_TENSORS = ("output.", "output_norm.")


class PlacementError(NbllmError, ValueError):
    """An `n_gpu_layers` that cannot be honoured (a bad value, or combined with options it does not work with)."""


@dataclass(frozen=True)
class Place:
    """Where a part of the model runs: its device and its compute dtype."""

    device: torch.device
    dtype: torch.dtype


CPU = Place(torch.device("cpu"), torch.float32)


@dataclass(frozen=True)
class LayerPlacement:
    """The place of the token table (`embed`), of each decoder layer, and of the output head (final norm and
    projection)."""

    embed: Place
    layers: tuple[Place, ...]
    head: Place

    @property
    def places(self) -> list[Place]:
        """The distinct places, in forward order."""
        return list(dict.fromkeys((self.embed, *self.layers, self.head)))

    @cached_property
    def crossings(self) -> dict[int, Place]:
        """Where the hidden state moves: part index (a layer, or `len(layers)` for the head) → the place it moves
        to, for each part whose place differs from the part before it."""
        parts = (self.embed, *self.layers, self.head)
        return {i: parts[i + 1] for i in range(len(parts) - 1) if parts[i + 1] != parts[i]}

    def place_of_tensor(self, name: str) -> Place:
        """The place of the part that reads tensor `name` (GGUF naming)."""
        if (m := _LAYER_TENSOR.match(name)) is not None:
            return self.layers[int(m.group(1))]
        return self.head if name.startswith(_HEAD_TENSORS) else self.embed


def gpu_layer_count(n_gpu_layers: int | None, num_layers: int) -> int:
    """How many decoder layers go to the GPU: None or -1 means all (llama-cpp-python's -1); more than the model
    has is clamped to all, with a warning."""
    if n_gpu_layers is None or n_gpu_layers == -1:
        return num_layers
    if n_gpu_layers < 0:
        raise PlacementError(f"n_gpu_layers must be 0..{num_layers} (or -1 for all), got {n_gpu_layers}")
    if n_gpu_layers > num_layers:
        warnings.warn(f"nbllm: n_gpu_layers={n_gpu_layers} is more than the model's {num_layers} layers; "
                      f"placing all {num_layers} on the GPU", stacklevel=4)
        return num_layers
    return n_gpu_layers


def plan_layer_offload(num_layers: int, n_gpu_layers: int | None, gpu: Place, cpu: Place = CPU) -> LayerPlacement:
    """The last `n_gpu_layers` decoder layers (clamped, see `gpu_layer_count`) and the head on `gpu`, the rest on
    `cpu`; everything on `gpu` when all layers are, everything on `cpu` when none is."""
    n = gpu_layer_count(n_gpu_layers, num_layers)
    if n == num_layers:
        return LayerPlacement(gpu, (gpu,) * num_layers, gpu)
    return LayerPlacement(cpu, (cpu,) * (num_layers - n) + (gpu,) * n, gpu if n else cpu)


def is_split(placement: LayerPlacement) -> bool:
    return len(placement.places) > 1


def source_at(source: WeightSource, place: Place) -> WeightSource:
    """`source` serving its tensors as `place.dtype` on `place.device`; the same open file and decode caches.

    A shallow copy on purpose: a second source over the same file would keep a second decode cache that
    overwrites the first's file on save. Quantized weights stay int8 only where `source` chose int8 (the CPU in
    float32); anywhere else they are what `WeightSource.linear` builds for that device.
    """
    view = copy.copy(source)
    view.device, view.dtype = place.device, place.dtype
    view.int8 = source.int8 and place == CPU
    view.packed_on_gpu = place.device.type == "cuda"  # offloaded GPU layers keep GGUF bits: llama.cpp's VRAM use
    return view


class PlacedWeights(WeightSource):
    """`base`'s tensors, each served on the place of the part that reads it (`LayerPlacement.place_of_tensor`).

    The model code is unchanged: it asks for `blk.3.attn_q` and gets it on layer 3's device. `dtype`/`device` are
    the token table's (what the model's embedding scale and rotary tables are built for).
    """

    def __init__(self, base: WeightSource, placement: LayerPlacement) -> None:
        super().__init__(base.path, dtype=placement.embed.dtype, device=placement.embed.device, fixups=None,
                         llamacpp_numerics=base.llamacpp_numerics, int8=base.int8)
        self.base, self.placement = base, placement
        self._sources = {place: source_at(base, place) for place in placement.places}

    def at(self, place: Place) -> WeightSource:
        return self._sources[place]

    def names(self) -> frozenset[str]:
        return self.base.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(name)

    def ggml_type(self, name: str) -> GGMLQuantizationType:
        return self.base.ggml_type(name)

    def _read(self, name: str) -> torch.Tensor:
        return self.base._read(name)

    def tensor(self, name: str, shape: tuple[int, ...], *, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.at(self.placement.place_of_tensor(name)).tensor(name, shape, dtype=dtype)

    def linear(self, prefix: str, out_features: int, in_features: int, *, bias: bool | None = None) -> torch.nn.Module:
        """The linear `prefix` as the source of its part's place builds it (int8 on the CPU, packed GGUF blocks on a
        GPU: `WeightSource.linear` and its GGUF override)."""
        source = self.at(self.placement.place_of_tensor(f"{prefix}.weight"))
        return source.linear(prefix, out_features, in_features, bias=bias)

    def finish(self) -> None:
        self.base.finish()


def build_placed_model(model_class: type[CausalLM], config: ModelConfig, weights: WeightSource,
                       placement: LayerPlacement) -> CausalLM:
    """`model_class` from `weights` (a source opened for the CPU in float32) with every part on its place.

    A placement on one place is the plain model there; a split one also gets its own copy of the shared rotary
    tables on each layer's device, and, for a tied head away from the token table, the head's own copy of the
    table (as llama.cpp duplicates it).
    """
    if not is_split(placement):
        return model_class(config, source_at(weights, placement.embed))
    placed = PlacedWeights(weights, placement)
    model = model_class(config, placed)
    _copy_rotary_tables(model, placement)
    if config.tie_word_embeddings and placement.head != placement.embed:
        model.lm_head = placed.at(placement.head).linear("token_embd", config.vocab_size, config.hidden_size,
                                                         bias=False)
    model.placement = placement
    return model


def _copy_rotary_tables(model: CausalLM, placement: LayerPlacement) -> None:
    """Layers share rotary modules (built on the token table's device): give each device its own copy."""
    copies: dict[tuple[int, torch.device], RotaryEmbedding] = {}
    for layer, place in zip(model.layers, placement.layers, strict=True):
        for module in layer.modules():
            for name, child in list(module.named_children()):
                if isinstance(child, RotaryEmbedding) and child.cos.device != place.device:
                    key = (id(child), place.device)
                    if key not in copies:
                        copies[key] = copy.deepcopy(child).to(place.device)
                    setattr(module, name, copies[key])


def layer_places(model: CausalLM) -> list[Place]:
    """Each decoder layer's place (where its K/V live): the placement's, or for a model on one device, that
    device and the model's dtype."""
    if model.placement is not None:
        return list(model.placement.layers)
    weight = model.norm.weight
    return [Place(weight.device, weight.dtype)] * len(model.layers)
