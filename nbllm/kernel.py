"""`python -m nbllm.kernel install [--user] [--prefix P]`: a Jupyter kernel with nbllm already loaded.

The kernel is the ordinary IPython kernel of this Python (`sys.executable`, so it sees the environment nbllm is
installed in) started with `--ext nbllm`: every notebook on it has `%%llm` and the other magics from its first
cell, without `%load_ext nbllm`. `--ext` adds to the extensions the user's IPython config loads instead of
replacing them. Installing goes through `jupyter_client`'s `KernelSpecManager`, so the spec lands where
`jupyter kernelspec list` looks: the system or environment prefix by default, `--user` for the user's data
directory, `--prefix` for another environment (or a test's temporary folder).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

KERNEL_NAME = "nbllm"
DISPLAY_NAME = "Python 3 (nbllm)"


def kernel_spec() -> dict[str, Any]:
    """The `kernel.json` contents: ipykernel on this interpreter with the extension preloaded."""
    return {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}", "--ext", "nbllm"],
        "display_name": DISPLAY_NAME,
        "language": "python",
        "metadata": {"debugger": True},
    }


def install(*, user: bool = False, prefix: str | None = None, name: str = KERNEL_NAME) -> str:
    """Register the kernel spec; returns the directory it was installed to."""
    from jupyter_client.kernelspec import KernelSpecManager

    with tempfile.TemporaryDirectory() as source:
        (Path(source) / "kernel.json").write_text(json.dumps(kernel_spec(), indent=1))
        return KernelSpecManager().install_kernel_spec(source, kernel_name=name, user=user, prefix=prefix)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nbllm.kernel",
                                     description="Register a Jupyter kernel that preloads the nbllm magics.")
    commands = parser.add_subparsers(dest="command", required=True)
    cmd = commands.add_parser("install", help="install the kernel spec")
    where = cmd.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="into the user's Jupyter data directory")
    where.add_argument("--prefix", help="into PREFIX/share/jupyter/kernels (e.g. another environment)")
    cmd.add_argument("--name", default=KERNEL_NAME, help=f"kernel name (default: {KERNEL_NAME})")
    args = parser.parse_args(argv)
    path = install(user=args.user, prefix=args.prefix, name=args.name)
    print(f"installed kernel spec {args.name!r} ({DISPLAY_NAME}) in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
