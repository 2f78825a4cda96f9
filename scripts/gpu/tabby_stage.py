#!/usr/bin/env python3
"""Side-by-side serving runs: this server against TabbyAPI on the same model, with scripts/bench_serving.py.

TabbyAPI (AGPL) is never part of this repository: its snapshot is exported beside it into .tabby/<rev>/
(ignored through .git/info/exclude) and its missing dependencies travel as wheels in .whl-tabby/ (also
ignored). This script only writes its own config.yml for it, runs it as a subprocess and measures it:
  .tabby/exl2-checkpoint  EXL2 models (backend exllamav2, paged when flash-attn imports)
  .tabby/main             EXL3 models (backend exllamav3)
Wheels: installed with pip --no-index --no-deps into /tmp/site-tabby, which goes first on TabbyAPI's
PYTHONPATH (it pins pydantic 2.11.0 there: formatron, imported by its exllamav2 backend, fails on newer
pydantic), then /tmp/site (run_checks.sh's target: exllamav2/exllamav3, their extensions, flash-attn).
The exl2-checkpoint revision turns its exllamav2 backend off when torch is a CUDA 13 build; BOOT below
turns it back on when exllamav2 imports, and keeps its (older) exllamav3 backend off.

This server must already be serving the model (``--ours``). Runs go in pairs, the order alternating
(ours, tabby), (tabby, ours), ...; each run is the chat workload at --levels, the autocomplete burst
at --burst-levels, and --extra-workloads (bench_serving's mixed at the highest chat level, slot with
--batch streams). Output in --out: tabby_stage.json (every run, the medians, TabbyAPI's config and log
tail) and tabby_stage.md (the medians side by side); bench_serving's own files stay in a temp dir.
Usage on the GPU machine (after run_checks.sh's wheel install and with this server up on :8765):
    python3 scripts/gpu/tabby_stage.py --model /tmp/gpu-work/small-exl2 --ours http://127.0.0.1:8765/v1 \
        --ours-model small-exl2 --tabby .tabby/exl2-checkpoint --backend exllamav2 --context 2048 --batch 32 \
        --logit-bias '{"2": -100, "5": -100}' --out $OUT/tabby
EXL3: --model /tmp/gpu-work/tiny-exl3 --ours-model tiny-exl3 --tabby .tabby/main --backend exllamav3.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

log = logging.getLogger("tabby_stage")
ROOT = Path(__file__).resolve().parent.parent.parent
BENCH = ROOT / "scripts" / "bench_serving.py"
WHEELS = ROOT / ".whl-tabby"
SITE = Path("/tmp/site-tabby")
SHARED_SITE = Path("/tmp/site")
PRESET = "bench_stage"  # written into TabbyAPI's sampler_overrides/ (its run copy, outside the repository)
METRICS = ("output_tok_s", "requests_per_s", "ttft_p50_ms", "ttft_p99_ms", "ttft_samples", "itl_p50_ms", "itl_p99_ms",
           "errors", "dropped_streams", "cancelled", "load_output_tok_s", "slot_wait_steps_p50", "slot_wait_steps_max")
BOOT = """
import importlib.util, runpy, sys
from common.optional_dependencies import dependencies as deps
backend = sys.argv[1]
if backend == "exllamav2" and hasattr(deps, "exllamav2"):
    deps.exllamav2 = importlib.util.find_spec("exllamav2") is not None
    deps.exllamav3 = False
