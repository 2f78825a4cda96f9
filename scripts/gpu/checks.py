#!/usr/bin/env python3
"""GPU checks for the exllamav2 backend, run by scripts/gpu/run_checks.sh on the lent GPU machine.

Stages (each timed; a failed check is recorded and the run goes on), in the order they run:
  env; models (random Llama, FP16) while exllamav2's extension JIT-builds (or is restored) in another
  process; serve (`python -m app serve`); end-to-end checks through the openai SDK on the FP16 model;
  load failures (out of GPU memory at load, a cancelled load); quantize (EXL2 with exllamav2's
  converter); direct benchmark; end-to-end checks on the EXL2 model; model switching; HTTP benchmark
  with VRAM figures; multi-GPU; exl3 (the exllamav3 backend: scripts/gpu/exl3_stage.py, skipped when
  exllamav3 is not importable).
The time budget (`--budget-s`, counted from run_checks.sh's start) drops the last stages first: on a
fresh machine (extension build, quantizer's measuring pass) the HTTP benchmark is the one left out.
Writes OUT/gpu-report.json and OUT/gpu-report.md, and OUT/exllamav2_ext.so.xz and
OUT/measurement.json when they were made in this run (carry them in .gpu/ next time).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent.parent
WORK = Path("/tmp/gpu-work")
SAVED_MEASUREMENT = ROOT / ".gpu" / "measurement.json"  # the quantizer's measuring pass, from an earlier run
# the TinyLlama-shaped model's measuring pass (minutes), kept in the repo
TINYLLAMA_MEASUREMENT = ROOT / "scripts" / "gpu" / "measurements" / "tinyllama-shape.json.xz"
# TinyLlama-1.1B's shape (hidden 2048, 22 layers, 32 heads, 4 KV heads, MLP 5632, vocab 32,000), random weights
TINYLLAMA = ["--hidden", "2048", "--heads", "32", "--kv-heads", "4", "--layers", "22", "--intermediate", "5632",
             "--init-std", "0.02"]
PORT = 8765
BASE = f"http://127.0.0.1:{PORT}"
BAN = {"2": -100, "5": -100}  # </s> and <|im_end|> of the generated tokenizer: keep random models talking
PROMPT = "The quick brown fox jumps over the lazy dog. " * 6
# runs per figure, taken in turns with the direct loop; this machine's speed drifts a lot between runs
DECODE_RUNS, TTFT_RUNS, LATENCY_RUNS = 24, 40, 20
SWITCH_REQUESTS = 4
PAGED_BATCH = 32  # the EXL2 model's batch_size: paged, its cache holds 2048 x 32 tokens
# the out-of-memory model: wide attention (every head its own KV head), thin MLP, FP16 cache
WIDE = {"hidden": 4096, "heads": 32, "kv_heads": 32, "intermediate": 128, "min_layers": 8}
MAX_CONTEXT = 1_048_576  # the settings' limit for context_length
OOM_MARGIN = 1.5  # the cache asked for is at least this many times all the GPU memory there is


class Report:
    def __init__(self, out: Path, skip: set[str] | None = None, budget_s: float = 1e9) -> None:
        self.out = out
        self.skip = skip or set()
        # the budget counts from run_checks.sh's start (wheel install, extension restore included)
        started = float(os.environ.get("RUN_STARTED") or time.time())
        self.deadline = time.monotonic() + budget_s - max(time.time() - started, 0.0)
        self.data: dict[str, Any] = {"stages": {}, "checks": [], "bench": {}, "vram": {}}
        self.packing: subprocess.Popen | None = None  # xz of a freshly built extension

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def stage(self, name: str, fn: Callable[[], Any], needs_s: float = 0.0) -> Any:
        if name in self.skip:
            self.data["stages"][name] = {"ok": True, "seconds": 0.0, "skipped": True}
            return None
        if self.left() < needs_s:  # the device call has a hard limit: leave a report, not a killed run
            self.data["stages"][name] = {"ok": False, "seconds": 0.0, "not_run": True,
                                         "error": f"not run: {self.left():.0f} s left of the time budget, "
                                                  f"needs about {needs_s:.0f} s"}
            print(f"== {name}: not run ({self.left():.0f} s left, needs about {needs_s:.0f} s)", flush=True)
            self.save()
            return None
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            result = fn()
            ok = True
        except Exception as exc:
            traceback.print_exc()
            result, ok = f"{type(exc).__name__}: {exc}", False
        self.data["stages"][name] = {"ok": ok, "seconds": round(time.perf_counter() - t0, 1),
                                     **({"error": result} if not ok else {})}
        self.save()
        return result if ok else None

    def not_run(self, name: str, why: str) -> None:
        if name not in self.skip:
            self.data["stages"][name] = {"ok": False, "seconds": 0.0, "not_run": True, "error": f"not run: {why}"}
            print(f"== {name}: not run ({why})", flush=True)
            self.save()

    def check(self, name: str, ok: bool, detail: str = "") -> None:
        print(f"   [{'PASS' if ok else 'FAIL'}] {name} {detail}", flush=True)
        self.data["checks"].append({"name": name, "ok": bool(ok), "detail": detail})
        self.save()

    def save(self) -> None:
        (self.out / "gpu-report.json").write_text(json.dumps(self.data, indent=2))


def sh(cmd: list[str], timeout: float, **kw: Any) -> subprocess.CompletedProcess:
    print("   $ " + " ".join(cmd[:8]) + (" ..." if len(cmd) > 8 else ""), flush=True)
    return subprocess.run(cmd, timeout=timeout, text=True, capture_output=True, **kw)


# -- stages ---------------------------------------------------------------------------------------
def env_info(rep: Report) -> dict[str, Any]:
    import torch

    count = torch.cuda.device_count()
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0),
            "gpus": count, "python": sys.version.split()[0],
            "gpu_total_bytes": [torch.cuda.get_device_properties(i).total_memory for i in range(count)]}
    try:
        import flash_attn  # noqa: F401
        info["flash_attn"] = flash_attn.__version__
    except Exception:
        info["flash_attn"] = None
    rep.data["env"] = info
    return info


def gpu_total_bytes(rep: Report) -> int:
    """All the GPU memory exllamav2's automatic split can fill (every visible GPU), read on the device."""
    totals = rep.data.get("env", {}).get("gpu_total_bytes")
    if not totals:  # the env stage failed: ask nvidia-smi
        smi = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, check=True)
        totals = [int(float(x)) * 2**20 for x in smi.stdout.split()]
    return sum(totals)


