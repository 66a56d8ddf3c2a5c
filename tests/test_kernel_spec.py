"""The "nbllm" Jupyter kernel: installed into a temporary prefix, found by jupyter_client, and started for real —
`%%llm` works without `%load_ext`, and the live widget dashboard under the cell gives way to the static report."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from nbllm import kernel


@pytest.fixture
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The kernel spec installed under `tmp_path`, which is put on JUPYTER_PATH (as `jupyter` would search it)."""
    assert kernel.main(["install", "--prefix", str(tmp_path)]) == 0
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "share" / "jupyter"))
    return tmp_path / "share" / "jupyter" / "kernels" / "nbllm"


def test_install_and_read_back(installed: Path) -> None:
    from jupyter_client.kernelspec import KernelSpecManager

    assert json.loads((installed / "kernel.json").read_text()) == kernel.kernel_spec()
    spec = KernelSpecManager().get_kernel_spec("nbllm")
    assert spec.display_name == "Python 3 (nbllm)" and spec.language == "python"
    assert spec.argv[:3] == [sys.executable, "-m", "ipykernel_launcher"]
    assert "{connection_file}" in spec.argv and spec.argv[-2:] == ["--ext", "nbllm"]


def _execute(client: Any, code: str) -> list[dict[str, Any]]:
    """Run `code` in the kernel; the iopub messages it produced (the reply must be "ok")."""
    messages: list[dict[str, Any]] = []
    reply = client.execute_interactive(code, output_hook=messages.append, timeout=240)
    errors = [m["content"] for m in messages if m["msg_type"] == "error"]
    assert reply["content"]["status"] == "ok", errors or reply["content"]
    return messages


@pytest.mark.slow
def test_kernel_runs_llm_cells_without_load_ext(installed: Path, tiny_model, tmp_path: Path) -> None:
    pytest.importorskip("ipywidgets")
    from jupyter_client.manager import start_new_kernel

    path, _ = tiny_model("llama", "f32")
    manager, client = start_new_kernel(kernel_name="nbllm", startup_timeout=120, cwd=str(tmp_path))
    try:
        loaded = _execute(client, "print('nbllm' in get_ipython().extension_manager.loaded)")
        assert [m["content"]["text"] for m in loaded if m["msg_type"] == "stream"] == ["True\n"]
        _execute(client, f"%llm_model {path} --device cpu")
        messages = _execute(client, "%%llm --max-tokens 4 -o answer\nHello")
        widget = [m for m in messages if m["msg_type"] == "display_data"
                  and "application/vnd.jupyter.widget-view+json" in m["content"]["data"]]
        assert len(widget) == 1, "the live dashboard is shown while the cell generates"
        display_id = widget[0]["content"]["transient"]["display_id"]
        finals = [m["content"] for m in messages if m["msg_type"] == "update_display_data"
                  and m["content"]["transient"]["display_id"] == display_id]
        assert "nbllm-report" in finals[-1]["data"]["text/html"], "the widget gives way to the static report"
        assert not any(m["msg_type"] == "stream" and m["content"]["name"] == "stderr"
                       and "nbllm:" in m["content"]["text"] and "loading" not in m["content"]["text"]
                       for m in messages)
        answer = _execute(client, "print(type(answer).__name__, len(answer) > 0)")
        assert [m["content"]["text"] for m in answer if m["msg_type"] == "stream"] == ["str True\n"]
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
