"""Why the model process's step is slower than the direct loop's at 32 jobs (issue #17: on the TinyLlama-
shaped EXL3 model 29.4 vs 17.2 ms a step at 00a7fab, the same library with the same settings).

At one concurrency (32 jobs of 256 tokens), on one loaded model, in turns:
  direct          the direct generator alone (two rounds)
  server          the server through HTTP (two rounds); per round the CPU seconds of each process (model
                  process, server, this client process, the direct loop's) and of each of the model
                  process's threads, so a second busy thread or a starved process shows
  server-spy      one server round with py-spy sampling the model process; direct-spy likewise
  direct-burn     the direct loop while as many busy processes run as the server round kept busy
  server-pinned   the model process's main thread on a CPU of its own (every other process of ours moved
                  off it) and at a higher priority where this user may raise it
The model process's step is its own clock (``/admin/requests``: time inside ``step()`` per step); the
direct loop's is its ``iterate()``'s mean. Figures go to the returned dict and OUT/step-contention.txt.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

import paged_clients as pc
import step_profile as sp

JOBS = 32
TOKENS = 256


def _burn(stop: Any) -> None:
    x = 0
    while not stop.is_set():
        for _ in range(10000):
            x += 1


def _cpu(pids: dict[str, int]) -> dict[str, float]:
    import psutil

    out = {}
    for name, pid in pids.items():
        try:
            t = psutil.Process(pid).cpu_times()
            out[name] = t.user + t.system
        except (psutil.Error, OSError):
            out[name] = float("nan")
    return out


def _threads(pid: int) -> dict[int, float]:
    import psutil

    try:
        return {t.id: t.user_time + t.system_time for t in psutil.Process(pid).threads()}
    except (psutil.Error, OSError):
        return {}


def _server_round(ctx: Any, seed: int, pids: dict[str, int]) -> dict[str, Any]:
    import httpx

    cpu0, th0, t0 = _cpu(pids), _threads(pids["model_process"]), time.perf_counter()
    got = pc.run_batch(ctx.base, [ctx.body(i, seed=seed) for i in range(JOBS)])
    wall = time.perf_counter() - t0
    cpu1, th1 = _cpu(pids), _threads(pids["model_process"])
    records = httpx.get(f"{ctx.base}/admin/requests", timeout=10).json()["data"][-JOBS:]
    steps = [r for r in records if r.get("model_decode_steps")]
    busy = sorted((round((th1[t] - th0.get(t, 0.0)) / wall, 3) for t in th1), reverse=True)
    return {"agg_tok_s": round(got["agg_tok_s"], 1), "itl_p50_ms": round(1e3 * got["itl_p50_s"], 2),
            "lost": got["lost"], "wall_s": round(wall, 2),
            "step_ms": pc.median_ms([r["model_decode_in_steps_s"] / r["model_decode_steps"] for r in steps], 2),
            "span_ms": pc.median_ms([r["model_decode_span_s"] / r["model_decode_steps"] for r in steps], 2),
            "cpu_share": {k: round((cpu1[k] - cpu0[k]) / wall, 3) for k in pids},
            "model_process_threads_busy": busy[:6]}


def _direct_round(ctx: Any, seed: int) -> dict[str, Any]:
    d = ctx.direct_batch(JOBS, TOKENS, seed)
    return {"agg_tok_s": round(d["agg_tok_s"], 1), "itl_p50_ms": round(1e3 * d["itl_p50_s"], 2),
            "step_ms": round(1e3 * d["step_mean_s"], 2), "steps": d["steps"]}


def _pin(pid: int, others: list[int]) -> dict[str, Any]:
    """The model process's main thread alone on the last CPU it may use, every other process of ours off it,
    and a higher priority where allowed; what was done."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return {"pinned": False, "why": f"{len(cpus)} CPU"}
    own, rest = cpus[-1], set(cpus[:-1])
    done: dict[str, Any] = {"cpu": own}
    os.sched_setaffinity(pid, {own})
    for other in others:
        try:
            os.sched_setaffinity(other, rest)
        except OSError as exc:
            done.setdefault("not_moved", []).append(f"{other}: {exc}")
    try:
        os.setpriority(os.PRIO_PROCESS, pid, -10)
        done["nice"] = -10
    except OSError as exc:
        done["nice"] = f"not raised: {exc}"
    return done


def run(ctx: Any, out_dir: Path) -> dict[str, Any]:
    import httpx
    import psutil

    httpx.post(f"{ctx.base}/admin/load", json={"model": ctx.model}, timeout=600)
    pc.run_batch(ctx.base, [ctx.body(i, tokens=32) for i in range(8)])
    ctx.start_direct(2048, JOBS)
    direct_pid = ctx.direct.pid
    model_pid = sp._model_process(direct_pid)
    if model_pid is None:
        return {"error": "the model process was not found"}
    server_pid = next((q.pid for q in psutil.Process(model_pid).parents()
                       if "serve" in q.cmdline() and "app" in q.cmdline()), None)
    if server_pid is None:
        return {"error": "the server's process was not found"}
    pids = {"model_process": model_pid, "server": server_pid, "clients": os.getpid(), "direct": direct_pid}
    data: dict[str, Any] = {"cpus": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)), "pids": pids,
                            "rounds": {}}
    rounds = data["rounds"]

    def add(name: str, row: dict[str, Any]) -> None:
        rounds.setdefault(name, []).append(row)
        print(f"   contention {name}: {json.dumps(row)}", flush=True)

    for k in range(2):
        add("direct", _direct_round(ctx, 500 + k))
        add("server", _server_round(ctx, 500 + k, pids))
    raw = {"server-spy": out_dir / "contention-spy-model-process.txt", "direct-spy": out_dir / "contention-spy-direct.txt"}
    spy = sp._spy(model_pid, raw["server-spy"])
    time.sleep(0.5)
    add("server-spy", _server_round(ctx, 510, pids))
    data["py_spy_server"] = sp._stop(spy)
    spy = sp._spy(direct_pid, raw["direct-spy"])
    time.sleep(0.5)
    add("direct-spy", _direct_round(ctx, 510))
    data["py_spy_direct"] = sp._stop(spy)
    # as many busy processes as the server round kept busy besides the model process (at least 2)
    shares = rounds["server"][-1]["cpu_share"]
    burners = max(2, round(shares.get("server", 0) + shares.get("clients", 0) + 0.5))
    stop = multiprocessing.Event()
    procs = [multiprocessing.Process(target=_burn, args=(stop,), daemon=True) for _ in range(burners)]
    for p in procs:
        p.start()
    time.sleep(0.3)
    add(f"direct-burn{burners}", _direct_round(ctx, 520))
    stop.set()
    for p in procs:
        p.join(5)
    every = os.sched_getaffinity(0)
    data["pinned"] = _pin(model_pid, [server_pid, os.getpid(), direct_pid])
    try:
        for k in range(2):
            add("server-pinned", _server_round(ctx, 530 + k, pids))
    finally:  # the stages after this one measure the app as it runs
        for pid in (model_pid, server_pid, os.getpid(), direct_pid):
            try:
                os.sched_setaffinity(pid, every)
            except OSError:
                pass
        try:
            os.setpriority(os.PRIO_PROCESS, model_pid, 0)
        except OSError:
            pass
    add("direct", _direct_round(ctx, 540))
    ctx.stop_direct()
    lines = [json.dumps(data, indent=1)]
    for side, path in raw.items():
        if path.exists():
            lines += ["", f"== {side}"] + sp.top_frames(path, 30)
    (out_dir / "step-contention.txt").write_text("\n".join(lines) + "\n")
    return data
