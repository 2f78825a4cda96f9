"""The PyInstaller bundle (build_spec/), built here and run as a user runs it: headless serve answers /health
and lists the model, a model whose backend is missing gets the 503 naming the runtime to install, the
bundle's own ``runtime install`` brings a CPU runtime from the package index, and a chat then completes
with the model process on that runtime's Python; the tray starts headless and quits cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from tests.helpers.app_process import AppProcess, free_port, registry_with_tiny
from tests.unit.test_desktop import parse_exec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "build_spec"))
from build import build, folder_size  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("bundle")
    exe = build(work / "dist", work / "work", quiet=True)
    assert 50 * 2**20 < folder_size(exe.parent) < 600 * 2**20  # Qt and the server, never torch
    assert not list((exe.parent / "_internal").glob("torch*"))
    return exe


def _env(tmp_path: Path, runtime: Path) -> dict[str, str]:
    return {"EXLLAMA_TRAY_RUNTIME_DIR": str(runtime), "XDG_CONFIG_HOME": str(tmp_path / "config"),
            "XDG_DATA_HOME": str(tmp_path / "data"), "XDG_STATE_HOME": str(tmp_path / "state"),
            "QT_QPA_PLATFORM": "offscreen"}


def _serve(bundle: Path, tmp_path: Path, models: Path, runtime: Path, log: str) -> AppProcess:
    port = free_port()
    app = AppProcess([str(bundle), "serve", "--port", str(port), "--models", str(models)], port,
                     _env(tmp_path, runtime), tmp_path / log)
    app.wait_healthy()
    return app


def _chat(app: AppProcess) -> openai.types.chat.ChatCompletion:
    client = openai.OpenAI(base_url=app.url + "/v1", api_key="x", max_retries=0, timeout=180)
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8)


def test_bundle_offers_the_runtime_installs_it_and_chats(bundle: Path, tmp_path: Path, tiny_model_dir: Path,
                                                         tmp_path_factory: pytest.TempPathFactory) -> None:
    models = registry_with_tiny(tmp_path / "models.json", tiny_model_dir)
    app = _serve(bundle, tmp_path, models, tmp_path / "no-runtime", "missing.log")
    try:
        listed = httpx.get(app.url + "/v1/models", timeout=10).json()
        assert [m["id"] for m in listed["data"]] == ["tiny"]
        with pytest.raises(openai.APIStatusError) as failed:
            _chat(app)
        assert failed.value.status_code == 503
        assert "exllama-tray runtime install transformers" in failed.value.body["message"]
    finally:
        assert app.stop() is not None

    runtime = tmp_path_factory.getbasetemp() / "cpu-runtime"  # shared with tests/test_runtime.py: resumed
    env = {**os.environ, **_env(tmp_path, runtime)}
    done = subprocess.run([str(bundle), "runtime", "install", "transformers", "--torch-index", ""], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "the transformers runtime is ready" in done.stdout
    status = subprocess.run([str(bundle), "runtime", "status"], env=env, capture_output=True, text=True, timeout=60)
    assert "backends ready: transformers" in status.stdout

    app = _serve(bundle, tmp_path, models, runtime, "runtime.log")
    try:
        reply = _chat(app)
        assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens > 0
        children = psutil.Process(app.proc.pid).children(recursive=True)
        assert any(c.cmdline()[:1] == [str(runtime / "venv" / "bin" / "python")] for c in children)
    finally:
        app.stop()


def test_bundled_tray_starts_headless_and_quits_cleanly(bundle: Path, tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, **_env(tmp_path, tmp_path / "runtime"), "EXLLAMA_TRAY_REPORT_READY": "1"}
    proc = subprocess.Popen([str(bundle), "--models", str(tmp_path / "models.json"), "tray", "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("READY"), first + proc.stderr.read() if proc.poll() is not None else first
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).json()["status"] == "ok"
        proc.send_signal(signal.SIGINT)  # the tray's Quit path
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (tmp_path / "state" / "exllama-tray" / "log" / "crash.log").exists()  # installed, and empty
    assert (tmp_path / "state" / "exllama-tray" / "log" / "crash.log").read_text() == ""


def test_bundle_installs_its_menu_entry(bundle: Path, tmp_path: Path) -> None:
    env = {**os.environ, **_env(tmp_path, tmp_path / "runtime")}
    done = subprocess.run([str(bundle), "install-desktop"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    entry = (tmp_path / "data" / "applications" / "exllama-tray.desktop").read_text()
    exec_value = next(line for line in entry.splitlines() if line.startswith("Exec="))[5:]
    assert parse_exec(exec_value) == [str(bundle.resolve())] and "Path=" not in entry
    assert (tmp_path / "data" / "icons" / "hicolor" / "48x48" / "apps" / "exllama-tray.png").is_file()
