"""`LLM`: vLLM's offline API over the engine core — load a model, `generate` many prompts, `chat`.

All prompts of a call are queued at once and run with continuous batching; results come back in input order.
An interrupt (Ctrl-C, a notebook's stop button) aborts the call's requests and frees their blocks before it
propagates, so the engine serves the next call as if nothing happened.
"""

from __future__ import annotations

import dataclasses
import itertools
import weakref
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from nbllm.defaults import default_model_path
from nbllm.engine.beam_search import BeamSearch, BeamSearchOutput
from nbllm.engine.core import EngineCore, PromptTooLongError, num_blocks_for
from nbllm.engine.model_runner import KVPool
from nbllm.engine.outputs import RequestOutput
from nbllm.engine.sampling_params import RequestOutputKind, SamplingParams
from nbllm.engine.scheduler import SchedulerConfig
from nbllm.engine.spec_decode import SpeculativeConfig
from nbllm.errors import NbllmError
from nbllm.loader import load_model
from nbllm.gguf import open_gguf
from nbllm.models.attention import DenseKVCache
from nbllm.models.base import CausalLM
from nbllm.models.config import ModelConfig
from nbllm.models.placement import PlacementError, layer_places
from nbllm.tokenizer import Tokenizer

if TYPE_CHECKING:
    from nbllm.distributed.tensor_parallel import TensorParallelWorkers

Prompt = str | Sequence[int]
Message = Mapping[str, Any]

_CPU_KV_BYTES = 1 << 30


