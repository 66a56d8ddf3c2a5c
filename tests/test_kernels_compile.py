"""The decode path's Triton kernels compile for Hopper (sm_90) in every variant the engine launches, here, without
a GPU (tests/compile_kernels.py: Triton and its bundled `ptxas` build the cubins as they would on the device).

The interpreter tests (tests/test_kernels_gpu.py and friends, run on the CPU where there is no GPU) check what
the kernels compute, but the interpreter is dynamic: it accepts code the compiler rejects (a variable given
another shape inside a branch) and never sees the inline PTX of programmatic-dependent launch. GPU time is
scarce, so a kernel that does not compile should fail here, not on the device.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")


@pytest.mark.slow
def test_every_decode_kernel_variant_compiles_for_hopper() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "0"}  # the session's interpreter cannot be compiled
    run = subprocess.run([sys.executable, str(Path(__file__).with_name("compile_kernels.py"))], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "variants compiled for sm_90" in run.stdout
    assert " 0 under a register cap" not in run.stdout  # the cap's no-spill check ran
