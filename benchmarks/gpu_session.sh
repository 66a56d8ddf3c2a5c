#!/usr/bin/env bash
# One device-machine session for issue 7: install, kernel tests, same-answers tests, the throughput benchmark.
# Logs go to $OUT (the device tool brings them back). Usage: bash benchmarks/gpu_session.sh [STAGES] [BENCH ARGS...]
# STAGES: comma list of kernels,engine,ab,bench (default kernels,engine,bench). TESTS_K: a pytest -k filter for both
# test stages. AB_TREES: the ab stage's NAME=TREE arguments (benchmarks/decode_ab.py; AB_ARGS: its options).
set -u
stages=${1:-kernels,engine,bench}; shift || true
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || tail -5 "$OUT/install.log"
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv;
  python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"; } \
  | tee "$OUT/env.log"
if [[ $stages == *kernels* ]]; then
  timeout ${KERNEL_TIMEOUT:-300} python3 -m pytest -q -x -p no:cacheprovider -o addopts=-ra ${TESTS_K:+-k "$TESTS_K"} tests/test_kernels_gpu.py tests/test_decode_fusion_gpu.py tests/test_quant_matmul_gpu.py >"$OUT/kernels.log" 2>&1
  echo "kernels rc=$?"; tail -4 "$OUT/kernels.log"
fi
if [[ $stages == *engine* ]]; then
  timeout ${ENGINE_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider -o addopts=-ra ${TESTS_K:+-k "$TESTS_K"} tests/test_gpu_engine.py tests/test_overlap.py tests/test_kv_offload.py >"$OUT/engine.log" 2>&1
  echo "engine rc=$?"; tail -6 "$OUT/engine.log"
fi
if [[ $stages == *ab* ]]; then
  timeout ${AB_TIMEOUT:-300} python3 benchmarks/decode_ab.py ${AB_TREES:-} ${AB_ARGS:-} >"$OUT/ab.log" 2>&1
  echo "ab rc=$?"; tail -12 "$OUT/ab.log"
fi
if [[ $stages == *bench* ]]; then
  timeout ${BENCH_TIMEOUT:-280} python3 benchmarks/gpu_throughput.py --profile "$OUT/prof" "$@" >"$OUT/bench.log" 2>&1
  echo "bench rc=$?"; tail -25 "$OUT/bench.log"
fi
