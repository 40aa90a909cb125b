#!/usr/bin/env bash
# The one command for the GPU box, from the checkout root, after `source .devkit/stage.sh`:
#     bash benchmarks/gpu_check.sh [CALIBRATION_ARTIFACT_DIR]
# 1. installs the checkout (editable, no deps, no build isolation);
# 2. runs the codec's GPU tests (pytest -m gpu tests/codec; Triton kernels + nvCOMP);
# 3. runs benchmarks/codec_speed.py (with a short GEMM launch-config sweep).
# Everything is logged to $OUT/gpu_check.log; results land in $OUT (codec_speed.json/.md/.png,
# pytest_gpu.xml). The run keeps itself under ~8 minutes (KVTC_CHECK_SECONDS, default 465), first
# Triton compilations included: each step has a timeout, and the benchmark gets what is left.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/kvtc_gpu_check}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
TOTAL=${KVTC_CHECK_SECONDS:-465}
START=$(date +%s)
left() { echo $(( TOTAL - ($(date +%s) - START) )); }
export PYTHONUNBUFFERED=1
export KVTC_COMMIT=${KVTC_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}

{
  echo "== $(date -u +%FT%TZ) commit $KVTC_COMMIT"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python3 -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__)"
  python3 -c "from nvidia import nvcomp; print('nvcomp', nvcomp.__version__)" || echo "nvcomp: not importable"
} 2>&1 | tee "$LOG"

echo "== pip install -e . ($(left)s left)" | tee -a "$LOG"
timeout 120 python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -5 | tee -a "$LOG"

PYTEST_ARGS=(-q -m gpu tests/codec -p no:cacheprovider --junitxml="$OUT/pytest_gpu.xml" -rs)
python3 -c "import xdist" 2>/dev/null && PYTEST_ARGS+=(-n 4)            # compile kernels in parallel
python3 -c "import pytest_timeout" 2>/dev/null && PYTEST_ARGS+=(--timeout 150)
TEST_SECONDS=$(( $(left) - 215 ))
[ "$TEST_SECONDS" -gt 240 ] && TEST_SECONDS=240
TEST_RC=skipped
if [ "$TEST_SECONDS" -ge 30 ]; then
  echo "== GPU tests (limit ${TEST_SECONDS}s)" | tee -a "$LOG"
  timeout "$TEST_SECONDS" python3 -m pytest "${PYTEST_ARGS[@]}" 2>&1 | tee -a "$LOG" | tail -60
  TEST_RC=${PIPESTATUS[0]}
fi

BENCH_SECONDS=$(( $(left) - 10 ))
[ "$BENCH_SECONDS" -lt 60 ] && BENCH_SECONDS=60
BUDGET=$(( BENCH_SECONDS - 45 ))
ART_ARGS=()
[ $# -ge 1 ] && ART_ARGS=(--artifact "$1")
echo "== codec speed (limit ${BENCH_SECONDS}s, optional parts within ${BUDGET}s)" | tee -a "$LOG"
timeout "$BENCH_SECONDS" python3 benchmarks/codec_speed.py --out "$OUT" --tune --budget "$BUDGET" "${ART_ARGS[@]}" 2>&1 | tee -a "$LOG"
BENCH_RC=${PIPESTATUS[0]}

echo "== done in $(( $(date +%s) - START ))s: GPU tests rc=$TEST_RC (124 = timed out), benchmark rc=$BENCH_RC (1 = a correctness check failed)" | tee -a "$LOG"
