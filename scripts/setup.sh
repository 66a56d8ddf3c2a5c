#!/usr/bin/env bash
# Installs nbllm with its dev extras and the embedded default model on a fresh machine, and Debian's Chromium.
# CPU torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[dev]"
# The browser test (tests/test_browser.py) drives Debian's Chromium through Playwright: Playwright's own browser
# download needs the internet, the distribution's package does not.
# The CPU int8 kernels (kernels/cpu_int8_gemm.cpp) are compiled on first use with g++.
missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v g++ >/dev/null || missing+=(g++)
if [ ${#missing[@]} -gt 0 ]; then
    apt=(env DEBIAN_FRONTEND=noninteractive apt-get)
    [ "$(id -u)" -eq 0 ] || apt=(sudo "${apt[@]}")
    "${apt[@]}" install -y -q "${missing[@]}" || { "${apt[@]}" update -q && "${apt[@]}" install -y -q "${missing[@]}"; }
fi
