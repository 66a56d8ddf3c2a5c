"""Runs one scheduled step through the model: batch tensors in, logits of the sequences that need tokens out.

The runner owns the KV pool (per layer, `[num_blocks, block_size, kv_heads, head_dim]` for K and for V) and turns a
`ScheduledBatch` into flat tensors the way vLLM does: the new tokens of every sequence concatenated, their
positions, the slot each one's K/V goes to, and per sequence its block table, query span and context length.
The model sees only the `AttentionBackend` seam; `PagedAttention` behind it stores K/V through the slot mapping
and attends through the block tables (`nbllm.kernels.paged_attention`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nbllm.engine.scheduler import ScheduledBatch
from nbllm.engine.sequence import Sequence
from nbllm.kernels.paged_attention import PagedAttentionPlan, plan_paged_attention, run_paged_attention, store_kv
from nbllm.models.base import CausalLM
from nbllm.models.config import ModelConfig


class KVPool:
    """K and V blocks of every layer, on the model's device."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, *, dtype: torch.dtype, device: torch.device) -> None:
        shape = (num_blocks, block_size, config.num_kv_heads, config.head_dim)
        # Uninitialised on purpose: zeroing a GiB costs a second at start-up, and attention never reads a slot
        # before it is written (stale slots inside gathered blocks are zeroed by the kernel).
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.num_blocks, self.block_size = num_blocks, block_size

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * itemsize

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: give each `dst` block the K/V of its `src` before a sequence writes into it."""
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], device=self.k[0].device)
        dst = torch.tensor([d for _, d in copies], device=self.k[0].device)
        for cache in (*self.k, *self.v):
            cache.index_copy_(0, dst, cache.index_select(0, src))


@dataclass
class PagedAttention:
    """The `AttentionBackend` of one step: where this step's K/V go and which blocks each sequence reads."""

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
        plan = self.plans.get(sliding_window)
        if plan is None:
            plan = self.plans[sliding_window] = plan_paged_attention(
                k_cache, block_tables=self.block_tables, cu_query_lens=self.cu_query_lens,
                context_lens=self.context_lens, sliding_window=sliding_window)
        return run_paged_attention(q, k_cache, v_cache, plan, scale=scale)


class ModelRunner:
    def __init__(self, model: CausalLM, config: ModelConfig, num_blocks: int, block_size: int) -> None:
        self.model, self.config = model, config
        self.device = model.device
        self.pool = KVPool(config, num_blocks, block_size, dtype=model.embed_tokens.dtype, device=self.device)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> tuple[list[Sequence], torch.Tensor]:
        """Run the step; returns the sequences whose pending tokens are now all computed, and their logits rows.

        A ready sequence gets `1 + len(seq.spec_token_ids)` consecutive rows, in batch order: the next-token
        logits after its last token and after each of its draft tokens (one row when it has no draft).
        """
        self.pool.copy_blocks(batch.copies)
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        cu = [0]
        context_lens: list[int] = []
        tables: list[list[int]] = []
        logit_rows: list[int] = []
        ready: list[Sequence] = []
        bs = self.pool.block_size
        for seq, n in batch.seqs:
            start, end = seq.num_computed, seq.num_computed + n
            draft = seq.spec_token_ids
            ids.extend(seq.token_ids[start:end])
            ids.extend(draft[: max(0, end - seq.num_tokens)])
            positions.extend(range(start, end))
            blocks = seq.table.blocks
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, end))
            cu.append(cu[-1] + n)
            context_lens.append(end)
            tables.append(blocks)
            if end == seq.num_tokens + len(draft):
                ready.append(seq)
                logit_rows.extend(range(cu[-1] - 1 - len(draft), cu[-1]))
        width = max(len(t) for t in tables)
        table_tensor = torch.zeros((len(tables), width), dtype=torch.int32)
        for i, t in enumerate(tables):
            table_tensor[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
        dev = self.device
        attn = PagedAttention(
            pool=self.pool,
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            block_tables=table_tensor.to(dev),
            cu_query_lens=torch.tensor(cu, dtype=torch.int32, device=dev),
            context_lens=torch.tensor(context_lens, dtype=torch.int32, device=dev),
        )
        hidden = self.model(torch.tensor(ids, dtype=torch.long, device=dev), torch.tensor(positions, device=dev), attn)
        if not ready:
            return [], hidden.new_empty((0, self.config.vocab_size))
        logits = self.model.compute_logits(hidden[torch.tensor(logit_rows, device=dev)])
        return ready, logits
