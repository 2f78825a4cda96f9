#!/usr/bin/env python3
"""An editor's completion sent while a long chat prompt is being prefilled: how long it waits.

Per trial: a streamed /v1/completions with a long prompt (--long-words words, fresh each trial so no
prefix is reused) and --long-output tokens; --delay-ms later a short completion (16 tokens, as an
editor's autocomplete asks). Prints the long prompt's token count, the short request's TTFT p50 / p99,
and in how many trials its first token came before the long request's first token (a backend that
prefills prompts in arrival order serves the short one only after the whole long prompt). A first trial,
not counted, loads the model.

Usage: python scripts/bench_prefill_order.py --base-url http://127.0.0.1:8080/v1 --model NAME
       [--trials 20] [--long-words 1500] [--delay-ms 5] [--logit-bias '{"2": -100}']
Dependencies: aiohttp.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from typing import Any

from bench_serving import percentile

WORDS = "alpha beta gamma delta river stone cloud paper green seven window light sound".split()


async def first_token(session: Any, url: str, body: dict, t0: float, out: dict, key: str) -> None:
    """Stream ``body``; record when its first text came (seconds after ``t0``) and its usage."""
    async with session.post(url, json={**body, "stream": True, "stream_options": {"include_usage": True}}) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:200]}")
        async for raw in resp.content:
            if not raw.startswith(b"data: {"):
                continue
            chunk = json.loads(raw[6:])
            if chunk.get("usage"):
                out[key + "_usage"] = chunk["usage"]
            if key not in out and any(c.get("text") for c in chunk.get("choices", [])):
                out[key] = time.perf_counter() - t0


async def trial(session: Any, args: argparse.Namespace, rng: random.Random) -> dict:
    url = f"{args.base_url}/completions"
    common = {"model": args.model, "temperature": 0, "logit_bias": json.loads(args.logit_bias)}
    long_body = {**common, "prompt": " ".join(rng.choice(WORDS) for _ in range(args.long_words)),
                 "max_tokens": args.long_output}
    short_body = {**common, "prompt": "def area(radius):\n    return ", "suffix": "\n", "max_tokens": 16}
    out: dict = {}
    t0 = time.perf_counter()
    long = asyncio.ensure_future(first_token(session, url, long_body, t0, out, "long"))
    await asyncio.sleep(args.delay_ms / 1e3)
    sent = time.perf_counter() - t0
    await first_token(session, url, short_body, t0, out, "short")
    await long
    return {"short_ttft_s": out["short"] - sent, "short_first": out["short"] < out.get("long", float("inf")),
            "long_prompt_tokens": out.get("long_usage", {}).get("prompt_tokens")}


async def run(args: argparse.Namespace) -> dict:
    import aiohttp

    rng = random.Random(args.seed)
    results = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        await trial(session, args, rng)  # not counted: the model's on-demand load, first-use costs
        for _ in range(args.trials):
            results.append(await trial(session, args, rng))
    ttft = [r["short_ttft_s"] for r in results]
    return {"trials": len(results), "long_prompt_tokens": results[0]["long_prompt_tokens"],
            "short_ttft_p50_ms": round(1e3 * statistics.median(ttft), 1),
            "short_ttft_p99_ms": round(1e3 * percentile(ttft, 0.99), 1),
            "short_first_token_before_long": sum(r["short_first"] for r in results)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--long-words", type=int, default=1500)
    parser.add_argument("--long-output", type=int, default=128)
    parser.add_argument("--delay-ms", type=float, default=5.0)
    parser.add_argument("--logit-bias", default="{}")
    parser.add_argument("--seed", type=int, default=1)
    print(json.dumps(asyncio.run(run(parser.parse_args()))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
