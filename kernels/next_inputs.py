"""A decode graph's next inputs, predicted on the device by the step before: then the host need not copy them.

Between two replays of a decode graph (`nbllm.engine.cuda_graphs`) the stream held the copy of the next step's
inputs, and at batch 1 the device idled through it. Yet in a steady decode those inputs are what the step before
implies: each row's token is the placeholder of the id it just sampled (`nbllm.engine.overlap`), its position and
context length one more, its slot the next one in its block table, and the half of the host buffers its tokens go
to the other one. So the graph's last kernel writes exactly that (`advance`, which `argmax_logsumexp`'s merge calls
once every reader of the inputs is done), the host computes the same from what it knows the device holds
(`next_inputs_reference`), and it copies only when the step's real inputs differ: a row that joins or leaves, a
sequence that enters a new block.

`inputs: int64 [5, R]`, one column per row of the graph: ids, positions, slots, context lengths, halves.
`tables: int32 [R, max_blocks]`. A padding row (context 0) keeps all but its half.
"""

from __future__ import annotations

import numpy as np
import triton
import triton.language as tl

__all__ = ["advance", "next_inputs_reference"]


@triton.jit
def advance(inputs_ptr, stride_in, tables_ptr, stride_t, max_blocks, row, BLOCK_SIZE: tl.constexpr):
    """Row `row`'s next inputs, in place (see the module docstring)."""
    ctx = tl.load(inputs_ptr + 3 * stride_in + row)
    half = tl.load(inputs_ptr + 4 * stride_in + row)
    if ctx > 0:
        pos = tl.load(inputs_ptr + stride_in + row) + 1
        index = pos // BLOCK_SIZE
        inside = index < max_blocks
        block = tl.load(tables_ptr + row * stride_t + index, mask=inside, other=0).to(tl.int64)
        tl.store(inputs_ptr + row, -1 - row.to(tl.int64))
        tl.store(inputs_ptr + stride_in + row, pos)
        tl.store(inputs_ptr + 2 * stride_in + row, tl.where(inside, block * BLOCK_SIZE + pos % BLOCK_SIZE, -1))
        tl.store(inputs_ptr + 3 * stride_in + row, ctx + 1)
    tl.store(inputs_ptr + 4 * stride_in + row, 1 - half)


def next_inputs_reference(inputs: np.ndarray, tables: np.ndarray, block_size: int, rows: int) -> np.ndarray:
    """What `advance` makes of `inputs` for its first `rows` columns (the others as they are), given `tables`."""
    out = inputs.copy()
    r = np.arange(rows)
    live = inputs[3, :rows] > 0
    pos = inputs[1, :rows] + 1
    index = pos // block_size
    inside = index < tables.shape[1]
    block = tables[r, np.minimum(index, tables.shape[1] - 1)].astype(np.int64)
    nxt = np.stack([-1 - r, pos, np.where(inside, block * block_size + pos % block_size, -1), inputs[3, :rows] + 1])
    out[:4, :rows] = np.where(live, nxt, inputs[:4, :rows])
    out[4, :rows] = 1 - inputs[4, :rows]
    return out
