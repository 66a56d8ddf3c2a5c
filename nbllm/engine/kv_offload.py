"""The host tier of the KV cache: radix-cache blocks evicted from the device pool wait in host RAM.

SGLang's HiCache idea at our size: when the prefix cache must free device blocks, it copies their K/V here
instead of dropping them, and a later prefix match that reaches them copies them back -- a memory copy instead
of a prefill over the same tokens (a multi-turn chat whose earlier turns were pushed out by other users).

`HostKVPool` holds blocks with the device pool's per-block layout (per layer, `[num_blocks, block_size,
kv_heads, head_dim]` for K and for V), pinned on a CUDA machine so the copies run at full bus speed, plus a free
list; the radix cache does the bookkeeping (which node's blocks live here, the host LRU). Every block here has
exactly one owner, a radix-tree node, so there are no reference counts.

Copies happen when they are asked for, in program order: the engine calls them while scheduling, when the
previous step's forward has ended (its sampled tokens were read back), and before this step's copy-on-write
copies and forward -- so a device block freed by an offload can be reused by this step at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from nbllm.engine.block_manager import NoFreeBlocks


class DevicePool(Protocol):
    """What the host tier needs of the device KV pool (`model_runner.KVPool`): its per-layer K and V blocks."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]


class HostKVPool:
    """`num_blocks` host blocks mirroring `device_pool`'s layout, with the copies between the two."""

    def __init__(self, device_pool: DevicePool, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"a host KV pool needs at least one block, got {num_blocks}")
        self.device_pool = device_pool
        self.num_blocks = num_blocks
        pin = any(c.device.type == "cuda" for c in device_pool.k)

        def like(cache: torch.Tensor) -> torch.Tensor:
            return torch.empty((num_blocks, *cache.shape[1:]), dtype=cache.dtype, pin_memory=pin)

        self.k = [like(c) for c in device_pool.k]
        self.v = [like(c) for c in device_pool.v]
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, n: int) -> list[int]:
        """`n` free host blocks; all or nothing (`NoFreeBlocks`)."""
        if n > len(self._free):
            raise NoFreeBlocks(n, len(self._free))
        return [self._free.pop() for _ in range(n)]

    def free(self, blocks: Sequence[int]) -> None:
        self._free.extend(blocks)

    def save(self, device_blocks: Sequence[int], host_blocks: Sequence[int]) -> None:
        """Copy device blocks into host blocks (an offload), pairwise, every layer."""
        self._copy(self.device_pool.k, self.k, device_blocks, host_blocks)
        self._copy(self.device_pool.v, self.v, device_blocks, host_blocks)

    def load(self, host_blocks: Sequence[int], device_blocks: Sequence[int]) -> None:
        """Copy host blocks back into device blocks (a restore), pairwise, every layer."""
        self._copy(self.k, self.device_pool.k, host_blocks, device_blocks)
        self._copy(self.v, self.device_pool.v, host_blocks, device_blocks)

    @staticmethod
    def _copy(src: list[torch.Tensor], dst: list[torch.Tensor], src_blocks: Sequence[int],
              dst_blocks: Sequence[int]) -> None:
        """`dst[l][dst_blocks[i]] = src[l][src_blocks[i]]` for every layer: one gather, one transfer and one
        scatter per layer (layers may sit on different devices)."""
        if not src_blocks:
            return
        devices = {t.device for t in (*src, *dst)}
        src_index = {dev: torch.tensor(src_blocks, device=dev) for dev in devices}
        dst_index = {dev: torch.tensor(dst_blocks, device=dev) for dev in devices}
        for s, d in zip(src, dst):
            d.index_copy_(0, dst_index[d.device], s.index_select(0, src_index[s.device]).to(d.device))
