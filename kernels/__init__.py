"""Triton GPU kernels with their torch references (installed as nbllm.kernels)."""
