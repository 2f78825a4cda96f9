#!/usr/bin/env python3
"""Measure what a CPU model costs the app's own process, and what unloading gives back.

Starts the headless server (``python -m app serve``) on a loopback port with a random Llama written
by scripts/make_tiny_model.py, then reads the RSS of the server's process and of its model processes
before the load, once loaded and after one request, and after unloading (POST /admin/load, /admin/unload).

Usage: python scripts/measure_unload_memory.py [--hidden 512] [--layers 8] [--settle 2] [--tray]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
MiB = 2**20


def post(url: str, body: dict, timeout: float = 300) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"{}")


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


def start_server(env: dict[str, str], models: Path, command: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "app", "--models", str(models), command, "--port", "0"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if "http://" in line and "/v1" in line:
            # keep reading its log, or the server blocks once the pipe is full
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return proc, line[line.index("http://"):].split()[0].rstrip(".,")
    raise RuntimeError("the server exited before it listened")


def _role(proc: psutil.Process, server: psutil.Process, spares: set[int]) -> str:
    cmdline = " ".join(proc.cmdline())
    if "forkserver" in cmdline and proc.ppid() == server.pid:  # its forks have its command line
        return "fork server"
    if "resource_tracker" in cmdline:
        return "resource tracker"
    return "spare" if proc.pid in spares else "model process"


def figures(server: psutil.Process, spares: set[int]) -> list[tuple[str, float, float]]:
    """(role, RSS, USS) in MiB of the server's process and of each of its descendants. USS counts only
    the pages no other process shares (RSS counts every page, so a forked process shows torch's pages
    again); PSS would depend on what else runs on the machine with the same libraries."""
    out = []
    for proc in [server, *server.children(recursive=True)]:
        try:
            mem = proc.memory_full_info()
            role = "app" if proc.pid == server.pid else _role(proc, server, spares)
            out.append((role, mem.rss / MiB, getattr(mem, "uss", mem.rss) / MiB))
        except psutil.Error:
            pass
    return out


def show(label: str, fig: list[tuple[str, float, float]]) -> None:
    app = fig[0]
    others = ", ".join(f"{role} {rss:.0f}/{uss:.0f}" for role, rss, uss in fig[1:]) or "none"
    total = sum(uss for _, _, uss in fig)
    print(f"{label:<30} app {app[1]:4.0f}/{app[2]:4.0f}   others: {others}   all (USS): {total:.0f}")


def spare_pids(base: str) -> set[int]:
    try:
        return {s["pid"] for s in get(f"{base}/health").get("spare_processes", [])}
    except (OSError, ValueError):
        return set()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--settle", type=float, default=2.0, help="seconds to wait before each reading")
    parser.add_argument("--tray", action="store_true", help="the tray app (offscreen Qt) instead of `serve`")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="unload-measure-"))
    model_dir = home / "model"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_model.py"), str(model_dir),
                    "--hidden", str(args.hidden), "--layers", str(args.layers)], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    weights = sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / MiB
    env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / "config"),
           "XDG_STATE_HOME": str(home / "state"), "XDG_CACHE_HOME": str(home / "cache"),
           "PYTHON_KEYRING_BACKEND": "keyring.backends.null.Keyring", "QT_QPA_PLATFORM": os.environ.get("QT_QPA_PLATFORM", "offscreen")}
    models = home / "models.json"
    subprocess.run([sys.executable, "-m", "app", "--models", str(models), "add-model", "--no-ollama",
                    "--model-dir", str(model_dir), "--context-length", "512", "m"], check=True, cwd=ROOT, env=env,
                   stdout=subprocess.DEVNULL)
    proc, url = start_server(env, models, "tray" if args.tray else "serve")
    base = url.rsplit("/v1", 1)[0]
    server = psutil.Process(proc.pid)
    print(f"model: hidden {args.hidden}, {args.layers} layers, {weights:.0f} MiB of weights on disk")
    print("figures: RSS/USS in MiB")
    try:
        time.sleep(args.settle)
        show("before load", figures(server, spare_pids(base)))
        t0 = time.perf_counter()
        post(f"{base}/admin/load", {"model": "m"})
        loaded_s = time.perf_counter() - t0
        post(f"{url}/completions", {"model": "m", "prompt": "hello", "max_tokens": 16})
        time.sleep(args.settle)
        show(f"loaded (+1 request, {loaded_s:.1f} s)", figures(server, spare_pids(base)))
        post(f"{base}/admin/unload", {"model": "m"})
        time.sleep(args.settle)
        show("after unload", figures(server, spare_pids(base)))
        print("the fork server (CPU) or a spare (GPU) ends 10 minutes after the last model of its backend was unloaded")
    finally:
        proc.terminate()
        proc.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
