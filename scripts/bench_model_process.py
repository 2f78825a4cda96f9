#!/usr/bin/env python3
"""What serving costs on top of the backend's own steps, on the CPU, with a step of known length.

A synthetic backend whose every step busy-waits a fixed time (as a CUDA synchronisation spins) and
yields one token per job is served by the real engine and aiohttp server, and driven through HTTP
with a keep-alive client, in two ways: in a model process read by the event loop (how exllamav2
runs) and in the server's process on the runner thread (how the CPU backend runs). The bare step
loop is the reference. The server runs in a process of its own, the client in this one. Prints
decode tok/s, time to first text and streaming vs non-streaming latency for each, so a change to the
serving path can be judged without a GPU (on a 2-core machine the client, the server and the model
process compete for the cores: compare rows of one run, not runs of different machines).

Usage: python scripts/bench_model_process.py [--step-ms 2.5] [--runs 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.engine.events import BackendJob  # noqa: E402
from tests.fixed_step_backend import FixedStepBackend  # noqa: E402

TARGET = "tests.fixed_step_backend:FixedStepBackend"

def direct(model_dir: str, step_s: float, tokens: int) -> tuple[float, float]:
    """The bare step loop: (first text after submit in s, tok/s)."""
    backend = FixedStepBackend(model_dir, context_length=4096, max_batch=1, step_s=step_s)
    backend.load(lambda f, m: None, threading.Event())
    job = BackendJob(prompt_ids=[1] * 100, max_new_tokens=tokens, sampling=_greedy(), stop_strings=[],
                     stop_token_ids=set())
    t0 = time.perf_counter()
    backend.submit(job)
    stamps = []
    while backend.has_work():
        backend.step()
        stamps.append(time.perf_counter())
    return stamps[0] - t0, (len(stamps) - 1) / (stamps[-1] - stamps[0])


def _greedy() -> Any:
    from app.engine.events import SamplingParams

    return SamplingParams(temperature=0.0)


def _server_main(model_dir: str, in_process: bool, step_s: float, ports: Any, stop: Any, target: str = TARGET,
                 max_batch: int = 1) -> None:
    """The server in a process of its own, as in real use (the client must not share its GIL); the backend
    ``target`` in a model process, or FixedStepBackend in this one (``in_process``)."""
    from app.engine.backends.model_process.client import ProcessBackend
    from app.engine.facade import Engine
    from app.engine.catalog.registry import Registry
    from tests.server_harness import ServerThread, register

    def factory(entry: Any, settings: Any) -> Any:
        kwargs = {"context_length": 4096, "max_batch": max_batch, "step_s": step_s}
        if in_process:
            return FixedStepBackend(entry.model_dir, **kwargs)
        return ProcessBackend(target, "fixed-step", entry.model_dir, **kwargs)

    registry = Registry(Path(model_dir).parent / f"models-{in_process}.json")
    register(registry, "m", Path(model_dir), context_length=4096, batch_size=max_batch)
    server = ServerThread(registry, engine_factory=lambda reg, **kw: Engine(reg, backend_factory=factory, **kw))
    server.start()
    ports.put(server.port)
    stop.wait()
    server.stop()


class ServerProcess:
    def __init__(self, model_dir: Path, in_process: bool, step_s: float, target: str = TARGET,
                 max_batch: int = 1) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self._ports, self._stop = ctx.Queue(), ctx.Event()
        self._proc = ctx.Process(target=_server_main, args=(str(model_dir), in_process, step_s, self._ports,
                                                            self._stop, target, max_batch))
        self._proc.start()
        self.base_url = f"http://127.0.0.1:{self._ports.get(timeout=120)}/v1"

    def stop(self) -> None:
        self._stop.set()
        self._proc.join(60)


def http_figures(server: Any, runs: int, tokens: int) -> dict[str, float]:
    import httpx

    http = httpx.Client(timeout=120)
    body = {"model": "m", "prompt": "The quick brown fox " * 5, "temperature": 0}

    def stream(n: int) -> tuple[float, list[float]]:
        t0 = time.perf_counter()
        stamps = []
        with http.stream("POST", f"{server.base_url}/completions", json={**body, "max_tokens": n, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {") and '"text":"a"' in line.replace(" ", ""):
                    stamps.append(time.perf_counter())
        return t0, stamps

    for _ in range(3):
        stream(16)
    rates, ttfts, lat_s, lat_n = [], [], [], []
    for _ in range(runs):
        _, stamps = stream(tokens)
        rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
        for _ in range(5):
            t0, stamps = stream(4)
            ttfts.append(stamps[0] - t0)
        t0, _ = stream(128)
        lat_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        http.post(f"{server.base_url}/completions", json={**body, "max_tokens": 128}).raise_for_status()
        lat_n.append(time.perf_counter() - t0)
    return {"decode_tok_s": statistics.median(rates), "ttft_ms": statistics.median(ttfts) * 1e3,
            "stream_128_ms": statistics.median(lat_s) * 1e3, "nonstream_128_ms": statistics.median(lat_n) * 1e3}


def make_tokenizer_folder(folder: Path) -> Path:
    """A one-layer tiny model folder: what the fixed-step backends need of a model is its tokenizer."""
    import subprocess

    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_model.py"), str(folder), "--layers", "1",
                    "--hidden", "32", "--heads", "2", "--kv-heads", "1", "--intermediate", "64"],
                   check=True, capture_output=True)
    return folder


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--step-ms", type=float, default=2.5)
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()
    step_s = args.step_ms / 1e3
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tokenizer_folder(Path(tmp) / "tok")
        firsts, rates = zip(*(direct(str(model_dir), step_s, args.tokens) for _ in range(args.runs)))
        results: dict[str, Any] = {"step_ms": args.step_ms, "direct": {
            "decode_tok_s": statistics.median(rates), "ttft_ms": statistics.median(firsts) * 1e3}}
        for name, in_process in (("model process, loop reads the pipe", False), ("in process, runner thread", True)):
            server = ServerProcess(model_dir, in_process, step_s)
            try:
                results[name] = http_figures(server, args.runs, args.tokens)
            finally:
                server.stop()
    ref = results["direct"]
    print(f"step {args.step_ms} ms; bare loop: {ref['decode_tok_s']:.1f} tok/s, first text {ref['ttft_ms']:.2f} ms")
    print(f"{'served':36} {'tok/s':>8} {'x bare':>7} {'TTFT ms':>8} {'+bare':>6} {'stream128':>10} {'nonstream128':>12}")
    for name, r in results.items():
        if name in ("direct", "step_ms"):
            continue
        print(f"{name:36} {r['decode_tok_s']:8.1f} {r['decode_tok_s'] / ref['decode_tok_s']:7.3f} {r['ttft_ms']:8.2f} "
              f"{r['ttft_ms'] - ref['ttft_ms']:6.2f} {r['stream_128_ms']:10.1f} {r['nonstream_128_ms']:12.1f}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
