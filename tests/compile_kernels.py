"""Compiles every variant of the decode path's Triton kernels that the engine launches for Hopper (sm_90), without
a GPU (Triton and its bundled `ptxas` build the cubins), and prints the ones that fail. Run by
tests/test_kernels_compile.py in a process of its own: the test session runs Triton's interpreter, which the
compiler cannot use.

`python3 tests/compile_kernels.py --resources` also prints each variant's registers, spills, SASS instructions
and barriers, and how many of its programs fit an SM at once: what decides whether the next kernel of a decode
step can start beside it (the register cap of `gemv.max_registers` came from this table)."""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from nbllm.kernels import argmax_logsumexp, decode_attention, embedding, gemv, rmsnorm, rotary

HOPPER = GPUTarget("cuda", 90, 32)
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
INT32_POINTERS = {"tables_ptr", "ctx_ptr", "slots_ptr", "counter_ptr", "ids_ptr", "part_arg_ptr"}
FP32_POINTERS = {"cos_ptr", "sin_ptr", "mid_o_ptr", "mid_lse_ptr", "part_max_ptr", "part_sum_ptr", "lse_ptr",
                 "lp_ptr"}
FLOATS = {"eps", "scale"}


def compile_for_hopper(fn, constants: dict, dtype: str = "bf16",
                       pointers: dict | None = None) -> tuple[int | None, bytes]:
    """Compile `fn` with `constants` for its constexpr arguments; pointers to activations and weights are `dtype`
    unless `pointers` names their type, the rest as the launchers pass them; every pointer 16-byte aligned, as
    torch allocates; the GEMV under the register cap its launcher sets. Returns the cap and the cubin; fails if a
    capped kernel spills registers to local memory."""
    signature = {}
    for name in fn.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif pointers and name in pointers:
            signature[name] = pointers[name]
        elif name == "pos_ptr":
            signature[name] = "*i64"
        elif name in INT32_POINTERS:
            signature[name] = "*i32"
        elif name in FP32_POINTERS:
            signature[name] = "*fp32"
        elif name.endswith("_ptr"):
            signature[name] = f"*{dtype}"
        else:
            signature[name] = "fp32" if name in FLOATS else "i32"
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if name.endswith("_ptr")}
    cap = None
    if fn is gemv._gemv_kernel:
        cap = gemv.max_registers(constants["PROLOGUE"], constants["BLOCK_M"], constants["BLOCK_N"],
                                 constants["BLOCK_K"], 4, even_n=constants["EVEN_N"],
                                 has_residual=constants["HAS_RESIDUAL"], element_size=4 if dtype == "fp32" else 2)
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=aligned),
                              target=HOPPER, options={"num_warps": 4, **({"maxnreg": cap} if cap else {})})
    cubin = compiled.asm["cubin"]
    if cap:
        stack = resources(cubin)["stack"]
        assert stack == 0, f"spills {stack} bytes a thread to local memory under its register cap"
    return cap, cubin


