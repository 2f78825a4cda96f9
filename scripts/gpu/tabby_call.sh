#!/usr/bin/env bash
# One device call of the TabbyAPI comparison, on a machine where run_checks.sh ran before (its /tmp/site
# and /tmp/gpu-work): this server on :8765 over the checks' registry, then tabby_stage.py with the bare
# generator as a third side; whatever is left of TabbyAPI killed at the end.
# Carry .whl, .tabby, .whl-tabby. Usage: bash scripts/gpu/tabby_call.sh MODEL TABBY_DIR BACKEND OUT_DIR [PAIRS] [LIMIT_S]
set -u
MODEL=$1; TABBY=$2; BACKEND=$3; DEST=$4; PAIRS=${5:-2}; LIMIT=${6:-540}
cd "$(dirname "$0")/../.."
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
mkdir -p "$DEST"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1 || true
# a model the checks did not make on this machine: unpacked from .gpu/ (tiny-exl3.tar.xz) and registered;
# exllamav3's extension restored from .gpu/ when it is not in place
if [ ! -d "/tmp/gpu-work/$MODEL" ] && [ -f ".gpu/$MODEL.tar.xz" ]; then
  mkdir -p /tmp/gpu-work && tar -xJf ".gpu/$MODEL.tar.xz" -C /tmp/gpu-work
fi
if [ ! -f /tmp/site/exllamav3_ext.so ] && ls .gpu/exllamav3_ext.so.xz* >/dev/null 2>&1; then
  cat .gpu/exllamav3_ext.so.xz* | xz -dc > /tmp/site/exllamav3_ext.so
fi
if ! grep -q "\"$MODEL:" /tmp/gpu-work/models.json 2>/dev/null; then
  python3 -m app --models /tmp/gpu-work/models.json add-model --no-ollama --model-dir "/tmp/gpu-work/$MODEL" \
    --context-length 2048 --max-batch-size 32 "$MODEL"
fi
python3 -m app --models /tmp/gpu-work/models.json serve --port 8765 > "$DEST/ours-server.log" 2>&1 &
OURS=$!
python3 - <<'PY'
import time, urllib.request
for _ in range(120):
    try:
        urllib.request.urlopen("http://127.0.0.1:8765/v1/models", timeout=2); break
    except OSError:
        time.sleep(0.5)
PY
timeout -s INT -k 30 "$LIMIT" python3 scripts/gpu/tabby_stage.py --pairs "$PAIRS" --bare \
  --bench-args "--requests-per-client 2 --burst-s 5 --slot-trials 3" \
  --model "/tmp/gpu-work/$MODEL" --ours http://127.0.0.1:8765/v1 --ours-model "$MODEL" \
  --tabby "$TABBY" --backend "$BACKEND" --context 2048 --batch 32 \
  --logit-bias '{"2": -100, "5": -100}' --out "$DEST" > "$DEST/tabby_stage.log" 2>&1
echo "tabby_stage exit $?"
pkill -f "[r]unpy\.run_path"; kill $OURS 2>/dev/null; sleep 2; pkill -KILL -f "[r]unpy\.run_path" || true
tail -40 "$DEST/tabby_stage.log"
