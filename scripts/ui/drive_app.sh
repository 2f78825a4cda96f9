#!/usr/bin/env bash
# Launch the real app under Xvfb twice (without a system tray, then with trayer as the tray host),
# drive it with xdotool through add model -> load -> request -> unload -> quit, take screenshots into
# docs/screenshots/ (or $1) and check that Quit ends the app within 2 s (the figure is printed).
# A manual / development tool, not part of CI. Installs what it needs with apt-get when run as root.
#
# Usage: bash scripts/ui/drive_app.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="${1:-docs/screenshots}"
PY=".venv/bin/python"
[ -x "$PY" ] || { echo "no .venv: run 'python3 scripts/dev.py test' (or 'run') once first" >&2; exit 2; }

need=()
for pair in Xvfb:xvfb xdotool:xdotool import:imagemagick openbox:openbox trayer:trayer xwininfo:x11-utils; do
  command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "missing: sudo apt-get install ${need[*]}" >&2; exit 2
  fi
fi

status=0
"$PY" scripts/ui/drive_app.py --mode window --out "$OUT" --display :71 || status=1
"$PY" scripts/ui/drive_app.py --mode tray --out "$OUT" --display :72 || status=1
exit $status
