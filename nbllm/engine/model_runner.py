"""Runs one scheduled step through the model: batch tensors in, logits of the sequences that need tokens out.

The runner owns the KV pool (per layer, `[num_blocks, block_size, kv_heads, head_dim]` for K and for V) and turns a
`ScheduledBatch` into flat tensors the way vLLM does: the new tokens of every sequence concatenated, their
positions, the slot each one's K/V goes to, and per sequence its block table, query span and context length.
The model sees only the `AttentionBackend` seam: on the CPU `PagedAttention` stores K/V through the slot
mapping and attends through the block tables in torch (`nbllm.kernels.paged_attention`); on CUDA
`TritonPagedAttention` does the same with the Triton kernels, and steps where every sequence decodes one token
replay a CUDA graph (`nbllm.engine.cuda_graphs`), so a decode step is a handful of launches, not thousands.
A model whose layers are split between the CPU and a GPU (`nbllm.models.placement`) gets each layer's backend on
its own device (`PerLayerAttention`), runs eagerly (no CUDA graphs) and hands its logits over on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch

from nbllm.engine.block_manager import BlockTable
from nbllm.engine.sampler import SampleResult
from nbllm.engine.scheduler import ScheduledBatch
from nbllm.engine.sequence import Sequence
from nbllm.kernels import cpu_paged_attention
from nbllm.kernels.cpu_decoder import DecoderStep
from nbllm.kernels.cpu_library import kernels_own_the_threads
from nbllm.kernels.paged_attention import (
    PagedAttentionPlan,
    plan_paged_attention,
    run_paged_attention,
    store_kv,
)
from nbllm.models.attention import AttentionBackend
from nbllm.models.base import CausalLM
from nbllm.models.config import ModelConfig
from nbllm.models.placement import Place, layer_places


class KVPool:
    """K and V blocks of every layer, each layer's on its place (device and dtype): the model's, or per layer for
    a model split over devices. One block id addresses the same slots in every layer, wherever it lives."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, *, places: Seq[Place]) -> None:
        shape = (num_blocks, block_size, config.num_kv_heads, config.head_dim)
        # Uninitialised on purpose: zeroing a GiB costs a second at start-up, and attention never reads a slot
        # before it is written (stale slots inside gathered blocks are zeroed by the kernel).
        self.k = [torch.empty(shape, dtype=p.dtype, device=p.device) for p in places]
        self.v = [torch.empty(shape, dtype=p.dtype, device=p.device) for p in places]
        self.num_blocks, self.block_size = num_blocks, block_size

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * itemsize

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: give each `dst` block the K/V of its `src` before a sequence writes into it."""
        if not copies:
            return
        indices: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        for cache in (*self.k, *self.v):
            if cache.device not in indices:
                indices[cache.device] = (torch.tensor([s for s, _ in copies], device=cache.device),
                                         torch.tensor([d for _, d in copies], device=cache.device))
            src, dst = indices[cache.device]
            cache.index_copy_(0, dst, cache.index_select(0, src))


def gpu_kv_memory_bytes(device: torch.device, fraction: float = 0.85) -> int:
    """KV-pool bytes for a CUDA device whose weights are loaded: `fraction` of the free memory, the rest left
    for activations, logits and CUDA-graph pools."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(free * fraction)


@dataclass
class PagedAttention:
    """The CPU `AttentionBackend` of one step: where this step's K/V go and which blocks each sequence reads."""

    pool: KVPool
    slot_mapping: torch.Tensor  # [T] int64
    block_tables: torch.Tensor  # [B, max_blocks] int32
    cu_query_lens: torch.Tensor  # [B + 1] int32
    context_lens: torch.Tensor  # [B] int32
    # The index work depends on the step and the window, not the layer: planned once per window per step.
    plans: dict[int | None, PagedAttentionPlan] = field(default_factory=dict)

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                sliding_window: int | None) -> torch.Tensor:
        k_cache, v_cache = self.pool.k[layer], self.pool.v[layer]
        store_kv(k_cache, v_cache, k, v, self.slot_mapping)
        return run_paged_attention(q, k_cache, v_cache, self._plan(k_cache, sliding_window), scale=scale)

    def _plan(self, k_cache: torch.Tensor, sliding_window: int | None) -> PagedAttentionPlan:
        plan = self.plans.get(sliding_window)
        if plan is None:
            plan = self.plans[sliding_window] = plan_paged_attention(
                k_cache, block_tables=self.block_tables, cu_query_lens=self.cu_query_lens,
                context_lens=self.context_lens, sliding_window=sliding_window)
        return plan

    def native_step(self) -> DecoderStep | None:
        """This step as the one-call CPU decoder takes it (`nbllm.models.native_cpu`): the C++ attention's
        arguments as the plan makes them (each layer brings its own window), or None where the pools are not
        that kernel's (fp32 on this CPU)."""
        native = self._plan(self.pool.k[0], None).native
        if native is None or not all(cpu_paged_attention.supports(k) for k in self.pool.k):
            return None
        return DecoderStep(slots=self.slot_mapping.to(torch.int64).contiguous(), block_tables=native.block_tables,
                           cu_query_lens=native.cu_query_lens, context_lens=native.context_lens, seqs=native.seqs,
                           k_caches=self.pool.k, v_caches=self.pool.v)