sys.argv = ["main.py"] + sys.argv[2:]
runpy.run_path("main.py", run_name="__main__")
"""


def install_wheels(wheels: Path = WHEELS, target: Path = SITE) -> None:
    """Install the carried wheels into ``target`` (once per machine: a marker file says it was done)."""
    marker = target / ".installed"
    if marker.exists():
        return
    files = sorted(str(p) for p in wheels.glob("*.whl"))
    if not files:
        raise SystemExit(f"no wheels in {wheels}")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--upgrade", "--target", str(target), *files], check=True)
    marker.write_text("\n".join(files))


def config_text(model: Path, port: int, context: int, batch: int, backend: str, chunk_size: int,
                cache_mode: str = "FP16") -> str:
    """TabbyAPI's config.yml for one model: loaded at start, no auth, cache for ``batch`` full contexts."""
    cache = max(context, -(-context * batch // 256) * 256)  # a multiple of 256, at least one context
    return "\n".join([
        "network:", "  host: 127.0.0.1", f"  port: {port}", "  disable_auth: true", "",
        "logging:", "  log_prompt: false", "  log_generation_params: false", "  log_requests: false", "",
        "model:", f"  model_dir: {json.dumps(str(model.parent))}", f"  model_name: {json.dumps(model.name)}",
        f"  backend: {backend}", f"  max_seq_len: {context}", f"  cache_size: {cache}",
        f"  cache_mode: {cache_mode}", f"  chunk_size: {chunk_size}", f"  max_batch_size: {batch}", "",
        "sampling:", f"  override_preset: {PRESET}", "",
    ])


def preset_text(top_k: int) -> str:
    """A sampler preset for TabbyAPI: this server's default top_k (TabbyAPI's is 0), a request's value wins."""
    return f"top_k:\n  override: {top_k}\n  force: false\n"


def get_json(url: str, timeout_s: float = 5.0) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except (urllib.error.URLError, OSError, ValueError):
        return 0, None


class Tabby:
    """One TabbyAPI process serving one model on 127.0.0.1:``port``."""

    def __init__(self, folder: Path, model: Path, port: int, context: int, batch: int, backend: str,
                 chunk_size: int = 2048, top_k: int = 40) -> None:
        self.folder, self.model, self.port, self.backend = folder.resolve(), model.resolve(), port, backend
        (self.folder / "sampler_overrides").mkdir(exist_ok=True)
        (self.folder / "sampler_overrides" / f"{PRESET}.yml").write_text(preset_text(top_k))
        self.work = Path(tempfile.mkdtemp(prefix="tabby-stage-"))
        self.config = self.work / "config.yml"
        self.config.write_text(config_text(self.model, port, context, batch, backend, chunk_size))
        self.log_path = self.work / "tabby.log"
        self.proc: subprocess.Popen | None = None
        self.base = f"http://127.0.0.1:{port}/v1"

    def env(self) -> dict[str, str]:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != ROOT]
        env["PYTHONPATH"] = os.pathsep.join([str(SITE), str(SHARED_SITE), *rest])
        return env

    def start(self, timeout_s: float = 600.0) -> float:
        """Start TabbyAPI and wait until /v1/model names the loaded model; seconds that took."""
        with socket.socket() as probe:  # TabbyAPI would move to port + 1 on its own: refuse instead
            if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                raise RuntimeError(f"port {self.port} is already in use")
        t0 = time.perf_counter()
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-c", BOOT, self.backend, "--config", str(self.config)],
                                         cwd=self.folder, env=self.env(), stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        while time.perf_counter() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"TabbyAPI exited with {self.proc.returncode}:\n{self.tail()}")
            status, body = get_json(f"{self.base}/model")
            if status == 200 and body:
                log.info("TabbyAPI up in %.1f s: %s", time.perf_counter() - t0, body.get("id"))
                return time.perf_counter() - t0
            time.sleep(1.0)
        self.stop()
        raise RuntimeError(f"TabbyAPI not ready after {timeout_s:.0f} s:\n{self.tail()}")

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGINT)  # its own session, started above
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


def bench_takes(option: str) -> bool:
    help_text = subprocess.run([sys.executable, str(BENCH), "--help"], capture_output=True, text=True).stdout
    return option in help_text


def measure(base_url: str, model: str, out: Path, workloads: list[str], levels: list[int],
            logit_bias: str = "", extra: list[str] | None = None, timeout_s: float = 900.0) -> dict:
    """Run scripts/bench_serving.py against ``base_url`` and return its report (report.json)."""
    cmd = [sys.executable, str(BENCH), "--base-url", base_url, "--model", model, "--out", str(out),
           "--workloads", *workloads, "--levels", *map(str, levels), *(extra or [])]
    if logit_bias:
        cmd += ["--logit-bias", logit_bias]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"bench_serving failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads((out / "report.json").read_text())


