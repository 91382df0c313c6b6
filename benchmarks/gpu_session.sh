#!/usr/bin/env bash
# One call on the GPU machine: environment, the GPU test suite, then the benchmark.
#   bash benchmarks/gpu_session.sh [flashmoba bench arguments]
# Logs and results go to $OUT (the device tool's return folder) or ./gpu_out.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# Packages the GPU image may lack travel as wheels in .whl (see the device tool's notes).
if ! python3 -c "import pytest, tqdm" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout "${TEST_TIMEOUT:-300}" python3 -m pytest tests/gpu -q -rfE -p no:cacheprovider \
    --junitxml="$OUT/gpu_tests.xml" 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  python3 -m flashmoba bench --out "$OUT/results.json" "$@" 2>&1 | grep -v '%|' | tee "$OUT/bench.log"
fi