@dataclass
class TritonPagedAttention:
    """The CUDA `AttentionBackend`: Triton KV store, then decode (split-K) or extend attention.

    `num_splits` set means every sequence has exactly one query (a decode step, possibly a padded CUDA-graph
    batch whose extra rows have context 0 and slot -1); otherwise `max_query_len` bounds the extend launch.
    No method reads device memory on the host, so a forward through this backend can be graph-captured.
    """

    pool: KVPool
    slot_mapping: torch.Tensor  # [T]
    block_tables: torch.Tensor  # [B, max_blocks] int32
    cu_query_lens: torch.Tensor | None  # [B + 1] int32; unused in decode
    context_lens: torch.Tensor  # [B] int32
    max_query_len: int = 1
    num_splits: int | None = None

    def kv_destination(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`layer`'s pools and this step's slots, for a layer that stores its K/V in its rotary kernel."""
        return self.pool.k[layer], self.pool.v[layer], self.slot_mapping

    def forward_rotary(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                       cos: torch.Tensor, sin: torch.Tensor, *, scale: float, sliding_window: int | None,
                       q_weight: torch.Tensor | None = None, k_weight: torch.Tensor | None = None,
                       eps: float = 0.0) -> torch.Tensor | None:
        """A decode step's q/k norms (optional), rotary, K/V store and attention in one launch (`DecodeRope`);
        None where that does not apply (not a decode step, a head size it does not take): the layer then rotates
        and calls `forward`."""
        from nbllm.kernels.decode_attention import DecodeRope, decode_attention

        if self.num_splits is None or not DecodeRope.supports(q.shape[-1]):
            return None
        return decode_attention(
            q, self.pool.k[layer], self.pool.v[layer], block_tables=self.block_tables, context_lens=self.context_lens,
            scale=scale, sliding_window=sliding_window, num_splits=self.num_splits,
            rope=DecodeRope(k, v, positions, cos, sin, self.slot_mapping, q_weight, k_weight, eps))

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                sliding_window: int | None, stored: bool = False) -> torch.Tensor:
        from nbllm.kernels import decode_attention, extend_attention
        from nbllm.kernels import store_kv as triton_store

        k_cache, v_cache = self.pool.k[layer], self.pool.v[layer]
        if not stored:
            triton_store.store_kv(k_cache, v_cache, k, v, self.slot_mapping)
        if self.num_splits is not None:
            return decode_attention.decode_attention(
                q, k_cache, v_cache, block_tables=self.block_tables, context_lens=self.context_lens, scale=scale,
                sliding_window=sliding_window, num_splits=self.num_splits)
        return extend_attention.extend_attention(
            q, k_cache, v_cache, block_tables=self.block_tables, cu_query_lens=self.cu_query_lens,
            context_lens=self.context_lens, max_query_len=self.max_query_len, scale=scale,
            sliding_window=sliding_window)


@dataclass
class PerLayerAttention:
    """The backend of a model split over devices: each layer attends through its own device's backend."""

    backends: Seq[AttentionBackend]  # one per layer

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                sliding_window: int | None) -> torch.Tensor:
        return self.backends[layer].forward(layer, q, k, v, scale=scale, sliding_window=sliding_window)


@dataclass
class StepInputs:
    """One step's flat batch on the host (numpy), before it goes to the device."""

    ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64
    slots: np.ndarray  # [T] int64
    cu_query_lens: np.ndarray  # [B + 1] int32
    context_lens: np.ndarray  # [B] int32
    block_tables: np.ndarray  # [B, max_blocks] int32
    logit_rows: list[int]  # rows of the hidden states whose logits the caller needs
    ready: list[Sequence]  # empty on tensor-parallel workers, which see the arrays only

    @property
    def is_decode(self) -> bool:
        """Every sequence computes exactly one token and needs its logits."""
        return len(self.ids) == len(self.context_lens) == len(self.logit_rows)


