#!/usr/bin/env bash
# Installs nbllm with its dev extras and the embedded default model on a fresh machine.
# CPU torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[dev]"
