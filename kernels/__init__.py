"""Kernels (installed as nbllm.kernels): Triton GPU kernels with their torch references, and CPU C++ kernels
built on first use into one library (`cpu_library`)."""
