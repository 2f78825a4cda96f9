"""HTTP clients for the paged stage: N concurrent SSE streams against the server, timed as the direct
generator is (scripts/gpu/paged_direct.py): per request the time to its first text and the gaps between
its chunks; per batch the output tokens over the wall time from the first request sent to the last
chunk received. asyncio + aiohttp: one connection per stream, as N separate clients have."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from paged_direct import percentile


@dataclass
class StreamResult:
    ok: bool
    tokens: int = 0  # completion_tokens from the usage chunk
    ttft_s: float = float("nan")
    gaps: list[float] = field(default_factory=list)
    error: str = ""
    finish: str | None = None
    sent_at: float = 0.0  # perf_counter() when the request went out
    stamps: list[float] = field(default_factory=list)  # perf_counter() of each text chunk
    prepare_ms: float = float("nan")  # the server's own preparation of the request (X-Prepare-Ms)

    def waits_after(self, start: float, end: float) -> list[float]:
        """For each gap between this stream's chunks that overlaps [start, end]: how long after ``start``
        (or the gap's own start, if later) the next chunk came, i.e. the wait that began in that window."""
        return [b - max(a, start) for a, b in zip(self.stamps, self.stamps[1:]) if b >= start and a <= end]


async def one_stream(session: Any, url: str, body: dict, t0: float, timeout_s: float,
                     cancel_after: int | None = None) -> StreamResult:
    """A streamed request; with ``cancel_after`` the connection is dropped after that many text chunks."""
    import aiohttp

    res = StreamResult(ok=False, sent_at=time.perf_counter())
    last = None
    try:
        async with session.post(url, json={**body, "stream": True, "stream_options": {"include_usage": True}},
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            if resp.status != 200:
                res.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return res
            res.prepare_ms = float(resp.headers.get("X-Prepare-Ms", "nan"))
            async for raw in resp.content:
                if cancel_after is not None and len(res.gaps) + 1 >= cancel_after:
                    res.error = "cancelled by the client"
                    return res
                if not raw.startswith(b"data: {"):
                    continue
                chunk = json.loads(raw[6:])
                if chunk.get("usage"):
                    res.tokens = chunk["usage"]["completion_tokens"]
                for ch in chunk.get("choices", []):
                    if ch.get("finish_reason"):
                        res.finish = ch["finish_reason"]
                    if ch.get("text") or (ch.get("delta") or {}).get("content"):
                        now = time.perf_counter()
                        res.stamps.append(now)
                        if last is None:
                            res.ttft_s = now - t0
                        else:
                            res.gaps.append(now - last)
                        last = now
        res.ok = res.tokens > 0
        if not res.ok:
            res.error = "no usage chunk"
    except asyncio.TimeoutError:
        res.error = f"hung: no end after {timeout_s:.0f} s"
    except Exception as exc:  # noqa: BLE001 - recorded, counted as lost
        res.error = f"{type(exc).__name__}: {exc}"
    return res


async def batch(base: str, bodies: list[dict], timeout_s: float = 300.0,
                cancel: dict[int, int] | None = None) -> tuple[list[StreamResult], float]:
    """All ``bodies`` sent at once (one connection each); the results and the wall time."""
    import aiohttp

    conn = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=conn) as session:
        t0 = time.perf_counter()
        results = await asyncio.gather(*[
            one_stream(session, f"{base}/v1/completions", b, t0, timeout_s, (cancel or {}).get(i))
            for i, b in enumerate(bodies)])
        return list(results), time.perf_counter() - t0


class KeptAlive:
    """One client whose connection stays open between its requests, as the openai SDK's (httpx) and a
    browser's do: a request's time to first token is then the server's, without a TCP connect and
    aiohttp's resolver lookup (about 0.4-0.5 ms of a fresh session per request on the CPU machine)."""

    def __init__(self, base: str) -> None:
        import aiohttp

        self.url = f"{base}/v1/completions"
        self.loop = asyncio.new_event_loop()

        async def open_session() -> Any:
            return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))

        self.session = self.loop.run_until_complete(open_session())

    def stream(self, body: dict, timeout_s: float = 300.0) -> StreamResult:
        return self.loop.run_until_complete(one_stream(self.session, self.url, body, time.perf_counter(), timeout_s))

    def close(self) -> None:
        self.loop.run_until_complete(self.session.close())
        self.loop.close()


def summary(results: list[StreamResult], wall: float) -> dict:
    gaps = [g for r in results for g in r.gaps]
    tokens = sum(r.tokens for r in results)
    return {"n": len(results), "tokens": tokens, "wall_s": wall, "agg_tok_s": tokens / wall if wall else 0.0,
            "ttft_s": [r.ttft_s for r in results], "itl_p50_s": percentile(gaps, 0.5),
            "itl_p99_s": percentile(gaps, 0.99), "itl_max_s": max(gaps, default=float("nan")),
            "lost": sum(not r.ok for r in results), "errors": sorted({r.error for r in results if r.error})[:5]}


def run_batch(base: str, bodies: list[dict], timeout_s: float = 300.0) -> dict:
    results, wall = asyncio.run(batch(base, bodies, timeout_s))
    return summary(results, wall)


async def timed_requests(base: str, bodies: list[dict], pause_s: float = 0.05) -> list[StreamResult]:
    """``bodies`` one after another (an editor's autocomplete), each a fresh stream."""
    import aiohttp

    out = []
    async with aiohttp.ClientSession() as session:
        for body in bodies:
            out.append(await one_stream(session, f"{base}/v1/completions", body, time.perf_counter(), 120.0))
            await asyncio.sleep(pause_s)
    return out


async def under_load(base: str, load: list[dict], probes: list[dict], settle_s: float = 1.0) -> tuple[
        list[StreamResult], list[StreamResult]]:
    """``probes`` sent one after another while the ``load`` streams run; (probe results, load results)."""
    import aiohttp

    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as session:
        t0 = time.perf_counter()
        running = [asyncio.create_task(one_stream(session, f"{base}/v1/completions", b, t0, 300.0)) for b in load]
        await asyncio.sleep(settle_s)  # the load streams are decoding
        probed = await timed_requests(base, probes)
        loaded = await asyncio.gather(*running)
    return probed, list(loaded)


def p(values: list[float], q: float) -> float:
    return percentile([v for v in values if v == v], q)  # NaN (no first token) left out


def median_ms(values: list[Any], digits: int | None = None) -> float | None:
    """The median of ``values`` (seconds) in ms, None and NaN left out; None when nothing is left."""
    vals = [v for v in values if isinstance(v, (int, float)) and v == v]
    if not vals:
        return None
    ms = 1e3 * statistics.median(vals)
    return ms if digits is None else round(ms, digits)


def health_round_trip_ms(http: Any, base: str, n: int = 20) -> float:
    """The median of ``n`` keep-alive GET /health round trips on the httpx client ``http``: one HTTP exchange
    with the server and no engine work."""
    took = []
    for _ in range(n):
        t = time.perf_counter()
        http.get(f"{base}/health")
        took.append(time.perf_counter() - t)
    return 1e3 * statistics.median(took)
