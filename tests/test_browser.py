"""A real browser on a real JupyterLab: Debian's Chromium, driven by Playwright, opens a notebook, runs a
`%%llm` cell on the default model, and sees what a user would see — the live widget dashboard while the cell
runs, the streamed text, and the static report (TTFT, tok/s) that replaces the dashboard at the end.

Kernel-level tests (test_kernel_spec, test_notebook_magics) check the messages; only a browser shows whether
the front-end renders them: a widget view that fails to load, or a display update that never lands, passes
those tests and still shows the user nothing. A screenshot is saved either way, to $NBLLM_BROWSER_SCREENSHOT
(default tests/artifacts/browser.png, git-ignored).
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Page

CHROMIUM = "/usr/bin/chromium"
SETUP_HINT = "run `bash scripts/setup.sh` (it installs jupyterlab and playwright, and Debian's chromium)"
# Playwright adds --headless and --no-sandbox and a fresh --user-data-dir itself; the rest keep Chromium off
# the network (on a closed machine it otherwise stalls on refused connections at start).
CHROMIUM_ARGS = ["--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
SCREENSHOT = Path(os.environ.get("NBLLM_BROWSER_SCREENSHOT",
                                 Path(__file__).resolve().parent / "artifacts" / "browser.png"))
PROMPT = "The capital of France is"
MAX_TOKENS = 12
KERNEL_NAME = "Python 3 (ipykernel)"


@dataclass
class Lab:
    """A running JupyterLab: where to point the browser, and its log for failure messages."""

    url: str
    log: Path

    def log_tail(self, chars: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _notebook(path: Path) -> None:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": KERNEL_NAME, "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell("%load_ext nbllm"),
                nbformat.v4.new_code_cell(f"%%llm --max-tokens {MAX_TOKENS}\n{PROMPT}")]
    nbformat.write(nb, path)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    """`jupyter lab` on a free loopback port with a known token, serving a folder that holds `browser.ipynb`.

    Its config, data, runtime, settings and workspace folders are temporary, so a developer's own Jupyter
    set-up does not leak in (and the news pop-up, which would ask the closed network, stays off); the python3
    kernel is ipykernel on this interpreter (sys.prefix's kernel spec)."""
    if importlib.util.find_spec("jupyterlab") is None:
        pytest.fail(f"jupyterlab is not installed for {sys.executable}: {SETUP_HINT}")
    root = tmp_path / "root"
    root.mkdir()
    _notebook(root / "browser.ipynb")
    settings = tmp_path / "settings"
    (settings / "@jupyterlab" / "apputils-extension").mkdir(parents=True)
    (settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(tmp_path / "config"), JUPYTER_DATA_DIR=str(tmp_path / "data"),
               JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"), IPYTHONDIR=str(tmp_path / "ipython"),
               JUPYTERLAB_SETTINGS_DIR=str(settings), JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "workspaces"))
    port, token = _free_port(), secrets.token_hex(16)
    log = tmp_path / "lab.log"
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={root}"]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    lab = Lab(f"http://127.0.0.1:{port}/lab/tree/browser.ipynb?token={token}", log)
    try:
        _wait_ready(proc, f"http://127.0.0.1:{port}/api/status?token={token}", lab)
        yield lab
    finally:
        proc.terminate()  # the server shuts its kernels down on SIGTERM
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _wait_ready(proc: subprocess.Popen, status_url: str, lab: Lab, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"jupyter lab exited with {proc.returncode} before serving; its log:\n{lab.log_tail()}",
                        pytrace=False)
        try:
            with urllib.request.urlopen(status_url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"jupyter lab did not answer {status_url} within {timeout:.0f} s; its log:\n{lab.log_tail()}",
                pytrace=False)


