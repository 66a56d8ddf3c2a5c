"""A live ipywidgets dashboard under a generating `%%llm` cell: tokens so far, tok/s, KV blocks, progress.

Widgets only live while a kernel is attached to the front-end: a saved notebook, nbconvert or nbviewer cannot
show them. So the dashboard is shown through a display id and, when the cell ends, that same output is replaced
by the static HTML report (`finish`) or, after an interrupt or error, by a one-line static summary (`close`):
the notebook file never keeps a widget without a static form.

Importing this module needs ipywidgets; the notebook front-end treats the ImportError as "no live dashboard".
"""

from __future__ import annotations

import html
import time
from typing import Any

import ipywidgets as widgets
from IPython.display import HTML, display


class LiveDashboard:
    """A progress bar of `max_tokens` and a line of numbers, redrawn at most every `min_interval` seconds."""

    def __init__(self, max_tokens: int, *, min_interval: float = 0.2) -> None:
        self.min_interval = min_interval
        self.max_tokens = max(1, max_tokens)
        self.generated = self.kv_used = self.kv_total = 0
        self.tok_s: float | None = None
        self._first: tuple[float, int] | None = None  # (time, tokens) when tokens were first seen
        self._drawn_at = float("-inf")
        self.bar = widgets.IntProgress(value=0, min=0, max=self.max_tokens, description="tokens",
                                       bar_style="info", layout=widgets.Layout(width="240px"))
        self.label = widgets.HTML(self._line())
        self.box = widgets.HBox([self.bar, self.label])
        self.handle = display(self.box, display_id=True)
        self.open = True

    def update(self, generated: int, kv_used: int, kv_total: int) -> None:
        """Record the request's state after a step; redraw when `min_interval` has passed since the last draw.

        The rate counts tokens after the first ones seen, over the time since then, so it is a decode speed that
        does not include prefill or model loading."""
        now = time.perf_counter()
        self.generated, self.kv_used, self.kv_total = generated, kv_used, kv_total
        if self._first is None and generated:
            self._first = (now, generated)
        elif self._first is not None and now > self._first[0]:
            self.tok_s = (generated - self._first[1]) / (now - self._first[0])
        if now - self._drawn_at >= self.min_interval:
            self._draw()
            self._drawn_at = now

    def finish(self, report: Any) -> None:
        """Replace the dashboard by the cell's static report (it keeps the last numbers, and survives nbconvert)."""
        if self.open:
            self.handle.update(report)
            self._close_widgets()

    def close(self) -> None:
        """Freeze the dashboard as static HTML with its last numbers (for a cell that ended without a report)."""
        if self.open:
            self.handle.update(HTML(f"<div class='nbllm-live' style='font-family:sans-serif;color:#888'>"
                                    f"stopped: {self._line()}</div>"))
            self._close_widgets()

    def _draw(self) -> None:
        self.bar.value = min(self.generated, self.max_tokens)
        self.label.value = self._line()

    def _line(self) -> str:
        rate = "–" if self.tok_s is None else f"{self.tok_s:.1f}"
        kv = f"{self.kv_used}/{self.kv_total}" if self.kv_total else "–"
        return html.escape(f"{self.generated}/{self.max_tokens} tokens · "
                           f"{rate} tok/s · KV blocks {kv}")

    def _close_widgets(self) -> None:
        for w in (self.bar, self.label, self.box):
            w.close()
        self.open = False
