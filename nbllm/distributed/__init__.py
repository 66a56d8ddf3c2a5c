"""Serving one model from several processes: tensor parallel (each rank holds a slice of every layer) and data
parallel (each replica holds the whole model and serves its own requests).

The engine (scheduler, block manager, radix cache) stays in one process: rank 0 of a tensor-parallel group
broadcasts each step's batch, every rank runs its shard over its own KV pool and the ranks all-reduce twice a
layer (`group`: collectives; `sharding`: each rank's slice of the weights; `layers`: the all-reduces and the
vocab-parallel lookup and head; `loading`: one rank's model; `tensor_parallel`: the spawned ranks and their step
loop). A data-parallel front-end routes each request to the replica that holds its longest cached prefix, else to
the least loaded one (`router`, `data_parallel`). `interrupts`: Ctrl-C never splits a step the ranks share.
"""

from nbllm.distributed.errors import ParallelConfigError, WorkerError

__all__ = ["ParallelConfigError", "WorkerError"]
