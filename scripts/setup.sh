#!/usr/bin/env bash
# Installs nbllm with its dev extras and the embedded default model on a fresh machine, and Debian's Chromium.
# CPU torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[dev]"
# The browser test (tests/test_browser.py) drives Debian's Chromium through Playwright: Playwright's own browser
# download needs the internet, the distribution's package does not.
if [ ! -x /usr/bin/chromium ]; then
    apt=(env DEBIAN_FRONTEND=noninteractive apt-get)
    [ "$(id -u)" -eq 0 ] || apt=(sudo "${apt[@]}")
    "${apt[@]}" install -y -q chromium || { "${apt[@]}" update -q && "${apt[@]}" install -y -q chromium; }
fi
