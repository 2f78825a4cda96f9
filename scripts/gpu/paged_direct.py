#!/usr/bin/env python3
"""The reference for the paged stage: exllamav2's dynamic generator in a process of its own (as the
server's model process is), fed the same batches of jobs as the server's HTTP clients.

Loads the model with the server's sizes (app.engine.backends.exllamav2_setup.cache_sizes), prints
READY, then answers one JSON line per command on stdin:
  {"op": "batch", "prompts": [...], "tokens": 256, "seed": 1}
    -> {"n", "tokens", "wall_s", "agg_tok_s", "ttft_s": [...], "itl_p50_s", "itl_p99_s", "itl_max_s"}
  {"op": "quit"}
All of a batch's jobs are enqueued at once; times count from then. Sampling as the server's checks use
it (temperature 0.8, top_k 40, top_p 0.9) with the ids in --ban biased by -100 (EOS), so lengths match.
Usage: python scripts/gpu/paged_direct.py MODEL_DIR --context 2048 --batch 32 --ban 2 5
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def load(model_dir: str, context: int, batch: int) -> tuple[Any, Any, Any]:
    from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config, ExLlamaV2Tokenizer
    from exllamav2.generator import ExLlamaV2DynamicGenerator

    from app.engine.backends.exllamav2_setup import cache_sizes, flash_attn_ok

    paged = flash_attn_ok()
    sizes = cache_sizes(context, batch, paged)
    config = ExLlamaV2Config(model_dir)
    config.max_seq_len = context
    config.max_input_len = sizes.chunk
    config.max_attention_size = sizes.chunk ** 2
    config.max_batch_size = sizes.config_batch
    model = ExLlamaV2(config)
    cache = ExLlamaV2Cache(model, max_seq_len=sizes.cache_tokens, lazy=True)
    model.load_autosplit(cache)
    tokenizer = ExLlamaV2Tokenizer(config)
    gen = ExLlamaV2DynamicGenerator(model=model, cache=cache, tokenizer=tokenizer,
                                    max_batch_size=batch if paged else 1, max_seq_len=context,
                                    max_chunk_size=sizes.chunk, paged=paged)
    return config, tokenizer, gen


GC_PAUSES: list[float] = []  # seconds of each full (generation 2) collection, for the stall diagnosis
_gc_started = [0.0]


def _gc_timer(phase: str, info: dict) -> None:
    if info.get("generation") != 2:
        return
    if phase == "start":
        _gc_started[0] = time.perf_counter()
    else:
        GC_PAUSES.append(time.perf_counter() - _gc_started[0])


def timed_run(gen: Any, jobs: list[Any], build_s: float = 0.0) -> dict:
    """Enqueue ``jobs`` at once and iterate ``gen`` until they are done (exllamav2's dynamic generator and
    exllamav3's Generator share this loop's calls and result keys): each job's first token and the gaps
    between its tokens, aggregate tok/s, the longest steps and full GC collections meanwhile. The clock
    starts at the first enqueue; ``build_s`` (the time it took to tokenize the prompts and make the jobs,
    which the server does per request after it arrives) is reported beside it."""
    t0 = time.perf_counter()
    for job in jobs:
        gen.enqueue(job)
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    gaps: list[float] = []
    steps: list[float] = []  # each iterate()'s duration
    tokens = 0
    GC_PAUSES.clear()
    while gen.num_remaining_jobs():
        t_step = time.perf_counter()
        results = gen.iterate()
        now = time.perf_counter()
        steps.append(now - t_step)
        for r in results:
            if r.get("stage") != "streaming" or r.get("token_ids") is None:
                continue
            n = int(r["token_ids"].shape[-1])
            if not n:
                continue
            i = r["identifier"]
            tokens += n
            if i in last:
                gaps.append(now - last[i])
            else:
                first[i] = now - t0
            last[i] = now
    wall = time.perf_counter() - t0
    return {"n": len(jobs), "tokens": tokens, "wall_s": wall, "build_s": build_s, "agg_tok_s": tokens / wall,
            "ttft_s": [first.get(i, float("nan")) for i in range(len(jobs))],
            "itl_p50_s": percentile(gaps, 0.5), "itl_p99_s": percentile(gaps, 0.99),
            "itl_max_s": max(gaps, default=float("nan")),
            "steps": len(steps), "step_max_s": max(steps, default=float("nan")),
            "step_mean_s": sum(steps) / len(steps) if steps else float("nan"),
            "steps_over_50ms": sum(t > 0.05 for t in steps), "gc_full": len(GC_PAUSES), "gc_full_s": sum(GC_PAUSES)}


def run_batch(gen: Any, tokenizer: Any, settings: Any, cmd: dict) -> dict:
    from exllamav2.generator import ExLlamaV2DynamicJob

    started = time.perf_counter()
    jobs = [ExLlamaV2DynamicJob(input_ids=tokenizer.encode(p, add_bos=True, encode_special_tokens=True),
                                max_new_tokens=cmd["tokens"], gen_settings=settings, seed=cmd["seed"] + i,
                                stop_conditions=[], identifier=i, decode_special_tokens=False)
            for i, p in enumerate(cmd["prompts"])]
    return timed_run(gen, jobs, time.perf_counter() - started)


def direct_args() -> argparse.Namespace:
    """The direct references' command line (this script and exl3_direct.py)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--ban", type=int, nargs="*", default=[], help="token ids biased by -100 (EOS)")
    return parser.parse_args()


def serve_batches(ready: dict, run: Any) -> None:
    """The protocol of the module docstring: ``ready`` as one JSON line, then ``run(cmd)``'s figures for
    each batch command read from stdin, until another command or the end of stdin."""
    print(json.dumps({"ready": True, **ready}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("op") != "batch":
            break
        print(json.dumps(run(cmd)), flush=True)


def main() -> int:
    args = direct_args()

    import gc

    import torch
    from exllamav2.generator import ExLlamaV2Sampler

    gc.callbacks.append(_gc_timer)

    config, tokenizer, gen = load(args.model_dir, args.context, args.batch)
    settings = ExLlamaV2Sampler.Settings()
    settings.temperature, settings.top_k, settings.top_p, settings.min_p, settings.typical = 0.8, 40, 0.9, 0.0, 0.0
    settings.token_repetition_penalty = 1.0
    if args.ban:
        bias = torch.zeros((config.vocab_size,), dtype=torch.float)
        for t in args.ban:
            bias[t] = -100
        settings.token_bias = bias
    run_batch(gen, tokenizer, settings, {"prompts": ["warm up"] * min(args.batch, 8), "tokens": 32, "seed": 0})
    serve_batches({"paged": gen.paged, "max_batch": gen.max_batch_size, "cache_tokens": gen.max_total_tokens},
                  lambda cmd: run_batch(gen, tokenizer, settings, cmd))
    return 0


if __name__ == "__main__":
    sys.exit(main())