def oom_plan(total_bytes: int, margin: float = OOM_MARGIN, max_context: int = MAX_CONTEXT) -> dict[str, Any]:
    """Layers of the wide model and the context of `wide-oom` such that the FP16 cache of that context
    is at least `margin` times all the GPU memory, within the settings' limit for context_length: the
    context alone sizes the cache in unpaged mode (paged mode multiplies it by the batch size).

    If even the longest context's cache would be too small, the model gets more layers."""
    head_dim = WIDE["hidden"] // WIDE["heads"]
    per_layer_token = 2 * WIDE["kv_heads"] * head_dim * 2  # K and V, FP16
    want = margin * total_bytes
    layers = max(WIDE["min_layers"], -(-int(want) // (max_context * per_layer_token)))
    step = 4096
    context = min(max_context, -(-int(want / (layers * per_layer_token)) // step) * step)
    cache = context * layers * per_layer_token
    assert cache >= want, (cache, want)
    return {"gpu_total_gib": round(total_bytes / 2**30, 1), "margin": margin, "layers": layers,
            "context": context, "cache_bytes_per_token": layers * per_layer_token,
            "cache_gib": round(cache / 2**30, 1), "cache_over_gpu": round(cache / total_bytes, 2),
            "weights_gib": round(layers * (4 * WIDE["hidden"] ** 2 + 3 * WIDE["hidden"] * WIDE["intermediate"])
                                 * 2 / 2**30, 2)}


EXT_PROBE = """
import json, sys, time
t0 = time.perf_counter()
import exllamav2  # JIT-builds the extension when it is not importable
from exllamav2 import ext
info = {"path": ext.exllamav2_ext.__file__, "import_s": round(time.perf_counter() - t0, 1)}
open(sys.argv[1], "w").write(json.dumps(info))
"""
EXT_LOG, EXT_INFO = Path("/tmp/gpu-extension-build.log"), Path("/tmp/gpu-extension.json")


FLASH_PROBE = """
import json, time, torch, flash_attn
from flash_attn import flash_attn_func
q, k, v = (torch.randn(2, 300, 8, 64, dtype=torch.float16, device="cuda") for _ in range(3))
t0 = time.perf_counter(); out = flash_attn_func(q, k, v, causal=True); torch.cuda.synchronize()
ref = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                       is_causal=True).transpose(1, 2)
print(json.dumps({"version": flash_attn.__version__, "first_call_ms": 1e3 * (time.perf_counter() - t0),
                  "max_abs_diff_vs_sdpa": float((out - ref).abs().max())}))
"""


def flash_probe(rep: Report) -> None:
    """flash-attn imports and one flash_attn_func call agrees with torch's attention (paged mode needs it)."""
    res = sh([sys.executable, "-c", FLASH_PROBE], 120)
    print(res.stdout[-500:], res.stderr[-1500:], flush=True)
    ok = res.returncode == 0
    data = json.loads(res.stdout.strip().splitlines()[-1]) if ok else {"error": res.stderr[-600:]}
    rep.data["flash_attn"] = data
    rep.check("flash-attn imports and flash_attn_func matches torch's attention",
              ok and data["max_abs_diff_vs_sdpa"] < 1e-2, json.dumps(data)[:300])


def paged(rep: Report, model: str, context: int, batch: int, parts: list[str] | None = None) -> None:
    import paged_stage

    if not rep.data.get("flash_attn", {}).get("version"):
        raise RuntimeError("flash-attn is not working here: exllamav2 runs unpaged (see the flash-attn check)")
    ctx = paged_stage.Ctx(rep, BASE, model, WORK / model, PROMPT, BAN, vram, metric)
    paged_stage.run(ctx, context, batch, parts)


def start_extension(rep: Report) -> subprocess.Popen | None:
    """Import exllamav2 in a process of its own: on a fresh machine that JIT-builds the extension
    (nvcc on every core for minutes) while this process makes the models, which need no extension.
    The build lands in torch's extension cache, where every later process that imports exllamav2
    finds it."""
    if "extension" in rep.skip:
        return None
    EXT_INFO.unlink(missing_ok=True)
    with EXT_LOG.open("w") as log:  # a file, not a pipe that nobody reads while the models are made
        proc = subprocess.Popen([sys.executable, "-c", EXT_PROBE, str(EXT_INFO)], stdout=log,
                                stderr=subprocess.STDOUT, cwd=ROOT)
    return proc


def extension(rep: Report, proc: subprocess.Popen | None, since: float) -> None:
    restored = Path("/tmp/site/exllamav2_ext.so").exists()
    if proc is None:
        proc = start_extension(rep)
        assert proc is not None
    proc.wait(timeout=min(max(rep.left() - 20, 60), 3600))
    print(EXT_LOG.read_text(errors="replace")[-1500:], flush=True)
    if proc.returncode != 0:
        raise RuntimeError(f"importing exllamav2 failed (exit {proc.returncode}); see the log above")
    info = json.loads(EXT_INFO.read_text())
    rep.data["extension"] = {"restored": restored, **info,
                             "waited_s_after_models": round(time.perf_counter() - since, 1)}
    if not restored:  # keep it for the next runs (.gpu/): packed while the checks run, waited for at the end
        packed = rep.out / "exllamav2_ext.so.xz"
        rep.packing = subprocess.Popen(
            ["sh", "-c", 'xz -T4 -6 -c "$1" > "$2" && if [ "$(stat -c %s "$2")" -gt 15728640 ]; then '
                         'split -b 15M -d "$2" "$2." && rm "$2"; fi', "pack", info["path"], str(packed)])
        print(f"   packing the built extension to {packed}", flush=True)


def wait_packing(rep: Report) -> None:
    if rep.packing is not None:
        rep.packing.wait(300)
        rep.data.setdefault("extension", {})["packed"] = rep.packing.returncode == 0
        rep.packing = None
        rep.save()


def make_models(rep: Report) -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    maker = [sys.executable, str(ROOT / "scripts" / "make_tiny_model.py")]
    specs = {
        "tiny-fp16": ["--hidden", "256", "--heads", "4", "--kv-heads", "2", "--layers", "2", "--intermediate", "512"],
        "small-fp16": ["--hidden", "1024", "--heads", "16", "--kv-heads", "4", "--layers", "12",
                       "--intermediate", "2816", "--init-std", "0.08"],
    }
    if "load-failures" not in rep.skip:  # only that stage serves it (1 GiB or more to make and write)
        # wide attention, thin MLP: 131 MiB of weights a layer that load for a second or two (a load to
        # cancel), and 16 KiB of FP16 cache per token a layer; layers and the context of `wide-oom` are
        # sized from this machine's GPU memory so that the context's cache surely does not fit (8 layers,
        # 128 KiB a token, on an 80 GB H100; 14 layers on a 141 GB H200)
        plan = oom_plan(gpu_total_bytes(rep))
        rep.data["oom_plan"] = plan
        print(f"   out-of-memory model: {plan}", flush=True)
        specs["wide-fp16"] = ["--hidden", str(WIDE["hidden"]), "--heads", str(WIDE["heads"]),
                              "--kv-heads", str(WIDE["kv_heads"]), "--layers", str(plan["layers"]),
                              "--intermediate", str(WIDE["intermediate"])]
    if "quantize" in rep.skip:  # only the quantizer reads it
        specs.pop("small-fp16")
    if "tinyllama" not in rep.skip:
        specs["tinyllama-fp16"] = [*TINYLLAMA, "--vocab", "32000"]
    # made side by side: each is mostly its own imports and the writing of its files
    procs = {}
    for name, extra in specs.items():
        cmd = [*maker, str(WORK / name), "--dtype", "float16", "--device", "cuda", "--vocab", "1024",
               "--context", "2048", *extra]
        print("   $ " + " ".join(cmd[:3]) + " ...", flush=True)
        with open(f"/tmp/gpu-make-{name}.log", "w") as log:  # files: nobody reads a pipe meanwhile
            procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    failed = []
    for name, proc in procs.items():
        proc.wait(timeout=300)
        print(f"   {name}: {Path(f'/tmp/gpu-make-{name}.log').read_text(errors='replace')[-600:].strip()}", flush=True)
        if proc.returncode != 0:
            failed.append(name)
    if failed:
        raise RuntimeError(f"making {', '.join(failed)} failed")
    rep.data["models"] = {n: sum(f.stat().st_size for f in (WORK / n).iterdir()) for n in specs}


def quantize_model(rep: Report, src: str, dst: str, saved: Path | None, keep_as: str, timeout_s: float) -> dict:
    """``src`` (FP16) to EXL2 4.0 bpw in ``dst`` with exllamav2's converter; the measuring pass is read from
    ``saved`` (plain or .xz) when there is one, else written to OUT/``keep_as`` (also when the quantizing
    after it runs out of time) for the next runs to reuse."""
    work, out = WORK / f"{dst}-work", WORK / dst
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "exllamav2.conversion.convert_exl2", "-i", str(WORK / src),
           "-o", str(work), "-cf", str(out), "-b", "4.0", "-hb", "6", "-r", "4", "-mr", "4", "-l", "512",
           "-ml", "512"]
    reused = saved is not None and saved.exists()
    if reused and saved.suffix == ".xz":
        plain = WORK / f"{dst}-measurement.json"
        subprocess.run(f"xz -dc '{saved}' > '{plain}'", shell=True, check=True)
        saved = plain
    if reused:
        cmd += ["-m", str(saved)]
    t0 = time.perf_counter()
    try:
        res = sh(cmd, timeout_s)
        print(res.stdout[-1500:], res.stderr[-1500:], flush=True)
    finally:
        if (work / "measurement.json").exists() and not reused:
            shutil.copy(work / "measurement.json", rep.out / keep_as)
    res.check_returncode()
    cfg = json.loads((out / "config.json").read_text())
    return {"reused_measurement": reused, "seconds": round(time.perf_counter() - t0, 1),
            "quantization_config": cfg.get("quantization_config"),
            "bytes": sum(f.stat().st_size for f in out.iterdir() if f.is_file())}


def quantize(rep: Report) -> None:
    # started only when it should fit with the stages that use its model (main's needs_s); here it may
    # use all but the time to write the report
    rep.data["quantized"] = quantize_model(rep, "small-fp16", "small-exl2", SAVED_MEASUREMENT, "measurement.json",
                                           min(max(rep.left() - 20, 60), 3600))
    # the server is already serving the FP16 models: it reads the registry again when the file changes
    register("small-exl2", "small-exl2", ["--context-length", "2048", "--max-batch-size", str(PAGED_BATCH)],
             served=True)


def tinyllama(rep: Report) -> None:
    """A random Llama of TinyLlama-1.1B's shape at EXL2 4.0 bpw: quantized (its measuring pass kept in the
    repo), then the paged levels (direct vs HTTP at 1, 8, 32) on it."""
    q = quantize_model(rep, "tinyllama-fp16", "tinyllama-exl2", TINYLLAMA_MEASUREMENT, "measurement-tinyllama.json",
                       max(rep.left() - 60, 60))
    rep.data["quantized_tinyllama"] = q
    register("tinyllama-exl2", "tinyllama-exl2", ["--context-length", "2048", "--max-batch-size", str(PAGED_BATCH)],
             served=True)
    import httpx

    for name in ("small-exl2", "tiny-fp16"):
        httpx.post(f"{BASE}/admin/unload", json={"model": name}, timeout=120)
    paged(rep, "tinyllama-exl2", 2048, PAGED_BATCH, ["levels", "ttft", "stream_vs_whole", "mixed", "prefill"])


def profile_first_token(rep: Report) -> None:
    res = sh([sys.executable, str(ROOT / "scripts" / "gpu" / "profile_first_token.py"), str(WORK / "small-exl2"),
              "--prompt", PROMPT], 300)
    print(res.stderr[-2000:], flush=True)
    res.check_returncode()
    data = json.loads(res.stdout.strip().splitlines()[-1])
    (rep.out / "profile.txt").write_text(data.pop("profile_backend_first_token") + "\n\n"
                                         + data.pop("profile_engine_prepare"))
    rep.data["profile"] = data


def direct_bench(rep: Report) -> None:
    # standalone figures and the greedy-repeatability probe; the compared figures are taken in turns
    # with the server in http-bench
    res = sh([sys.executable, str(ROOT / "scripts" / "gpu" / "bench_direct.py"), str(WORK / "small-exl2"),
              "--prompt", PROMPT, "--ban", "2", "5", "--runs", "3", "--ttft-runs", "10"], 300)
    print(res.stderr[-1500:], flush=True)
    res.check_returncode()
    rep.data["bench"]["direct"] = json.loads(res.stdout.strip().splitlines()[-1])


def register(name: str, folder: str, extra: list[str], served: bool = False) -> None:
    """Add a model to the checks' registry; with `served`, wait until the running server lists it."""
    app = [sys.executable, "-m", "app", "--models", str(WORK / "models.json")]
    res = sh([*app, "add-model", "--no-ollama", "--model-dir", str(WORK / folder), *extra, name], 60)
    print(res.stdout, res.stderr[-500:], flush=True)
    res.check_returncode()
    if served:
        import httpx

        deadline = time.monotonic() + 10
        while name not in [m["id"] for m in httpx.get(f"{BASE}/v1/models", timeout=10).json()["data"]]:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server does not list {name} after add-model")
            time.sleep(0.2)


def start_server(rep: Report) -> subprocess.Popen:
    models = WORK / "models.json"
    models.unlink(missing_ok=True)
    app = [sys.executable, "-m", "app", "--models", str(models)]
    oom_context = str(rep.data.get("oom_plan", {}).get("context", MAX_CONTEXT))
    for name, folder, extra in (  # small-exl2 is registered when the quantizer has made it
            ("tiny-fp16", "tiny-fp16", ["--backend", "exllamav2", "--context-length", "2048"]),
            ("wide-fp16", "wide-fp16", ["--backend", "exllamav2", "--context-length", "2048"]),
            ("wide-oom", "wide-fp16", ["--backend", "exllamav2", "--context-length", oom_context])):
        if (WORK / folder / "config.json").exists():  # else its stage was skipped or failed
            register(name, folder, extra)
    log = open(rep.out / "server.log", "w")
    proc = subprocess.Popen([*app, "serve", "--port", str(PORT)], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    import httpx

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{BASE}/health", timeout=1).status_code == 200:
                rep.data["vram_no_model_process"] = vram()  # nothing of ours on the GPU yet
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    log.close()
    tail = (rep.out / "server.log").read_text(errors="replace").strip().splitlines()[-3:]
    raise RuntimeError(f"server did not start (exit {proc.poll()}): {' | '.join(tail)[-400:]}")


def metric(name: str) -> float:
    import httpx

    for line in httpx.get(f"{BASE}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def vram() -> dict[str, float]:
    time.sleep(1.6)  # the engine samples memory once a second
    out = {"torch_reserved_mib": metric('exllama_tray_memory_bytes{device="cuda:0"}') / 2**20,
           "torch_allocated_mib": metric('exllama_tray_memory_bytes{device="cuda:0:allocated"}') / 2**20}
    smi = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True)
    if smi.returncode == 0:
        out["gpu_used_mib"] = float(smi.stdout.split()[0])
    return out


def load_failures(rep: Report) -> None:
    """Out of GPU memory during a load, and a load cancelled by unloading: a readable error, every byte
    of GPU memory back, and the server still serving."""
    import threading

    import httpx
    import openai

    http = httpx.Client(timeout=300)
    for name in ("tiny-fp16", "small-exl2", "wide-fp16"):
        http.post(f"{BASE}/admin/unload", json={"model": name}, timeout=120)
    before = vram().get("gpu_used_mib")
    client = openai.OpenAI(base_url=f"{BASE}/v1", api_key="x", max_retries=0, timeout=300)
    msgs = [{"role": "user", "content": "Say something."}]
    t0 = time.perf_counter()
    try:
        client.chat.completions.create(model="wide-oom", messages=msgs, max_tokens=4)
        status, message = 200, ""
    except openai.APIStatusError as exc:
        status, message = exc.status_code, str(exc)
    took = time.perf_counter() - t0
    readable = "out of gpu memory" in message.lower() and "context_length" in message  # the cause and the fix
    plan = rep.data.get("oom_plan", {})
    rep.check(f"OOM at load ({plan.get('context')}-token context, {plan.get('cache_gib')} GiB of cache on "
              f"{plan.get('gpu_total_gib')} GiB of GPU memory): an OpenAI error naming the cause and the fix",
              status in (500, 503) and readable, f"HTTP {status} after {took:.1f} s: {message[:400]}")
    entry = [f for f in http.get(f"{BASE}/health").json().get("load_failures", [])
             if f.get("model") == "wide-oom:latest"]
    rep.check("OOM at load: /health keeps the reason", len(entry) == 1 and entry[0]["message"] in message,
              json.dumps(entry)[:300])
    after = vram().get("gpu_used_mib")
    rep.data["load_failures"] = {"oom_plan": plan, "oom_status": status, "oom_message": message,
                                 "oom_seconds": took, "health_after_oom": entry, "gpu_used_mib_before": before,
                                 "gpu_used_mib_after_oom": after}
    def back_as_before(now: float | None) -> bool:
        return before is not None and now is not None and now - before <= 100

    rep.check("OOM at load: GPU memory used after the failed load as before it (within 100 MiB)",
              back_as_before(after), f"{before} -> {after} MiB")
    out = client.chat.completions.create(model="tiny-fp16", messages=msgs, max_tokens=8, logit_bias=BAN)
    rep.check("OOM at load: the server serves another model afterwards", out.usage.completion_tokens == 8)
    http.post(f"{BASE}/admin/unload", json={"model": "tiny-fp16"}, timeout=120)

    # a load cancelled by unloading while the weights are loading
    answer: dict[str, Any] = {}

    def load() -> None:
        r = http.post(f"{BASE}/admin/load", json={"model": "wide-fp16"}, timeout=300)
        answer.update(status=r.status_code, body=r.text[:300])

    loader = threading.Thread(target=load)
    loader.start()
    seen, deadline = "", time.monotonic() + 60
    while time.monotonic() < deadline and "status" not in answer:
        models = httpx.get(f"{BASE}/health", timeout=10).json().get("models", [])
        seen = next((m.get("message", "") for m in models if m.get("model") == "wide-fp16:latest"), "")
        if "weights" in seen:
            break
        time.sleep(0.01)
    t0 = time.perf_counter()
    http.post(f"{BASE}/admin/unload", json={"model": "wide-fp16"}, timeout=120)
    unload_s = time.perf_counter() - t0
    loader.join(120)
    cancelled = answer.get("status") == 503 and "cancel" in answer.get("body", "").lower()
    rep.check("load cancelled by unloading while the weights load: the load answers that it was cancelled",
              cancelled, f"progress seen '{seen}', unload took {unload_s:.2f} s, load answered {answer}")
    after_cancel = vram().get("gpu_used_mib")
    rep.data["load_failures"].update(cancel_progress_seen=seen, cancel_unload_s=unload_s, cancel_answer=answer,
                                     gpu_used_mib_after_cancel=after_cancel)
    rep.check("cancelled load: GPU memory used as before it (within 100 MiB)",
              back_as_before(after_cancel), f"{before} -> {after_cancel} MiB")
    t0 = time.perf_counter()
    out = client.chat.completions.create(model="wide-fp16", messages=msgs, max_tokens=8, logit_bias=BAN)
    rep.check("after the cancelled load the same model loads and answers", out.usage.completion_tokens == 8,
              f"{time.perf_counter() - t0:.1f} s")
    http.post(f"{BASE}/admin/unload", json={"model": "wide-fp16"}, timeout=120)


def e2e(rep: Report, model: str) -> None:
    import httpx
    import openai

    client = openai.OpenAI(base_url=f"{BASE}/v1", api_key="x", max_retries=0, timeout=300)
    msgs = [{"role": "user", "content": "Say something."}]
    health = httpx.get(f"{BASE}/health").json()
    rep.check(f"{model}: not loaded before first request", f"{model}:latest" not in health["loaded"])
    ids = [m.id for m in client.models.list().data]
    rep.check(f"{model}: listed in /v1/models", model in ids, str(ids))
    full = client.chat.completions.create(model=model, messages=msgs, max_tokens=32, temperature=0, logit_bias=BAN)
    text = full.choices[0].message.content or ""
    rep.check(f"{model}: non-stream chat", bool(text) and full.usage.completion_tokens == 32,
              f"{full.usage.completion_tokens} tokens, finish {full.choices[0].finish_reason}")
    health = httpx.get(f"{BASE}/health").json()
    rep.check(f"{model}: loaded on demand", f"{model}:latest" in health["loaded"],
              json.dumps(health["models"])[:300])
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=model, messages=msgs, max_tokens=32, temperature=0, logit_bias=BAN, stream=True) if c.choices)
    # exllamav2's EXL2 kernels may not repeat a greedy run (direct-bench probes it): unknown counts as not
    repeatable = model != "small-exl2" or rep.data["bench"].get("direct", {}).get("greedy_repeatable", False)
    if streamed == text or repeatable:
        rep.check(f"{model}: stream equals non-stream (greedy)", streamed == text, repr(text[:60]))
    else:
        rep.check(f"{model}: stream equals non-stream (greedy): not comparable, exllamav2's EXL2 kernels gave "
                  "different greedy outputs for two identical direct runs", True, repr(text[:40]))
    try:
        text.encode("utf-8")
        rep.check(f"{model}: text is valid UTF-8", True)
    except UnicodeEncodeError as exc:
        rep.check(f"{model}: text is valid UTF-8", False, str(exc))
    comp = client.completions.create(model=model, prompt=PROMPT, max_tokens=24, temperature=0, logit_bias=BAN)
    again = client.completions.create(model=model, prompt=PROMPT, max_tokens=24, temperature=0, logit_bias=BAN)
    comp_s = "".join(c.choices[0].text for c in client.completions.create(
        model=model, prompt=PROMPT, max_tokens=24, temperature=0, logit_bias=BAN, stream=True) if c.choices)
    whole, whole_again = comp.choices[0].text, again.choices[0].text
    # the server's own repeatability decides: two identical non-streaming requests must agree first
    if whole == whole_again:
        rep.check(f"{model}: completions stream equals non-stream (greedy)", comp_s == whole,
                  f"stream {comp_s[:40]!r} whole {whole[:40]!r}")
    else:
        rep.check(f"{model}: completions stream and non-stream produced text (not comparable: two identical "
                  "non-streaming requests differed)", bool(comp_s) and bool(whole),
                  f"stream {comp_s[:30]!r} whole {whole[:30]!r} again {whole_again[:30]!r}")
    long = client.chat.completions.create(model=model, messages=msgs, max_tokens=48, temperature=0, logit_bias=BAN)
    ltext = long.choices[0].message.content or ""
    if len(ltext) > 12:
        stop = ltext[8:11]
        cut = client.chat.completions.create(model=model, messages=msgs, max_tokens=48, temperature=0,
                                             logit_bias=BAN, stop=[stop])
        got = cut.choices[0].message.content or ""
        if repeatable:
            ok = got == ltext[: ltext.find(stop)] and cut.choices[0].finish_reason == "stop"
        else:  # the two runs may diverge: check that the stop string is never returned
            ok = stop not in got and (cut.choices[0].finish_reason == "stop" or len(cut.choices) == 1)
        rep.check(f"{model}: stop string cut and not returned", ok,
                  f"stop={stop!r} got={got[:40]!r} want={ltext[:ltext.find(stop)]!r}")
    else:
        rep.check(f"{model}: stop string cut and not returned", False, "output too short to test")
    length = client.chat.completions.create(model=model, messages=msgs, max_tokens=5, logit_bias=BAN)
    rep.check(f"{model}: max_tokens -> finish_reason length", length.choices[0].finish_reason == "length"
              and length.usage.completion_tokens == 5)
    before = metric('exllama_tray_requests_total{finish_reason="cancelled"}')
    with httpx.stream("POST", f"{BASE}/v1/chat/completions", json={"model": model, "messages": msgs,
                      "max_tokens": 1500, "stream": True, "logit_bias": BAN}, timeout=60) as resp:
        it = resp.iter_lines()
        for _ in range(8):
            next(it)
    deadline = time.time() + 10
    while time.time() < deadline and metric("exllama_tray_requests_running") != 0:
        time.sleep(0.05)
    rep.check(f"{model}: disconnect cancels the job", metric("exllama_tray_requests_running") == 0 and
              metric('exllama_tray_requests_total{finish_reason="cancelled"}') == before + 1)
    again = client.chat.completions.create(model=model, messages=msgs, max_tokens=4)
    rep.check(f"{model}: serves after a disconnect", again.choices[0].message.content is not None)
    r = httpx.post(f"{BASE}/admin/unload", json={"model": model}, timeout=120).json()
    health = httpx.get(f"{BASE}/health").json()
    rep.check(f"{model}: unload", r.get("was_loaded") and f"{model}:latest" not in health["loaded"])


def switching(rep: Report) -> None:
    import concurrent.futures

    import openai

    client = openai.OpenAI(base_url=f"{BASE}/v1", api_key="x", max_retries=0, timeout=300)
    msgs = [{"role": "user", "content": "hi"}]

    def one(i: int) -> str:
        model = "tiny-fp16" if i % 2 == 0 else "small-exl2"
        return client.chat.completions.create(model=model, messages=msgs, max_tokens=8, temperature=0,
                                              logit_bias=BAN).choices[0].message.content or ""

    # every switch ends one model process and starts another (imports, then the load): a few seconds each
    ref = [one(0), one(1)]
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(one, range(SWITCH_REQUESTS)))
    took = time.perf_counter() - t0
    fp16_same = all(outs[i] == ref[0] for i in range(0, SWITCH_REQUESTS, 2))
    rep.check(f"switch between two models ({SWITCH_REQUESTS} alternating requests, 2 at a time): all answered, "
              "FP16 outputs identical", fp16_same and all(outs),
              f"{len([o for o in outs if o])}/{SWITCH_REQUESTS} answered in {took:.1f} s")


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
        values = [r[key] for r in records if r.get(key) is not None]
        return statistics.median(values) * 1e3 if values else None

    # the floor of one keep-alive HTTP exchange with this server (no engine work)
    health_ms = []
    for _ in range(20):
        t = time.perf_counter()
        http.get(f"{BASE}/health")
        health_ms.append((time.perf_counter() - t) * 1e3)
    rep.data["bench"]["ttft_phases_p50_ms"] = {
        "queued (submit -> GPU thread)": p50_ms("queued_s"),
        "first step (GPU thread -> first text)": p50_ms("first_step_s"),
        "hand-off (first text -> written to the socket)": p50_ms("handoff_s"),
        "to the model process (job taken -> start of the step with the first text)": p50_ms("to_model_step_s"),
        "that step in the model process": p50_ms("model_step_s"),
        "back from the model process (step end -> read by the event loop)": p50_ms("from_model_s"),
        "runner ttft (submit -> first token)": p50_ms("ttft_s"),
        "GET /health round trip": statistics.median(health_ms)}
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


def multi_gpu(rep: Report) -> None:
    """Two or more GPUs: the EXL2 model with autosplit and with a manual split across GPUs.

    Records per-GPU memory after load, after 100 requests and after unload, and single-stream decode
    tok/s against the same model on one GPU. Skipped (recorded as such) on a one-GPU machine.
    """
    import httpx
    import torch

    count = torch.cuda.device_count()
    if count < 2:
        rep.data["multi_gpu"] = f"skipped: {count} GPU"
        return
    app = [sys.executable, "-m", "app", "--models", str(WORK / "models.json")]
    per_gpu = [torch.cuda.get_device_properties(i).total_memory / 2**30 for i in range(count)]
    # a split that forces layers onto every GPU: a sliver of the model on each but the last
    manual = ",".join(["0.03"] * (count - 1) + [f"{per_gpu[-1] - 4:.0f}"])
    for name, split in (("split-auto", "auto"), ("split-manual", manual)):
        sh([*app, "add-model", "--no-ollama", "--replace", "--model-dir", str(WORK / "small-exl2"),
            "--gpu-split", split, "--context-length", "2048", name], 60).check_returncode()
    http = httpx.Client(timeout=300)
    body = {"prompt": PROMPT, "logit_bias": BAN, "max_tokens": 128, "stream": True,
            "stream_options": {"include_usage": True}}

    def gpu_used() -> list[float]:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True).stdout.split()
        return [float(x) for x in out]

    def decode_rate(model: str) -> float:
        rates = []
        for i in range(6):
            stamps = []
            n = 0
            with http.stream("POST", f"{BASE}/v1/completions", json={**body, "model": model, "seed": i}) as resp:
                for line in resp.iter_lines():
                    if line.startswith("data: {"):
                        chunk = json.loads(line[6:])
                        if chunk.get("usage"):
                            n = chunk["usage"]["completion_tokens"]
                        if any(c.get("text") for c in chunk.get("choices", [])):
                            stamps.append(time.perf_counter())
            rates.append((n - 1) / (stamps[-1] - stamps[0]))
        return statistics.median(rates[1:])

    results: dict[str, Any] = {"gpus": count, "gpu_total_gib": per_gpu, "manual_split": manual}
    for name in ("tiny-fp16", "small-exl2", "split-auto", "split-manual"):
        http.post(f"{BASE}/admin/unload", json={"model": name})
    http.post(f"{BASE}/admin/load", json={"model": "small-exl2"})
    results["single_gpu_decode_tok_s"] = decode_rate("small-exl2")
    http.post(f"{BASE}/admin/unload", json={"model": "small-exl2"})
    for name in ("split-auto", "split-manual"):
        before = gpu_used()
        r = http.post(f"{BASE}/admin/load", json={"model": name})
        rep.check(f"multi-GPU {name}: loads", r.status_code == 200, r.text[:200])
        after_load = gpu_used()
        for i in range(100):
            http.post(f"{BASE}/v1/completions", json={"model": name, "prompt": PROMPT[: 30 + i], "max_tokens": 4,
                                                      "logit_bias": BAN})
        after_100 = gpu_used()
        rate = decode_rate(name)
        http.post(f"{BASE}/admin/unload", json={"model": name})
        after_unload = gpu_used()
        results[name] = {"gpu_used_mib_before": before, "after_load": after_load, "after_100": after_100,
                         "after_unload": after_unload, "decode_tok_s": rate}
        rep.check(f"multi-GPU {name}: serves 100 requests and streams", rate > 0, f"{rate:.1f} tok/s")
    spread = [a - b for a, b in zip(results["split-manual"]["after_load"], results["split-manual"]["gpu_used_mib_before"])]
    rep.check("multi-GPU manual split puts weights on every GPU", all(d > 10 for d in spread), str(spread))
    rep.data["multi_gpu"] = results


