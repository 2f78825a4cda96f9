#!/usr/bin/env python3
"""Serving benchmark for any OpenAI-compatible server: a concurrency sweep over three workloads.

Workloads (sizes in tokens, calibrated on the server's own token counts):
  chat          /v1/chat/completions, prompt --chat-prompt (512), output --chat-output (256)
  long          /v1/completions, prompt --long-prompt (4,096), output --long-output (128)
  autocomplete  /v1/completions with a FIM ``suffix``, output 16; each "editor" sends a new request every
                --burst-ms (150) and drops the one still running, as editors do
  mixed         one editor's autocomplete burst while N chat clients run (the editor's figures; the chat
                load's tok/s beside them)
  slot          N streams of --slot-output tokens fill the server's batch (N = its batch size); one at a
                time is dropped and a probe (80 tokens) sent at once: its wait over an idle TTFT, in steps
                (the streams' inter-token gap), shows whether the dropped stream's slot was freed at once
At each concurrency level (--levels, default 1 2 4 8 16 32 64) N clients run in a closed loop for
--requests-per-client requests each (autocomplete: N editors for --burst-s seconds). Per level: requests/s,
aggregate output tok/s, TTFT p50/p99, inter-token latency p50/p99, errors, dropped streams (a stream that
ended without finish_reason and was not cancelled by the client) and, for autocomplete, cancelled
requests. Every request streams, with ``stream_options.include_usage`` for the token counts.

Output in --out: report.json, report.md (tables) and, when matplotlib is importable, PNG plots.
Usage: python scripts/bench_serving.py --base-url http://127.0.0.1:8080/v1 --model NAME --out bench-out
       [--workloads chat long autocomplete] [--levels 1 8 32] [--logit-bias '{"2": -100}'] [--api-key KEY]
Dependencies: aiohttp only (matplotlib optional, for the plots).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("bench_serving")

#: the chat workload's default prompt and output sizes (bare_side.py feeds the bare generator the same)
CHAT_PROMPT, CHAT_OUTPUT = 512, 256
WORDS = ("river stone cloud paper green seven window light sound table garden yellow morning "
         "silver engine market winter number little golden forest button circle letter").split()
CODE = ("import math\n\n\ndef area(radius):\n    return math.pi * radius ** 2\n\n\n"
        "def perimeter(radius):\n    return 2 * math.pi * radius\n\n\nclass Circle:\n"
        "    def __init__(self, radius):\n        self.radius = radius\n\n    def scaled(self, k):\n        ")


@dataclass
class Sample:
    """One streamed request as the client saw it."""

    ok: bool = False
    cancelled: bool = False  # dropped by the client (autocomplete)
    dropped: bool = False  # the stream ended without a finish_reason
    error: str = ""
    ttft_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)
    completion_tokens: int = 0


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


class Client:
    def __init__(self, base_url: str, model: str, api_key: str, logit_bias: dict[str, float], timeout_s: float,
                 top_k: int | None = None) -> None:
        self.base = base_url.rstrip("/")
        self.model = model
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.logit_bias = logit_bias
        self.timeout_s = timeout_s
        self.words_per_token = 1.0
        self.top_k = top_k

    def body(self, **fields: Any) -> dict:
        out = {"model": self.model, "stream": True, "stream_options": {"include_usage": True},
               "temperature": 0.8, "top_p": 0.9, "seed": random.randrange(1 << 30), **fields}
        if self.logit_bias:
            out["logit_bias"] = self.logit_bias
        if self.top_k is not None:
            out.setdefault("top_k", self.top_k)
        return out

    async def stream(self, session: Any, path: str, body: dict, sample: Sample | None = None) -> Sample:
        """One streamed request; ``sample`` (filled as it goes) keeps what came if the task is cancelled."""
        import aiohttp

        sample, last, t0 = sample or Sample(), None, time.perf_counter()
        try:
            async with session.post(f"{self.base}{path}", json=body, headers=self.headers,
                                    timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as resp:
                if resp.status != 200:
                    sample.error = f"HTTP {resp.status}: {(await resp.text())[:160]}"
                    return sample
                finished = False
                async for raw in resp.content:
                    if not raw.startswith(b"data: {"):
                        continue
                    chunk = json.loads(raw[6:])
                    if chunk.get("usage"):
                        sample.completion_tokens = int(chunk["usage"].get("completion_tokens") or 0)
                    for choice in chunk.get("choices") or []:
                        finished = finished or bool(choice.get("finish_reason"))
                        if choice.get("text") or (choice.get("delta") or {}).get("content"):
                            now = time.perf_counter()
                            if last is None:
                                sample.ttft_s = now - t0
                            else:
                                sample.gaps_s.append(now - last)
                            last = now
                sample.dropped = not finished
                sample.ok = finished
        except asyncio.CancelledError:
            sample.cancelled = True
            raise
        except asyncio.TimeoutError:
            sample.error = f"no end after {self.timeout_s:.0f} s"
        except Exception as exc:  # noqa: BLE001 - counted as an error of the level
            sample.error = f"{type(exc).__name__}: {exc}"[:200]
        return sample

    async def calibrate(self, session: Any) -> None:
        """Words of WORDS per token of this server's tokenizer, from its usage count of a probe."""
        import aiohttp

        probe = " ".join(random.Random(1).choice(WORDS) for _ in range(50))
        body = {"model": self.model, "prompt": probe, "max_tokens": 1}
        async with session.post(f"{self.base}/completions", json=body, headers=self.headers,
                                timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as resp:
            data = await resp.json(content_type=None)
            if resp.status != 200:
                raise SystemExit(f"calibration request failed: HTTP {resp.status}: {json.dumps(data)[:300]}")
        count = (data.get("usage") or {}).get("prompt_tokens")
        if count is None:  # a server without usage in non-streamed bodies: its tokenizer endpoint, if any
            async with session.post(f"{self.base}/token/encode", json={"text": probe}, headers=self.headers,
                                    timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as resp:
                enc = await resp.json(content_type=None) if resp.status == 200 else {}
            count = enc.get("length") or len(enc.get("tokens") or []) or None
        if count is None:
            raise SystemExit(f"calibration: no prompt token count from {self.base} (no usage, no /token/encode)")
        self.words_per_token = 50 / max(1, int(count))

    def text(self, tokens: int, rng: random.Random) -> str:
        """Fresh words (no shared prefix between requests) of about ``tokens`` tokens."""
        return " ".join(rng.choice(WORDS) for _ in range(max(1, int(tokens * self.words_per_token))))


def summarize(samples: list[Sample], wall_s: float) -> dict:
    done = [s for s in samples if s.ok]
    gaps = [g for s in done for g in s.gaps_s]
    # every request that got its first token counts for TTFT, also one an editor dropped after it: counting
    # only completed ones would keep the fast requests of a server that finishes few in time
    ttfts = [s.ttft_s for s in samples if s.ttft_s is not None and (s.ok or s.cancelled)]
    tokens = sum(s.completion_tokens for s in done)

    def ms(v: float | None) -> float | None:
        return None if v is None else round(1e3 * v, 2)

    return {"requests": len(samples), "completed": len(done), "wall_s": round(wall_s, 3),
            "requests_per_s": round(len(done) / wall_s, 3) if wall_s else 0.0,
            "output_tok_s": round(tokens / wall_s, 1) if wall_s else 0.0, "output_tokens": tokens,
            "ttft_p50_ms": ms(percentile(ttfts, 0.5)), "ttft_p99_ms": ms(percentile(ttfts, 0.99)),
            "ttft_samples": len(ttfts),
            "itl_p50_ms": ms(percentile(gaps, 0.5)), "itl_p99_ms": ms(percentile(gaps, 0.99)),
            "errors": sum(bool(s.error) for s in samples), "dropped_streams": sum(s.dropped for s in samples),
            "cancelled": sum(s.cancelled for s in samples),
            "error_examples": sorted({s.error for s in samples if s.error})[:3]}


async def closed_loop(client: Client, session: Any, n: int, per_client: int, make: Any) -> dict:
    """``n`` clients, each sending ``per_client`` requests one after another."""
    samples: list[Sample] = []

    async def worker(k: int) -> None:
        rng = random.Random(k)
        for _ in range(per_client):
            path, body = make(rng)
            samples.append(await client.stream(session, path, body))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(n)))
    return summarize(samples, time.perf_counter() - t0)


