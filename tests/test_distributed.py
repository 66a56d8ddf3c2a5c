"""Tensor and data parallel on the CPU (gloo, 2 processes): the same greedy outputs as one process, a router that
follows cached prefixes, no leaked KV blocks, no processes left after `close`, and clear errors.

The engines run exact numerics: with "fast" ones a rank's share of a row-parallel sum rounds its input on its
own and the all-reduce adds in another order, so logits move by ~the 8-bit rounding and greedy near-ties of a
random tiny model may flip (as between llama.cpp runs with different splits)."""

from __future__ import annotations

import gc
import math
import multiprocessing
import os
import random
import signal
import threading

import numpy as np
import pytest
import torch
from engine_helpers import assert_no_leak, make_llm
from gguf import GGMLQuantizationType

from nbllm import NbllmError, SamplingParams
from nbllm.distributed import ParallelConfigError, WorkerError
from nbllm.distributed.router import PrefixRouter
from nbllm.distributed.sharding import ShardedWeights, shard_config
from nbllm.engine.model_runner import StepInputs
from nbllm.models.config import ModelConfig
from nbllm.models.weights import WeightSource

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=0)


def _prompts(seed: int = 0) -> list[list[int]]:
    """Mixed lengths around the 16-token block size, all below the tiny vocabulary."""
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 320) for _ in range(n)] for n in (2, 15, 16, 33, 70)]


def _run(llm, prompts):
    outs = llm.generate(prompts, GREEDY)
    return [o.outputs[0].token_ids for o in outs], [o.outputs[0].cumulative_logprob for o in outs]


def _children() -> set[int]:
    return {p.pid for p in multiprocessing.active_children()}


# ---------------------------------------------------------------------------------------------- tensor parallel


@pytest.mark.slow
@pytest.mark.parametrize("arch,fmt", [("llama", "q8_0"), ("qwen3", "f32"), ("gemma3", "q4_k"), ("qwen2", "q8_0")])
def test_tensor_parallel_equals_one_process(tiny_model, arch, fmt):
    """TP=2 (rank 0 here, rank 1 spawned) gives TP=1's greedy tokens and logprobs, with the prefix cache hit on
    the second round; llama covers permuted q/k rows and an untied head, qwen3 q/k norms and dense weights,
    gemma3 sliding windows, softcapping and a tied int8 table, qwen2 q/k/v biases."""
    path, _ = tiny_model(arch, fmt)
    prompts = _prompts()
    again = [prompts[4] + [7, 8, 9], prompts[3], prompts[0]]  # extends / repeats cached prompts
    ref = make_llm(path, numerics="exact")
    expected = [_run(ref, prompts), _run(ref, again)]
    before = _children()
    with make_llm(path, numerics="exact", tensor_parallel_size=2) as tp:
        workers = _children() - before
        assert len(workers) == 1
        got = [_run(tp, prompts), _run(tp, again)]
        assert tp.stats()["cached_prompt_tokens"] > 0
        assert_no_leak(tp)
    for (tokens, logprobs), (ref_tokens, ref_logprobs) in zip(got, expected):
        assert tokens == ref_tokens
        assert all(math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-4) for a, b in zip(logprobs, ref_logprobs))
    assert not workers & _children()


@pytest.mark.slow
def test_tensor_parallel_worker_death_is_a_clear_error(tiny_model):
    path, _ = tiny_model("llama", "q8_0")
    before = _children()
    with make_llm(path, numerics="exact", tensor_parallel_size=2) as tp:
        (worker,) = _children() - before
        _run(tp, _prompts()[:2])
        os.kill(worker, signal.SIGKILL)
        with pytest.raises(WorkerError, match=r"rank 1 exited with code -9.*create a new LLM"):
            tp.generate(_prompts()[:2], GREEDY)
        with pytest.raises(WorkerError):  # the engine stays failed, with the same error
            tp.generate(_prompts()[:1], GREEDY)
        assert not tp.engine.scheduler.running and not tp.engine.scheduler.waiting
    assert not _children() - before


