"""The paged (continuous-batching) stage of the GPU checks, called by checks.py with its Report.

For one EXL2 model served with batch_size 32: the direct generator (paged_direct.py, its own process)
and the server through HTTP (paged_clients.py) measured in turns at 1, 8 and 32 concurrent jobs of 256
tokens; time to first token at one stream; an autocomplete (FIM, 16 tokens) idle and while 8 chats
stream; a long prompt's prefill while streams run; cancels (one of 8 streams, jobs still in prefill);
0 lost / 0 hung at 32 and 64 clients; VRAM after 1,000 batched requests vs after 10; streaming vs
non-streaming latency for 128 tokens. Figures go to rep.data["paged"][model]. ``--skip paged-<part>``
leaves a part out (levels, ttft, mixed, prefill, cancels, clients, stream_vs_whole, vram).
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import paged_clients as pc

LEVELS = {1: 15, 8: 11, 32: 7}  # concurrency: measured pairs (direct, server), in turns
TOKENS = 256
TTFT_PAIRS = 30
CODE = ("import math\n\n\ndef area(radius):\n    return math.pi * radius ** 2\n\n\n"
        "def perimeter(radius):\n    return 2 * math.pi * radius\n\n\nclass Circle:\n"
        "    def __init__(self, radius):\n        self.radius = radius\n\n    def scaled(self, k):\n        ")


class Ctx:
    def __init__(self, rep: Any, base: str, model: str, folder: Path, prompt: str, ban: dict,
                 vram: Callable[[], dict], metric: Callable[[str], float]) -> None:
        self.rep, self.base, self.model, self.folder, self.prompt, self.ban = rep, base, model, folder, prompt, ban
        self.vram, self.metric = vram, metric
        self.out: dict[str, Any] = rep.data.setdefault("paged", {}).setdefault(model, {})
        self.direct: subprocess.Popen | None = None

    def body(self, i: int, tokens: int | None = None, seed: int = 0, **extra: Any) -> dict:
        return {"model": self.model, "prompt": f"{i}: {self.prompt}", "max_tokens": tokens or TOKENS, "seed": seed + i,
                "temperature": 0.8, "top_k": 40, "top_p": 0.9, "min_p": 0.0, "logit_bias": self.ban, **extra}

    def start_direct(self, context: int, batch: int) -> dict:
        ban = [str(t) for t in self.ban]
        self.direct = subprocess.Popen([sys.executable, str(Path(__file__).with_name("paged_direct.py")),
                                        str(self.folder), "--context", str(context), "--batch", str(batch),
                                        "--ban", *ban], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        return json.loads(self.direct.stdout.readline())

    def direct_batch(self, n: int, tokens: int, seed: int) -> dict:
        assert self.direct is not None and self.direct.stdin is not None and self.direct.stdout is not None
        prompts = [f"{i}: {self.prompt}" for i in range(n)]
        self.direct.stdin.write(json.dumps({"op": "batch", "prompts": prompts, "tokens": tokens, "seed": seed}) + "\n")
        self.direct.stdin.flush()
        line = self.direct.stdout.readline()
        if not line:
            raise RuntimeError("the direct generator's process ended")
        return json.loads(line)

    def stop_direct(self) -> None:
        if self.direct is not None:
            self.direct.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.direct.stdin.flush()
            self.direct.wait(30)
            self.direct = None


def levels(ctx: Ctx) -> None:
    """Aggregate tok/s, TTFT and inter-token latency at 1, 8 and 32 jobs, direct and server in turns."""
    rep, table = ctx.rep, {}
    for n, pairs in LEVELS.items():
        rows: dict[str, list[dict]] = {"direct": [], "server": []}
        ctx.direct_batch(n, 32, 7)  # warm-up of this batch size on both sides, not counted
        pc.run_batch(ctx.base, [ctx.body(i, tokens=32, seed=7) for i in range(n)])
        for k in range(pairs):
            for side in (("direct", "server") if k % 2 == 0 else ("server", "direct")):
                if side == "direct":
                    rows["direct"].append(ctx.direct_batch(n, TOKENS, 100 * k))
                else:
                    got = pc.run_batch(ctx.base, [ctx.body(i, seed=100 * k) for i in range(n)])
                    got.update(model_process_steps(ctx.base, n))
                    rows["server"].append(got)
        ratios = [s["agg_tok_s"] / d["agg_tok_s"] for d, s in zip(rows["direct"], rows["server"])]
        row = {"pair_ratio_median": statistics.median(ratios), "pair_ratios": [round(r, 4) for r in ratios],
               "lost": sum(s["lost"] for s in rows["server"]),
               "tokens_each": sorted({s["tokens"] // n for s in rows["server"]} | {d["tokens"] // n for d in rows["direct"]})}
        row["direct_stalls"] = {k: sum(r.get(k, 0) for r in rows["direct"])
                                for k in ("steps", "steps_over_50ms", "gc_full", "gc_full_s")}
        row["direct_stalls"]["step_max_s"] = max(r.get("step_max_s", 0) for r in rows["direct"])
        # a step's time on each side: the direct loop's iterate() against the model process's step() and its
        # step-to-step span (step() plus its loop around it), medians of the runs, in ms
        row["step_ms"] = {"direct_iterate": pc.median_ms([r.get("step_mean_s") for r in rows["direct"]], 3),
                          "model_process_step": pc.median_ms([r.get("mp_step_s") for r in rows["server"]], 3),
                          "model_process_span": pc.median_ms([r.get("mp_span_s") for r in rows["server"]], 3)}
        for side, runs in rows.items():
            ttfts = [t for r in runs for t in r["ttft_s"]]
            row[side] = {"agg_tok_s": statistics.median(r["agg_tok_s"] for r in runs),
                         "ttft_p50_ms": 1e3 * pc.p(ttfts, 0.5), "ttft_p99_ms": 1e3 * pc.p(ttfts, 0.99),
                         "itl_p50_ms": 1e3 * statistics.median(r["itl_p50_s"] for r in runs),
                         "itl_p99_ms": 1e3 * statistics.median(r["itl_p99_s"] for r in runs)}
        table[n] = row
        print(f"   {n:>2} jobs: server {row['server']['agg_tok_s']:.0f} tok/s, direct {row['direct']['agg_tok_s']:.0f}"
              f" tok/s, pair ratio {row['pair_ratio_median']:.3f}", flush=True)
    ctx.out["levels"] = table
    goals = {1: 0.99, 8: 0.97, 32: 0.95}
    for n, goal in goals.items():
        r = table[n]
        rep.check(f"paged {ctx.model}: {n} stream(s) through HTTP >= {goal}x the direct generator",
                  r["pair_ratio_median"] >= goal and r["lost"] == 0,
                  f"median pair ratio {r['pair_ratio_median']:.3f} ({r['server']['agg_tok_s']:.0f} vs "
                  f"{r['direct']['agg_tok_s']:.0f} tok/s), lost {r['lost']}")
    rep.check(f"paged {ctx.model}: every job gave {TOKENS} tokens (EOS banned)",
              all(t["tokens_each"] == [TOKENS] for t in table.values()), json.dumps({n: t["tokens_each"] for n, t in table.items()}))


def model_process_steps(base: str, n: int) -> dict[str, float]:
    """The model process's own timing of the last ``n`` requests' decoding (the request log: steps after the
    first, the time inside them, the span from the first to the last): mean time per step inside step()
    and per step in all, medians over the requests."""
    import httpx

    try:
        records = httpx.get(f"{base}/admin/requests", timeout=30).json()["data"][-n:]
    except Exception:  # noqa: BLE001 - the figure is optional
        return {}
    inside = [r["model_decode_in_steps_s"] / r["model_decode_steps"] for r in records
              if r.get("model_decode_steps") and r.get("model_decode_in_steps_s") is not None]
    span = [r["model_decode_span_s"] / r["model_decode_steps"] for r in records
            if r.get("model_decode_steps") and r.get("model_decode_span_s") is not None]
    return {"mp_step_s": statistics.median(inside) if inside else float("nan"),
            "mp_span_s": statistics.median(span) if span else float("nan")}


def ttft_overhead(ctx: Ctx) -> None:
    """Time to first token at one stream: the server over the direct generator, pairs in turns. Each side's
    timed request follows an untimed one of 2 tokens on the same side: the first kernels after the other
    process used the GPU pay its switch between the two processes' CUDA contexts, which a user's app (the
    only one on the GPU) does not (at 00a7fab the fresh-connection request, always right after a server
    request, was 0.36 ms faster than the kept-alive one, which came after the direct loop's half the time)."""
    direct, server, fresh, built, prepared = [], [], [], [], []
    client = pc.KeptAlive(ctx.base)  # one connection, kept alive as the SDK keeps its own
    client.stream(ctx.body(0, tokens=4, seed=499))
    for k in range(TTFT_PAIRS):
        for side in (("direct", "server") if k % 2 == 0 else ("server", "direct")):
            if side == "direct":
                ctx.direct_batch(1, 2, 900 + k)  # not timed (see above)
                got = ctx.direct_batch(1, 4, 500 + k)
                direct.append(got["ttft_s"][0])
                built.append(got.get("build_s", float("nan")))
            else:
                client.stream(ctx.body(0, tokens=2, seed=900 + k))  # not timed (see above)
                res = client.stream(ctx.body(0, tokens=4, seed=500 + k))
                server.append(res.ttft_s)
                prepared.append(res.prepare_ms)
                # and with a fresh connection and client event loop per request, as the runs of cdbeb4c and before
                fresh.append(pc.run_batch(ctx.base, [ctx.body(0, tokens=4, seed=500 + k)])["ttft_s"][0])
    client.close()
    over = [s - d for s, d in zip(server, direct)]
    res = {"direct_p50_ms": 1e3 * statistics.median(direct), "server_p50_ms": 1e3 * statistics.median(server),
           "overhead_p50_ms": 1e3 * statistics.median(over), "overhead_p99_ms": 1e3 * pc.p(over, 0.99),
           "server_fresh_connection_p50_ms": 1e3 * statistics.median(fresh),
           # what the direct loop does before its clock starts (tokenize, make the job) and the server after
           # the request arrives (settings, prompt, tokens: X-Prepare-Ms), and the overhead counted from there
           "direct_build_p50_ms": 1e3 * statistics.median(built), "server_prepare_p50_ms": statistics.median(prepared),
           "overhead_from_prompt_p50_ms": 1e3 * statistics.median(s - d - b for s, d, b in zip(server, direct, built))}
    ctx.out["ttft_one_stream"] = res
    try:  # the 30 pairs above are kept whatever happens here
        res["server_phases_p50_ms"] = server_phases(ctx.base, TTFT_PAIRS)
    except Exception as exc:  # noqa: BLE001 - recorded instead
        res["server_phases_p50_ms"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    ctx.rep.check(f"paged {ctx.model}: TTFT overhead over direct <= 1.5 ms p50 at one stream",
                  res["overhead_p50_ms"] <= 1.5,
                  json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in res.items()}))


