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
Stages live beside this file: gpu_base.py (report, constants, server helpers), served_checks.py (e2e, load
failures, switching, multi-GPU), single_stream_bench.py, paged_stage.py (+ paged_clients.py, paged_direct.py),
exl3_stage.py. Writes OUT/gpu-report.json and OUT/gpu-report.md, and OUT/exllamav2_ext.so.xz and
OUT/measurement.json when they were made in this run (carry them in .gpu/ next time).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import constrained_stage
from gpu_base import (  # noqa: F401 - exl3_stage.py reaches these through this module
    BAN, BASE, MAX_CONTEXT, OOM_MARGIN, PAGED_BATCH, PORT, PROMPT, ROOT, SAVED_MEASUREMENT, TINYLLAMA,
    TINYLLAMA_MEASUREMENT, WIDE, WORK, Report, ban_for, metric, register, sh, vram)
from served_checks import e2e, load_failures, multi_gpu, switching  # noqa: F401
from single_stream_bench import http_bench


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
MADE = ".made"  # in a model folder once it is whole: a later call on the same machine reuses it
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
    ctx = paged_stage.Ctx(rep, BASE, model, WORK / model, PROMPT, ban_for(WORK / model), vram, metric)
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
    if not {"tinyllama", "step-profile", "exl3"} <= rep.skip:  # exl3's own TinyLlama-shape part converts it
        specs["tinyllama-fp16"] = [*TINYLLAMA, "--vocab", "32000"]
    # made side by side: each is mostly its own imports and the writing of its files
    procs = {}
    for name, extra in specs.items():
        if (WORK / name / MADE).exists():  # made by an earlier call on this (warm) machine
            continue
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
        else:
            (WORK / name / MADE).touch()
    if failed:
        raise RuntimeError(f"making {', '.join(failed)} failed")
    rep.data["models"] = {n: sum(f.stat().st_size for f in (WORK / n).iterdir()) for n in specs}


def quantize_model(rep: Report, src: str, dst: str, saved: Path | None, keep_as: str, timeout_s: float) -> dict:
    """``src`` (FP16) to EXL2 4.0 bpw in ``dst`` with exllamav2's converter; the measuring pass is read from
    ``saved`` (plain or .xz) when there is one, else written to OUT/``keep_as`` (also when the quantizing
    after it runs out of time) for the next runs to reuse."""
    work, out = WORK / f"{dst}-work", WORK / dst
    if (out / MADE).exists():  # quantized by an earlier call on this (warm) machine
        return {"reused_folder": True, "quantization_config": json.loads((out / "config.json").read_text())
                .get("quantization_config")}
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
    (out / MADE).touch()
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


def step_profile(rep: Report) -> None:
    """The model process's step against the direct loop's on the vocab-32,000 model (scripts/gpu/step_profile.py);
    FP16, so that no quantizing is needed."""
    import httpx
    import paged_stage
    import step_profile as sp

    register("tinyllama-fp16", "tinyllama-fp16", ["--backend", "exllamav2", "--context-length", "2048",
                                                  "--max-batch-size", str(PAGED_BATCH)], served=True)
    for name in ("small-exl2", "small-exl2-tools", "tiny-fp16"):
        httpx.post(f"{BASE}/admin/unload", json={"model": name}, timeout=120)
    ctx = paged_stage.Ctx(rep, BASE, "tinyllama-fp16", WORK / "tinyllama-fp16", PROMPT, ban_for(WORK / "tinyllama-fp16"),
                          vram, metric)
    rep.data["step_profile"] = sp.run(ctx, rep.out)


def start_exl3_build(rep: Report) -> None:
    """exllamav3's extension JIT-builds (about 6 minutes) from the run's start, in a session of its own so
    that it goes on after this device call ends: the next call on the same machine finds it built (or waits
    for torch's build lock) instead of starting over."""
    if "exl3" in rep.skip or importlib.util.find_spec("exllamav3") is None:
        return
    import exl3_stage

    if exl3_stage.restore_extension() is None:
        rep.data["exl3_build_started_at_s"] = round(time.time() - float(os.environ.get("RUN_STARTED") or time.time()), 1)
        log = open("/tmp/exl3-extension-build-early.log", "w")
        subprocess.Popen([sys.executable, "-c", exl3_stage.EXT_PROBE], stdout=log, stderr=subprocess.STDOUT,
                         cwd=ROOT, start_new_session=True, env={**os.environ, "MAX_JOBS": "12"})


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
           "tinyllama": 200, "constrained": 100, "step-profile": 80}
QUANTIZE_S = {"measured before": 90, "measuring": 130}


def served_stages(rep: Report, args: argparse.Namespace) -> None:
    rep.stage("e2e-fp16", lambda: e2e(rep, "tiny-fp16"), NEEDS_S["e2e-fp16"])
    rep.stage("load-failures", lambda: load_failures(rep), NEEDS_S["load-failures"])
    # the quantizer starts only if the first stages that use its model fit after it
    quantize_s = QUANTIZE_S["measured before" if SAVED_MEASUREMENT.exists() else "measuring"]
    rep.stage("quantize", lambda: quantize(rep), quantize_s + NEEDS_S["direct-bench"] + NEEDS_S["e2e-exl2"])
    exl2 = [("direct-bench", lambda: direct_bench(rep)), ("e2e-exl2", lambda: e2e(rep, "small-exl2")),
            ("paged", lambda: paged(rep, "small-exl2", 2048, PAGED_BATCH)),
            ("constrained", lambda: constrained_stage.on_served_model(rep, "small-exl2", "exllamav2",
                                                                      rep.data.setdefault("constrained", {}))),
            ("step-profile", lambda: step_profile(rep)),
            ("tinyllama", lambda: tinyllama(rep)),
            ("switching", lambda: switching(rep)), ("http-bench", lambda: http_bench(rep)),
            ("multi-gpu", lambda: multi_gpu(rep))]
    if args.profile:
        exl2.insert(0, ("profile", lambda: profile_first_token(rep)))
    made = (WORK / "small-exl2" / "config.json").exists() and rep.data["stages"]["quantize"].get("ok")
    for name, fn in exl2:
        if not made and name not in ("tinyllama", "step-profile"):  # those bring their own model
            rep.not_run(name, "no EXL2 model: the quantize stage did not run or failed")
            continue
        if name == "http-bench":
            wait_packing(rep)  # the extension's xz off the CPU before anything is timed
        needs = NEEDS_S.get(name, 0) if name != "multi-gpu" or rep.data.get("env", {}).get("gpus", 2) > 1 else 0
        rep.stage(name, fn, needs)
    if importlib.util.find_spec("exllamav3") is None:  # its wheels were not carried (docs/gpu-results.md)
        rep.skip.add("exl3")
        rep.data["exl3"] = {"skipped": "exllamav3 is not importable"}
    rep.stage("exl3", lambda: exl3(rep), 240 if "exl3-tinyllama" not in rep.skip else 110)


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
    start_exl3_build(rep)
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
