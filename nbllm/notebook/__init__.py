"""The notebook front-end: IPython magics, streamed cell output, reports under each cell."""

from __future__ import annotations

from typing import Any


def load_ipython_extension(ipython: Any) -> None:
    """`%load_ext nbllm`: register the magics; the model itself loads on first use."""
    from nbllm.notebook.magics import NbllmMagics

    ipython.register_magics(NbllmMagics(ipython))