def server_phases(base: str, last: int) -> dict[str, float | None]:
    """Where the server's time to first text went in the kept-alive requests of the last ``last`` pairs (its
    request log: before the job was taken, the way to the model process, the step that gave the first text,
    the way back, the write to the socket), and a keep-alive GET /health round trip (HTTP with no engine
    work), p50 in ms. Each server turn of ttft_overhead logs a kept-alive request, then a fresh-connection
    one: every other record of the last 2 x ``last``, from the first."""
    import httpx

    with httpx.Client(timeout=30) as http:
        records = [r for r in http.get(f"{base}/admin/requests").json()["data"] if r.get("completion_tokens") == 4]
        health = pc.health_round_trip_ms(http, base)
    records = records[-2 * last::2]
    keys = ("queued_s", "to_model_step_s", "model_step_s", "from_model_s", "handoff_s", "ttft_s")
    return {**{k: pc.median_ms([r.get(k) for r in records], 3) for k in keys}, "health_round_trip": round(health, 3)}


def fim_bodies(ctx: Ctx, n: int) -> list[dict]:
    return [{"model": ctx.model, "prompt": CODE[: len(CODE) - n + i], "suffix": "\n\n    def grow(self):\n",
             "max_tokens": 16, "temperature": 0, "logit_bias": ctx.ban} for i in range(n)]