async def editors(client: Client, session: Any, n: int, seconds: float, every_s: float,
                  stop: asyncio.Event | None = None) -> dict:
    """``n`` editors typing: a FIM request every ``every_s``, the previous one dropped if still running."""
    samples: list[Sample] = []

    async def editor(k: int) -> None:
        running: asyncio.Task | None = None
        current = Sample()
        started = time.perf_counter()
        i = 0
        while time.perf_counter() - started < seconds and not (stop is not None and stop.is_set()):
            if running is not None and not running.done():
                running.cancel()
                current.cancelled = True  # what it got before the drop stays (its first token's time)
                samples.append(current)
            cut = (len(CODE) * (k + 1) // (n + 1) + i) % len(CODE)
            body = client.body(prompt=CODE[:max(cut, 20)], suffix="\n\n    def grow(self):\n", max_tokens=16,
                               temperature=0)
            current = Sample()
            running = asyncio.ensure_future(client.stream(session, "/completions", body, current))
            running.add_done_callback(lambda t: None if t.cancelled() else samples.append(t.result()))
            i += 1
            await asyncio.sleep(every_s)
        if running is not None:
            await asyncio.wait([running])

    t0 = time.perf_counter()
    await asyncio.gather(*(editor(k) for k in range(n)))
    return summarize(samples, time.perf_counter() - t0)


async def mixed(client: Client, session: Any, n: int, per_client: int, make: Any, every_s: float) -> dict:
    """One editor's autocomplete burst while ``n`` chat clients run their closed loop: the editor's figures,
    with the chat load's throughput beside them."""
    load = asyncio.ensure_future(closed_loop(client, session, n, per_client, make))
    stop = asyncio.Event()
    probe = asyncio.ensure_future(editors(client, session, 1, float("inf"), every_s, stop))
    chat = await load
    stop.set()
    burst = await probe
    return {**burst, "load_output_tok_s": chat["output_tok_s"], "load_completed": chat["completed"]}


#: the slot workload's probe: more tokens than a server keeps its short-job slot for
PROBE_TOKENS = 80


async def slot_reuse(client: Client, session: Any, n: int, trials: int, output: int) -> dict:
    """Whether a dropped stream frees its slot at once: ``n`` long streams fill the server's batch (run it
    with n = its batch size), then, ``trials`` times, one is dropped and a probe sent at once. Its time to
    first token over an idle one's, in the running streams' inter-token gaps, is the number of steps the
    slot stayed taken (about 1 when the server frees it within a step: the probe's first step is one
    of the batch's, longer than an idle one)."""
    def probe() -> dict:  # longer than what a server may keep a slot for (this one: 64 tokens), so that
        # it needs the dropped stream's slot; its first token is what is timed
        return client.body(prompt=CODE[:120], max_tokens=PROBE_TOKENS, temperature=0)

    idle = [await client.stream(session, "/completions", probe()) for _ in range(3)]
    idle_ttft = percentile([s.ttft_s for s in idle if s.ttft_s is not None], 0.5) or 0.0
    load: list[asyncio.Task] = []
    load_samples: list[Sample] = []  # kept by the streams as they go, also when dropped

    def add_stream(i: int) -> None:
        body = client.body(prompt=f"{i} " + CODE[:200], max_tokens=output)
        load_samples.append(Sample())
        load.append(asyncio.ensure_future(client.stream(session, "/completions", body, load_samples[-1])))

    for i in range(n):
        add_stream(i)
    deadline = time.perf_counter() + client.timeout_s
    while any(x.ttft_s is None for x in load_samples) and time.perf_counter() < deadline:
        await asyncio.sleep(0.01)  # until every stream is decoding
    probes: list[Sample] = []
    t0 = time.perf_counter()
    for k in range(trials):
        victim = next((t for t in load if not t.done()), None)
        if victim is None:
            break
        victim.cancel()
        probes.append(await client.stream(session, "/completions", probe()))
        add_stream(n + k)  # the batch full again
        await asyncio.sleep(0.3)
    wall = time.perf_counter() - t0
    for task in load:
        task.cancel()
    await asyncio.gather(*load, return_exceptions=True)
    gap = percentile([g for s in load_samples for g in s.gaps_s], 0.5)
    waits = [(s.ttft_s - idle_ttft) for s in probes if s.ttft_s is not None]
    steps = [w / gap for w in waits] if gap else []
    row = summarize(probes, wall)
    return {**row, "idle_ttft_ms": round(1e3 * idle_ttft, 2),
            "slot_wait_steps_p50": None if not steps else round(percentile(steps, 0.5), 2),
            "slot_wait_steps_max": None if not steps else round(max(steps), 2)}


async def run(args: argparse.Namespace) -> dict:
    import aiohttp

    client = Client(args.base_url, args.model, args.api_key, json.loads(args.logit_bias or "{}"), args.timeout_s,
                    args.top_k)
    report: dict[str, Any] = {"base_url": args.base_url, "model": args.model, "started": time.time(),
                              "settings": {k: v for k, v in vars(args).items() if k not in ("api_key", "out")},
                              "workloads": {}}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await client.calibrate(session)
        report["words_per_token"] = round(client.words_per_token, 4)
        makers = {
            "chat": lambda rng: ("/chat/completions", client.body(
                messages=[{"role": "user", "content": client.text(args.chat_prompt, rng)}],
                max_tokens=args.chat_output)),
            "long": lambda rng: ("/completions", client.body(prompt=client.text(args.long_prompt, rng),
                                                            max_tokens=args.long_output)),
        }
        for workload in args.workloads:
            levels: dict[str, dict] = {}
            for n in args.levels:
                log.info("%s: %d concurrent", workload, n)
                if workload == "autocomplete":
                    levels[str(n)] = await editors(client, session, n, args.burst_s, args.burst_ms / 1e3)
                elif workload == "mixed":
                    levels[str(n)] = await mixed(client, session, n, args.requests_per_client, makers["chat"],
                                                 args.burst_ms / 1e3)
                elif workload == "slot":
                    levels[str(n)] = await slot_reuse(client, session, n, args.slot_trials, args.slot_output)
                else:
                    levels[str(n)] = await closed_loop(client, session, n, args.requests_per_client, makers[workload])
                log.info("%s", json.dumps(levels[str(n)]))
            report["workloads"][workload] = levels
    return report


TABLE_COLUMNS = ("requests_per_s", "output_tok_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms",
                 "errors", "dropped_streams", "cancelled")


def markdown(report: dict) -> str:
    lines = [f"# Serving benchmark: {report['model']} at {report['base_url']}", ""]
    for workload, levels in report["workloads"].items():
        lines += [f"## {workload}", "", "| concurrency | " + " | ".join(TABLE_COLUMNS) + " |",
                  "|---" * (len(TABLE_COLUMNS) + 1) + "|"]
        for n, row in levels.items():
            lines.append(f"| {n} | " + " | ".join("-" if row[c] is None else str(row[c]) for c in TABLE_COLUMNS) + " |")
        lines.append("")
    return "\n".join(lines)


def plots(report: dict, out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    for workload, levels in report["workloads"].items():
        xs = [int(n) for n in levels]
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
        a.plot(xs, [levels[str(n)]["output_tok_s"] for n in xs], "-o")
        b.plot(xs, [levels[str(n)]["ttft_p99_ms"] or 0 for n in xs], "-o", label="TTFT p99")
        b.plot(xs, [levels[str(n)]["itl_p99_ms"] or 0 for n in xs], "--s", label="ITL p99")
        for ax, unit in ((a, "aggregate output tok/s"), (b, "ms")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrency")
            ax.set_ylabel(unit)
            ax.grid(True, alpha=0.3)
        b.legend()
        fig.suptitle(f"{workload}: {report['model']}")
        fig.tight_layout()
        path = out / f"{workload}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path.name)
    return written


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Serving benchmark for an OpenAI-compatible server")
    p.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8080/v1")
    p.add_argument("--model", required=True)
    p.add_argument("--api-key", default="")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--workloads", nargs="+", default=["chat", "long", "autocomplete"],
                   choices=["chat", "long", "autocomplete", "mixed", "slot"])
    p.add_argument("--levels", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--requests-per-client", type=int, default=4)
    p.add_argument("--chat-prompt", type=int, default=CHAT_PROMPT)
    p.add_argument("--chat-output", type=int, default=CHAT_OUTPUT)
    p.add_argument("--long-prompt", type=int, default=4096)
    p.add_argument("--long-output", type=int, default=128)
    p.add_argument("--burst-s", type=float, default=10.0, help="how long the editors type, per level")
    p.add_argument("--burst-ms", type=float, default=150.0, help="an editor's pause between requests")
    p.add_argument("--logit-bias", default="", help='JSON, e.g. \'{"2": -100}\' to ban EOS so lengths match')
    p.add_argument("--top-k", type=int, default=None, help="top_k sent with every request (default: none sent)")
    p.add_argument("--slot-trials", type=int, default=5, help="slot: streams dropped, one at a time")
    p.add_argument("--slot-output", type=int, default=512, help="slot: tokens each filling stream asks for")
    p.add_argument("--timeout-s", type=float, default=600.0)
    args = p.parse_args(argv)
    if any(n < 1 for n in args.levels) or args.requests_per_client < 1:
        p.error("levels and --requests-per-client must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_args(argv)
    report = asyncio.run(run(args))
    args.out.mkdir(parents=True, exist_ok=True)
    report["plots"] = plots(report, args.out)
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    (args.out / "report.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
