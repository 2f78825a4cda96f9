#!/usr/bin/env python3
"""The EXL3 stage of the GPU checks (the exllamav3 backend), and the step that prepares it.

As a stage (checks.py's `exl3`, given its Report and the checks module ``ck``): exllamav3's extension
restored (or built); `tiny-exl3` made from checks.py's random `tiny-fp16` with exllamav3's own
converter (or unpacked from .gpu/tiny-exl3.tar.xz) and registered with `backend: auto`; then, through
the openai SDK, the exllamav2 stage's end-to-end list (ck.e2e: on-demand load, stream/non-stream,
completions, stop, length, disconnect cancels, unload, UTF-8) and that /health names the exllamav3
backend; concurrency 1/8/32 through HTTP against the direct exllamav3 Generator (exl3_direct.py) with
paged_stage's levels and TTFT parts, held to the EXL3 goals (>= 0.95x at every level, TTFT overhead
<= 1.5 ms p50); EXL2 -> EXL3 -> EXL2 switching with GPU memory back to its baseline after each; the
multi-GPU part ("skipped: 1 GPU" on one GPU). On the TinyLlama-shaped EXL3 model, before its levels,
step_contention.py's comparison of the model process's step with the direct loop's at 32 jobs. Figures go
to rep.data["exl3"]. ``--skip exl3-<part>`` leaves a part out: e2e, constrained (also the TinyLlama
shape's constrained overhead), levels, tinyllama, contention, switching, multi_gpu.

As a command, before the checks (one device call; carry the exllamav3 wheels, see docs/gpu-results.md):
    python3 scripts/gpu/exl3_stage.py prepare --out $OUT [--budget-s 560]
builds the extension (about 6 minutes with MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0) while it makes the
FP16 models, converts tiny-fp16 (and small-fp16 if time is left), and leaves in $OUT what later runs
reuse from .gpu/: exllamav3_ext.so.xz (15 MB pieces when larger) and tiny-exl3.tar.xz. The built
extension is also kept in .gpu-cache/ (ignored), which a warm machine keeps for the next call.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent
SAVED = ROOT / ".gpu"  # carried from earlier runs
KEPT = ROOT / ".gpu-cache"  # ignored: a warm machine keeps it between two calls
SITE = Path("/tmp/site")  # run_checks.sh's install target, on PYTHONPATH
EXT = "exllamav3_ext"
BITS, HEAD_BITS = "4.0", "6"
CONVERT = {"tiny-exl3": "tiny-fp16", "small-exl3": "small-fp16", "tinyllama-exl3": "tinyllama-fp16"}
EXT_PROBE = """
import json, sys, time
t0 = time.perf_counter()
import exllamav3.ext as ext  # JIT-builds the extension when it is not importable
print(json.dumps({"path": ext.exllamav3_ext.__file__, "import_s": round(time.perf_counter() - t0, 1)}))
"""


def importable() -> bool:
    return importlib.util.find_spec("exllamav3") is not None


def restore_extension() -> str | None:
    """Put a built extension where exllamav3 finds it prebuilt (SITE); which one it was, or None."""
    target = SITE / f"{EXT}.so"
    if target.exists():
        return "already in place"
    if (KEPT / f"{EXT}.so").exists():
        shutil.copy(KEPT / f"{EXT}.so", target)
        return "kept from the last call on this machine"
    parts = sorted(SAVED.glob(f"{EXT}.so.xz*"))
    if parts:
        subprocess.run(f"cat {' '.join(map(str, parts))} | xz -dc > '{target}'", shell=True, check=True)
        return "restored from .gpu"
    return None


def start_build() -> subprocess.Popen:
    KEPT.mkdir(exist_ok=True)
    log = open("/tmp/exl3-extension-build.log", "w")
    return subprocess.Popen([sys.executable, "-c", EXT_PROBE], stdout=subprocess.PIPE, stderr=log, text=True,
                            cwd=ROOT)


def finish_build(proc: subprocess.Popen, out: Path, timeout_s: float) -> dict[str, Any]:
    """Wait for the import (the build); keep the .so for the next calls and pack it into ``out``."""
    stdout, _ = proc.communicate(timeout=timeout_s)
    if proc.returncode != 0:
        tail = Path("/tmp/exl3-extension-build.log").read_text(errors="replace")[-1500:]
        raise RuntimeError(f"importing exllamav3 failed (exit {proc.returncode}): {tail}")
    info = json.loads(stdout.strip().splitlines()[-1])
    built = Path(info["path"])
    if built.parent != SITE:
        shutil.copy(built, KEPT / f"{EXT}.so")
        shutil.copy(built, SITE / f"{EXT}.so")
        packed = out / f"{EXT}.so.xz"
        subprocess.run(f"xz -T8 -6 -c '{built}' > '{packed}' && if [ $(stat -c %s '{packed}') -gt 15728640 ]; "
                       f"then split -b 15M -d '{packed}' '{packed}.' && rm '{packed}'; fi", shell=True, check=True)
        info.update(built_bytes=built.stat().st_size,
                    packed_bytes=sum(p.stat().st_size for p in out.glob(f"{EXT}.so.xz*")))
    return info


def ensure_extension(rep: Any, out: Path) -> dict[str, Any]:
    how = restore_extension()
    if how is not None:
        return {"how": how}
    if "exl3_build_started_at_s" in rep.data:  # checks.py started it at the run's start: wait for it
        return {"how": "built in this run (started at the run's start)",
                **finish_build(start_build(), out, max(rep.left() - 200, 30))}
    if rep.left() < 420:
        raise RuntimeError(f"exllamav3's extension is not built and {rep.left():.0f} s are left (the build takes "
                           "about 6 minutes): run `exl3_stage.py prepare` first (docs/gpu-results.md)")
    return {"how": "built in this run", **finish_build(start_build(), out, rep.left() - 30)}


def convert(work: Path, dst: str, out: Path, timeout_s: float) -> dict[str, Any]:
    """exllamav3's converter: ``CONVERT[dst]`` (FP16) to EXL3 at BITS in ``work/dst``, or the folder
    unpacked from .gpu/``dst``.tar.xz; a fresh conversion is packed into ``out`` for the next runs."""
    saved = SAVED / f"{dst}.tar.xz"
    target = work / dst
    if (target / ".made").exists():  # converted by an earlier call on this (warm) machine
        return {"reused": "folder", "quantization_config": json.loads((target / "config.json").read_text())
                .get("quantization_config")}
    shutil.rmtree(target, ignore_errors=True)
    if saved.exists():
        subprocess.run(["tar", "-xJf", str(saved), "-C", str(work)], check=True)
        return {"reused": True, "quantization_config": json.loads((target / "config.json").read_text())
                .get("quantization_config")}
    scratch = work / f"{dst}-work"
    shutil.rmtree(scratch, ignore_errors=True)
    cmd = [sys.executable, "-m", "exllamav3.conversion.convert_model", "-i", str(work / CONVERT[dst]),
           "-w", str(scratch), "-o", str(target), "-b", BITS, "-hb", HEAD_BITS, "-cr", "64", "-cc", "1024"]
    print("   $ " + " ".join(cmd[:4]) + " ...", flush=True)
    t0 = time.perf_counter()
    res = subprocess.run(cmd, timeout=timeout_s, text=True, capture_output=True)
    took = time.perf_counter() - t0
    print(res.stdout[-1500:], res.stderr[-1500:], flush=True)
    if res.returncode != 0 or not (target / "config.json").exists():  # its argument errors exit 0
        raise RuntimeError(f"exllamav3's converter failed (exit {res.returncode}): {res.stdout[-300:]}")
    (target / ".made").touch()
    size = sum(f.stat().st_size for f in target.iterdir() if f.is_file())
    if size < 12 * 2**20:  # what comes back from the device is at most 16 MiB a file
        subprocess.run(["tar", "-cJf", str(out / f"{dst}.tar.xz"), "-C", str(work), dst], check=True)
    return {"reused": False, "seconds": round(took, 1), "bytes": size,
            "quantization_config": json.loads((target / "config.json").read_text()).get("quantization_config")}


def served_backend(ck: Any, model: str) -> dict[str, Any]:
    import httpx

    httpx.post(f"{ck.BASE}/admin/load", json={"model": model}, timeout=600)
    mine = [m for m in httpx.get(f"{ck.BASE}/health", timeout=10).json().get("models", [])
            if m["model"].split(":")[0] == model]
    return mine[0] if mine else {}


def exl3_ctx(rep: Any, ck: Any, model: str) -> Any:
    """paged_stage's context with exllamav3's direct Generator (exl3_direct.py) as the reference."""
    import paged_stage

    class Exl3Ctx(paged_stage.Ctx):
        def start_direct(self, context: int, batch: int) -> dict:
            self.direct = subprocess.Popen(
                [sys.executable, str(Path(__file__).with_name("exl3_direct.py")), str(self.folder), "--context",
                 str(context), "--batch", str(batch), "--ban", *[str(t) for t in self.ban]],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            return json.loads(self.direct.stdout.readline())

    return Exl3Ctx(rep, ck.BASE, model, ck.WORK / model, ck.PROMPT, ck.ban_for(ck.WORK / model), ck.vram, ck.metric)


def levels(rep: Any, ck: Any, model: str) -> None:
    """paged_stage's levels and TTFT parts with exllamav3's direct Generator as the reference."""
    import paged_stage

    ctx = exl3_ctx(rep, ck, model)
    paged_stage.run(ctx, 2048, ck.PAGED_BATCH, ["levels", "ttft"])
    table, ttft = ctx.out.get("levels", {}), ctx.out.get("ttft_one_stream", {})
    for n in (1, 8, 32):
        row = table.get(n, {})
        rep.check(f"exl3 {model}: {n} stream(s) through HTTP >= 0.95x the direct exllamav3 Generator (no flash-attn)",
                  row.get("pair_ratio_median", 0) >= 0.95 and row.get("lost", 1) == 0,
                  json.dumps({k: row.get(k) for k in ("pair_ratio_median", "server", "direct", "lost")})[:300])
    rep.check(f"exl3 {model}: TTFT overhead over the direct Generator <= 1.5 ms p50",
              ttft.get("overhead_p50_ms", 1e9) <= 1.5, json.dumps(ttft)[:300])


def tinyllama(rep: Any, ck: Any) -> dict[str, Any]:
    """The levels again on a model of realistic shape (TinyLlama-1.1B's, vocab 32,000; checks.py makes its
    FP16 folder unless both its tinyllama and step-profile stages are skipped), converted here: on the
    2-layer tiny model the server's fixed costs per request and per token outweigh a 0.75 ms token."""
    if not (ck.WORK / "tinyllama-fp16" / "config.json").exists():
        return {"not_run": "no tinyllama-fp16 folder"}
    made = convert(ck.WORK, "tinyllama-exl3", rep.out, max(rep.left() - 180, 60))
    ck.register("tinyllama-exl3", "tinyllama-exl3", ["--context-length", "2048", "--max-batch-size",
                                                     str(ck.PAGED_BATCH)], served=True)
    import httpx

    for name in ("tiny-exl3", "tiny-exl3-tools", "small-exl2"):
        httpx.post(f"{ck.BASE}/admin/unload", json={"model": name}, timeout=120)
    out: dict[str, Any] = {"converted": made}
    if "exl3-contention" not in rep.skip:  # where the model process's step loses time at 32 jobs
        import step_contention

        try:
            out["contention"] = step_contention.run(exl3_ctx(rep, ck, "tinyllama-exl3"), rep.out)
        except Exception as exc:  # noqa: BLE001 - the levels still run
            out["contention"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        rep.save()
    levels(rep, ck, "tinyllama-exl3")
    if rep.left() > 90 and "exl3-constrained" not in rep.skip:  # a constrained job's cost at a vocabulary of 32,000
        import constrained_stage

        httpx.post(f"{ck.BASE}/admin/unload", json={"model": "tinyllama-exl3"}, timeout=120)
        try:
            out["constrained_overhead"] = constrained_stage.overhead_on(rep, "tinyllama-exl3", "exllamav3")
        except Exception as exc:  # noqa: BLE001 - the conversion's record stays
            out["constrained_overhead"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    return out


def switching(rep: Any, ck: Any, exl2: str, exl3: str) -> dict[str, Any]:
    """EXL2 -> EXL3 -> EXL2, each model answering two requests at a time; the whole GPU's memory used after
    each unload against the baseline before the first load."""
    import concurrent.futures

    import httpx
    import openai

    client = openai.OpenAI(base_url=f"{ck.BASE}/v1", api_key="x", max_retries=0, timeout=300)
    msgs = [{"role": "user", "content": "hi"}]
    for name in (exl2, exl3, "tiny-fp16", "small-exl3", f"{exl3}-tools", f"{exl2}-tools", "tinyllama-fp16",
                 "tinyllama-exl3", "tinyllama-exl3-json"):
        httpx.post(f"{ck.BASE}/admin/unload", json={"model": name}, timeout=120)
    base = ck.vram().get("gpu_used_mib")
    steps = []
    for model in (exl2, exl3, exl2):
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            outs = list(pool.map(lambda i: client.chat.completions.create(
                model=model, messages=msgs, max_tokens=8, temperature=0, logit_bias=ck.BAN), range(2)))
        backend = served_backend(ck, model).get("backend")
        httpx.post(f"{ck.BASE}/admin/unload", json={"model": model}, timeout=120)
        after = ck.vram().get("gpu_used_mib")
        steps.append({"model": model, "backend": backend, "answered": sum(o.usage.completion_tokens == 8 for o in outs),
                      "gpu_used_mib_after_unload": after})
        rep.check(f"exl3 switching: {model} ({backend}) answered both requests, GPU memory after its unload at "
                  "the baseline (within 100 MiB)", steps[-1]["answered"] == 2 and base is not None
                  and after is not None and abs(after - base) <= 100, f"{base} -> {after} MiB")
    return {"baseline_gpu_used_mib": base, "steps": steps}


def multi_gpu(rep: Any, ck: Any, model: str) -> Any:
    """Tensor-parallel and a manual layer split of ``model`` over every GPU; skipped on one GPU."""
    import httpx
    import torch

    count = torch.cuda.device_count()
    if count < 2:
        return f"skipped: {count} GPU"
    per_gpu = [torch.cuda.get_device_properties(i).total_memory / 2**30 for i in range(count)]
    manual = ",".join(["0.03"] * (count - 1) + [f"{per_gpu[-1] - 4:.0f}"])
    results: dict[str, Any] = {"gpus": count, "manual_split": manual}
    for name, extra in ((f"{model}-tp", ["--gpu-split-mode", "tensor"]), (f"{model}-split", ["--gpu-split", manual])):
        ck.register(name, model, ["--replace", "--context-length", "2048", *extra], served=True)
        before = ck.vram()
        r = httpx.post(f"{ck.BASE}/admin/load", json={"model": name}, timeout=600)
        smi = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True).stdout.split()
        answered = sum(httpx.post(f"{ck.BASE}/v1/completions", json={"model": name, "prompt": ck.PROMPT[:40 + i],
                                                                     "max_tokens": 4, "logit_bias": ck.BAN},
                                  timeout=120).status_code == 200 for i in range(20))
        httpx.post(f"{ck.BASE}/admin/unload", json={"model": name}, timeout=120)
        results[name] = {"load": r.status_code, "gpu_used_mib_per_gpu": smi, "answered": answered,
                         "before": before, "after_unload": ck.vram()}
        rep.check(f"exl3 multi-GPU {name}: loads and answers 20 requests", r.status_code == 200 and answered == 20,
                  r.text[:200])
    return results


def run(rep: Any, ck: Any) -> None:
    """The stage (see the module's docstring); parts that do not fit the time budget are recorded as not run."""
    import constrained_stage

    out = rep.data.setdefault("exl3", {})
    out["extension"] = ensure_extension(rep, rep.out)
    out["converted"] = {"tiny-exl3": convert(ck.WORK, "tiny-exl3", rep.out, max(rep.left() - 60, 60))}
    ck.register("tiny-exl3", "tiny-exl3", ["--context-length", "2048", "--max-batch-size", str(ck.PAGED_BATCH)],
                served=True)  # backend: auto
    if "exl3-e2e" not in rep.skip:
        ck.e2e(rep, "tiny-exl3")
    served = served_backend(ck, "tiny-exl3")
    out["served"] = served
    rep.check("exl3: backend auto serves an EXL3 folder with exllamav3, continuous batching without flash-attn",
              served.get("backend") == "exllamav3" and served.get("batching") == "continuous", json.dumps(served)[:300])
    parts = [("constrained", 60, lambda: constrained_stage.on_served_model(rep, "tiny-exl3", "exllamav3",
                                                                       out.setdefault("constrained", {}))),
             ("levels", 90, lambda: levels(rep, ck, "tiny-exl3")),
             ("tinyllama", 230, lambda: out.__setitem__("tinyllama", tinyllama(rep, ck))),
             ("switching", 60, lambda: out.__setitem__("switching", switching(rep, ck, "small-exl2", "tiny-exl3"))),
             ("multi_gpu", 0, lambda: out.__setitem__("multi_gpu", multi_gpu(rep, ck, "tiny-exl3")))]
    for name, needs, fn in parts:
        if f"exl3-{name}" in rep.skip:  # e.g. --skip exl3-constrained
            out[name] = "skipped"
        elif name == "switching" and not (ck.WORK / "small-exl2" / "config.json").exists():
            out[name] = "not run: no EXL2 model (the quantize stage did not run)"
        elif rep.left() < needs:
            out[name] = f"not run: {rep.left():.0f} s left, needs about {needs} s"
        else:
            t0 = time.perf_counter()
            try:
                fn()
            except Exception as exc:  # recorded; the next part runs
                import traceback

                traceback.print_exc()
                rep.check(f"exl3: {name} raised", False, f"{type(exc).__name__}: {exc}"[:300])
            out.setdefault("seconds", {})[name] = round(time.perf_counter() - t0, 1)
        rep.save()


def prepare(args: argparse.Namespace) -> int:
    """The extension's build beside the FP16 models' making, then the conversions; a report in OUT."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import checks as ck

    args.out.mkdir(parents=True, exist_ok=True)
    rep = ck.Report(args.out, skip={"load-failures", "tinyllama"}, budget_s=args.budget_s)
    how = restore_extension()
    building = None if how is not None else start_build()
    rep.stage("models", lambda: ck.make_models(rep))
    if building is not None:
        rep.stage("exl3-extension", lambda: rep.data.__setitem__("extension", finish_build(building, args.out,
                                                                                             rep.left() - 20)))
    else:
        rep.data["extension"] = {"how": how}
    for dst in ("tiny-exl3", "small-exl3"):
        rep.stage(f"convert-{dst}", lambda d=dst: rep.data.setdefault("converted", {}).__setitem__(
            d, convert(ck.WORK, d, args.out, max(rep.left() - 15, 30))), 60 if dst == "small-exl3" else 20)
    (args.out / "exl3-prepare.json").write_text(json.dumps(rep.data, indent=1))
    print(json.dumps(rep.data, indent=1)[-3000:])
    return 0 if all(s.get("ok") for s in rep.data["stages"].values()) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description="prepare the EXL3 stage of the GPU checks (see the docstring)")
    parser.add_argument("command", choices=["prepare"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget-s", type=float, default=560.0)
    return prepare(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
