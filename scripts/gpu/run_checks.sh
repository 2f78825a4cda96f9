#!/usr/bin/env bash
# One call on the GPU machine: install carried wheels, JIT-build (or restore) exllamav2's extension,
# make random-weight models, quantize one to EXL2, serve them, run the end-to-end checks through the
# openai SDK and the benchmark. Report: $OUT/gpu-report.md and $OUT/gpu-report.json.
#
# Carry: .whl (wheels, see docs/gpu-results.md) and .gpu (a previously built extension, measurement).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
if ls .gpu/exllamav2_ext.so.xz* >/dev/null 2>&1; then
  cat .gpu/exllamav2_ext.so.xz* | xz -dc > /tmp/site/exllamav2_ext.so && echo "restored prebuilt exllamav2_ext.so"
fi
python3 scripts/gpu/checks.py --out "$OUT" "$@" 2>&1 | tee "$OUT/checks.log"
