"""The engine's own host time per decode step: everything but the model forward and the sampler (issue 7 point 4).

On a GPU a decode step overlaps the host's work with the device's (`nbllm.engine.overlap`), so once the CUDA graph
is short the step costs max(device, host): the Python around a token (scheduling, batch arrays, appending,
detokenizing, stop checks, outputs, prefix-cache offers) is the floor. This measures it on a tiny random model on
the CPU, where the forward is cheap: each `EngineCore.step()` is timed, and the time spent inside
`ModelRunner.run` (copies + forward) and inside the sampler is subtracted. Only steps whose launched batch is a
full decode batch count (every sequence computes one token), so prefill and the ragged tail are left out.

    python benchmarks/engine_overhead.py [--batch 1,64,256] [--steps 300] [--mode sync,overlap] [--repeat 3]
                                         [--outputs cumulative,final_only] [--stub-forward] [--freeze-gc]
                                         [--profile]

Columns: median and mean host microseconds a step (the median of the best of `--repeat` runs: the box is shared;
the mean over all runs, so it includes garbage-collection pauses), host microseconds a token (median / batch), and
for scale the median forward and sampler times. `--stub-forward` replaces the forward by random logits: the host
work then runs with warm caches, as on a GPU host, where the forward does not run through the CPU's caches.
To measure older code, put its `nbllm` first on the path: `PYTHONPATH=/tmp/old python benchmarks/...` (the
first line printed says which `nbllm` ran).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import itertools
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))  # the tiny-model builders

import torch  # noqa: E402
from tiny_models import build_hf_model, random_prompts, write_gguf  # noqa: E402

import nbllm  # noqa: E402
from nbllm import LLM, RequestOutputKind, SamplingParams  # noqa: E402

PROMPT_TOKENS = 24


def build_model(directory: Path) -> Path:
    """A tiny Llama GGUF (fp32, 2 layers, vocabulary 320) whose context holds long decodes."""
    path = directory / "tiny-llama.gguf"
    write_gguf(build_hf_model("llama", max_position_embeddings=4096), "llama", path, None)
    return path


def random_logits(vocab: int):
    """A stand-in for `ModelRunner.run` (`--stub-forward`): random logits for the step's rows, no forward."""

    def run(copies, inputs, placeholders=None):
        return torch.randn(len(inputs.logit_rows), vocab)

    return run


class StepTimer:
    """Wraps the engine's runner and sampler to time each step's forward and sampling separately."""

    def __init__(self, llm: LLM, *, stub_forward: bool) -> None:
        engine = llm.engine
        self.engine = engine
        self.run_s = self.sample_s = 0.0
        self.full_decode = False
        run = random_logits(llm.config.vocab_size) if stub_forward else engine.runner.run
        sampler = engine.sampler

        def timed_run(copies, inputs, placeholders=None):
            self.full_decode = inputs.is_decode and len(inputs.logit_rows) == self.batch
            start = time.perf_counter()
            try:
                return run(copies, inputs, placeholders)
            finally:
                self.run_s += time.perf_counter() - start

        def timed_sampler(*args, **kwargs):
            start = time.perf_counter()
            try:
                return sampler(*args, **kwargs)
            finally:
                self.sample_s += time.perf_counter() - start

        engine.runner.run = timed_run
        engine.sampler = timed_sampler
        self.batch = 0

    def decode(self, batch: int, steps: int, *, profile: cProfile.Profile | None,
               outputs: RequestOutputKind = RequestOutputKind.CUMULATIVE) -> list[tuple[float, float, float]]:
        """Run `batch` greedy requests for `steps` output tokens; (host, forward, sampler) seconds of each full
        decode step."""
        engine = self.engine
        self.batch = batch
        params = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True, output_kind=outputs)
        for i, prompt in enumerate(random_prompts([PROMPT_TOKENS] * batch, seed=batch)):
            engine.add_request(f"b{batch}-{i}-{time.perf_counter_ns()}", prompt, params)
        samples = []
        while engine.has_unfinished():
            self.run_s = self.sample_s = 0.0
            self.full_decode = False
            if profile is not None:
                profile.enable()
            start = time.perf_counter()
            engine.step()
            wall = time.perf_counter() - start
            if profile is not None:
                profile.disable()
            if self.full_decode:
                samples.append((wall - self.run_s - self.sample_s, self.run_s, self.sample_s))
        return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", default="1,64,256", help="comma-separated batch sizes")
    parser.add_argument("--steps", type=int, default=300, help="output tokens per request")
    parser.add_argument("--mode", default="sync,overlap", help="sync (CPU default), overlap (the GPU loop), or both")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each batch; the best median is shown")
    parser.add_argument("--stub-forward", action="store_true", help="random logits instead of the forward")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the forward is not measured)")
    parser.add_argument("--freeze-gc", action="store_true",
                        help="gc.freeze() once the engine is built: its objects leave the collector's full passes")
    parser.add_argument("--outputs", default="cumulative,final_only",
                        help="RequestOutputKind values to measure: every step's outputs, or the final ones only")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of the measured steps")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batch.split(",")]
    print(f"nbllm from {Path(nbllm.__file__).parent}; forward {'stubbed' if args.stub_forward else 'real'}; "
          f"gc {'frozen after start-up' if args.freeze_gc else 'as is'}")
    with tempfile.TemporaryDirectory() as tmp:
        path = build_model(Path(tmp))
        print("| mode | outputs | batch | steps | host us/step (median) | host us/step (mean) | host us/token | "
              "forward us | sampler us |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for mode in args.mode.split(","):
            llm = LLM(path, device="cpu", kv_cache_tokens=max(batches) * (PROMPT_TOKENS + args.steps + 32),
                      max_num_seqs=max(batches), max_num_batched_tokens=max(1024, max(batches) * PROMPT_TOKENS))
            llm.engine.overlap.enabled = mode == "overlap"
            if args.freeze_gc:
                gc.collect()
                gc.freeze()
            timer = StepTimer(llm, stub_forward=args.stub_forward)
            timer.decode(min(batches), 8, profile=None)  # warm-up: first calls, lazy imports
            for batch, kind in itertools.product(batches, args.outputs.split(",")):
                profile = cProfile.Profile() if args.profile else None
                outputs = RequestOutputKind(kind)
                runs = [timer.decode(batch, args.steps, profile=profile, outputs=outputs) for _ in range(args.repeat)]
                best = min(runs, key=lambda samples: statistics.median(s[0] for s in samples))
                med = statistics.median(s[0] for s in best) * 1e6
                mean = statistics.fmean(s[0] for samples in runs for s in samples) * 1e6
                print(f"| {mode} | {kind} | {batch} | {len(best)} | {med:.0f} | {mean:.0f} | {med / batch:.1f} | "
                      f"{statistics.median(s[1] for s in best) * 1e6:.0f} | "
                      f"{statistics.median(s[2] for s in best) * 1e6:.0f} |", flush=True)
                if profile is not None:
                    pstats.Stats(profile, stream=sys.stderr).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