@pytest.mark.slow
def test_tensor_parallel_worker_exception_is_raised_with_its_traceback(tiny_model):
    """A step the worker cannot run (a copy-on-write from a block its pool does not have): the worker reports and
    exits, and rank 0's next call raises a WorkerError naming the worker's exception, its traceback attached."""
    path, _ = tiny_model("llama", "q8_0")
    bad = StepInputs(ids=np.zeros(1, np.int64), positions=np.zeros(1, np.int64), slots=np.zeros(1, np.int64),
                     cu_query_lens=np.array([0, 1], np.int32), context_lens=np.ones(1, np.int32),
                     block_tables=np.zeros((1, 1), np.int32), logit_rows=[0], ready=[])
    before = _children()
    with make_llm(path, numerics="exact", tensor_parallel_size=2) as tp:
        with tp.engine.runner.step_broadcast([(10**6, 0)], bad):
            pass  # sent to the worker; rank 0 does not run it
        with pytest.raises(WorkerError, match=r"rank 1 failed: IndexError") as caught:
            tp.generate(_prompts()[:2], GREEDY)
        assert "copy_blocks" in "".join(caught.value.__notes__)
    assert not _children() - before


@pytest.mark.slow
def test_tensor_parallel_interrupt_mid_generation_leaves_a_working_engine(tiny_model):
    """A real SIGINT at an arbitrary moment (a notebook's stop button): it is raised between steps, never in the
    middle of one, so rank 0 and the worker stay in lockstep and the next call gives the reference answer."""
    path, _ = tiny_model("llama", "q8_0")
    long = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    expected = _run(make_llm(path, numerics="exact"), _prompts())[0]
    with make_llm(path, numerics="exact", tensor_parallel_size=2) as tp:
        for delay in (0.3, 0.75):
            timer = threading.Timer(delay, os.kill, (os.getpid(), signal.SIGINT))
            timer.start()
            with pytest.raises(KeyboardInterrupt):
                tp.generate(_prompts(2) * 4, long)
            timer.join()
            assert _run(tp, _prompts())[0] == expected
        assert_no_leak(tp)


def test_parallel_sizes_are_checked_before_any_process_starts(tiny_model):
    path, _ = tiny_model("llama", "q8_0")  # 4 heads, 2 kv heads
    before = _children()
    with pytest.raises(ParallelConfigError, match="tensor_parallel_size=4 does not divide the model's 2 kv heads"):
        make_llm(path, numerics="exact", tensor_parallel_size=4)
    with pytest.raises(ParallelConfigError, match="at least 1"):
        make_llm(path, numerics="exact", tensor_parallel_size=0)
    with pytest.raises(ParallelConfigError, match="at least 1"):
        make_llm(path, numerics="exact", data_parallel_size=0)
    assert issubclass(ParallelConfigError, NbllmError)
    assert _children() == before


# ---------------------------------------------------------------------------------------------- sharded weights


