#!/usr/bin/env python3
"""Measure how long a large prompt stalls every other client of the server.

Starts ``python -m app serve`` on a loopback port with the tiny random Llama (scripts/make_tiny_model.py)
registered with a long context (so that the prompt is not refused before it is tokenized), sends one
``/v1/completions`` request with a prompt of ``--mb`` megabytes, and meanwhile asks ``/health`` every
20 ms from another client: the longest ``/health`` answer is the stall. Prints the request's status,
its time, and the longest and median ``/health`` times.

Usage: python scripts/measure_prompt_stall.py [--mb 1.5] [--context 32768] [--runs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def start_server(env: dict[str, str], models: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "app", "--models", str(models), "serve", "--port", "0"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if "http://" in line and "/v1" in line:
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return proc, line[line.index("http://"):].split()[0].rstrip(".,").rsplit("/v1", 1)[0]
    raise RuntimeError("the server exited before it listened")


def post(url: str, body: dict) -> tuple[int, float]:
    started = time.perf_counter()
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=600) as resp:
            resp.read()
            status = resp.status
    except urllib.error.HTTPError as exc:
        exc.read()
        status = exc.code
    return status, time.perf_counter() - started


def poll_health(base: str, stop: threading.Event, times: list[float]) -> None:
    while not stop.is_set():
        started = time.perf_counter()
        with urllib.request.urlopen(f"{base}/health", timeout=600) as resp:
            resp.read()
        times.append(time.perf_counter() - started)
        time.sleep(0.02)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=1.5, help="prompt size in MB")
    parser.add_argument("--context", type=int, default=32768, help="the model's context length")
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="stall-measure-"))
    model_dir = home / "model"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_model.py"), str(model_dir)], check=True,
                   cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / "config"),
           "XDG_STATE_HOME": str(home / "state"), "XDG_CACHE_HOME": str(home / "cache"),
           "PYTHON_KEYRING_BACKEND": "keyring.backends.null.Keyring"}
    models = home / "models.json"
    subprocess.run([sys.executable, "-m", "app", "--models", str(models), "add-model", "--no-ollama", "--model-dir",
                    str(model_dir), "--context-length", str(args.context), "m"], check=True, cwd=ROOT, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc, base = start_server(env, models)
    prompt = ("The quick brown fox jumps over the lazy dog; " * (int(args.mb * 1e6) // 45 + 1))[:int(args.mb * 1e6)]
    try:
        post(f"{base}/admin/load", {"model": "m"})
        post(f"{base}/v1/completions", {"model": "m", "prompt": "warm up", "max_tokens": 1})
        print(f"prompt: {len(prompt) / 1e6:.2f} MB, context {args.context} tokens")
        for run in range(args.runs):
            stop, times = threading.Event(), []
            poller = threading.Thread(target=poll_health, args=(base, stop, times), daemon=True)
            poller.start()
            time.sleep(0.3)
            status, took = post(f"{base}/v1/completions", {"model": "m", "prompt": prompt, "max_tokens": 1})
            time.sleep(0.3)
            stop.set()
            poller.join()
            print(f"run {run + 1}: HTTP {status} in {took:.2f} s; /health longest {max(times) * 1e3:.0f} ms, "
                  f"median {statistics.median(times) * 1e3:.1f} ms over {len(times)} calls")
    finally:
        proc.terminate()
        proc.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
