"""Text streaming into a cell: a display that is updated in place in a notebook, plain prints in a terminal."""

from __future__ import annotations

import html
import sys
from typing import TYPE_CHECKING, Any

from nbllm.engine.outputs import RequestOutput

if TYPE_CHECKING:
    from nbllm.widgets.live import LiveDashboard


def in_notebook() -> bool:
    """Whether rich display updates reach a front-end (a Jupyter kernel), as opposed to a terminal IPython."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and shell.has_trait("kernel")


def show(obj: Any) -> None:
    """Display a report: rich HTML in a notebook, its text form in a terminal."""
    if in_notebook():
        from IPython.display import display

        display(obj)
    else:
        print(repr(obj))


def live_dashboard(max_tokens: int) -> LiveDashboard | None:
    """A live ipywidgets dashboard for a generating cell, or None where it could not show: a terminal IPython,
    or no ipywidgets installed (the static report under the cell is then all there is)."""
    if not in_notebook():
        return None
    try:
        from nbllm.widgets.live import LiveDashboard
    except ImportError:
        return None
    return LiveDashboard(max_tokens)


class StreamView:
    """Shows the texts of a request's `n` completions as they grow (side by side when n > 1)."""

    def __init__(self, n: int, *, live: bool) -> None:
        self.n, self.live = n, live
        self.notebook = in_notebook()
        self.texts = [""] * n
        self.handle = None
        if self.live and self.notebook:
            from IPython.display import HTML, display

            self.handle = display(HTML(self._html()), display_id=True)

    def update(self, out: RequestOutput) -> None:
        for c in out.outputs:
            self.texts[c.index] = c.text
            if self.live and not self.notebook and self.n == 1 and c.text_delta:
                sys.stdout.write(c.text_delta)
                sys.stdout.flush()
        if self.handle is not None:
            from IPython.display import HTML

            self.handle.update(HTML(self._html()))

    def close(self) -> None:
        """After the last update: show the texts now if nothing was streamed."""
        if self.notebook and self.handle is None:
            from IPython.display import HTML, display

            display(HTML(self._html()))
        elif not self.notebook:
            if self.live and self.n == 1:
                sys.stdout.write("\n")
            else:
                for i, text in enumerate(self.texts):
                    print(f"[{i}] {text}" if self.n > 1 else text)

    def _html(self) -> str:
        boxes = "".join(
            f"<pre class='nbllm-text' style='white-space:pre-wrap;flex:1;margin:0 6px 0 0;padding:6px;"
            f"background:#f7f7f7'>{html.escape(t)}</pre>" for t in self.texts)
        return f"<div style='display:flex'>{boxes}</div>"
