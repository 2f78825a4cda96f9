"""The single-stream HTTP benchmark: the server against the direct generator (bench_direct.py) in turns,
decode tok/s, time to first token and its phases, streaming vs non-streaming, VRAM."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

from paged_clients import health_round_trip_ms, median_ms
from gpu_base import BAN, BASE, DECODE_RUNS, LATENCY_RUNS, PROMPT, ROOT, TTFT_RUNS, WORK, Report, metric, vram


def http_bench(rep: Report) -> None:
    import httpx

    model = "small-exl2"
    body = {"model": model, "prompt": PROMPT, "temperature": 0.8, "top_k": 40, "top_p": 0.9, "min_p": 0.0,
            "logit_bias": BAN}
    # One keep-alive client, as real clients (the openai SDK) use: a fresh connection per request adds
    # ~40 ms to the first chunk (the client's Nagle + the server's delayed ACK), which is not ours.
    http = httpx.Client(timeout=300)
    for name in ("tiny-fp16", "small-exl2"):
        http.post(f"{BASE}/admin/unload", json={"model": name}, timeout=120)
    vram_before = vram()
    http.post(f"{BASE}/admin/load", json={"model": model}, timeout=300)
    prepare_ms: list[float] = []

    def stream(max_tokens: int, seed: int) -> tuple[float, float | None, list[float], int, str]:
        t0 = time.perf_counter()
        stamps: list[float] = []
        usage = 0
        text = []
        with http.stream("POST", f"{BASE}/v1/completions", json={**body, "max_tokens": max_tokens, "seed": seed,
                          "stream": True, "stream_options": {"include_usage": True}}, timeout=300) as resp:
            prepare_ms.append(float(resp.headers.get("x-prepare-ms", "nan")))
            for line in resp.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]["completion_tokens"]
                for ch in chunk.get("choices", []):
                    if ch.get("text"):
                        stamps.append(time.perf_counter())
                        text.append(ch["text"])
        end = time.perf_counter()
        return t0, (stamps[0] - t0) if stamps else None, stamps, usage, "".join(text) if end else ""

    for i in range(3):
        stream(32, i)
    stream(256, 99)
    # the direct generator in a second process on the same GPU, measured in turns with the server so
    # that machine drift hits both sides alike
    direct_proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "gpu" / "bench_direct.py"),
                                    str(WORK / "small-exl2"), "--prompt", PROMPT, "--ban", "2", "5", "--serve",
                                    "--runs", "1", "--ttft-runs", "1"],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert direct_proc.stdin is not None and direct_proc.stdout is not None
    for line in direct_proc.stdout:
        if line.strip() == "READY":
            break

    def direct(cmd: dict) -> dict:
        direct_proc.stdin.write(json.dumps(cmd) + "\n")
        direct_proc.stdin.flush()
        return json.loads(direct_proc.stdout.readline())

    rates, direct_rates, direct_decodes = [], [], []
    for i in range(DECODE_RUNS):
        # in turns, and which side goes first alternates: whatever the first run of a pair pays (a
        # process woken from idle, caches) falls on both sides alike
        for side in (("direct", "http") if i % 2 == 0 else ("http", "direct")):
            if side == "direct":
                direct_decodes.append(direct({"op": "decode", "tokens": 256, "seed": 100 + i}))
                direct_rates.append(direct_decodes[-1]["rate"])
            else:
                _, _, stamps, n, _ = stream(256, 100 + i)
                rates.append((n - 1) / (stamps[-1] - stamps[0]))
    # the model process's side of those runs, from the server's request log, against the direct loop's:
    # per step, the time inside the generator's iterate() and the time of the loop around it
    def decode_steps(tokens: int, last: int) -> list[tuple[int, float, float]]:
        """(steps, time inside them, span) of the last ``last`` requests of ``tokens`` tokens."""
        records = [r for r in http.get(f"{BASE}/admin/requests").json()["data"]
                   if r.get("completion_tokens") == tokens and r.get("model_decode_steps")]
        return [(r["model_decode_steps"], r["model_decode_in_steps_s"], r["model_decode_span_s"])
                for r in records[-last:]]

    decode_records = decode_steps(256, DECODE_RUNS)

    def per_step_us(items: list[tuple[int, float, float]]) -> dict[str, float]:
        inside = statistics.median(t / n for n, t, _ in items if n) * 1e6
        span = statistics.median(s / n for n, _, s in items if n) * 1e6
        return {"step_us": span, "inside_iterate_us": inside, "loop_us": span - inside}

    if decode_records and direct_decodes:
        rep.data["bench"]["decode_per_step"] = {
            "model process": per_step_us(decode_records),
            "direct loop": per_step_us([(d["steps"], d["in_steps_s"], d["span_s"]) for d in direct_decodes])}
    ttfts, direct_ttft, direct_text = [], [], []
    prepare_ms.clear()
    ttft_sum0 = metric("exllama_tray_time_to_first_token_seconds_sum")
    ttft_cnt0 = metric("exllama_tray_time_to_first_token_seconds_count")
    for i in range(TTFT_RUNS):
        d = direct({"op": "ttft", "seed": 200 + i})
        direct_ttft.append(d["ttft"])
        direct_text.append(d["first_text"])
        _, ttft, _, _, _ = stream(4, 200 + i)
        if ttft is not None:
            ttfts.append(ttft)
    # where the server's first-text time went, per request (the last 20 are the TTFT runs)
    records = http.get(f"{BASE}/admin/requests").json()["data"][-TTFT_RUNS:]

    def p50_ms(key: str) -> float | None:
        return median_ms([r.get(key) for r in records])

    rep.data["bench"]["ttft_phases_p50_ms"] = {
        "queued (submit -> GPU thread)": p50_ms("queued_s"),
        "first step (GPU thread -> first text)": p50_ms("first_step_s"),
        "hand-off (first text -> written to the socket)": p50_ms("handoff_s"),
        "to the model process (job taken -> start of the step with the first text)": p50_ms("to_model_step_s"),
        "that step in the model process": p50_ms("model_step_s"),
        "back from the model process (step end -> read by the event loop)": p50_ms("from_model_s"),
        "runner ttft (submit -> first token)": p50_ms("ttft_s"),
        "GET /health round trip": health_round_trip_ms(http, BASE)}  # the floor of one keep-alive HTTP exchange
    direct_proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
    direct_proc.stdin.close()
    direct_proc.wait(60)
    rep.data["bench"]["direct_interleaved"] = {
        "decode_tok_s": statistics.median(direct_rates), "decode_tok_s_runs": direct_rates,
        "ttft_p50_s": statistics.median(direct_ttft), "first_text_p50_s": statistics.median(direct_text)}
    server_ttft = ((metric("exllama_tray_time_to_first_token_seconds_sum") - ttft_sum0)
                   / max(metric("exllama_tray_time_to_first_token_seconds_count") - ttft_cnt0, 1))
    ttft_prepare = statistics.median(prepare_ms) if prepare_ms else None
    lat_stream, lat_full = [], []
    mismatches = 0
    kinds: list[str] = []  # the order the server saw them in, for its request log below
    for i in range(LATENCY_RUNS):
        s_text = full_text = ""
        for kind in (("stream", "whole") if i % 2 == 0 else ("whole", "stream")):  # who goes first alternates
            kinds.append(kind)
            if kind == "stream":
                t0, _, _, _, s_text = stream(128, 300 + i)
                lat_stream.append(time.perf_counter() - t0)
            else:
                t0 = time.perf_counter()
                full = http.post(f"{BASE}/v1/completions", json={**body, "max_tokens": 128, "seed": 300 + i}).json()
                lat_full.append(time.perf_counter() - t0)
                full_text = full["choices"][0]["text"]
        if full_text != s_text:
            mismatches += 1
    # the same split for those 128-token requests (streamed and whole in turns): does the model process
    # step slower while the server streams to a client than while it only waits for the end?
    latency_records = decode_steps(128, 2 * LATENCY_RUNS)
    if len(latency_records) == 2 * LATENCY_RUNS and "decode_per_step" in rep.data["bench"]:
        for name, kind in (("model process, 128 streamed", "stream"), ("model process, 128 not streamed", "whole")):
            rep.data["bench"]["decode_per_step"][name] = per_step_us(
                [r for r, k in zip(latency_records, kinds) if k == kind])
    direct = rep.data["bench"].get("direct_interleaved", {})
    rep.data["bench"]["stream_vs_nonstream_text_mismatches"] = f"{mismatches}/{LATENCY_RUNS} (same seed)"
    results = {"decode_tok_s": statistics.median(rates), "decode_tok_s_runs": rates,
            "ttft_p50_s": statistics.median(ttfts), "ttft_runs_s": ttfts,
            "server_ttft_mean_s": server_ttft, "prepare_p50_ms": ttft_prepare,
            "decode_tok_s_max": max(rates),
            "stream_latency_128_p50_s": statistics.median(lat_stream),
            "nonstream_latency_128_p50_s": statistics.median(lat_full),
            "nonstream_over_stream_median_of_pairs": statistics.median(f / s for f, s in zip(lat_full, lat_stream))}
    rep.data["bench"]["http"] = results
    if direct:
        ratio = results["decode_tok_s"] / direct["decode_tok_s"]
        rep.data["bench"]["decode_ratio_http_over_direct"] = ratio
        rep.data["bench"]["decode_ratio_median_of_pairs"] = statistics.median(
            h / d for h, d in zip(rates, direct["decode_tok_s_runs"]))
        # like for like: the first chunk that carries text over HTTP vs the first non-empty text the
        # generator yields directly (a first token that is an incomplete UTF-8 byte shows no text)
        direct_ttft = direct.get("first_text_p50_s", direct["ttft_p50_s"])
        rep.data["bench"]["ttft_http_minus_direct_ms"] = (results["ttft_p50_s"] - direct_ttft) * 1e3
        rep.data["bench"]["ttft_http_minus_direct_first_token_ms"] = (results["ttft_p50_s"] - direct["ttft_p50_s"]) * 1e3
        rep.check("bench: decode tok/s HTTP >= 0.98x direct", ratio >= 0.98, f"{ratio:.3f}")
        rep.check("bench: TTFT HTTP - direct <= 3 ms (p50)", rep.data["bench"]["ttft_http_minus_direct_ms"] <= 3,
                  f"{rep.data['bench']['ttft_http_minus_direct_ms']:.2f} ms")
    rep.check("bench: non-streaming not slower than streaming",
              results["nonstream_latency_128_p50_s"] <= results["stream_latency_128_p50_s"] * 1.01,
              f"{results['nonstream_latency_128_p50_s'] * 1e3:.1f} ms vs {results['stream_latency_128_p50_s'] * 1e3:.1f} ms")
    # VRAM creep: after 10 vs after 500 requests, then after unload vs before load
    import concurrent.futures

    def short(i: int) -> None:
        http.post(f"{BASE}/v1/completions", json={**body, "prompt": PROMPT[: 20 + (i * 7) % 200],
                                                   "max_tokens": 4 + i % 12, "seed": i}, timeout=300)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(short, range(10)))
    after10 = vram()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(short, range(10, 500)))
    after500 = vram()
    http.post(f"{BASE}/admin/unload", json={"model": model}, timeout=120)
    after_unload = vram()
    rep.data["cuda_tensors_after_unload"] = httpx.get(f"{BASE}/admin/cuda-tensors", timeout=120).json()
    rep.data["vram"] = {"before_load": vram_before, "after_10": after10, "after_500": after500,
                        "after_unload": after_unload}
    creep = after500["torch_reserved_mib"] - after10["torch_reserved_mib"]
    rep.check("VRAM: reserved after 500 vs after 10 requests within 64 MiB", abs(creep) <= 64, f"{creep:+.1f} MiB")
    # the model runs in its own process, which ends at unload: the whole GPU's figure is the honest one
    back = after_unload["gpu_used_mib"] - vram_before["gpu_used_mib"]
    rep.check("VRAM: GPU memory used (nvidia-smi) after unload vs before load within 100 MiB", abs(back) <= 100,
              f"{back:+.1f} MiB")
    # a spare model process (imports done, no model) waits for the next load: it must hold no GPU memory
    spares = [sp["pid"] for sp in httpx.get(f"{BASE}/health").json().get("spare_processes", []) if sp["alive"]]
    apps = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                          capture_output=True, text=True).stdout
    rep.data["gpu_processes_after_unload"] = {"spare_pids": spares, "nvidia_smi_compute_apps": apps}
    none_yet = rep.data.get("vram_no_model_process", {}).get("gpu_used_mib")
    if none_yet is not None:
        extra = after_unload["gpu_used_mib"] - none_yet
        rep.check("VRAM: after unload, with a spare model process waiting, as before any model process "
                  "(within 100 MiB)", bool(spares) and abs(extra) <= 100, f"{extra:+.1f} MiB, spares {spares}")
