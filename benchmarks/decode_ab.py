"""A/B of batch-1 decode between source trees, on one GPU in one run: which revision of the kernels is faster.

    python3 benchmarks/decode_ab.py head=. base=.whl/trees/base [--rounds 2] [--model qwen3-0.6b]

Each TREE is a checkout or an unpacked `git archive REV nbllm kernels widgets` (the device machine sees no git
history: unpack the revisions here, into a folder the device tool carries, e.g.
`mkdir -p .whl/trees/base && git archive REV nbllm kernels widgets | tar -x -C .whl/trees/base`;
`benchmarks/gpu_session.sh`'s `ab` stage runs this with `AB_TREES`). The trees take turns, round after
round, each in a process of its own with that tree's `nbllm` first on the path, so a slow minute of the machine
falls on every tree alike; per tree the table gives the median over rounds of `gpu_throughput.py` (b)'s two
measures: the engine's batch-1 greedy decode (a step: host and device) and its decode graph replayed back to back
(the device alone), against the memory roofline. A change of a few µs a step, which one run of the benchmark
cannot tell from the machine's drift, shows here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Where each part of a source tree goes in the package (pyproject's package-dir).
PACKAGE_DIRS = {"nbllm": "nbllm", "kernels": "nbllm/kernels", "widgets": "nbllm/widgets"}


def stage(tree: Path, into: Path) -> Path:
    """`tree`'s sources laid out as an importable `nbllm` package under `into`, which is returned."""
    for part, target in PACKAGE_DIRS.items():
        if not (tree / part).is_dir():
            raise SystemExit(f"{tree} has no {part}/: give a checkout or `git archive REV nbllm kernels widgets`")
        shutil.copytree(tree / part, into / target, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.so", "build"))
    return into


def worker(model_name: str, tokens: int) -> None:
    """One measurement with whatever `nbllm` is first on the path; prints one JSON line."""
    import torch

    sys.path.insert(0, str(HERE))
    import gpu_throughput as bench

    import nbllm

    dev = torch.device("cuda")
    model, config, _ = bench.build_model(model_name, dev, hf=False)
    engine = bench.make_engine(model, config, bench.placeholder_tokenizer(config.vocab_size), max_num_seqs=1)
    graphs = engine.runner.graphs  # batch 1 only: one bucket to compile and capture, not twenty
    engine.runner.graphs = type(graphs)(model, engine.runner.pool, max_batch=1, max_blocks=graphs.max_blocks)
    bench.batch1_decode(engine, tokens=16)  # compiles and captures
    tok_s = bench.batch1_decode(engine, tokens=tokens)
    graph_s = statistics.median(bench.graph_replay_seconds(engine, 1) for _ in range(5))
    roofline = bench.copy_bandwidth(dev) / bench.weight_bytes(model)
    print(json.dumps({"package": str(Path(nbllm.__file__).parent), "step_ms": 1e3 / tok_s, "graph_ms": graph_s * 1e3,
                      "roofline_tok_s": roofline}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trees", nargs="*", metavar="NAME=TREE")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", default="qwen3-0.6b")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.model, args.tokens)
        return
    trees = dict(t.split("=", 1) for t in args.trees)
    if len(trees) < 2:
        parser.error("give two trees or more, NAME=TREE each")
    results: dict[str, list[dict]] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory() as tmp:
        staged = {name: stage(Path(tree), Path(tmp) / name) for name, tree in trees.items()}
        for r in range(args.rounds):
            for name, path in staged.items():
                env = {**os.environ, "PYTHONPATH": os.pathsep.join(
                    [str(path), *filter(None, [os.environ.get("PYTHONPATH")])])}
                run = subprocess.run([sys.executable, __file__, "--worker", "--model", args.model,
                                      "--tokens", str(args.tokens)], env=env, capture_output=True, text=True)
                if run.returncode:
                    print(f"{name}, round {r + 1}: failed\n{run.stderr[-3000:]}", flush=True)
                    continue
                result = json.loads(run.stdout.strip().splitlines()[-1])
                if not result["package"].startswith(str(path)):
                    raise SystemExit(f"{name} imported {result['package']}, not its tree: is nbllm installed "
                                     "non-editable, ahead of PYTHONPATH?")
                results[name].append(result)
                print(f"{name}, round {r + 1}: step {result['step_ms']:.3f} ms, graph {result['graph_ms']:.3f} ms",
                      flush=True)
    print(f"\n{args.model} batch-1 decode, median over {args.rounds} rounds\n")
    print(f"{'tree':<16} {'step ms':>8} {'graph ms':>9} {'of roofline (step)':>19}")
    for name, runs in results.items():
        if runs:
            step = statistics.median(r["step_ms"] for r in runs)
            graph = statistics.median(r["graph_ms"] for r in runs)
            share = 1e3 / step / statistics.median(r["roofline_tok_s"] for r in runs)
            print(f"{name:<16} {step:>8.3f} {graph:>9.3f} {share:>19.1%}")


if __name__ == "__main__":
    main()