def one_run(side: str, base: str, model: str, out: Path, args: argparse.Namespace, extra: list[str]) -> dict:
    """The chat workload at --levels and the autocomplete burst at --burst-levels on one server."""
    chat = measure(base, model, out / "chat", ["chat"], args.levels, args.logit_bias, extra)
    burst = measure(base, model, out / "burst", ["autocomplete"], args.burst_levels, args.logit_bias, extra)
    got = {"side": side, "chat": chat["workloads"]["chat"], "autocomplete": burst["workloads"]["autocomplete"],
           "words_per_token": chat.get("words_per_token")}
    for workload in args.extra_workloads:  # mixed at the highest chat level; slot with the batch filled
        level = args.batch if workload == "slot" else max(args.levels)
        got[workload] = measure(base, model, out / workload, [workload], [level], args.logit_bias,
                                extra)["workloads"][workload]
    return got


def medians(runs: list[dict]) -> dict:
    """Per side, workload, level and metric: the median over the runs (None where no run had a figure)."""
    table: dict[str, Any] = {}
    for run in runs:
        for workload in ("chat", "autocomplete", "mixed", "slot"):
            for level, row in run.get(workload, {}).items():
                cell = table.setdefault(run["side"], {}).setdefault(workload, {}).setdefault(level, {})
                for metric in METRICS:
                    if row.get(metric) is not None:
                        cell.setdefault(metric, []).append(row[metric])
    return {side: {w: {lvl: {m: statistics.median(v) for m, v in cell.items()} for lvl, cell in levels.items()}
                   for w, levels in workloads.items()} for side, workloads in table.items()}


def markdown(summary: dict) -> str:
    med = summary["medians"]
    lines = [f"# This server vs TabbyAPI ({summary['tabby_revision']}, {summary['backend']}): {summary['model']}",
             "", f"Medians of {summary['pairs']} alternating pairs. Settings: {json.dumps(summary['settings'])}", "",
             "| workload | concurrency | metric | ours | TabbyAPI | ours / TabbyAPI | bare generator |",
             "|---|---|---|---|---|---|---|"]
    for workload, levels in med.get("ours", {}).items():
        for level, cell in levels.items():
            theirs = med.get("tabby", {}).get(workload, {}).get(level, {})
            bare = med.get("bare", {}).get(workload, {}).get(level, {})
            for metric in METRICS:
                a, b, c = cell.get(metric), theirs.get(metric), bare.get(metric)
                ratio = f"{a / b:.3f}" if a is not None and b else "-"
                lines.append(f"| {workload} | {level} | {metric} | {'-' if a is None else a} | "
                             f"{'-' if b is None else b} | {ratio} | {'-' if c is None else c} |")
    lines.append("")
    return "\n".join(lines)


def revision(folder: Path) -> str:
    marker = folder / "REVISION"
    return marker.read_text().strip()[:12] if marker.exists() else folder.name


def warm_up(base: str, model: str, requests: int = 3) -> None:
    """A few short chat and completion requests before anything is measured (a load on demand, the first
    kernels' set-up, the template's first render)."""
    for i in range(requests):
        for path, body in (("/chat/completions", {"messages": [{"role": "user", "content": f"warm up {i}"}]}),
                           ("/completions", {"prompt": f"warm up {i}"})):
            data = json.dumps({"model": model, "max_tokens": 16, **body}).encode()
            req = urllib.request.Request(f"{base.rstrip('/')}{path}", data=data,
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=600) as resp:
                    resp.read()
            except (urllib.error.URLError, OSError) as exc:
                log.warning("warm-up request to %s failed: %s", base, exc)