def exl3(rep: Report) -> None:
    """The exllamav3 backend's stage (scripts/gpu/exl3_stage.py), given this module's helpers."""
    import exl3_stage

    exl3_stage.run(rep, sys.modules[__name__])


def write_markdown(rep: Report) -> None:
    d = rep.data
    lines = ["# GPU results", "", f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             f"- device: {d.get('env', {}).get('gpu')} (torch {d.get('env', {}).get('torch')}, CUDA "
             f"{d.get('env', {}).get('cuda')}, flash-attn {d.get('env', {}).get('flash_attn')})",
             f"- commit: {os.environ.get('GIT_COMMIT', 'unknown')}",
             f"- extension: {json.dumps(d.get('extension'))}",
             f"- quantizer's measurement reused: {d.get('quantized', {}).get('reused_measurement')}",
             f"- run: {d.get('run_s')} s from run_checks.sh's start, budget {d.get('budget_s')} s",
             "", "## Stages", "",
             "| stage | ok | seconds |", "|---|---|---|"]
    for name, s in d["stages"].items():
        state = ("skipped" if s.get("skipped") else "yes" if s["ok"] else
                 s["error"][:120] if s.get("not_run") else "NO: " + s.get("error", "")[:120])
        lines.append(f"| {name} | {state} | {s['seconds']} |")
    passed = sum(c["ok"] for c in d["checks"])
    lines += ["", f"## Checks: {passed} passed, {len(d['checks']) - passed} failed", ""]
    lines += [f"- {'PASS' if c['ok'] else 'FAIL'} {c['name']} {c['detail']}" for c in d["checks"]]
    if "paged" in d:
        lines += ["", "## Paged (continuous batching)", "", "```", json.dumps(d["paged"], indent=1), "```"]
    if "multi_gpu" in d:
        lines += ["", "## Multi-GPU", "", "```", json.dumps(d["multi_gpu"], indent=1), "```"]
    if "exl3" in d:
        lines += ["", "## EXL3 (exllamav3 backend)", "", "```", json.dumps(d["exl3"], indent=1), "```"]
    if "load_failures" in d:
        lines += ["", "## Load failures", "", "```", json.dumps(d["load_failures"], indent=1), "```"]
    lines += ["", "## Benchmark (EXL2 model)", "", "```", json.dumps(d["bench"], indent=1), "```", "",
              "## VRAM (MiB)", "", "```", json.dumps(d["vram"], indent=1), "```", ""]
    (rep.out / "gpu-report.md").write_text("\n".join(lines))
    print("\n".join(lines[-40:]))


