"""CUDA graphs for decode steps: one replay per step instead of a few hundred kernel launches.

A decode step of a small model is launch-bound: each layer is a dozen small kernels, each a few microseconds of
GPU work and as much of Python and driver time to launch. So, as vLLM and nano-vllm do, the whole forward plus
the logits of a decode batch is captured once per batch size bucket (1, 2, 4, 8, then every 16 up to
`max_batch`) over static input buffers; a step copies its inputs into the buffers of the smallest bucket that
holds it and replays. Padding rows get context length 0 and slot -1: the KV store skips them and the decode
kernel writes zeros for them, so they cost a little compute and touch no real sequence.

The graph also begins and ends the host's per-token work on the device: its token lookup resolves the input ids
that are placeholders for the previous step's sampled tokens (`nbllm.engine.overlap`) and it ends with each row's
argmax and its log-probability (`sampler.greedy_sample`), so a step whose rows are all plain greedy
(`SamplingBatch.plain_greedy`) is one replay with no sampling launch. Its tokens reach the host with no copy
either: the argmax kernel also writes them into pinned host memory (`argmax_logsumexp`'s `host`; two halves,
used by alternate replays as each replay's inputs say, so the host reads one replay's tokens while the next is
already queued), and it leaves the next step's inputs on the device (`nbllm.kernels.next_inputs`), which the host
copies only when its real ones differ. In a steady decode nothing stands on the stream between two replays.

All buckets are captured together, largest first, at the first decode step, sharing one memory pool (the
graphs never run concurrently). The decode attention's split count is fixed per bucket
(`default_num_splits`), which is what makes one graph valid for every context length.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from nbllm.engine.sampler import SampleResult, greedy_sample
from nbllm.kernels.decode_attention import default_num_splits
from nbllm.kernels.next_inputs import next_inputs_reference
from nbllm.kernels.placeholders import resolve_placeholders

if TYPE_CHECKING:
    from nbllm.engine.model_runner import KVPool, StepInputs
    from nbllm.models.base import CausalLM


def bucket_sizes(max_batch: int) -> list[int]:
    """Captured batch sizes: 1, 2, 4, 8, then multiples of 16, the last one `max_batch` itself."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_batch] + list(range(16, max_batch, 16))
    return sizes + [max_batch]