def start_bare(args: argparse.Namespace) -> Any:
    """The bare generator loop (bare_side.py) on the same model folder, or None when it does not start."""
    from bare_side import BareGenerator

    ban = [int(k) for k in json.loads(args.logit_bias or "{}")]
    try:
        return BareGenerator(args.model, args.backend, args.context, args.batch, ban)
    except Exception:  # noqa: BLE001 - the two servers' runs go on without it
        log.exception("the bare generator did not start")
        return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="This server vs TabbyAPI, alternately in pairs")
    p.add_argument("--model", type=Path, required=True, help="the model folder TabbyAPI loads")
    p.add_argument("--ours", required=True, help="this server's base URL, e.g. http://127.0.0.1:8765/v1")
    p.add_argument("--ours-model", required=True, help="the model's name on this server")
    p.add_argument("--tabby", type=Path, default=ROOT / ".tabby" / "exl2-checkpoint", help="TabbyAPI's folder")
    p.add_argument("--backend", default="exllamav2", choices=["exllamav2", "exllamav3"])
    p.add_argument("--port", type=int, default=5005)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--chunk-size", type=int, default=2048)
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--levels", nargs="+", type=int, default=[1, 32])
    p.add_argument("--burst-levels", nargs="+", type=int, default=[8])
    p.add_argument("--extra-workloads", nargs="*", default=["mixed", "slot"], choices=["mixed", "slot"],
                   help="bench_serving's mixed (autocomplete under chat load) and slot (a dropped stream's slot)")
    p.add_argument("--logit-bias", default="", help="JSON, the EOS ids banned on both sides")
    p.add_argument("--top-k", type=int, default=40,
                   help="TabbyAPI's default top_k (this server's default is 40); sent too if bench_serving takes it")
    p.add_argument("--bare", action="store_true", help="also the bare generator loop after each pair (chat levels)")
    p.add_argument("--bench-args", default="", help="more bench_serving.py options, one string")
    p.add_argument("--start-timeout-s", type=float, default=600.0)
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if get_json(f"{args.ours.rstrip('/')}/models")[0] != 200:
        raise SystemExit(f"this server does not answer at {args.ours}/models")
    extra = args.bench_args.split()
    if bench_takes("--top-k"):
        extra += ["--top-k", str(args.top_k)]
    else:
        log.warning("bench_serving.py sends no top_k: ours defaults to 40, TabbyAPI gets --top-k from its preset")
    install_wheels()
    bare = None
    tabby = Tabby(args.tabby, args.model, args.port, args.context, args.batch, args.backend, args.chunk_size,
                  args.top_k)
    summary: dict[str, Any] = {"model": args.model.name, "tabby_revision": revision(args.tabby),
                               "backend": args.backend, "pairs": args.pairs, "runs": [],
                               "settings": {"context": args.context, "batch": args.batch, "cache_mode": "FP16",
                                            "chunk_size": args.chunk_size, "levels": args.levels,
                                            "burst_levels": args.burst_levels, "logit_bias": args.logit_bias,
                                            "bench_extra": extra, "tabby_config": tabby.config.read_text()}}
    try:
        summary["tabby_start_s"] = round(tabby.start(args.start_timeout_s), 1)
        sides = {"ours": (args.ours, args.ours_model), "tabby": (tabby.base, args.model.name)}
        for base, model in sides.values():  # first requests after a load are slow on both (ours loads on demand)
            warm_up(base, model)
        if args.bare:
            bare = start_bare(args)
        for k in range(args.pairs):
            for side in (("ours", "tabby") if k % 2 == 0 else ("tabby", "ours")):
                log.info("pair %d: %s", k + 1, side)
                base, model = sides[side]
                runs_dir = tabby.work / f"pair{k + 1}-{side}"  # bench's own files stay out of --out
                summary["runs"].append(one_run(side, base, model, runs_dir, args, extra))
                (args.out / "tabby_stage.json").write_text(json.dumps(summary, indent=1))  # if the call is cut off
            if bare is not None:  # the bare generator after each pair, at the chat levels
                log.info("pair %d: bare generator", k + 1)
                wpt = summary["runs"][-1].get("words_per_token") or 1.0
                try:
                    summary["runs"].append({"side": "bare", "chat": {str(n): bare.chat_level(
                        n, wpt, 2, 1000 * (k + 1)) for n in args.levels}})
                except Exception:  # noqa: BLE001 - the servers' pairs go on without it
                    log.exception("the bare generator failed")
                    bare.close()
                    bare = None
    finally:
        if bare is not None:
            summary["bare_ready"] = bare.ready
            bare.close()
        tabby.stop()
        summary["tabby_log_tail"] = tabby.tail(2000)
        summary["medians"] = medians(summary["runs"])
        (args.out / "tabby_stage.json").write_text(json.dumps(summary, indent=1))
        (args.out / "tabby_stage.md").write_text(markdown(summary))
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