def resolve_device(device: str | torch.device) -> torch.device:
    """`"auto"` is CUDA when present, else CPU; asking for CUDA without it is a clear error."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise NbllmError("device='cuda' was asked for but CUDA is not available here; use device='cpu'")
    return device


class LLM:
    """An in-process engine for one model (the embedded Gemma 3 270M when `model` is None)."""

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        device: str | torch.device = "auto",
        n_gpu_layers: int | None = None,
        dtype: torch.dtype | None = None,
        block_size: int = 16,
        kv_cache_tokens: int | None = None,
        enable_prefix_caching: bool = True,
        seed: int = 0,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int | None = None,
        max_model_len: int | None = None,
        speculative_tokens: int = 0,
        ngram_max: int = 3,
        ngram_min: int = 1,
        tensor_parallel_size: int = 1,
        data_parallel_size: int = 1,
        kv_offload_gb: float = 0.0,
        numerics: str = "fast",
    ) -> None:
        """`tensor_parallel_size` > 1 splits every layer over that many processes (this one and spawned workers,
        one GPU each on CUDA); `data_parallel_size` > 1 serves from that many replicas, each in its own process,
        behind a router (`nbllm.distributed`). `close()` stops them; so does dropping the `LLM`.

        `kv_offload_gb` > 0 gives the prefix cache a second tier of that many GiB of host RAM (per replica):
        cached prefixes evicted from the KV pool move there and are copied back on a later hit instead of being
        prefilled again -- a multi-turn chat keeps its history across many other requests. It needs prefix
        caching and one process per replica (no tensor parallelism).

        `numerics` as in `load_model`: "fast" (default; on a CPU, int8 weights times activations rounded to int8 as
        llama.cpp rounds them), "exact" (transformers' fp32 results; greedy output independent of the parallel
        sizes), "llamacpp"."""
        if kv_offload_gb < 0:
            raise NbllmError(f"kv_offload_gb must be >= 0, got {kv_offload_gb}")
        if kv_offload_gb and not enable_prefix_caching:
            raise NbllmError("kv_offload_gb offloads the prefix cache; keep enable_prefix_caching=True or set 0")
        if kv_offload_gb and tensor_parallel_size != 1:
            raise NbllmError("kv_offload_gb does not work with tensor parallelism yet; use tensor_parallel_size=1")
        path = Path(model) if model is not None else default_model_path()
        dev = resolve_device(device)
        _check_n_gpu_layers(n_gpu_layers, device, dev, tensor_parallel_size * data_parallel_size)
        dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
        self.model_path = path
        self.tensor_parallel_size, self.data_parallel_size = tensor_parallel_size, data_parallel_size
        self._close = lambda: None
        if data_parallel_size != 1:
            from nbllm.distributed.data_parallel import DataParallelEngine

            replica_args = {"dtype": dtype, "block_size": block_size, "kv_cache_tokens": kv_cache_tokens,
                            "enable_prefix_caching": enable_prefix_caching, "seed": seed, "max_num_seqs": max_num_seqs,
                            "max_num_batched_tokens": max_num_batched_tokens, "max_model_len": max_model_len,
                            "speculative_tokens": speculative_tokens, "ngram_max": ngram_max, "ngram_min": ngram_min,
                            "tensor_parallel_size": tensor_parallel_size, "kv_offload_gb": kv_offload_gb,
                            "numerics": numerics}
            self.engine = DataParallelEngine(path, data_parallel_size, dev, replica_args)
            self.model, self.config, self.tokenizer = None, self.engine.config, self.engine.tokenizer
            self._ids = itertools.count()
            self._close = weakref.finalize(self, self.engine.close)
            return
        self.model, self.config, self.tokenizer, workers = _load(path, dev, dtype, tensor_parallel_size, block_size,
                                                                 n_gpu_layers, numerics)
        if workers is not None:
            self._close = weakref.finalize(self, workers.close)
        max_len = min(max_model_len or self.config.max_positions, self.config.max_positions)
        num_blocks = _num_kv_blocks(self.model, block_size, kv_cache_tokens)
        if workers is not None:
            num_blocks = workers.group.min_int(num_blocks)
        scheduler_config = SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens or (1024 if dev.type == "cpu" else 8192),
            max_model_len=max_len,
            enable_prefix_caching=enable_prefix_caching,
        )
        # Prompt-lookup speculative decoding (off by default): up to `speculative_tokens` drafts per step.
        speculative = SpeculativeConfig(speculative_tokens, ngram_max, ngram_min) if speculative_tokens else None
        host_kv_blocks = num_blocks_for(self.model.config, block_size, dtype, kv_cache_tokens=None,
                                        memory_bytes=int(kv_offload_gb * 2**30)) if kv_offload_gb else 0
        self.engine = EngineCore(self.model, self.config, self.tokenizer, num_blocks=num_blocks, block_size=block_size,
                                 scheduler_config=scheduler_config, seed=seed, speculative=speculative,
                                 host_kv_blocks=host_kv_blocks)
        if workers is not None:
            workers.serve(self.engine.runner)
        self._ids = itertools.count()

    def close(self) -> None:
        """Stop the worker or replica processes of a parallel `LLM` (a no-op otherwise); it serves nothing after."""
        self._close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ generation

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion, batched; outputs in input order."""
        finished: dict[int, RequestOutput] = {}
        for index, out in self._run(prompts, sampling_params, final_only=True):
            if out.finished:
                finished[index] = out
        return [finished[i] for i in range(len(finished))]

    def stream(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> Iterator[RequestOutput]:
        """Like `generate`, but yields each request's state after every step that changed it (`text_delta` and
        `token_ids_delta` say what is new). Closing the iterator early aborts the requests still running."""
        return (out for _, out in self._run(prompts, sampling_params))

    def _run(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None,
        *,
        final_only: bool = False,
    ) -> Iterator[tuple[int, RequestOutput]]:
        """Queue every prompt (all checked before any work), then step the engine until they finish; with
        `final_only` the engine builds each request's output only when it finishes (`RequestOutputKind`).

        Whatever ends the loop — completion, an interrupt, an error, the consumer closing the iterator — the
        requests of this call are aborted, so their blocks go back to the pool.
        """
        prompt_list = [prompts] if _is_single_prompt(prompts) else list(prompts)
        params = _broadcast(sampling_params, len(prompt_list))
        if final_only:
            params = _final_only(params)
        encoded = [self._encode(p) for p in prompt_list]
        index = {f"gen-{next(self._ids)}": i for i in range(len(prompt_list))}
        try:
            for request_id, (text, token_ids), p in zip(index, encoded, params):
                self.engine.add_request(request_id, token_ids, p, prompt=text)
            pending = set(index)
            while pending:
                for out in self.engine.step():
                    if out.request_id in pending:
                        if out.finished:
                            pending.discard(out.request_id)
                        yield index[out.request_id], out
        finally:
            for request_id in index:
                self.engine.abort(request_id)

    def beam_search(
        self,
        prompts: Prompt | Sequence[Prompt],
        beam_width: int,
        max_tokens: int,
        *,
        length_penalty: float = 1.0,
        ignore_eos: bool = False,
    ) -> list[BeamSearchOutput]:
        """The `beam_width` best continuations of each prompt (vLLM's `LLM.beam_search` output shape), with beams
        sharing KV blocks; see `nbllm.engine.beam_search`. Needs an engine with no other requests running."""
        if self.data_parallel_size != 1:
            raise NbllmError("beam_search runs on one engine; use an LLM with data_parallel_size=1")
        prompt_list = [prompts] if _is_single_prompt(prompts) else list(prompts)
        encoded = [self._encode(p) for p in prompt_list]
        search = BeamSearch(self.engine, encoded, beam_width, max_tokens, length_penalty=length_penalty,
                            ignore_eos=ignore_eos)
        return search.run()

    @torch.inference_mode()
    def token_logprobs(self, sequences: Sequence[Sequence[int]], starts: Sequence[int]) -> list[list[float]]:
        """Teacher forcing: for each token list `ids` and its `start`, `log p(ids[i] | ids[:i])` for every
        `i >= start` (`start >= 1`), all sequences in one forward.

        What scoring fixed continuations needs (the DSL's `select`, SGLang's prompt logprobs). It runs a plain
        dense forward beside the paged engine, so it neither reads nor fills the prefix cache: meant for short
        texts, and for a caller that does not step the engine at the same time (the engine is single-threaded).
        """
        if self.tensor_parallel_size != 1 or self.data_parallel_size != 1:
            raise NbllmError("token_logprobs runs the model in this process only; use an LLM without parallelism")
        seqs = [[int(t) for t in ids] for ids in sequences]
        if len(seqs) != len(starts) or any(not 1 <= s <= len(ids) for ids, s in zip(seqs, starts)):
            raise NbllmError("token_logprobs needs one start per sequence, each in [1, len(sequence)]")
        vocab, limit = self.config.vocab_size, self.engine.scheduler.config.max_model_len
        if any(not 0 <= t < vocab for ids in seqs for t in ids):
            raise NbllmError(f"token ids must be in [0, {vocab}); got an id outside that range")
        if any(len(ids) > limit for ids in seqs):
            longest = max(len(ids) for ids in seqs)
            raise PromptTooLongError(f"a sequence to score has {longest} tokens but the context holds {limit}; "
                                     "shorten the text")
        if not seqs:
            return []
        cache = DenseKVCache()
        cache.prepare(range(len(seqs)), [len(ids) for ids in seqs])
        device = self.model.device
        flat = torch.tensor([t for ids in seqs for t in ids], dtype=torch.long, device=device)
        positions = torch.tensor([p for ids in seqs for p in range(len(ids))], device=device)
        hidden = self.model(flat, positions, cache)
        rows, targets, offset = [], [], 0
        for ids, start in zip(seqs, starts):
            rows.extend(range(offset + start - 1, offset + len(ids) - 1))  # the row before each scored token
            targets.extend(ids[start:])
            offset += len(ids)
        if not rows:
            return [[] for _ in seqs]
        logits = self.model.compute_logits(hidden[torch.tensor(rows, device=hidden.device)])
        picked = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(targets, device=logits.device)[:, None])
        values = picked[:, 0].tolist()
        out, at = [], 0
        for ids, start in zip(seqs, starts):
            out.append(values[at : at + len(ids) - start])
            at += len(ids) - start
        return out

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """OpenAI-style messages (one conversation or a list of them) through the model's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], Mapping) else list(messages)
        token_lists = [self.chat_prompt_ids(conv, add_generation_prompt=add_generation_prompt) for conv in conversations]
        return self.generate(token_lists, sampling_params)

    def chat_prompt_ids(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        # Templates write BOS themselves; encoding must not add a second one.
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _encode(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        return None, [int(t) for t in prompt]

    # ------------------------------------------------------------------ introspection

    def stats(self) -> dict[str, float | int]:
        """Engine totals: tokens, cache hits, KV blocks, prefill/decode throughput (what dashboards draw)."""
        return self.engine.stats()

    def reset_prefix_cache(self) -> None:
        self.engine.reset_prefix_cache()


def _check_n_gpu_layers(n_gpu_layers: int | None, asked: str | torch.device, device: torch.device,
                        processes: int) -> None:
    """`n_gpu_layers` splits one in-process model between the CPU and a GPU: nothing else to split with, and
    no GPU on an explicit `device="cpu"` (on `"auto"` without CUDA it is ignored, as llama.cpp does)."""
    if n_gpu_layers is None:
        return
    if processes != 1:
        raise PlacementError("n_gpu_layers splits one model between the CPU and a GPU; leave it out with "
                             "tensor_parallel_size or data_parallel_size above 1")
    if n_gpu_layers != 0 and device.type == "cpu" and str(asked) != "auto":
        raise PlacementError(f"n_gpu_layers={n_gpu_layers} puts layers on a GPU but device={str(asked)!r}; "
                             "use device='cuda' or leave n_gpu_layers out")


def _num_kv_blocks(model: CausalLM, block_size: int, kv_cache_tokens: int | None) -> int:
    """KV blocks for `kv_cache_tokens`, else as many as fit each device's budget (CPU: 1 GiB; CUDA: 80% of what
    is free) with the K/V of the layers there. Sized by the model's own config: a tensor-parallel shard caches
    only its share of the heads."""
    config = model.config
    if kv_cache_tokens is not None:
        return num_blocks_for(config, block_size, torch.float32, kv_cache_tokens=kv_cache_tokens, memory_bytes=0)
    per_block: dict[torch.device, int] = {}
    for place in layer_places(model):
        layer_bytes = KVPool.bytes_per_block(config, block_size, place.dtype) // config.num_layers
        per_block[place.device] = per_block.get(place.device, 0) + layer_bytes
    budget = {dev: _CPU_KV_BYTES if dev.type == "cpu" else int(torch.cuda.mem_get_info(dev)[0] * 0.8)
              for dev in per_block}
    return max(1, min(budget[dev] // size for dev, size in per_block.items()))


def _load(path: Path, device: torch.device, dtype: torch.dtype, tensor_parallel_size: int, block_size: int,
          n_gpu_layers: int | None, numerics: str
          ) -> tuple[CausalLM, ModelConfig, Tokenizer, TensorParallelWorkers | None]:
    """Model and tokenizer from one open GGUF (its header is parsed once); with tensor parallelism, rank 0's
    shard and the started workers."""
    if path.is_dir():
        raise NbllmError(f"{path}: LLM() needs a GGUF file (it carries the tokenizer); load HF folders with load_model")
    file = open_gguf(path)
    tokenizer = Tokenizer.from_metadata(file.metadata)
    if tensor_parallel_size == 1:
        model, config = load_model(file, device=device, dtype=dtype, n_gpu_layers=n_gpu_layers, numerics=numerics)
        return model, config, tokenizer, None
    from nbllm.distributed.tensor_parallel import start_tensor_parallel

    workers, model, config = start_tensor_parallel(file, tensor_parallel_size, device, dtype, block_size, numerics)
    return model, config, tokenizer, workers


def _is_single_prompt(prompts: Any) -> bool:
    return isinstance(prompts, str) or (isinstance(prompts, Sequence) and bool(prompts) and isinstance(prompts[0], int))


def _final_only(params: list[SamplingParams]) -> list[SamplingParams]:
    """Copies of `params` asking for final outputs only, one per distinct object (the caller's stay as they are)."""
    copies: dict[int, SamplingParams] = {}
    for p in params:
        if id(p) not in copies:
            copies[id(p)] = dataclasses.replace(p, output_kind=RequestOutputKind.FINAL_ONLY)
    return [copies[id(p)] for p in params]


def _broadcast(params: SamplingParams | Sequence[SamplingParams] | None, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise NbllmError(f"got {len(params)} SamplingParams for {n} prompts; pass one, or one per prompt")
    return params