class DecodeGraphs:
    """Graph-captured decode forwards (logits included) for batch sizes up to `max_batch`."""

    def __init__(self, model: CausalLM, pool: KVPool, *, max_batch: int, max_blocks: int) -> None:
        self.model, self.pool = model, pool
        self.max_batch, self.max_blocks = max_batch, max_blocks
        self.sizes = bucket_sizes(max_batch)
        dev = model.device
        # ids, positions, slots, context lengths of a step and the half of the host buffers its tokens go to, one
        # row each: one host-to-device copy, when the step before did not leave them there
        # (`nbllm.kernels.next_inputs`; `_expected` is what the device holds then, None when unknown).
        self._inputs = torch.zeros((5, max_batch), dtype=torch.long, device=dev)
        self.ids, self.positions, self.slots, self.context_lens, self._halves = self._inputs.unbind(0)
        self.block_tables = torch.zeros((max_batch, max_blocks), dtype=torch.int32, device=dev)
        # Pinned host staging, so the copies are asynchronous; two sets, used in turn, so that with overlap
        # scheduling the host can fill step N+1's while step N's copy may still be queued (each set's event
        # says when its last copy is done).
        self._host = [torch.zeros((5, max_batch), dtype=torch.long).pin_memory() for _ in range(2)]
        self._host_tables = [torch.zeros((max_batch, max_blocks), dtype=torch.int32).pin_memory() for _ in range(2)]
        self._copied = [torch.cuda.Event(), torch.cuda.Event()]
        self._turn = 0
        self._expected: np.ndarray | None = None
        self.input_copies = 0  # replays whose inputs the host had to copy
        # The device's block tables (nothing but the copies below writes them): a decode batch's tables change only
        # when a sequence enters a new block or the batch changes (at batch 1, one step in 16), and each copy is a
        # transfer on the device's critical path between two replays.
        self._device_tables = np.zeros((max_batch, max_blocks), dtype=np.int32)
        # Each replay's greedy tokens, their log-sum-exp and log-probabilities, rows first; the tokens are also
        # where the next replay resolves its placeholders from.
        self.sampled = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self._lse, self._logprobs = torch.zeros((2, max_batch), dtype=torch.float32, device=dev).unbind(0)
        # The same tokens and log-probabilities in pinned host memory, written by the graph: half `turn` for the
        # replay of that staging turn; each half's event fires when its replay is done.
        self._host_ids = torch.zeros((2, max_batch), dtype=torch.long).pin_memory()
        self._host_logprobs = torch.zeros((2, max_batch), dtype=torch.float32).pin_memory()
        self._replayed = [torch.cuda.Event(), torch.cuda.Event()]
        self._batch, self._last_turn = 0, 0  # rows and staging turn of the last replay
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: dict[int, torch.Tensor] = {}

    def run(self, inputs: StepInputs, placeholders: torch.Tensor | None = None) -> torch.Tensor:
        """The logits `[B, vocab]` of a decode step (a view of the bucket's output buffer); negative ids stand
        for rows of `placeholders` (`nbllm.engine.overlap`)."""
        if not self._graphs:
            self.capture()
        batch = len(inputs.context_lens)  # a decode step: one sequence per context
        size = next(s for s in self.sizes if s >= batch)
        turn = self._turn
        self._turn ^= 1
        self._copied[turn].synchronize()  # this set's previous copy (two steps ago) is done
        host_inputs, host_tables = self._host[turn], self._host_tables[turn]
        host = host_inputs.numpy()
        host[:, :size] = 0  # padding rows: token 0 at position 0, context 0...
        host[2, batch:size] = -1  # ...and no slot
        host[0, :batch] = inputs.ids
        host[1, :batch] = inputs.positions
        host[2, :batch] = inputs.slots
        host[3, :batch] = inputs.context_lens
        host[4, :size] = turn
        copied = self._expected is None or not np.array_equal(self._expected[:, :size], host[:, :size])
        if copied:
            self._inputs.copy_(host_inputs, non_blocking=True)  # all of it: a column slice would be staged pageable
            self._expected = host.copy()
            self.input_copies += 1
        tables = inputs.block_tables
        width = tables.shape[1]
        if not np.array_equal(self._device_tables[:batch, :width], tables):
            host_tables.numpy()[:batch, :width] = tables
            self.block_tables[:batch, :width].copy_(host_tables[:batch, :width], non_blocking=True)
            self._device_tables[:batch, :width] = tables
            copied = True
        if copied:
            self._copied[turn].record()
        if placeholders is not None and placeholders.data_ptr() != self.sampled.data_ptr():
            resolve_placeholders(self.ids[:batch], placeholders)  # not sampled by a replay: resolved here
        self._graphs[size].replay()
        self._replayed[turn].record()
        self._expected = next_inputs_reference(self._expected, self._device_tables, self.pool.block_size, size)
        self._batch, self._last_turn = batch, turn
        return self._logits[size][:batch]

    def greedy(self) -> tuple[SampleResult, SampleResult, torch.cuda.Event]:
        """The last replay's greedy tokens and their log-probabilities, what `Sampler` returns for those logits
        when the batch is `plain_greedy`: on the device (views valid until the next replay), in pinned host memory
        (valid once the event has fired, until the replay after the next), and that event."""
        batch, turn = self._batch, self._last_turn
        return (SampleResult(self.sampled[:batch], self._logprobs[:batch]),
                SampleResult(self._host_ids[turn, :batch], self._host_logprobs[turn, :batch]), self._replayed[turn])

    def capture(self) -> None:
        from nbllm.engine.model_runner import TritonPagedAttention

        sms = torch.cuda.get_device_properties(self.model.device).multi_processor_count
        pool = None
        torch.cuda.synchronize()
        for size in reversed(self.sizes):
            attn = TritonPagedAttention(
                pool=self.pool, slot_mapping=self.slots[:size], block_tables=self.block_tables[:size],
                cu_query_lens=None, context_lens=self.context_lens[:size],
                num_splits=default_num_splits(size, self.pool.k[0].shape[2], sms))

            def forward(size: int = size, attn: TritonPagedAttention = attn) -> torch.Tensor:
                hidden = self.model(self.ids[:size], self.positions[:size], attn, self.sampled)
                logits = self.model.compute_logits(hidden)
                greedy_sample(logits, out=(self.sampled[:size], self._lse[:size], self._logprobs[:size]),
                              host=(self._host_ids, self._host_logprobs, self._halves[:size]),
                              advance=(self._inputs, self.block_tables, self.pool.block_size))
                return logits

            self.context_lens.zero_()  # warm-up and capture store nothing and read nothing
            self.slots.fill_(-1)
            self.ids.zero_()
            forward()  # compiles the Triton kernels of this shape before capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._logits[size] = forward()
            pool = graph.pool() if pool is None else pool
            self._graphs[size] = graph
        torch.cuda.synchronize()
        self._expected = None  # the warm-ups advanced the inputs: the first replay copies them