def mixed_load(ctx: Ctx) -> None:
    """Autocomplete TTFT idle vs while 8 long chats stream (goal: p99 <= 3x idle p99)."""
    probes = fim_bodies(ctx, 24)
    asyncio.run(pc.timed_requests(ctx.base, probes[:4]))  # warm: the FIM form, the prompt builder
    idle = asyncio.run(pc.timed_requests(ctx.base, probes))
    load = [ctx.body(i, tokens=1536, seed=900) for i in range(8)]
    probed, loaded = asyncio.run(pc.under_load(ctx.base, load, probes))
    idle_t = [r.ttft_s for r in idle]
    busy_t = [r.ttft_s for r in probed]
    res = {"idle_p50_ms": 1e3 * pc.p(idle_t, 0.5), "idle_p99_ms": 1e3 * pc.p(idle_t, 0.99),
           "loaded_p50_ms": 1e3 * pc.p(busy_t, 0.5), "loaded_p99_ms": 1e3 * pc.p(busy_t, 0.99),
           "probes_ok": sum(r.ok for r in probed), "load_ok": sum(r.ok and r.tokens == 1536 for r in loaded),
           "load_itl_p50_ms": 1e3 * pc.p([g for r in loaded for g in r.gaps], 0.5)}
    ctx.out["autocomplete_under_load"] = res
    ctx.rep.check(f"paged {ctx.model}: autocomplete TTFT p99 while 8 chats stream <= 3x idle p99",
                  res["loaded_p99_ms"] <= 3 * res["idle_p99_ms"] and res["probes_ok"] == len(probes)
                  and res["load_ok"] == 8, json.dumps({k: round(v, 2) for k, v in res.items()}))