def resources(cubin: bytes, num_warps: int = 4) -> dict[str, int]:
    """A cubin's registers and stack (spilled registers) a thread, SASS instructions and barriers, by Triton's
    bundled cuobjdump, and its programs an SM (Hopper: 64K registers allocated per warp in 256s, 2,048 threads,
    32 programs)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage, sass = (subprocess.run([str(CUOBJDUMP), flag, f.name], capture_output=True, text=True,
                                      check=True).stdout for flag in ("-res-usage", "-sass"))
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    warp_registers = -(-registers * 32 // 256) * 256
    return {"registers": registers, "stack": int(re.search(r"STACK:(\d+)", usage).group(1)),
            "instructions": len(re.findall(r"^\s+/\*[0-9a-f]{4}\*/", sass, re.M)),
            "barriers": len(re.findall(r"\bBAR\.SYNC", sass)),
            "programs_per_sm": min(65536 // (warp_registers * num_warps), 2048 // (32 * num_warps), 32)}


def variants():
    """(label, kernel, constants, pointer dtype[, pointer types that differ]) for each variant."""
    for dtype, prologue, (k, rows), bias, residual in itertools.product(
            ["bf16", "fp32"], [-2, -1, 0, 1], [(1024, 1), (3072, 1), (1000, 3)], [False, True], [False, True]):
        block_k = gemv._block_k(rows, k, gemv._BLOCK_N)
        yield (f"gemv {dtype} prologue={prologue} K={k} rows={rows} bias={bias} residual={residual}",
               gemv._gemv_kernel, dict(K=k, BLOCK_M=triton.next_power_of_2(rows), BLOCK_N=gemv._BLOCK_N,
                                       BLOCK_K=block_k, PROLOGUE=prologue, HAS_BIAS=bias, HAS_RESIDUAL=residual,
                                       EVEN_N=False, EVEN_K=k % block_k == 0, PDL=True), dtype)
    for dtype, k, bias in itertools.product(["bf16", "fp16"], [640, 896, 1024], [False, True]):
        block_k = gemv._block_k(1, k, gemv._BLOCK_N)  # the register-capped pre-norm projections of batch 1
        yield (f"gemv {dtype} norm K={k} rows=1 bias={bias} whole row groups", gemv._gemv_kernel,
               dict(K=k, BLOCK_M=1, BLOCK_N=gemv._BLOCK_N, BLOCK_K=block_k, PROLOGUE=-1, HAS_BIAS=bias,
                    HAS_RESIDUAL=False, EVEN_N=True, EVEN_K=k % block_k == 0, PDL=True), dtype)
    for prologue in (-2, -1):  # the logits, the final norm folded in or not
        yield (f"gemv bf16 -> fp32 prologue={prologue}", gemv._gemv_kernel,
               dict(K=1024, BLOCK_M=1, BLOCK_N=gemv._BLOCK_N, BLOCK_K=1024, PROLOGUE=prologue, HAS_BIAS=False,
                    HAS_RESIDUAL=False, EVEN_N=True, EVEN_K=True, PDL=True), "bf16", {"out_ptr": "*fp32"})
    for (dtype, precision, group), (rope, norm), splits in itertools.product(
            [("bf16", "tf32", 2), ("fp32", "ieee", 4)], [(False, False), (True, False), (True, True)], [1, 16]):
        yield (f"decode attention {dtype} group={group} rope={rope} norm={norm} splits={splits}",
               decode_attention._split_kernel,
               dict(HQ=8 * group, HKV=8, GROUP=group, D=128, BLOCK_D=128, BLOCK_H=16, BLOCK_N=64, BLOCK_SIZE=16,
                    SPLITS=splits, PRECISION=precision, PDL=True, ROPE=rope, NORM=norm), dtype)
    for norm, store in [(False, False), (True, False), (True, True)]:
        yield (f"rotary q/k norm={norm} store={store}", rotary._qk_kernel,
               dict(HQ=16, HKV=8, HALF=64, BLOCK_Q=16, BLOCK_K=8, BLOCK_D=64, NORM=norm, STORE=store, PDL=True),
               "bf16")
    for add in (False, True):
        yield f"rms norm add={add}", rmsnorm._norm_kernel, dict(N=1024, BLOCK=1024, ADD=add, PDL=True), "bf16"
    for dtype, placeholders, scale in itertools.product(["bf16", "fp32"], [False, True], [False, True]):
        yield (f"embedding {dtype} placeholders={placeholders} scale={scale}", embedding._embedding_kernel,
               dict(H=640, BLOCK=1024, PLACEHOLDERS=placeholders, SCALE=scale, PDL=True), dtype,
               {"ids_ptr": "*i64", "placeholders_ptr": "*i64"})
    for host in (False, True):  # a decode graph's: its tokens to the host, its next inputs advanced
        yield (f"argmax/logsumexp graph={host}", argmax_logsumexp._kernel,
               dict(CHUNK=4096, CHUNKS=38, BLOCK_C=64, PDL=True, HOST=host, ADVANCE=host, BLOCK_SIZE=16), "fp32",
               {"host_ids_ptr": "*i64", "host_lp_ptr": "*fp32", "halves_ptr": "*i64", "inputs_ptr": "*i64"})


def main() -> int:
    failed, count, capped = [], 0, 0
    for label, fn, constants, dtype, *pointers in variants():
        count += 1
        try:
            cap, cubin = compile_for_hopper(fn, constants, dtype, *pointers)
            capped += cap is not None
            if "--resources" in sys.argv:
                print(label, " ".join(f"{k}={v}" for k, v in resources(cubin).items()))
        except Exception:  # report every variant that fails, not only the first
            failed.append(label)
            print(f"FAILED {label}\n{traceback.format_exc(limit=1)}")
    print(f"{count - len(failed)} of {count} variants compiled for sm_90, {capped} under a register cap")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