def prepare_inputs(batch: ScheduledBatch, block_size: int) -> StepInputs:
    """Flatten the scheduled sequences. A decode step (every sequence computes its one pending token and no
    draft) takes a per-sequence path with no per-token index arithmetic; any other step vectorises that
    arithmetic, since a prefill step has thousands of tokens. Both give the same arrays for a decode step."""
    seqs = batch.seqs
    if all(n == 1 and seq.num_computed == len(seq.token_ids) - 1 and not seq.spec_token_ids for seq, n in seqs):
        return _prepare_decode(batch, block_size)
    return _prepare_general(batch, block_size)


def _prepare_decode(batch: ScheduledBatch, block_size: int) -> StepInputs:
    """One token a sequence: its position is `num_computed`, its slot one lookup in its block table."""
    ready = [seq for seq, _ in batch.seqs]
    positions = [seq.num_computed for seq in ready]
    tables = [seq.table for seq in ready]
    slots = [t.blocks[pos // block_size] * block_size + pos % block_size for t, pos in zip(tables, positions)]
    count = len(ready)
    positions_np = np.array(positions, dtype=np.int64)
    return StepInputs(
        ids=np.array([seq.token_ids[-1] for seq in ready], dtype=np.int64), positions=positions_np,
        slots=np.array(slots, dtype=np.int64), cu_query_lens=np.arange(count + 1, dtype=np.int32),
        context_lens=(positions_np + 1).astype(np.int32), block_tables=_block_tables(tables),
        logit_rows=list(range(count)), ready=ready,
    )


def _prepare_general(batch: ScheduledBatch, block_size: int) -> StepInputs:
    """Any mix of prefill chunks, decodes and drafts; the per-token index arithmetic is vectorised."""
    ids: list[int] = []
    starts, counts, tables, logit_rows, ready = [], [], [], [], []
    total = 0
    for seq, n in batch.seqs:
        start, end = seq.num_computed, seq.num_computed + n
        draft = seq.spec_token_ids
        ids.extend(seq.token_ids[start:end])
        ids.extend(draft[: max(0, end - seq.num_tokens)])
        starts.append(start)
        counts.append(n)
        tables.append(seq.table)
        total += n
        if end == seq.num_tokens + len(draft):
            ready.append(seq)
            logit_rows.extend(range(total - 1 - len(draft), total))
    counts_np = np.asarray(counts, dtype=np.int64)
    cu = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts_np, out=cu[1:])
    starts_np = np.asarray(starts, dtype=np.int64)
    positions = np.arange(total, dtype=np.int64) - np.repeat(cu[:-1] - starts_np, counts_np)
    table = _block_tables(tables)
    owner = np.repeat(np.arange(len(tables)), counts_np)
    slots = table[owner, positions // block_size].astype(np.int64) * block_size + positions % block_size
    return StepInputs(
        ids=np.asarray(ids, dtype=np.int64), positions=positions, slots=slots, cu_query_lens=cu.astype(np.int32),
        context_lens=(starts_np + counts_np).astype(np.int32), block_tables=table, logit_rows=logit_rows,
        ready=ready,
    )


def _block_tables(tables: list[BlockTable]) -> np.ndarray:
    """The tables' block ids as one zero-padded `[B, max_blocks]` array, from each table's cached array
    (`BlockTable.array`: ids are not converted from Python ints again every step) through one concatenation
    and a row-major mask of the filled cells (no numpy call per table)."""
    rows = [t.array() for t in tables]
    widths = np.array([len(row) for row in rows])
    table = np.zeros((len(rows), widths.max()), dtype=np.int32)
    table[np.arange(table.shape[1]) < widths[:, None]] = np.concatenate(rows)
    return table


class ModelRunner:
    """`execute(batch)`: one step of the model over the KV pool, on the CPU or on CUDA.

    On CUDA, decode steps of at most `max_graph_batch` sequences replay CUDA graphs captured on first use for
    batch sizes 1, 2, 4, 8, 16, 32, 48, ... (padded up to the next one); `cuda_graphs=False` runs them eagerly.
    """

    def __init__(self, model: CausalLM, config: ModelConfig, num_blocks: int, block_size: int, *,
                 cuda_graphs: bool = True, max_graph_batch: int = 256) -> None:
        self.model, self.config = model, config
        self.device = model.device
        # The model's own config: a tensor-parallel shard holds (and caches K/V for) only its share of the heads.
        self.places = layer_places(model)
        self.pool = KVPool(model.config, num_blocks, block_size, places=self.places)
        #: Set on rank 0 of a tensor-parallel group (`nbllm.distributed`): entered around each step, it first sends
        #: the step's copies and inputs to the other ranks, so every rank runs `run` with the same arguments, and
        #: keeps an interrupt from leaving the ranks halfway through the step.
        self.step_broadcast: Callable[[list[tuple[int, int]], StepInputs], AbstractContextManager] | None = None
        self.graphs = None
        self._replayed = False  # the last step replayed a decode graph
        # One GEMM for q/k/v and one for gate/up: a decode step is launch-bound on a GPU, call-bound on a CPU. On
        # the CPU only int8 weights are joined (bit-identical rows); a dense join would change MKL's blocking.
        for module in [m for m in model.modules() if hasattr(m, "fuse_projections")]:
            module.fuse_projections(dense=self.device.type == "cuda")
        if self.device.type == "cuda" and cuda_graphs:
            from nbllm.engine.cuda_graphs import DecodeGraphs

            max_blocks = -(-config.max_positions // block_size)
            self.graphs = DecodeGraphs(model, self.pool, max_batch=max_graph_batch, max_blocks=max_blocks)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, *,
                placeholders: torch.Tensor | None = None) -> tuple[list[Sequence], torch.Tensor]:
        """Run the step; returns the sequences whose pending tokens are now all computed, and their logits rows.

        A ready sequence gets `1 + len(seq.spec_token_ids)` consecutive rows, in batch order: the next-token
        logits after its last token and after each of its draft tokens (one row when it has no draft). On CUDA
        the logits may be a view of a graph's output buffer: valid until the next `execute`. `placeholders`:
        the previous step's sampled ids, still on the device, which negative input ids stand for
        (`nbllm.engine.overlap`).
        """
        inputs = prepare_inputs(batch, self.pool.block_size)
        if self.step_broadcast is None:
            return inputs.ready, self.run(batch.copies, inputs, placeholders)
        with self.step_broadcast(batch.copies, inputs):
            return inputs.ready, self.run(batch.copies, inputs)

    @torch.inference_mode()
    def run(self, copies: list[tuple[int, int]], inputs: StepInputs,
            placeholders: torch.Tensor | None = None) -> torch.Tensor:
        """Copy-on-write `copies`, then the forward of `inputs`: the logits of its `logit_rows` (`execute`)."""
        self.pool.copy_blocks(copies)
        self._replayed = (self.graphs is not None and inputs.is_decode
                          and len(inputs.logit_rows) <= self.graphs.max_batch)
        if self._replayed:
            return self.graphs.run(inputs, placeholders)
        dev = self.device

        def put(array: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(array).to(dev, non_blocking=True)

        # One backend per place, not per device: a backend's plans may depend on its pools' dtype.
        backends = {p: self._attention(inputs, p.device) for p in dict.fromkeys(self.places)}
        attn = next(iter(backends.values())) if len(backends) == 1 else PerLayerAttention(
            [backends[p] for p in self.places])
        # On a CPU the forward's heavy work is the C++ kernels': torch stays on one thread meanwhile.
        with kernels_own_the_threads() if dev.type == "cpu" else nullcontext():
            hidden = self.model(put(inputs.ids), put(inputs.positions), attn, placeholders)
            rows = inputs.logit_rows
            if not rows:
                return hidden.new_empty((0, self.config.vocab_size))
            if rows != list(range(hidden.shape[0])):
                hidden = hidden[torch.from_numpy(np.asarray(rows, dtype=np.int64)).to(hidden.device)]
            return self.model.compute_logits(hidden).to(dev)  # a split model's head is on another device

    def graph_greedy(self) -> tuple[SampleResult, SampleResult, torch.cuda.Event] | None:
        """The last step's greedy tokens, on the device and the host, when its decode graph took them
        (`DecodeGraphs.greedy`), else None."""
        return self.graphs.greedy() if self._replayed else None

    def _attention(self, inputs: StepInputs, dev: torch.device) -> PagedAttention | TritonPagedAttention:
        """This step's backend for the layers on `dev`: the Triton kernels on CUDA, torch elsewhere."""

        def put(array: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(array).to(dev, non_blocking=True)

        if dev.type == "cuda":
            num_splits = None
            if inputs.is_decode:
                from nbllm.kernels.decode_attention import default_num_splits

                num_splits = default_num_splits(len(inputs.logit_rows), self.model.config.num_kv_heads,
                                                torch.cuda.get_device_properties(dev).multi_processor_count)
            return TritonPagedAttention(
                pool=self.pool, slot_mapping=put(inputs.slots), block_tables=put(inputs.block_tables),
                cu_query_lens=put(inputs.cu_query_lens), context_lens=put(inputs.context_lens),
                max_query_len=int(np.diff(inputs.cu_query_lens).max()), num_splits=num_splits)
        return PagedAttention(
            pool=self.pool, slot_mapping=put(inputs.slots), block_tables=put(inputs.block_tables),
            cu_query_lens=put(inputs.cu_query_lens), context_lens=put(inputs.context_lens))
