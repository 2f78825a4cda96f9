"""Figures of a built bundle: its size, launch-to-tray time and idle memory.

``python build_spec/measure_bundle.py [dist/exllama-tray/exllama-tray] [--runs 5]`` starts the bundled tray
(QT_QPA_PLATFORM=offscreen unless a display is set, in a temporary config folder and on a free port) ``runs``
times and prints, for each, the seconds from the process's start to the tray being shown (the app prints
READY then; the first run is the cold one, the median of the others is the warm figure), then its resident
memory after 5 s idle and its /health answer."""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "build_spec"))
from build import executable, folder_size  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch(exe: Path, home: Path, idle_s: float = 0.0) -> tuple[float, int | None, int]:
    """Start the tray; (seconds to READY, RSS after ``idle_s`` or None, /health status)."""
    port = free_port()
    env = {**os.environ, "EXLLAMA_TRAY_REPORT_READY": "1", "XDG_CONFIG_HOME": str(home / "config"),
           "XDG_STATE_HOME": str(home / "state"), "XDG_DATA_HOME": str(home / "data"),
           "EXLLAMA_TRAY_RUNTIME_DIR": str(home / "runtime")}
    if not os.environ.get("DISPLAY"):
        env["QT_QPA_PLATFORM"] = "offscreen"
    started = time.perf_counter()
    proc = subprocess.Popen([str(exe), "--models", str(home / "models.json"), "tray", "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("READY"):
                break
        else:
            raise SystemExit(f"the tray exited ({proc.wait()}) without READY")
        ready = time.perf_counter() - started
        status = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code
        rss = None
        if idle_s:
            time.sleep(idle_s)
            rss = psutil.Process(proc.pid).memory_info().rss
        return ready, rss, status
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("exe", nargs="?", type=Path, default=executable(ROOT / "dist"))
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    if not args.exe.is_file():
        raise SystemExit(f"{args.exe} not found: build it with python build_spec/build.py")
    size = folder_size(args.exe.parent)
    print(f"bundle: {args.exe.parent} {size / 2**20:.0f} MiB ({sum(1 for _ in args.exe.parent.rglob('*'))} files)")
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.runs):
            ready, rss, status = launch(args.exe, Path(tmp), idle_s=5.0 if run == args.runs - 1 else 0.0)
            times.append(ready)
            extra = f", idle RSS {rss / 2**20:.0f} MiB after 5 s" if rss else ""
            print(f"run {run + 1}: launch to tray {ready:.2f} s, /health {status}{extra}")
    warm = statistics.median(times[1:]) if len(times) > 1 else times[0]
    print(f"launch to tray: cold {times[0]:.2f} s, warm median {warm:.2f} s (cores: {os.cpu_count()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
