"""Constrained decoding on the Gemma vocabulary (262,144 tokens), CPU: nbllm beside xgrammar, llguidance and
outlines-core in the same run, over the JSON Schema suite of `tests/constrain_schemas.py`.

For every schema and each of its hand-written instances (`json.dumps`, keys in schema order) the instance is
tokenized with the Gemma tokenizer and walked token by token as a decoder would: compute the next-token mask,
check the instance's token is allowed, advance; at the end the mask must allow EOS. Reported per library:

- compile: schema → the library's compiled form (everything done before the first mask), p50 and max;
- mask cold: the first walk over a freshly compiled grammar (nbllm computes each state's mask here);
- mask warm: a second walk with a new matcher over the same compiled grammar (nbllm: cached masks);
- valid accepted / invalid rejected: instances the masks let through to EOS, and invalid ones they stop;
- unsupported: schemas the library refuses to compile.

A mask time is what it takes to get a usable mask for the sampler: nbllm's `TokenIndex.mask` plus writing it
into a bool row of the `[B, V]` mask; the peers' own bitmask fill (xgrammar `fill_next_token_bitmask`,
llguidance `fill_next_token_bitmask`, outlines-core `Guide.write_mask_into`).

The peers are benchmark-only and never nbllm dependencies; install them into a folder of their own (xgrammar's
other requirements, torch, pydantic, transformers and numpy, are already in nbllm's environment):

    pip install --target ~/.cache/nbllm/constrained-peers --no-deps xgrammar apache-tvm-ffi llguidance outlines-core
    python benchmarks/constrained_cpu.py [--peers-path DIR] [--libs nbllm,xgrammar,llguidance,outlines-core]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

from constrain_schemas import SCHEMAS

from nbllm.constrain import compile_json_schema
from nbllm.constrain.token_index import TokenIndex, VocabTrie
from nbllm.defaults import default_model_path
from nbllm.tokenizer import Tokenizer, from_gguf

PEERS_PATH = Path.home() / ".cache" / "nbllm" / "constrained-peers"

Walk = Callable[[list[int]], tuple[list[float], bool]]  # tokens (+ EOS) -> mask seconds per step, accepted


@dataclass
class Result:
    name: str
    setup_s: float = 0.0  # vocabulary/tokenizer structures, once per library
    compile_s: list[float] = field(default_factory=list)
    cold: list[float] = field(default_factory=list)
    warm: list[float] = field(default_factory=list)
    valid: list[bool] = field(default_factory=list)
    rejected: list[bool] = field(default_factory=list)
    let_through: list[str] = field(default_factory=list)  # schemas with an invalid instance the masks allowed
    unsupported: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # schemas with a valid instance the masks stopped


class Library:
    """One constrained-decoding implementation: `compile(schema)` returns a factory of fresh walkers."""

    name: str
    eos: int

    def compile(self, schema: Any) -> Callable[[], Walk]:
        raise NotImplementedError


class Nbllm(Library):
    name = "nbllm"

    def __init__(self, tokenizer: Tokenizer, trie: VocabTrie) -> None:
        self.trie, self.eos = trie, 1
        self.row = np.empty(trie.vocab_size, dtype=np.bool_)

    def compile(self, schema: Any) -> Callable[[], Walk]:
        index = TokenIndex(compile_json_schema(schema), self.trie)  # masks are computed lazily, on first use

        def walker() -> Walk:
            def walk(tokens: list[int]) -> tuple[list[float], bool]:
                state, times = index.initial(), []
                for token in tokens:
                    start = time.perf_counter()
                    index.mask(state).write(self.row)
                    times.append(time.perf_counter() - start)
                    if not self.row[token]:
                        return times, False
                    if token != self.eos:
                        state = index.advance(state, token)
                return times, True

            return walk

        return walker


class XGrammar(Library):
    name = "xgrammar"

    def __init__(self, tokenizer: Tokenizer, trie: VocabTrie) -> None:
        import xgrammar as xgr

        self.xgr, self.eos = xgr, 1
        vocab = [trie.token_bytes[i] if trie.is_text(i) else b"" for i in range(trie.vocab_size)]
        info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=trie.vocab_size,
                                 stop_token_ids=sorted(trie.eos_set))
        self.compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
        self.bitmask = xgr.allocate_token_bitmask(1, trie.vocab_size)

    def compile(self, schema: Any) -> Callable[[], Walk]:
        compiled = self.compiler.compile_json_schema(json.dumps(schema))

        def walker() -> Walk:
            matcher = self.xgr.GrammarMatcher(compiled)

            def walk(tokens: list[int]) -> tuple[list[float], bool]:
                times = []
                for token in tokens:
                    start = time.perf_counter()
                    matcher.fill_next_token_bitmask(self.bitmask)
                    times.append(time.perf_counter() - start)
                    if not _bit(self.bitmask.numpy()[0], token) or not matcher.accept_token(token):
                        return times, False
                return times, True

            return walk

        return walker


class LLGuidance(Library):
    name = "llguidance"

    def __init__(self, tokenizer: Tokenizer, trie: VocabTrie) -> None:
        import llguidance
        import llguidance.numpy

        self.llg, self.eos = llguidance, 1

        class Vocab:  # what llguidance.TokenizerWrapper reads
            def __init__(self) -> None:
                self.eos_token_id, self.bos_token_id = 1, tokenizer.bos_token_id
                self.tokens = list(trie.token_bytes)
                self.special_token_ids = [i for i in range(trie.vocab_size) if not trie.is_text(i)]

            def __call__(self, data: bytes) -> list[int]:
                return tokenizer.encode(data.decode("utf-8", errors="replace"), False, parse_special=False)

        self.tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(Vocab()))
        self.bitmask = llguidance.numpy.allocate_token_bitmask(1, trie.vocab_size)

    def compile(self, schema: Any) -> Callable[[], Walk]:
        grammar = self.llg.LLMatcher.grammar_from_json_schema(json.dumps(schema))
        error = self.llg.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise ValueError(error)

        def walker() -> Walk:
            matcher = self.llg.LLMatcher(self.tokenizer, grammar)

            def walk(tokens: list[int]) -> tuple[list[float], bool]:
                times = []
                for token in tokens:
                    start = time.perf_counter()
                    self.llg.numpy.fill_next_token_bitmask(matcher, self.bitmask, 0)
                    times.append(time.perf_counter() - start)
                    if not _bit(self.bitmask[0], token) or not matcher.consume_token(token):
                        return times, False
                return times, True

            return walk

        return walker


class OutlinesCore(Library):
    name = "outlines-core"

    def __init__(self, tokenizer: Tokenizer, trie: VocabTrie) -> None:
        import outlines_core

        self.oc, self.eos = outlines_core, 1
        spellings: dict[bytes, list[int]] = {}
        for i in range(trie.vocab_size):
            if trie.is_text(i):
                spellings.setdefault(trie.token_bytes[i], []).append(i)
        self.vocabulary = outlines_core.Vocabulary(self.eos, spellings)
        self.mask = np.zeros((trie.vocab_size + 31) // 32, dtype=np.int32)

    def compile(self, schema: Any) -> Callable[[], Walk]:
        from outlines_core.json_schema import build_regex_from_schema

        index = self.oc.Index(build_regex_from_schema(json.dumps(schema)), self.vocabulary)

        def walker() -> Walk:
            guide = self.oc.Guide(index)

            def walk(tokens: list[int]) -> tuple[list[float], bool]:
                times = []
                for token in tokens:
                    start = time.perf_counter()
                    guide.write_mask_into(self.mask.ctypes.data, self.mask.size, 4)
                    times.append(time.perf_counter() - start)
                    if not _bit(self.mask, token):
                        return times, False
                    if token != self.eos:
                        guide.advance(token)
                return times, True

            return walk

        return walker


def _bit(words: np.ndarray, token: int) -> bool:
    """Token `token`'s bit in a 32-bit-word bitmask (bit i of word i // 32), the layout all three peers use."""
    return bool((int(words[token >> 5]) >> (token & 31)) & 1)


