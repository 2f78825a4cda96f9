"""Where a decode step's time goes in the server's model process vs the direct generator (issue #16).

On the TinyLlama-shaped model (vocab 32,000) the server's inter-token latency was ~1 ms above the direct
loop's at 1 and 8 streams, and equal on a vocab-1,024 model. For 1 and 8 streams of 256 tokens, in
turns: the direct generator (paged_direct.py) and the server through HTTP, each side's process sampled by
py-spy meanwhile (when py-spy is installed and may attach); and per server request the model process's
own clock (``/admin/requests``: steps, time inside the backend's step(), span). From these: the time per
step inside ``step()`` and outside it (the model process's loop), against the direct loop's time per
``iterate()``; and the functions with the most samples on each side (self and inclusive), written to
OUT/step-profile.txt.
"""

from __future__ import annotations

import collections
import json
import shutil
import signal
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import paged_clients as pc

ROUNDS = {1: 4, 8: 3}


def _gpu_pids() -> set[int]:
    try:
        smi = subprocess.run(["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"],
                             capture_output=True, text=True)
    except OSError:
        return set()
    return {int(x) for x in smi.stdout.split() if x.strip().isdigit()}


def _model_process(exclude: int) -> int | None:
    """The model process of the loaded model: a multiprocessing child using the GPU (nvidia-smi's PIDs may
    be another namespace's: then the multiprocessing child with the most resident memory)."""
    import psutil

    kids = [p for p in psutil.process_iter(["pid", "ppid", "cmdline", "memory_info"])
            if p.info["pid"] != exclude and "multiprocessing" in " ".join(p.info["cmdline"] or [])]
    parents = {p.info["ppid"] for p in kids}  # the forkserver (the model processes' parent) is not one
    kids = [p for p in kids if p.info["pid"] not in parents and "resource_tracker" not in " ".join(p.info["cmdline"])]
    on_gpu = [p for p in kids if p.info["pid"] in _gpu_pids()]
    pick = on_gpu or kids
    return max(pick, key=lambda p: p.info["memory_info"].rss).info["pid"] if pick else None


def _spy(pid: int, path: Path) -> subprocess.Popen | None:
    exe = shutil.which("py-spy") or ("/tmp/site/bin/py-spy" if Path("/tmp/site/bin/py-spy").exists() else None)
    if exe is None:
        return None
    return subprocess.Popen([exe, "record", "--pid", str(pid), "--rate", "400", "--format", "raw", "--nonblocking",
                             "--output", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def _stop(spy: subprocess.Popen | None) -> str:
    if spy is None:
        return "py-spy not installed"
    if spy.poll() is not None:
        return f"py-spy ended early: {(spy.stderr.read() if spy.stderr else '')[-300:]}"
    spy.send_signal(signal.SIGINT)
    try:
        spy.wait(30)
    except subprocess.TimeoutExpired:
        spy.kill()
    return "ok"


def top_frames(raw: Path, n: int = 25) -> list[str]:
    """The ``n`` frames with the most samples, self and inclusive, from py-spy's collapsed stacks."""
    self_c: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        c = int(count)
        total += c
        frames = stack.split(";")
        self_c[frames[-1]] += c
        for f in set(frames):
            incl[f] += c
    out = [f"{raw.name}: {total} samples", "self:"]
    out += [f"  {100 * c / max(total, 1):5.1f}%  {f[:160]}" for f, c in self_c.most_common(n)]
    out += ["inclusive:"] + [f"  {100 * c / max(total, 1):5.1f}%  {f[:160]}" for f, c in incl.most_common(n)]
    return out


def run(ctx: Any, out_dir: Path) -> dict[str, Any]:
    import httpx

    httpx.post(f"{ctx.base}/admin/load", json={"model": ctx.model}, timeout=600)
    pc.run_batch(ctx.base, [ctx.body(i, tokens=32) for i in range(8)])
    ready = ctx.start_direct(2048, 32)
    direct_pid = ctx.direct.pid
    model_pid = _model_process(direct_pid)
    data: dict[str, Any] = {"direct_ready": ready, "model_process_pid": model_pid, "levels": {}}
    raws = {"server": out_dir / "spy-model-process.txt", "direct": out_dir / "spy-direct.txt"}
    spies = {"server": _spy(model_pid, raws["server"]) if model_pid else None,
             "direct": _spy(direct_pid, raws["direct"])}
    time.sleep(1.0)
    for n, rounds in ROUNDS.items():
        direct, server, records = [], [], []
        for k in range(rounds):
            direct.append(ctx.direct_batch(n, 256, 300 + k))
            server.append(pc.run_batch(ctx.base, [ctx.body(i, seed=300 + k) for i in range(n)]))
            records += httpx.get(f"{ctx.base}/admin/requests", timeout=10).json()["data"][-n:]
        steps = [r for r in records if r.get("model_decode_steps")]
        per_step_in = [r["model_decode_in_steps_s"] / r["model_decode_steps"] for r in steps]
        per_step_span = [r["model_decode_span_s"] / r["model_decode_steps"] for r in steps]
        direct_step = [d["wall_s"] / d["steps"] for d in direct if d.get("steps")]
        row = {"direct_ms_per_iterate": 1e3 * statistics.median(direct_step),
               "direct_itl_p50_ms": 1e3 * statistics.median(d["itl_p50_s"] for d in direct),
               "server_itl_p50_ms": 1e3 * statistics.median(s["itl_p50_s"] for s in server),
               "model_process_ms_in_step": 1e3 * statistics.median(per_step_in) if per_step_in else None,
               "model_process_ms_per_step": 1e3 * statistics.median(per_step_span) if per_step_span else None,
               "server_agg_tok_s": statistics.median(s["agg_tok_s"] for s in server),
               "direct_agg_tok_s": statistics.median(d["agg_tok_s"] for d in direct)}
        data["levels"][n] = row
        print(f"   step profile {n} job(s): {json.dumps(row)}", flush=True)
    data["py_spy"] = {side: _stop(spy) for side, spy in spies.items()}
    ctx.stop_direct()
    lines = [json.dumps(data, indent=1)]
    for side, raw in raws.items():
        if raw.exists():
            lines += ["", f"== {side}"] + top_frames(raw)
    (out_dir / "step-profile.txt").write_text("\n".join(lines) + "\n")
    return data
