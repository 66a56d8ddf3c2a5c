"""The live dashboard's numbers, its redraw throttle, and its hand-over to a static output (report or summary)."""

from __future__ import annotations

import time
from typing import Any

import pytest

pytest.importorskip("ipywidgets")

from nbllm.widgets import live


class _Handle:
    """Stands in for IPython's DisplayHandle outside a kernel: records what the output was replaced by."""

    def __init__(self) -> None:
        self.updates: list[Any] = []

    def update(self, obj: Any) -> None:
        self.updates.append(obj)


@pytest.fixture
def handle(monkeypatch: pytest.MonkeyPatch) -> _Handle:
    h = _Handle()
    monkeypatch.setattr(live, "display", lambda obj, display_id: h)
    return h


def test_numbers_and_throttle(handle: _Handle) -> None:
    dash = live.LiveDashboard(8, min_interval=3600)
    dash.update(1, 2, 100)  # first draw: at once
    assert dash.bar.value == 1 and "1/8 tokens" in dash.label.value and "KV blocks 2/100" in dash.label.value
    time.sleep(0.01)
    dash.update(5, 3, 100)  # within the interval: recorded, not drawn
    assert dash.bar.value == 1 and dash.generated == 5 and dash.tok_s is not None and dash.tok_s > 0
    dash.min_interval = 0
    dash.update(9, 3, 100)
    assert dash.bar.value == 8  # the bar stops at max_tokens (n > 1 requests count every completion)


def test_finish_replaces_the_widgets_once(handle: _Handle) -> None:
    dash = live.LiveDashboard(4)
    dash.finish("the report")
    dash.close()  # the cell's `finally`: nothing more to do
    assert handle.updates == ["the report"] and not dash.open and dash.box.comm is None


def test_close_freezes_the_last_numbers(handle: _Handle) -> None:
    dash = live.LiveDashboard(4, min_interval=0)
    dash.update(2, 1, 10)
    dash.close()
    (frozen,) = handle.updates
    assert "stopped: 2/4 tokens" in frozen.data and not dash.open
