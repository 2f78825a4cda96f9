#!/usr/bin/env bash
# One call on the GPU machine: install carried wheels, JIT-build (or restore) exllamav2's extension,
# make random-weight models, serve them, run the end-to-end and load-failure checks through the openai
# SDK, quantize one model to EXL2 and run its checks and the benchmark. Report: $OUT/gpu-report.md and
# $OUT/gpu-report.json; a freshly built extension ($OUT/exllamav2_ext.so.xz) and the quantizer's
# measurement ($OUT/measurement.json) to put in .gpu/ for the next runs.
#
# Carry: .whl (wheels, see docs/gpu-results.md) and .gpu (a previously built extension, measurements, and
# flash-attn's pieces in .gpu/flash-attn/ copied from ../shared/gpu-wheels: without them exllamav2 runs unpaged).
# Usage: bash scripts/gpu/run_checks.sh [--budget-s 540] [--skip STAGE ...] [--only-build] [--profile]
set -uo pipefail
export RUN_STARTED=${RUN_STARTED:-$(date +%s.%N)}  # --budget-s counts from here
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export GIT_COMMIT=${GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
if ls .gpu/exllamav2_ext.so.xz* >/dev/null 2>&1; then
  cat .gpu/exllamav2_ext.so.xz* | xz -dc > /tmp/site/exllamav2_ext.so && echo "restored prebuilt exllamav2_ext.so"
fi
# flash-attn (prebuilt for sm_90 with this image's torch, see ../shared/gpu-wheels): the wheel without its
# extension unpacked into the target, the extension beside it; paged mode (continuous batching) needs it
if [ -f .gpu/flash-attn/flash_attn_2_cuda.cpython-312-x86_64-linux-gnu.so.xz ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/flash-attn/einops-*.whl \
    && python3 -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall('/tmp/site')" .gpu/flash-attn/flash_attn-*.noext.zip \
    && xz -dc .gpu/flash-attn/flash_attn_2_cuda.cpython-312-x86_64-linux-gnu.so.xz > /tmp/site/flash_attn_2_cuda.cpython-312-x86_64-linux-gnu.so \
    && echo "restored prebuilt flash-attn" || echo "flash-attn restore failed"
fi
echo "wheels installed in $(python3 -c "import time; print(round(time.time() - $RUN_STARTED, 1))") s"
python3 scripts/gpu/checks.py --out "$OUT" "$@" 2>&1 | tee "$OUT/checks.log"
