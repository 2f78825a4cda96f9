#!/usr/bin/env python3
"""How fast the server starts N streams that arrive at once, on the CPU, with a step of known length.

A stand-in backend that steps up to 32 jobs at once in a fixed busy-wait (tests/fixed_step_backend.py's
BatchedFixedStepBackend) runs in a model process, as the GPU backends do; N clients (one connection each,
aiohttp) send a streamed completion of 64 tokens at the same moment. Per N: the time to first token (p50,
max) in steps, and aggregate tok/s against the ideal (N tokens a step). What this isolates is the server's
own part (HTTP, prompt preparation, the pipe to the model process): a GPU library's scheduling of prompts
that arrive while others generate comes on top (see docs/gpu-results.md, EXL3).

Usage: python scripts/bench_arrivals.py [--step-ms 5] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts" / "gpu"))

TARGET = "tests.fixed_step_backend:BatchedFixedStepBackend"
BATCH = 32


def _server_main(model_dir: str, step_s: float, ports: Any, stop: Any) -> None:
    from app.engine.backends.model_process.client import ProcessBackend
    from app.engine.catalog.registry import Registry
    from app.engine.facade import Engine
    from tests.server_harness import ServerThread, register

    def factory(entry: Any, settings: Any) -> Any:
        return ProcessBackend(TARGET, "batched-fixed-step", entry.model_dir, context_length=4096, max_batch=BATCH,
                              step_s=step_s)

    registry = Registry(Path(model_dir).parent / "models.json")
    register(registry, "m", Path(model_dir), context_length=4096, batch_size=BATCH)
    server = ServerThread(registry, engine_factory=lambda reg, **kw: Engine(reg, backend_factory=factory, **kw))
    server.start()
    ports.put(server.port)
    stop.wait()
    server.stop()


def main() -> int:
    import paged_clients as pc

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step-ms", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    step = args.step_ms / 1e3
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "tiny"
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_model.py"), str(model), "--layers", "1",
                        "--hidden", "32", "--heads", "2", "--kv-heads", "1", "--intermediate", "64"],
                       check=True, capture_output=True)
        ctx = multiprocessing.get_context("spawn")
        ports, stop = ctx.Queue(), ctx.Event()
        proc = ctx.Process(target=_server_main, args=(str(model), step, ports, stop))
        proc.start()
        try:
            base = f"http://127.0.0.1:{ports.get(timeout=120)}"

            def body(i: int) -> dict:
                return {"model": "m", "prompt": f"{i} The quick brown fox jumps over the lazy dog",
                        "max_tokens": 64, "temperature": 0}

            pc.run_batch(base, [body(i) for i in range(BATCH)])  # warm: load, the batch's first steps
            report = {}
            for n in (1, 8, 32):
                rows = [pc.run_batch(base, [body(i) for i in range(n)]) for _ in range(args.rounds)]
                ttft = sorted(t for r in rows for t in r["ttft_s"])
                agg = statistics.median(r["agg_tok_s"] for r in rows)
                report[n] = {"ttft_p50_steps": round(statistics.median(ttft) / step, 2),
                             "ttft_max_steps": round(ttft[-1] / step, 2), "ttft_p50_ms": round(1e3 * statistics.median(ttft), 2),
                             "agg_tok_s": round(agg, 1), "of_ideal": round(agg * step / n, 3)}
                print(f"{n:2d} streams at once: TTFT p50 {report[n]['ttft_p50_ms']} ms "
                      f"({report[n]['ttft_p50_steps']} steps, max {report[n]['ttft_max_steps']}), "
                      f"{report[n]['agg_tok_s']} tok/s = {report[n]['of_ideal']} of the ideal", flush=True)
        finally:
            stop.set()
            proc.join(30)
    print(json.dumps({"step_ms": args.step_ms, "levels": report}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
