#!/usr/bin/env python3
"""The reference for the EXL3 concurrency checks: exllamav3's Generator in a process of its own (as the
server's model process is), fed the same batches of jobs as the server's HTTP clients.

The model is loaded by the app's own ExLlamaV3Backend (same cache size, chunk, kernel warm-up and
generator settings as the server's model process); the jobs are plain exllamav3 Jobs enqueued at once
and the loop is bare ``iterate()``. Same protocol as paged_direct.py: prints one JSON line when ready,
then answers one JSON line per command on stdin:
  {"op": "batch", "prompts": [...], "tokens": 256, "seed": 1}
    -> {"n", "tokens", "wall_s", "agg_tok_s", "ttft_s": [...], "itl_p50_s", "itl_p99_s", "itl_max_s", ...}
  {"op": "quit"}
Sampling as the checks use it (temperature 0.8, top_k 40, top_p 0.9) with the ids in --ban biased by
-100 (EOS), so lengths match.
Usage: python scripts/gpu/exl3_direct.py MODEL_DIR --context 2048 --batch 32 --ban 2 5
"""

from __future__ import annotations

import gc
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from paged_direct import _gc_timer, direct_args, serve_batches, timed_run  # noqa: E402


def run_batch(backend: Any, sampler_for: Any, cmd: dict) -> dict:
    import torch
    from exllamav3 import Job

    gen = backend._generator
    started = time.perf_counter()
    jobs = [Job(input_ids=torch.tensor([backend.encode(p, add_bos=True)], dtype=torch.long),
                max_new_tokens=cmd["tokens"], sampler=sampler_for(), seed=cmd["seed"] + i, stop_conditions=[],
                identifier=i, decode_special_tokens=False)
            for i, p in enumerate(cmd["prompts"])]
    return timed_run(gen, jobs, time.perf_counter() - started)


def main() -> int:
    args = direct_args()

    from app.engine.backends.exllamav3_backend import ExLlamaV3Backend
    from app.engine.events import SamplingParams

    gc.callbacks.append(_gc_timer)
    backend = ExLlamaV3Backend(args.model_dir, context_length=args.context, max_batch=args.batch)
    backend.load(lambda f, m: None, threading.Event())
    params = SamplingParams(temperature=0.8, top_k=40, top_p=0.9, min_p=0.0, logit_bias={t: -100.0 for t in args.ban})

    def sampler_for() -> Any:
        return backend.sampler(params)

    run_batch(backend, sampler_for, {"prompts": ["warm up"] * min(args.batch, 8), "tokens": 32, "seed": 0})
    gen = backend._generator
    serve_batches({"paged": True, "max_batch": gen.max_batch_size, "cache_tokens": gen.max_total_tokens},
                  lambda cmd: run_batch(backend, sampler_for, cmd))
    backend.unload()
    return 0


if __name__ == "__main__":
    sys.exit(main())