def long_prompt(ctx: Ctx, context: int) -> str:
    """A prompt of about 80% of the context in fresh random words (no prefix to reuse)."""
    rng = random.Random(time.time_ns())
    words = "alpha beta gamma delta river stone cloud paper green seven window light sound".split()
    probe = " ".join(rng.choice(words) for _ in range(400))
    import httpx

    r = httpx.post(f"{ctx.base}/v1/completions", json={"model": ctx.model, "prompt": probe, "max_tokens": 1},
                   timeout=120).json()
    per_word = r["usage"]["prompt_tokens"] / 400
    return " ".join(rng.choice(words) for _ in range(int(0.8 * context / per_word)))


def prefill_stall(ctx: Ctx, context: int) -> None:
    """A long prompt arriving while 8 streams decode stalls them by at most about one prefill chunk: the
    streams' gaps that overlap the long prompt's prefill (its send to its first token) against the time
    that prefill takes alone."""
    alone = asyncio.run(pc.timed_requests(ctx.base, [{"model": ctx.model, "prompt": long_prompt(ctx, context),
                                                      "max_tokens": 2, "logit_bias": ctx.ban}]))[0]
    long_body = {"model": ctx.model, "prompt": long_prompt(ctx, context), "max_tokens": 2, "logit_bias": ctx.ban}
    probed, loaded = asyncio.run(pc.under_load(ctx.base, [ctx.body(i, tokens=512, seed=800) for i in range(8)],
                                               [long_body]))
    long = probed[0]
    during = [g for r in loaded for g in r.waits_after(long.sent_at, long.sent_at + long.ttft_s)]
    res = {"long_prompt_ttft_alone_ms": 1e3 * alone.ttft_s, "long_prompt_ttft_under_load_ms": 1e3 * long.ttft_s,
           "streams_max_wait_during_prefill_ms": 1e3 * max(during, default=float("nan")),
           "streams_itl_p50_ms": 1e3 * pc.p([g for r in loaded for g in r.gaps], 0.5),
           "streams_itl_p99_ms": 1e3 * pc.p([g for r in loaded for g in r.gaps], 0.99),
           "long_prompt_ok": long.ok, "streams_ok": sum(r.tokens == 512 for r in loaded)}
    ctx.out["prefill_stall"] = res
    bound = res["long_prompt_ttft_alone_ms"] * 1.5 + 2 * res["streams_itl_p50_ms"]
    ctx.rep.check(f"paged {ctx.model}: a long prompt stalls running streams by at most one prefill chunk",
                  bool(during) and res["streams_max_wait_during_prefill_ms"] <= bound
                  and res["streams_ok"] == 8 and res["long_prompt_ok"],
                  json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in res.items()})
                  + f", bound {bound:.1f} ms")