# seconds a stage needs to be started (the H100/H200 runs took about two thirds of these); the order is
# what the goals need first, so a short budget drops the benchmark, then switching, then the EXL2 stages
NEEDS_S = {"serve": 15, "e2e-fp16": 40, "load-failures": 80, "direct-bench": 30, "e2e-exl2": 30,
           "switching": 60, "http-bench": 110, "multi-gpu": 60, "paged": 150,
           "tinyllama": 200}
QUANTIZE_S = {"measured before": 90, "measuring": 130}


def served_stages(rep: Report, args: argparse.Namespace) -> None:
    rep.stage("e2e-fp16", lambda: e2e(rep, "tiny-fp16"), NEEDS_S["e2e-fp16"])
    rep.stage("load-failures", lambda: load_failures(rep), NEEDS_S["load-failures"])
    # the quantizer starts only if the first stages that use its model fit after it
    quantize_s = QUANTIZE_S["measured before" if SAVED_MEASUREMENT.exists() else "measuring"]
    rep.stage("quantize", lambda: quantize(rep), quantize_s + NEEDS_S["direct-bench"] + NEEDS_S["e2e-exl2"])
    exl2 = [("direct-bench", lambda: direct_bench(rep)), ("e2e-exl2", lambda: e2e(rep, "small-exl2")),
            ("paged", lambda: paged(rep, "small-exl2", 2048, PAGED_BATCH)),
            ("tinyllama", lambda: tinyllama(rep)),
            ("switching", lambda: switching(rep)), ("http-bench", lambda: http_bench(rep)),
            ("multi-gpu", lambda: multi_gpu(rep))]
    if args.profile:
        exl2.insert(0, ("profile", lambda: profile_first_token(rep)))
    made = (WORK / "small-exl2" / "config.json").exists() and rep.data["stages"]["quantize"].get("ok")
    for name, fn in exl2:
        if not made and name != "tinyllama":  # that one quantizes its own model
            rep.not_run(name, "no EXL2 model: the quantize stage did not run or failed")
            continue
        if name == "http-bench":
            wait_packing(rep)  # the extension's xz off the CPU before anything is timed
        needs = NEEDS_S.get(name, 0) if name != "multi-gpu" or rep.data.get("env", {}).get("gpus", 2) > 1 else 0
        rep.stage(name, fn, needs)
    if importlib.util.find_spec("exllamav3") is None:  # its wheels were not carried (docs/gpu-results.md)
        rep.skip.add("exl3")
        rep.data["exl3"] = {"skipped": "exllamav3 is not importable"}
    rep.stage("exl3", lambda: exl3(rep), 240)


