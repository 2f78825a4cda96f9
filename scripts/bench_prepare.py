#!/usr/bin/env python3
"""What the engine spends on a request before its job reaches the runner, and TTFT on the CPU.

A fixed-step backend (0.5 ms steps, tests/fixed_step_backend.py) with the tiny test tokenizer serves a
model registered three ways: the folder's Jinja chat template, an Ollama Go template, and a FIM
completion whose template has no ``.Suffix`` (the folder's FIM tokens are looked up, as for every
Continue keystroke). For each, prints the median time of ``submit_chat`` / ``submit_completion``
(settings layering, prompt builder, tokenizing) and the median time to first streamed text through
HTTP on loopback.

Usage: python scripts/bench_prepare.py [--requests 300]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.engine.facade import Engine  # noqa: E402
from app.engine.requests import ChatRequest, CompletionRequest, Message  # noqa: E402
from app.engine.catalog.registry import OllamaMetadata, Registry  # noqa: E402
from tests.fixed_step_backend import FixedStepBackend  # noqa: E402
from tests.server_harness import ServerThread, register  # noqa: E402

GO_TEMPLATE = ("{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}</s>\n{{ end }}<|assistant|>\n")
MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Say something about foxes and dogs, briefly."}]
CHAT = [Message(m["role"], m["content"]) for m in MESSAGES]


def factory(entry: Any, settings: Any) -> Any:
    return FixedStepBackend(entry.model_dir, context_length=2048, max_batch=1, step_s=0.0005)


def make_registry(tmp: Path) -> Registry:
    folder = tmp / "tiny"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_model.py"), str(folder), "--layers", "1",
                    "--hidden", "32", "--heads", "2", "--kv-heads", "1", "--intermediate", "64"],
                   check=True, capture_output=True)
    registry = Registry(tmp / "models.json")
    register(registry, "jinja", folder)
    key = register(registry, "ollama", folder)
    entry = registry.find(key)[1]
    registry.add("ollama", entry.model_copy(update={"ollama": OllamaMetadata(name="x", template=GO_TEMPLATE)}),
                 replace=True)
    return registry


async def prepare_times(engine: Engine, n: int) -> dict[str, float]:
    cases = {
        "chat, jinja template": lambda: engine.submit_chat(ChatRequest("jinja", CHAT, stream=True)),
        "chat, ollama template": lambda: engine.submit_chat(ChatRequest("ollama", CHAT, stream=True)),
        "FIM completion, no .Suffix": lambda: engine.submit_completion(
            CompletionRequest("jinja", "def add(a, b):\n    ", suffix="\n\nprint(add(1, 2))\n", stream=True)),
    }
    out = {}
    for name, submit in cases.items():
        times = []
        for i in range(n + 20):
            t0 = time.perf_counter()
            handle = await submit()
            took = time.perf_counter() - t0
            handle.cancel()
            if i >= 20:
                times.append(took)
        out[name] = statistics.median(times) * 1e3
    return out


def ttft(base_url: str, model: str, n: int) -> float:
    import httpx

    body = {"model": model, "messages": MESSAGES, "max_tokens": 2, "stream": True, "temperature": 0}
    times = []
    with httpx.Client(timeout=60) as http:
        for i in range(n + 10):
            t0 = time.perf_counter()
            with http.stream("POST", f"{base_url}/chat/completions", json=body) as r:
                for line in r.iter_lines():
                    if '"content":"a"' in line.replace(" ", ""):
                        break
            if i >= 10:
                times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        registry = make_registry(Path(tmp))
        server = ServerThread(registry, engine_factory=lambda reg, **kw: Engine(reg, backend_factory=factory, **kw))
        server.start()
        try:
            server.call(server.engine.load("jinja"))
            prepare = server.call(prepare_times(server.engine, args.requests))
            first = {m: ttft(server.base_url, m, args.requests // 3) for m in ("jinja", "ollama")}
        finally:
            server.stop()
    print(f"{'request':30} {'prepare ms':>11}")
    for name, ms in prepare.items():
        print(f"{name:30} {ms:11.3f}")
    for model, ms in first.items():
        print(f"TTFT through HTTP, {model:8} {ms:8.2f} ms")
    print(json.dumps({"prepare_ms": prepare, "ttft_ms": first}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