class _Tensors(WeightSource):
    """Weights by GGUF name from a dict (float32 on the CPU)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        from pathlib import Path

        super().__init__(Path("<tensors>"), dtype=torch.float32, device=torch.device("cpu"))
        self.tensors = tensors

    def names(self) -> frozenset[str]:
        return frozenset(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def ggml_type(self, name: str) -> GGMLQuantizationType:
        return GGMLQuantizationType.F32

    def _read(self, name: str) -> torch.Tensor:
        return self.tensors[name].clone()


def test_shards_put_back_together_are_the_weights():
    """Column slices stack to the weight, row slices sit side by side, vocab slices stack (the last rank padded
    with zero rows), a row-parallel bias is rank 0's alone and replicated tensors are whole on every rank."""
    g = torch.Generator().manual_seed(0)
    full = {"blk.0.attn_q.weight": torch.randn(8, 6, generator=g), "blk.0.attn_q.bias": torch.randn(8, generator=g),
            "blk.0.ffn_down.weight": torch.randn(6, 4, generator=g), "blk.0.ffn_down.bias": torch.randn(6, generator=g),
            "token_embd.weight": torch.randn(7, 6, generator=g), "output_norm.weight": torch.randn(6, generator=g)}
    source = _Tensors(full)
    shards = [ShardedWeights(source, rank, 2) for rank in range(2)]

    def parts(name):
        return [s.tensor(name, s.shape(name)) for s in shards]

    assert torch.equal(torch.cat(parts("blk.0.attn_q.weight")), full["blk.0.attn_q.weight"])
    assert torch.equal(torch.cat(parts("blk.0.attn_q.bias")), full["blk.0.attn_q.bias"])
    assert torch.equal(torch.cat(parts("blk.0.ffn_down.weight"), dim=1), full["blk.0.ffn_down.weight"])
    assert torch.equal(sum(parts("blk.0.ffn_down.bias")), full["blk.0.ffn_down.bias"])
    vocab = parts("token_embd.weight")
    assert [v.shape[0] for v in vocab] == [4, 4] and not vocab[1][3].any()
    assert torch.equal(torch.cat(vocab)[:7], full["token_embd.weight"])
    assert all(torch.equal(p, full["output_norm.weight"]) for p in parts("output_norm.weight"))


def test_shard_config_divides_heads_mlp_and_vocab():
    config = ModelConfig.from_hf_config({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 1, "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 101,
        "max_position_embeddings": 64})
    local = shard_config(config, 2)
    assert (local.num_heads, local.num_kv_heads, local.intermediate_size, local.vocab_size) == (4, 1, 48, 51)
    assert local.head_dim == config.head_dim and local.hidden_size == config.hidden_size
    with pytest.raises(ParallelConfigError, match="does not divide the model's 2 kv heads"):
        shard_config(config, 4)


# ---------------------------------------------------------------------------------------------- router


def test_router_prefers_the_longest_cached_prefix_then_the_least_loaded():
    router = PrefixRouter(2, block_size=4, capacity_blocks=100)
    a, b = list(range(10, 30)), list(range(50, 70))
    assert router.route(a) == 0  # all idle: the lowest index
    assert router.route(b) == 1  # no match anywhere: the least loaded
    assert router.route(b + [1, 2]) == 1  # b's blocks are on replica 1, though both are equally loaded
    assert router.route(a[:9]) == 0  # two of a's blocks (a partial block does not count)
    assert router.matched_blocks(1, b + [1, 2]) == 5 and router.matched_blocks(0, b) == 0
    assert router.load == [2, 2]
    router.finished(1, b + [1, 2, 3, 4, 5, 6])  # the output is cached too
    assert router.load == [2, 1] and router.matched_blocks(1, b + [1, 2, 3, 4, 5, 6]) == 6


def test_router_balances_when_the_cache_holder_is_far_busier():
    router = PrefixRouter(2, block_size=4, capacity_blocks=100, max_imbalance=2)
    shared = list(range(100, 116))
    picks = [router.route(shared + [i]) for i in range(6)]
    # 0 holds the prefix until it is more than 2 requests busier than 1; then both hold it, the less loaded wins
    assert picks == [0, 0, 0, 1, 1, 1]


def test_router_forgets_least_recently_used_blocks():
    router = PrefixRouter(2, block_size=2, capacity_blocks=3)
    router.route([1, 2, 3, 4, 5, 6])  # 3 blocks on replica 0
    router.route([7, 8])  # replica 1
    router.route([1, 2, 9, 9, 9, 9])  # replica 0 again (1 block shared): evicts [3, 4] and [5, 6]
    assert router.matched_blocks(0, [1, 2, 3, 4, 5, 6]) == 1
    router.reset()
    assert router.matched_blocks(0, [1, 2]) == 0


# ---------------------------------------------------------------------------------------------- data parallel