def main() -> int:
    parser = argparse.ArgumentParser(description="GPU checks of the exllamav2 backend (see run_checks.sh)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only-build", action="store_true")
    parser.add_argument("--profile", action="store_true", help="also profile the first-token path in process")
    parser.add_argument("--skip", nargs="*", default=[], help="stages to leave out (e.g. e2e-fp16 switching)")
    parser.add_argument("--budget-s", type=float, default=540.0,
                        help="stop starting stages when they would not fit (the device tool's call limit), "
                             "counted from run_checks.sh's start (RUN_STARTED)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rep = Report(args.out, skip=set(args.skip), budget_s=args.budget_s)
    rep.stage("env", lambda: env_info(rep))
    rep.stage("flash-attn", lambda: flash_probe(rep))
    building = start_extension(rep)  # a JIT build runs while the models are made
    if not args.only_build:
        rep.stage("models", lambda: make_models(rep))
    models_done = time.perf_counter()
    if rep.stage("extension", lambda: extension(rep, building, models_done)) is None \
            and not rep.data["stages"]["extension"]["ok"]:
        write_markdown(rep)
        return 1
    if not args.only_build:
        proc = rep.stage("serve", lambda: start_server(rep), NEEDS_S["serve"])
        if proc is not None:
            try:
                served_stages(rep, args)
            finally:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    wait_packing(rep)
    rep.data["run_s"] = round(args.budget_s - rep.left(), 1)
    rep.data["budget_s"] = args.budget_s
    write_markdown(rep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
