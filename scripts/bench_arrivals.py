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
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "scripts" / "gpu"))

from bench_model_process import ServerProcess, make_tokenizer_folder  # noqa: E402

TARGET = "tests.fixed_step_backend:BatchedFixedStepBackend"
BATCH = 32


def main() -> int:
    import paged_clients as pc

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step-ms", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    step = args.step_ms / 1e3
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(make_tokenizer_folder(Path(tmp) / "tiny"), False, step, TARGET, BATCH)
        try:
            base = server.base_url.rsplit("/v1", 1)[0]

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
            server.stop()
    print(json.dumps({"step_ms": args.step_ms, "levels": report}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
