#!/usr/bin/env python3
"""Run Open WebUI headless against this server and chat through it (stream and non-stream).

Usage: python scripts/clients/open_webui_check.py [--venv /tmp/open-webui-venv] [--report docs/clients.md] [--ollama]

Installs open-webui in its own virtual environment (heavy: ~3 GB; torch is pinned to the CPU build
first so it does not pull CUDA), starts this server with a tiny random model, starts Open WebUI pointed
at it (offline, no Ollama, no embedding downloads), signs in as the admin it creates, lists models and
chats with and without streaming through Open WebUI's own API. Prints a report (and appends it to
--report when given). Everything runs on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} did not come up within {timeout:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, default=Path("/tmp/open-webui-venv"))
    parser.add_argument("--report", type=Path)
    parser.add_argument("--ollama", action="store_true",
                        help="connect Open WebUI through its Ollama connection (this server's /api/) instead")
    args = parser.parse_args()
    lines: list[str] = []

    def note(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    py = args.venv / "bin" / "python"
    if not py.exists():
        subprocess.check_call([sys.executable, "-m", "venv", str(args.venv)])
        t0 = time.monotonic()
        subprocess.check_call([str(py), "-m", "pip", "install", "-q", "torch==2.13.0"])
        subprocess.check_call([str(py), "-m", "pip", "install", "-q", "open-webui"])
        note(f"- installed open-webui in {time.monotonic() - t0:.0f} s")
    version = subprocess.run([str(py), "-m", "pip", "show", "open-webui"], capture_output=True, text=True).stdout
    version = next((line.split(": ")[1] for line in version.splitlines() if line.startswith("Version")), "?")
    work = Path(tempfile.mkdtemp(prefix="owui-"))
    subprocess.check_call([sys.executable, str(ROOT / "scripts" / "make_tiny_model.py"), str(work / "tiny")],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    models = work / "models.json"
    subprocess.check_call([sys.executable, "-m", "app", "--models", str(models), "add-model", "--no-ollama",
                           "--model-dir", str(work / "tiny"), "--context-length", "32768", "--max-tokens", "16",
                           "tiny"], cwd=ROOT, stdout=subprocess.DEVNULL)
    api_port, ui_port = free_port(), free_port()
    server = subprocess.Popen([sys.executable, "-m", "app", "--models", str(models), "serve", "--port",
                               str(api_port)], cwd=ROOT, stdout=open(work / "server.log", "w"),
                              stderr=subprocess.STDOUT)
    env = {**os.environ, "OPENAI_API_BASE_URL": f"http://127.0.0.1:{api_port}/v1", "OPENAI_API_KEY": "unused",
           "ENABLE_OLLAMA_API": "false", "OLLAMA_BASE_URL": "http://127.0.0.1:9", "OFFLINE_MODE": "true",
           "HF_HUB_OFFLINE": "1", "RAG_EMBEDDING_ENGINE": "openai", "DATA_DIR": str(work / "data"),
           "WEBUI_ADMIN_EMAIL": "admin@example.com", "WEBUI_ADMIN_PASSWORD": "test-password-123",
           "WEBUI_SECRET_KEY": "test-secret", "ENABLE_SIGNUP": "false", "PORT": str(ui_port),
           "ENABLE_TITLE_GENERATION": "false", "ENABLE_FOLLOW_UP_GENERATION": "false",
           "ENABLE_TAGS_GENERATION": "false"}
    if args.ollama:  # Open WebUI's Ollama connection only; it names models as Ollama does (name:tag)
        env.update(ENABLE_OLLAMA_API="true", OLLAMA_BASE_URL=f"http://127.0.0.1:{api_port}", ENABLE_OPENAI_API="false")
    model = "tiny:latest" if args.ollama else "tiny"
    connection = f"its Ollama connection, http://127.0.0.1:{api_port}" if args.ollama else \
        f"http://127.0.0.1:{api_port}/v1"
    owui = args.venv / "bin" / "open-webui"
    ui = subprocess.Popen([str(owui), "serve", "--host", "127.0.0.1", "--port", str(ui_port)], env=env, cwd=work,
                          stdout=open(work / "open-webui.log", "w"), stderr=subprocess.STDOUT)
    ok = True
    try:
        wait_http(f"http://127.0.0.1:{api_port}/health", 60)
        t0 = time.monotonic()
        wait_http(f"http://127.0.0.1:{ui_port}/health", 400)
        note(f"- Open WebUI {version} up in {time.monotonic() - t0:.0f} s, pointed at {connection}")
        ui_url = f"http://127.0.0.1:{ui_port}"
        token = httpx.post(f"{ui_url}/api/v1/auths/signin", json={"email": "admin@example.com",
                                                                  "password": "test-password-123"},
                           timeout=30).json()["token"]
        auth = {"Authorization": f"Bearer {token}"}
        note("- signed in as the admin")
        listed = httpx.get(f"{ui_url}/api/models", headers=auth, timeout=60).json()
        ids = [m["id"] for m in listed.get("data", [])]
        note(f"- GET /api/models through Open WebUI: {ids}")
        ok &= model in ids
        body = {"model": model, "messages": [{"role": "user", "content": "Hello from Open WebUI"}]}
        full = httpx.post(f"{ui_url}/api/chat/completions", headers=auth, json={**body, "stream": False},
                          timeout=120)
        content = full.json()["choices"][0]["message"]["content"] if full.status_code == 200 else full.text
        note(f"- non-streaming chat: HTTP {full.status_code}, {len(content)} characters: {content[:60]!r}")
        ok &= full.status_code == 200 and bool(content)
        pieces = []
        with httpx.stream("POST", f"{ui_url}/api/chat/completions", headers=auth, json={**body, "stream": True},
                          timeout=120) as resp:
            status = resp.status_code
            for line in resp.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    for choice in chunk.get("choices", []):
                        pieces.append((choice.get("delta") or {}).get("content") or "")
        note(f"- streaming chat: HTTP {status}, {len(pieces)} chunks, {len(''.join(pieces))} characters")
        ok &= status == 200 and len(pieces) > 1
    except Exception as exc:  # report whatever broke, with the logs' tails
        ok = False
        note(f"- FAILED: {type(exc).__name__}: {exc}")
        note("```\n" + (work / "open-webui.log").read_text()[-2000:] + "\n```")
    finally:
        ui.terminate()
        server.terminate()
        for proc in (ui, server):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    note(f"- result: {'PASS' if ok else 'FAIL'}")
    if args.report:
        with args.report.open("a") as fh:
            fh.write(f"\n### Open WebUI run, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n")
            fh.write("\n".join(lines) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
