"""Which data-parallel replica serves a request: cache-aware first, load-balanced otherwise.

SGLang's router (sgl-router's cache-aware policy) keeps, per worker, an approximate tree of the prompts it sent
there, because asking the workers what their caches hold costs a round trip per request. This router does the
same at block granularity, as the replicas' radix caches hold whole KV blocks: a prompt is a chain of full-block
hashes (each covers the block and everything before it, as vLLM's prefix-cache keys do), and a replica's record is
an LRU set of the chains it was sent or finished, bounded by its number of KV blocks. A request goes to the replica
whose record holds its longest chain; without a match, or when that replica is busier than the least loaded one by
more than `max_imbalance` requests, to the least loaded one (outstanding requests; ties to the lowest index).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class PrefixRouter:
    def __init__(self, num_replicas: int, block_size: int, *, capacity_blocks: int, max_imbalance: int = 16) -> None:
        self.block_size, self.capacity, self.max_imbalance = block_size, capacity_blocks, max_imbalance
        self.load = [0] * num_replicas
        self._cached: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(num_replicas)]

    def route(self, token_ids: Sequence[int]) -> int:
        """Pick the replica for a new request and count it there (remembering its prompt as cached there)."""
        chain = self._chain(token_ids)
        least = min(range(len(self.load)), key=lambda r: self.load[r])
        best, best_len = least, 0
        for replica, cached in enumerate(self._cached):
            matched = next((i for i, h in enumerate(chain) if h not in cached), len(chain))
            if matched > best_len or (matched == best_len and matched and self.load[replica] < self.load[best]):
                best, best_len = replica, matched
        if best_len == 0 or self.load[best] - self.load[least] > self.max_imbalance:
            best = least
        self.load[best] += 1
        self._remember(best, chain)
        return best

    def matched_blocks(self, replica: int, token_ids: Sequence[int]) -> int:
        """How many leading full blocks of `token_ids` the router believes `replica` holds."""
        chain, cached = self._chain(token_ids), self._cached[replica]
        return next((i for i, h in enumerate(chain) if h not in cached), len(chain))

    def finished(self, replica: int, token_ids: Sequence[int]) -> None:
        """A request on `replica` ended; `token_ids` (prompt and output) are what its cache now holds."""
        self.load[replica] -= 1
        self._remember(replica, self._chain(token_ids))

    def reset(self) -> None:
        """The replicas' prefix caches were cleared."""
        for cached in self._cached:
            cached.clear()

    def _chain(self, token_ids: Sequence[int]) -> list[int]:
        chain, h = [], 0
        for end in range(self.block_size, len(token_ids) + 1, self.block_size):
            h = hash((h, tuple(token_ids[end - self.block_size : end])))
            chain.append(h)
        return chain

    def _remember(self, replica: int, chain: list[int]) -> None:
        cached = self._cached[replica]
        for h in chain:
            cached[h] = None
            cached.move_to_end(h)
        while len(cached) > self.capacity:
            cached.popitem(last=False)
