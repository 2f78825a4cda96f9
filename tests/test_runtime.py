"""Runtimes: the packages they install match pyproject's, steps resume, a cancel kills pip, offline is a
clear error, a model whose backend is missing is a 503 saying what to install, and a chat completes with
the model process on an installed CPU runtime's Python."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import openai
import psutil
import pytest

from app.engine.runtime.installer import InstallCancelled, RuntimeInstaller, RuntimeInstallError
from app.engine.runtime.layout import BACKEND_PACKAGES, ENGINE_PACKAGES, TORCH, Runtime, steps_for
from app.engine.runtime.launcher import MISSING, BackendMissing, launcher_for
from tests.helpers.app_process import AppProcess, cpu_runtime, free_port, registry_with_tiny

ROOT = Path(__file__).resolve().parent.parent
OFFLINE_PIP = {"PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_FIND_LINKS": "",
               "PIP_EXTRA_INDEX_URL": "", "PIP_RETRIES": "1", "PIP_DEFAULT_TIMEOUT": "3", "PIP_NO_CACHE_DIR": "1"}


def test_runtime_installs_what_pyproject_declares() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    for requirement in ENGINE_PACKAGES:
        assert requirement in project["dependencies"] or all(requirement in extras[b] for b in BACKEND_PACKAGES)
    for backend, packages in BACKEND_PACKAGES.items():
        assert set(packages) | {"numpy"} == {r for r in extras[backend] if not r.startswith("torch")}
    assert f'TORCH = "{TORCH}"' in (ROOT / "scripts" / "dev.py").read_text()
    assert steps_for("exllamav2") == ("venv", "torch", "engine", "backend-exllamav2")
    with pytest.raises(ValueError, match="unknown backend"):
        steps_for("llamacpp")


def test_done_steps_are_not_run_again(tmp_path: Path) -> None:
    runtime = Runtime(tmp_path / "rt")
    for step in steps_for("transformers"):
        runtime.mark(step, "partial")
        runtime.mark(step, "done")
    messages: list[str] = []
    RuntimeInstaller(runtime, torch_index=None, base_python="/nonexistent/python").install(
        "transformers", lambda f, m: messages.append(m))
    assert messages[:4] == [f"{s}: done before" for s in steps_for("transformers")]
    assert not runtime.venv.exists()  # nothing was run: the base python does not even exist
    status = runtime.status()
    assert status.partial_steps == [] and status.done_steps == sorted(steps_for("transformers"))
    assert status.python is None and status.backends == []  # no interpreter: not usable


def test_cancel_resume_and_offline(tmp_path: Path) -> None:
    runtime = Runtime(tmp_path / "rt")
    cancel = threading.Event()

    def cancel_at(prefix: str):
        def progress(fraction: float, message: str) -> None:
            if message.startswith(prefix):
                cancel.set()
        return progress

    installer = RuntimeInstaller(runtime, torch_index=None, base_python=sys.executable)
    with pytest.raises(InstallCancelled):
        installer.install("transformers", cancel_at("making the virtual environment"), cancel)
    assert (runtime.steps_dir / "venv.partial").exists() and not runtime.is_done("venv")
    cancel.clear()
    with pytest.raises(InstallCancelled, match="installing torch"):  # resumed: the venv is made, pip is killed
        installer.install("transformers", cancel_at("installing torch==2.13.0:"), cancel)
    assert runtime.is_done("venv") and (runtime.steps_dir / "torch.partial").exists()
    assert not [p for p in psutil.Process().children(recursive=True) if "pip" in " ".join(p.cmdline())]
    offline = RuntimeInstaller(runtime, torch_index=None, env=OFFLINE_PIP)
    with pytest.raises(RuntimeInstallError, match="package index could not be reached") as failed:
        offline.install("transformers", lambda f, m: None)
    assert "resumes where it stopped" in str(failed.value)
    assert runtime.is_done("venv") and not runtime.is_done("torch") and runtime.status().partial_steps == ["torch"]


def test_missing_backend_names_the_remedy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXLLAMA_TRAY_RUNTIME_ONLY", "1")
    with pytest.raises(BackendMissing, match=re.escape("exllama-tray runtime install transformers")):
        launcher_for("transformers", Runtime(tmp_path / "none"))
    monkeypatch.delenv("EXLLAMA_TRAY_RUNTIME_ONLY")
    assert launcher_for("transformers", Runtime(tmp_path / "none")) is None  # this .venv has it
    MISSING.discard("transformers")  # the offer the tray would make: not for other tests


def _serve(tmp_path: Path, models: Path, runtime_dir: Path) -> AppProcess:
    port = free_port()
    env = {"EXLLAMA_TRAY_RUNTIME_DIR": str(runtime_dir), "EXLLAMA_TRAY_RUNTIME_ONLY": "1",
           "XDG_STATE_HOME": str(tmp_path / "state")}  # the crash log: not in the user's folder
    app = AppProcess([sys.executable, "-m", "app", "serve", "--port", str(port), "--models", str(models)],
                     port, env, tmp_path / "app.log")
    app.wait_healthy()
    return app


def test_missing_runtime_is_a_503_with_the_remedy(tmp_path: Path, tiny_model_dir: Path) -> None:
    app = _serve(tmp_path, registry_with_tiny(tmp_path / "models.json", tiny_model_dir), tmp_path / "no-runtime")
    try:
        client = openai.OpenAI(base_url=app.url + "/v1", api_key="x", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        with pytest.raises(openai.APIStatusError) as failed:
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
        assert failed.value.status_code == 503
        message = failed.value.body["message"]
        assert "transformers backend is not installed" in message and "Install runtime" in message
        assert "exllama-tray runtime install transformers" in message
    finally:
        app.stop()


@pytest.mark.slow
def test_chat_with_the_model_process_in_the_runtime(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory,
                                                    tiny_model_dir: Path) -> None:
    runtime = cpu_runtime(tmp_path_factory.getbasetemp() / "cpu-runtime")
    assert runtime.status().backends == ["transformers"]
    app = _serve(tmp_path, registry_with_tiny(tmp_path / "models.json", tiny_model_dir), runtime.root)
    try:
        client = openai.OpenAI(base_url=app.url + "/v1", api_key="x", max_retries=0, timeout=120)
        reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=8)
        assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens > 0
        children = psutil.Process(app.proc.pid).children(recursive=True)
        on_runtime = [c for c in children if c.cmdline()[:1] == [str(runtime.python)]]
        assert on_runtime and "app.engine.runtime.child_entry" in on_runtime[0].cmdline()
    finally:
        app.stop()


def _cli(env: dict[str, str], *args: str) -> "subprocess.CompletedProcess[str]":
    return subprocess.run([sys.executable, "-m", "app", *args], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)


def test_cli_install_shows_progress_and_the_offline_error(tmp_path: Path) -> None:
    env = {"EXLLAMA_TRAY_RUNTIME_DIR": str(tmp_path / "rt"), **OFFLINE_PIP}
    done = _cli(env, "runtime", "install", "transformers", "--torch-index", "")
    assert done.returncode == 1
    assert re.search(r"\[#*\.*\] +\d+\.\d% making the virtual environment", done.stdout)
    assert "error: installing torch==2.13.0 failed: the package index could not be reached" in done.stderr
    status = _cli(env, "runtime", "status")
    assert "backends ready: none" in status.stdout and "unfinished steps (resumed by `runtime install`): torch" \
        in status.stdout
    assert f"removed {tmp_path / 'rt'}" in _cli(env, "runtime", "remove").stdout
    assert "not installed" in _cli(env, "runtime", "status").stdout


def test_where_torch_comes_from(monkeypatch: pytest.MonkeyPatch) -> None:
    from app.engine.backends.factory import nvidia_gpu_present
    from app.engine.runtime.installer import default_torch_index
    from app.engine.runtime.layout import CPU_TORCH_INDEX

    monkeypatch.setenv("EXLLAMA_TRAY_TORCH_INDEX", "https://mirror.example/simple")
    assert default_torch_index() == "https://mirror.example/simple"
    monkeypatch.setenv("EXLLAMA_TRAY_TORCH_INDEX", "")
    assert default_torch_index() is None  # pip's own index
    monkeypatch.delenv("EXLLAMA_TRAY_TORCH_INDEX")
    if sys.platform == "linux":
        assert default_torch_index() == (None if nvidia_gpu_present() else CPU_TORCH_INDEX)


def test_a_gpu_backend_installed_as_a_runtime_is_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.engine.backends.factory import installed_gpu_backend

    if installed_gpu_backend() is not None:
        pytest.skip("a GPU backend is installed in this interpreter")
    runtime = Runtime(tmp_path / "rt")
    monkeypatch.setenv("EXLLAMA_TRAY_RUNTIME_DIR", str(runtime.root))
    Path(runtime.python).parent.mkdir(parents=True)
    Path(runtime.python).symlink_to(sys.executable)
    for step in steps_for("exllamav3")[:-1]:
        runtime.mark(step, "done")
    assert installed_gpu_backend() is None  # its last step is not done
    runtime.mark("backend-exllamav3", "done")
    assert installed_gpu_backend() == "exllamav3"
