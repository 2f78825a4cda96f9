"""What every stage of the GPU checks shares: where things are, the models' constants, the report, and
the helpers that talk to the server under test (register a model, read /metrics, GPU memory)."""

from __future__ import annotations

import json
import os
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


def ban_for(folder: Path) -> dict[str, float]:
    """:data:`BAN` and every token of ``folder``'s tokenizer whose text alone is empty (special tokens) or an
    incomplete UTF-8 sequence (the byte-level alphabet's bytes 0x80-0xFF). The libraries hold such a
    token's text until it completes, so a stream on random weights went quiet for tens of steps now and
    then (the ITL p99 of 150 ms on both sides at 8 streams, 40x the step) and the stall and ITL figures
    read those waits; banned, every step gives every stream text. :data:`BAN` alone without a tokenizer.json."""
    path = folder / "tokenizer.json"
    if not path.exists():
        return dict(BAN)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    texts = (tok.decode([i], skip_special_tokens=True) for i in range(tok.get_vocab_size()))
    quiet = [i for i, text in enumerate(texts) if text == "" or "\ufffd" in text]
    return {**BAN, **{str(i): -100.0 for i in quiet}}


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