def settle(ctx: Ctx, timeout_s: float = 5.0) -> dict:
    """Wait until the server runs nothing; what /health and /metrics say then."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        running = ctx.metric("exllama_tray_requests_running")
        waiting = ctx.metric("exllama_tray_requests_waiting")
        models = httpx.get(f"{ctx.base}/health", timeout=10).json()["models"]
        active = sum(m["active_jobs"] for m in models)
        if (running, waiting, active) == (0, 0, 0) or time.monotonic() > deadline:
            return {"running": running, "waiting": waiting, "active_jobs": active}
        time.sleep(0.05)


def cancels(ctx: Ctx, context: int) -> None:
    """One of 8 streams dropped mid-stream, and 4 long-prompt jobs dropped while in prefill or queued:
    the other streams finish whole, and the server holds nothing of the dropped ones."""
    bodies = [ctx.body(i, seed=300) for i in range(8)]
    results, _ = asyncio.run(pc.batch(ctx.base, bodies, cancel={3: 8}))
    others = [r for i, r in enumerate(results) if i != 3]
    after = settle(ctx)
    ctx.rep.check(f"paged {ctx.model}: one of 8 streams dropped, the other 7 finish whole",
                  all(r.ok and r.tokens == TOKENS for r in others) and results[3].error == "cancelled by the client"
                  and after == {"running": 0, "waiting": 0, "active_jobs": 0},
                  f"{[r.tokens for r in results]} then {after}")

    async def drop_in_prefill() -> list[pc.StreamResult]:
        import aiohttp

        long_bodies = [{"model": ctx.model, "prompt": long_prompt(ctx, context), "max_tokens": 64,
                        "logit_bias": ctx.ban} for _ in range(4)]
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            t0 = time.perf_counter()
            running = [asyncio.create_task(pc.one_stream(session, f"{ctx.base}/v1/completions", b, t0, 300.0))
                       for b in bodies]
            await asyncio.sleep(0.3)
            dropped = [asyncio.create_task(pc.one_stream(session, f"{ctx.base}/v1/completions", b, t0, 300.0))
                       for b in long_bodies]
            await asyncio.sleep(0.003)  # sent, not yet prefilled (4 chunks of 80% of the context each)
            for task in dropped:
                task.cancel()
            return list(await asyncio.gather(*running))

    kept = asyncio.run(drop_in_prefill())
    after = settle(ctx)
    ctx.rep.check(f"paged {ctx.model}: jobs dropped in prefill are freed, the streams running go on whole",
                  all(r.ok and r.tokens == TOKENS for r in kept) and after == {"running": 0, "waiting": 0, "active_jobs": 0},
                  f"{[r.tokens for r in kept]} then {after}")


def no_lost_no_hung(ctx: Ctx) -> None:
    for n in (32, 64):
        res = pc.run_batch(ctx.base, [ctx.body(i, tokens=64, seed=1000) for i in range(n)], timeout_s=180)
        ctx.out[f"clients_{n}"] = {k: v for k, v in res.items() if k != "ttft_s"}
        ctx.rep.check(f"paged {ctx.model}: {n} concurrent clients, 0 lost and 0 hung",
                      res["lost"] == 0 and res["tokens"] == 64 * n,
                      f"{res['tokens']} tokens of {64 * n}, lost {res['lost']} {res['errors']}, {res['wall_s']:.1f} s")


def vram_after_many(ctx: Ctx) -> None:
    """GPU memory after 10 batched requests and after 1,000 (32 at a time, 32 tokens each)."""
    def run(total: int, start: int) -> int:
        lost = 0
        for k in range(start, start + total, 32):
            res = pc.run_batch(ctx.base, [ctx.body(i, tokens=32, seed=k) for i in range(min(32, start + total - k))])
            lost += res["lost"]
        return lost

    lost = run(10, 0)
    after_10 = ctx.vram()
    lost += run(990, 10)
    after_1000 = ctx.vram()
    diff = after_1000.get("gpu_used_mib", 0) - after_10.get("gpu_used_mib", 0)
    ctx.out["vram"] = {"after_10": after_10, "after_1000": after_1000, "gpu_used_diff_mib": diff, "lost": lost}
    ctx.rep.check(f"paged {ctx.model}: VRAM within 64 MiB after 1,000 batched requests vs after 10",
                  abs(diff) <= 64 and lost == 0, f"{diff:+.0f} MiB (nvidia-smi), lost {lost}")


def stream_vs_whole(ctx: Ctx, pairs: int = 30) -> None:
    """The same 128 tokens streamed and not: the non-streaming answer must not be slower. Judged on the
    median of the pairs' differences (each pair measured back to back, the order alternating), which the
    machine's drift over the run (up to 2x on these shared GPU hosts) leaves alone; both sides' own medians
    are reported beside it."""
    import httpx

    http = httpx.Client(timeout=300)
    streamed, whole = [], []
    for k in range(pairs):
        for side in (("stream", "whole") if k % 2 == 0 else ("whole", "stream")):
            body = ctx.body(0, tokens=128, seed=2000 + k)
            t0 = time.perf_counter()
            if side == "whole":
                r = http.post(f"{ctx.base}/v1/completions", json=body).json()
                assert r["usage"]["completion_tokens"] == 128, r
                whole.append(time.perf_counter() - t0)
            else:
                with http.stream("POST", f"{ctx.base}/v1/completions", json={**body, "stream": True}) as resp:
                    for _ in resp.iter_lines():
                        pass
                streamed.append(time.perf_counter() - t0)
    res = {"stream_ms": 1e3 * statistics.median(streamed), "whole_ms": 1e3 * statistics.median(whole),
           "pair_diff_whole_minus_stream_median_ms": 1e3 * statistics.median(w - s for w, s in zip(whole, streamed))}
    ctx.out["stream_vs_whole_128"] = res
    ctx.rep.check(f"paged {ctx.model}: non-streaming latency <= streaming for 128 tokens (median of pair differences)",
                  res["pair_diff_whole_minus_stream_median_ms"] <= 0, json.dumps({k: round(v, 1) for k, v in res.items()}))


def run(ctx: Ctx, context: int, batch: int, parts: list[str] | None = None) -> None:
    """All parts (or ``parts``), the server's model loaded with ``batch``; the direct one for levels/ttft."""
    import httpx

    info = httpx.post(f"{ctx.base}/admin/load", json={"model": ctx.model}, timeout=600)
    health = httpx.get(f"{ctx.base}/health", timeout=10).json()
    mine = [m for m in health["models"] if m["model"].split(":")[0] == ctx.model]
    ctx.out["served"] = mine[0] if mine else {"load": info.text[:300]}
    ctx.rep.check(f"paged {ctx.model}: served with continuous batching ({batch})",
                  bool(mine) and mine[0].get("batching_summary") == f"continuous batching ({batch})",
                  json.dumps(ctx.out["served"])[:300])
    chosen = [name for name in parts or ["levels", "ttft", "mixed", "prefill", "cancels", "clients",
                                         "stream_vs_whole", "vram"]
              if f"paged-{name}" not in ctx.rep.skip]  # e.g. --skip paged-vram
    if {"levels", "ttft"} & set(chosen):
        ctx.out["direct"] = ctx.start_direct(context, batch)
    steps = {"levels": lambda: levels(ctx), "ttft": lambda: ttft_overhead(ctx), "mixed": lambda: mixed_load(ctx),
             "prefill": lambda: prefill_stall(ctx, context), "cancels": lambda: cancels(ctx, context),
             "clients": lambda: no_lost_no_hung(ctx), "stream_vs_whole": lambda: stream_vs_whole(ctx),
             "vram": lambda: vram_after_many(ctx)}
    try:
        for name in chosen:
            if name not in ("levels", "ttft"):
                ctx.stop_direct()  # the direct generator's process off the GPU for the server-only parts
            if ctx.rep.left() < 25:
                ctx.rep.check(f"paged {ctx.model}: {name} not run (time budget)", False, f"{ctx.rep.left():.0f} s left")
                continue
            t0 = time.perf_counter()
            try:
                steps[name]()
            except Exception as exc:  # recorded; the next part runs
                import traceback

                traceback.print_exc()
                ctx.rep.check(f"paged {ctx.model}: {name} raised", False, f"{type(exc).__name__}: {exc}"[:300])
            ctx.out.setdefault("seconds", {})[name] = round(time.perf_counter() - t0, 1)
            ctx.rep.save()
    finally:
        ctx.stop_direct()