@pytest.fixture
def page() -> Iterator[Page]:
    """A page in headless Debian Chromium (no browser download: Playwright drives the system one)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(f"playwright is not installed for {sys.executable}: {SETUP_HINT}")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: {SETUP_HINT}")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": 1280, "height": 900})
        finally:
            browser.close()


# Installed before the cells run, it records what the `%%llm` cell's output area showed over time: each new
# text of the stream box, each new line of the live widget dashboard, and any widget error JupyterLab printed
# (a widget whose view cannot be built shows "Error displaying widget" instead of failing the cell).
WATCH_OUTPUT = """([cell, PROGRESS]) => {
  const seen = window.nbllmSeen = {texts: [], widget: [], errors: []};
  const push = (list, value) => { if (value && list[list.length - 1] !== value) list.push(value); };
  new MutationObserver(() => {
    const area = document.querySelectorAll('.jp-Notebook .jp-CodeCell')[cell].querySelector('.jp-OutputArea');
    if (!area) return;
    const text = area.querySelector('pre.nbllm-text');
    if (text) push(seen.texts, text.textContent);
    const bar = area.querySelector(PROGRESS);
    if (bar) push(seen.widget, bar.closest('.widget-hbox').textContent);
    if (area.textContent.includes('Error displaying widget')) push(seen.errors, area.textContent);
  }).observe(document.body, {subtree: true, childList: true, characterData: true, attributes: true});
}"""
PROGRESS = ".jupyter-widgets.widget-hprogress"  # ipywidgets 8's horizontal IntProgress view
REPORT_ROWS = """area => Object.fromEntries([...area.querySelectorAll('.nbllm-report > div:first-child > div')]
  .map(d => [d.children[0].textContent, d.children[1].textContent]))"""


def _reference(prompt: str):
    """What the cell must show: the same request through the notebook session in this process (greedy)."""
    from nbllm.engine.sampling_params import SamplingParams
    from nbllm.notebook.session import CellRequest, Session

    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)  # the magic's defaults
    *_, final = Session().run(CellRequest(prompt, greedy))
    return final.outputs[0]


def _what_the_page_shows(page: Page) -> str:
    """For a failure message: the notebook's text (a cell's traceback shows there) and a screenshot."""
    from playwright.sync_api import Error as PlaywrightError

    try:
        page.screenshot(path=str(SCREENSHOT), full_page=True)
        return f"screenshot: {SCREENSHOT}\nthe notebook shows:\n{page.locator('.jp-Notebook').inner_text(timeout=5000)}"
    except PlaywrightError as exc:
        return f"(the page could not be read: {exc.message})"


@pytest.mark.slow
def test_llm_cell_in_jupyterlab(default_model_path: Path, page: Page, lab: Lab,
                                capsys: pytest.CaptureFixture[str]) -> None:
    from playwright.sync_api import Error as PlaywrightError

    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        page.goto(lab.url, timeout=60_000)
        # The status bar names the kernel once it is connected (the toolbar's indicator says "idle" before that,
        # and a run then would open the Select Kernel dialog).
        page.locator(".jp-StatusBar-TextItem", has_text=f"{KERNEL_NAME} | Idle").wait_for(timeout=60_000)
        ready = time.perf_counter()
        page.evaluate(WATCH_OUTPUT, [1, PROGRESS])
        page.get_by_role("menuitem", name="Run", exact=True).click()
        page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
        area = page.locator(".jp-Notebook .jp-CodeCell").nth(1).locator(".jp-OutputArea")
        area.locator(".nbllm-report").wait_for(timeout=120_000)
        done = time.perf_counter()
        shown_text = area.locator("pre.nbllm-text").inner_text()
        rows = area.evaluate(REPORT_ROWS)
        seen = page.evaluate("window.nbllmSeen")
        widgets_left = area.locator(PROGRESS).count()
        block_map = area.locator(".nbllm-report svg").is_visible()
        page.screenshot(path=str(SCREENSHOT), full_page=True)
    except PlaywrightError as exc:
        message = f"{exc}\n{_what_the_page_shows(page)}\njupyter lab log:\n{lab.log_tail()}"
        raise pytest.fail.Exception(message, pytrace=False) from None  # the message once, not chained twice
    with capsys.disabled():
        print(f"\nbrowser: notebook open with kernel idle {ready - start:.1f} s, cells run {done - ready:.1f} s")

    ref = _reference(PROMPT)
    look = f"(screenshot: {SCREENSHOT})"
    assert ref.text.strip(), "the reference generated nothing; the check below would be empty"
    assert shown_text == ref.text, f"the cell shows {shown_text!r}, the engine generates {ref.text!r} {look}"
    assert all(ref.text.startswith(t) for t in seen["texts"]), f"a streamed text is not a prefix: {seen['texts']}"
    assert any(t != ref.text for t in seen["texts"]), f"the text never showed before it was complete: {seen} {look}"
    assert not seen["errors"], f"JupyterLab could not display the live widget: {seen['errors'][0]} {look}"
    assert any(f"/{MAX_TOKENS} tokens" in line and "tok/s" in line for line in seen["widget"]), \
        f"the live dashboard never showed while the cell ran: {seen} {look}"
    assert widgets_left == 0, f"the live dashboard was not replaced by the static report {look}"
    assert rows["generated"] == str(len(ref.token_ids)) and rows["finish"] == ref.finish_reason, rows
    assert rows["TTFT"].endswith(" ms") and rows["decode"].endswith(" tok/s"), rows
    assert block_map, f"the KV block map is not visible under the report {look}"
