#!/usr/bin/env python3
"""Measure the tray app when idle: launch-to-tray time, RSS and CPU with no model loaded, and that a
second start does not start a second server.

Usage: QT_QPA_PLATFORM=offscreen python scripts/measure_tray_idle.py [--seconds 10] [--runs 3]
Goals: tray ready within 2 s, at most 250 MB RSS, about 0 % CPU when idle, torch not imported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent


def launch(env: dict[str, str], models: Path) -> tuple[subprocess.Popen, float]:
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "app", "--models", str(models), "tray", "--port", "0"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("READY"):
            return proc, time.perf_counter() - t0
    raise RuntimeError("the tray app exited before it was ready")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="tray-measure-"))
    env = {**os.environ, "QT_QPA_PLATFORM": os.environ.get("QT_QPA_PLATFORM", "offscreen"),
           "EXLLAMA_TRAY_REPORT_READY": "1", "HOME": str(home), "XDG_CONFIG_HOME": str(home / "config"),
           "XDG_STATE_HOME": str(home / "state"), "XDG_CACHE_HOME": str(home / "cache"),
           "PYTHON_KEYRING_BACKEND": "keyring.backends.null.Keyring"}
    models = home / "models.json"
    times = []
    for _ in range(args.runs):
        proc, ready = launch(env, models)
        times.append(ready)
        proc.terminate()
        proc.wait(20)
    proc, ready = launch(env, models)
    ps = psutil.Process(proc.pid)
    time.sleep(2)
    cpu0 = ps.cpu_times()
    time.sleep(args.seconds)
    cpu1 = ps.cpu_times()
    cpu_pct = ((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)) / args.seconds * 100
    rss = ps.memory_info().rss / 2**20
    torch_loaded = any("libtorch" in m.path for m in ps.memory_maps())
    second = subprocess.run([sys.executable, "-m", "app", "--models", str(models), "tray", "--port", "0"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=60)
    proc.terminate()
    proc.wait(20)
    print(f"launch to tray ready: median {statistics.median(times):.2f} s over {len(times)} runs "
          f"({', '.join(f'{t:.2f}' for t in times)}) — goal <= 2 s")
    print(f"idle RSS: {rss:.0f} MiB — goal <= 250 MB")
    print(f"idle CPU over {args.seconds:.0f} s: {cpu_pct:.2f} % — goal about 0 %")
    print(f"torch imported while idle: {torch_loaded}")
    print(f"second start: exit {second.returncode}, said: {second.stderr.strip().splitlines()[-1:]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