def _replicas_hold_no_leaked_blocks(llm) -> None:
    """Each replica: nothing running, only its prefix cache holds blocks, and clearing it frees them all."""
    for s in llm.engine.replica_stats():
        assert s["running"] == s["waiting"] == 0 and s["kv_blocks_used"] == s["kv_blocks_cached"]
    llm.reset_prefix_cache()
    assert all(s["kv_blocks_used"] == 0 for s in llm.engine.replica_stats())


@pytest.mark.slow
def test_data_parallel_equals_one_process_and_follows_cached_prefixes(tiny_model):
    path, _ = tiny_model("llama", "q8_0")
    prompts = _prompts(1)
    follow = prompts[3] + [5, 6, 7, 8]  # prompts[3] went to replica 1 (the 4th prompt: replicas alternate)
    ref = make_llm(path, numerics="exact")
    expected = _run(ref, prompts)[0] + _run(ref, [follow])[0]
    before = _children()
    with make_llm(path, numerics="exact", data_parallel_size=2) as dp:
        replicas = _children() - before
        assert len(replicas) == 2
        got = _run(dp, prompts)[0]
        first = dp.engine.replica_stats()
        assert [s["prompt_tokens"] for s in first] == [
            sum(map(len, prompts[0::2])), sum(map(len, prompts[1::2]))]  # load-balanced: 0, 1, 0, 1, 0
        got += _run(dp, [follow])[0]  # both idle again: only the cached prefix sends it to replica 1
        second = dp.engine.replica_stats()
        assert second[0]["prompt_tokens"] == first[0]["prompt_tokens"]
        assert second[1]["cached_prompt_tokens"] - first[1]["cached_prompt_tokens"] == 32  # 2 full blocks of 16
        assert dp.stats()["generated_tokens"] == 12 * 6
        _replicas_hold_no_leaked_blocks(dp)
        with pytest.raises(NbllmError, match="data_parallel_size=1"):
            dp.beam_search([prompts[0]], 2, 4)
    assert got == expected
    assert not replicas & _children()


@pytest.mark.slow
def test_data_parallel_replica_death_is_a_clear_error(tiny_model):
    path, _ = tiny_model("llama", "q8_0")
    before = _children()
    with make_llm(path, numerics="exact", data_parallel_size=2) as dp:
        replica = max(_children() - before)
        os.kill(replica, signal.SIGKILL)
        with pytest.raises(WorkerError, match=r"replica \d failed: exited with code -9; create a new LLM"):
            dp.generate(_prompts(), GREEDY)
    assert not _children() - before


# ---------------------------------------------------------------------------------------------- two GPUs


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_gpu_tensor_and_data_parallel_equal_one_gpu_on_llama3_8b_shape(tmp_path):
    """NCCL: TP=2 and DP=2 give one GPU's greedy tokens on Llama-3-8B widths with random weights (two layers, to
    keep the file at 3 GB; sharding sees the full widths). fp32 so that only summation order differs: the first
    8 tokens must match exactly, as the design asks of GPU runs."""
    import sys
    from pathlib import Path

    from nbllm import LLM

    sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
    from multi_gpu import write_random_gguf

    path = write_random_gguf("llama3-8b", tmp_path / "llama3-8b-2layers.gguf", num_layers=2)
    rng = random.Random(0)
    prompts = [[1] + [rng.randrange(3, 10000) for _ in range(n)] for n in (5, 40, 200, 700)]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    options = {"device": "cuda", "dtype": torch.float32, "max_model_len": 2048}
    def greedy(**parallel) -> list[list[int]]:
        """Each LLM sizes its KV pool from free GPU memory: the previous one must be gone first."""
        with LLM(path, **options, **parallel) as llm:
            out = [o.outputs[0].token_ids[:8] for o in llm.generate(prompts, params)]
        del llm
        gc.collect()
        torch.cuda.empty_cache()
        return out

    expected = greedy()
    for parallel in ({"tensor_parallel_size": 2}, {"data_parallel_size": 2}):
        assert greedy(**parallel) == expected, parallel