LIBRARIES: dict[str, type[Library]] = {"nbllm": Nbllm, "xgrammar": XGrammar, "llguidance": LLGuidance,
                                       "outlines-core": OutlinesCore}


def run(library: Library, cases: list[tuple[str, Any, list[list[int]], list[list[int]]]], result: Result) -> None:
    for name, schema, valid, invalid in cases:
        start = time.perf_counter()
        try:
            walker = library.compile(schema)
        except Exception as error:  # noqa: BLE001 (each library's own error type): counted as unsupported
            result.unsupported.append(f"{name}: {type(error).__name__}: {str(error)[:80]}")
            continue
        result.compile_s.append(time.perf_counter() - start)
        for tokens in valid:
            times, ok = walker()(tokens)
            result.cold.extend(times)
            result.valid.append(ok)
            if not ok:
                result.failed.append(name)
        for tokens in valid:
            times, _ = walker()(tokens)
            result.warm.extend(times)
        for tokens in invalid:
            result.rejected.append(not walker()(tokens)[1])
            if not result.rejected[-1]:
                result.let_through.append(name)


def us(values: list[float], q: float) -> str:
    return f"{np.percentile(values, q) * 1e6:,.0f}" if values else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers-path", type=Path, default=PEERS_PATH)
    parser.add_argument("--libs", default=",".join(LIBRARIES))
    parser.add_argument("--schemas", type=int, default=len(SCHEMAS), help="the first N schemas of the suite")
    args = parser.parse_args()
    if args.peers_path.is_dir():
        sys.path.append(str(args.peers_path))

    tokenizer = from_gguf(default_model_path())
    start = time.perf_counter()
    trie = VocabTrie.from_tokenizer(tokenizer)  # nbllm's setup; the peers read token bytes from it
    trie_s = time.perf_counter() - start

    def encode(value: Any) -> list[int]:
        return tokenizer.encode(json.dumps(value, ensure_ascii=False), False) + [1]  # + EOS

    cases = [(c.name, c.schema, [encode(v) for v in c.valid], [encode(v) for v in c.invalid])
             for c in SCHEMAS[: args.schemas]]
    results = []
    for name in args.libs.split(","):
        result = Result(name)
        start = time.perf_counter()
        try:
            library = LIBRARIES[name](tokenizer, trie)
        except ImportError as error:
            print(f"{name}: not installed ({error}); see this script's docstring")
            continue
        result.setup_s = time.perf_counter() - start + (trie_s if name == "nbllm" else 0.0)
        run(library, cases, result)
        results.append(result)
        print(f"{name}: done", file=sys.stderr, flush=True)

    print(f"\n{len(cases)} schemas, {sum(len(c[2]) for c in cases)} valid and {sum(len(c[3]) for c in cases)} "
          f"invalid instances, Gemma 3 vocabulary ({trie.vocab_size:,} tokens; nbllm's trie {trie.num_nodes:,} "
          "nodes); setup: vocabulary structures, once; mask times in µs\n")
    print("| library | setup s | compile p50 ms | compile max ms | mask cold p50 | cold p99 | mask warm p50 | "
          "warm p99 | valid accepted | invalid rejected | unsupported |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        compile_ms = [s * 1e3 for s in r.compile_s]
        print(f"| {r.name} | {r.setup_s:.1f} | {statistics.median(compile_ms) if compile_ms else 0:.1f} | "
              f"{max(compile_ms, default=0):.0f} | {us(r.cold, 50)} | {us(r.cold, 99)} | {us(r.warm, 50)} | "
              f"{us(r.warm, 99)} | {sum(r.valid)}/{len(r.valid)} | {sum(r.rejected)}/{len(r.rejected)} | "
              f"{len(r.unsupported)} |")
    for r in results:
        for line in r.unsupported:
            print(f"  {r.name} unsupported: {line}")
        if r.failed:
            print(f"  {r.name} stopped valid instances of: {', '.join(r.failed)}")
        if r.let_through:
            print(f"  {r.name} let invalid instances through: {', '.join(r.let_through)}")


if __name__ == "__main__":
    main()
