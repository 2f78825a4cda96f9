"""Installing a backend's runtime: a virtual environment, torch (the CUDA build on an NVIDIA machine, the
CPU build elsewhere), the engine's packages and the backend's library, each a step with a marker.

Resumable: a finished step is never run again; a step that was cancelled or failed is marked partial and
runs again (pip skips what it already installed). Cancellable: the pip (or venv) subprocess is killed.
Offline, the error says that the package index could not be reached.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable, Sequence

from app.engine.runtime.layout import (BACKEND_PACKAGES, CPU_TORCH_INDEX, ENGINE_PACKAGES, TORCH,
                                       WINDOWS_CUDA_TORCH_INDEX, Runtime, steps_for)

log = logging.getLogger(__name__)
ProgressFn = Callable[[float, str], None]
_DEFAULT = object()
_OFFLINE = re.compile(r"NewConnectionError|Failed to establish a new connection|Temporary failure in name "
                      r"resolution|Name or service not known|Network is unreachable|Connection refused|"
                      r"ConnectTimeout|Max retries exceeded|getaddrinfo failed", re.I)
_NOT_FOUND = re.compile(r"No matching distribution found|Could not find a version", re.I)


class RuntimeInstallError(RuntimeError):
    """The runtime could not be installed; the message says why and what to do."""


class InstallCancelled(RuntimeInstallError):
    pass


def default_torch_index() -> str | None:
    """Where torch comes from: ``$EXLLAMA_TRAY_TORCH_INDEX`` when set (empty: pip's own index), else on an
    NVIDIA machine pip's own index (PyPI's Linux torch is the CUDA build) or on Windows PyTorch's CUDA index
    (untested), on a Mac pip's own index, elsewhere the CPU builds' index."""
    if "EXLLAMA_TRAY_TORCH_INDEX" in os.environ:
        return os.environ["EXLLAMA_TRAY_TORCH_INDEX"] or None
    from app.engine.backends.factory import nvidia_gpu_present

    if nvidia_gpu_present():
        return WINDOWS_CUDA_TORCH_INDEX if sys.platform == "win32" else None
    return None if sys.platform == "darwin" else CPU_TORCH_INDEX


def find_base_python() -> str:
    """A Python 3.11+ to make the virtual environment with: ``$EXLLAMA_TRAY_RUNTIME_PYTHON``, this one in a
    source checkout, else one on the PATH (a bundle has no interpreter of its own to make a venv with)."""
    env = os.environ.get("EXLLAMA_TRAY_RUNTIME_PYTHON")
    if env:
        return env
    if not getattr(sys, "frozen", False):
        return sys.executable
    for name in ("python3.13", "python3.12", "python3.11", "python3", "python"):
        found = shutil.which(name)
        if found and _version_ok(found):
            return found
    raise RuntimeInstallError(
        "installing a runtime needs Python 3.11 or newer on the PATH (python3) to make its virtual "
        "environment with; install it (python.org, or your distribution's python3 and python3-venv) and retry, "
        "or set EXLLAMA_TRAY_RUNTIME_PYTHON to its path")


def _version_ok(python: str) -> bool:
    try:
        out = subprocess.run([python, "-c", "import sys, venv; print(sys.version_info >= (3, 11))"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.stdout.strip() == "True"


class RuntimeInstaller:
    """Installs backends into ``runtime``; ``progress(fraction, message)`` is called from the installing
    thread, and setting ``cancel`` stops the running step (its subprocess is killed)."""

    def __init__(self, runtime: Runtime, *, torch_spec: str = TORCH, torch_index: str | None | object = _DEFAULT,
                 base_python: str | None = None, env: dict[str, str] | None = None) -> None:
        self.runtime = runtime
        self.torch_spec = torch_spec
        self.torch_index = default_torch_index() if torch_index is _DEFAULT else torch_index
        self.base_python = base_python
        self.env = env

    def install(self, backend: str, progress: ProgressFn, cancel: threading.Event | None = None) -> None:
        """Run every step of ``backend``'s runtime that is not done yet."""
        cancel = cancel or threading.Event()
        steps = steps_for(backend)
        for index, step in enumerate(steps):
            def part(fraction: float, message: str, index: int = index) -> None:
                progress((index + min(max(fraction, 0.0), 1.0)) / len(steps), message)

            if self.runtime.is_done(step):
                part(1.0, f"{step}: done before")
                continue
            if cancel.is_set():
                raise InstallCancelled("runtime installation cancelled")
            self.runtime.mark(step, "partial")
            self._run_step(step, backend, part, cancel)
            self.runtime.mark(step, "done")
        self.runtime.write_manifest(torch=self.torch_spec, torch_index=self.torch_index)
        progress(1.0, f"the {backend} runtime is installed")

    def _run_step(self, step: str, backend: str, progress: ProgressFn, cancel: threading.Event) -> None:
        label = {"venv": "making the virtual environment", "torch": f"installing {self.torch_spec}",
                 "engine": "installing the engine's packages"}.get(step, f"installing {backend}")
        progress(0.0, label)
        if step == "venv":
            shutil.rmtree(self.runtime.venv, ignore_errors=True)
            python = self.base_python or find_base_python()
            self._run([python, "-m", "venv", str(self.runtime.venv)], label, progress, cancel)
            return
        if step == "torch":
            index = ["--index-url", self.torch_index] if self.torch_index else []
            self._pip([self.torch_spec, *index], label, progress, cancel)
        elif step == "engine":
            self._pip([self.torch_spec, *ENGINE_PACKAGES], label, progress, cancel)
        else:
            self._pip([self.torch_spec, *BACKEND_PACKAGES[backend]], label, progress, cancel)

    def _pip(self, args: Sequence[str], label: str, progress: ProgressFn, cancel: threading.Event) -> None:
        command = [str(self.runtime.python), "-m", "pip", "install", "--disable-pip-version-check",
                   "--progress-bar", "off", *args]
        self._run(command, label, progress, cancel)

    def _run(self, command: list[str], label: str, progress: ProgressFn, cancel: threading.Event) -> None:
        log.info("runtime: %s", " ".join(command))
        env = {**os.environ, **(self.env or {})}
        for name in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
            env.pop(name, None)
        _restore_library_path(env)
        try:
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    env=env, start_new_session=sys.platform != "win32")
        except OSError as exc:
            raise RuntimeInstallError(f"{label}: could not run {command[0]}: {exc}") from None
        lines = _read_lines(proc)
        tail: list[str] = []
        seen = 0
        while True:
            try:
                line = lines.get(timeout=0.2)
            except queue.Empty:
                line = ""
            if cancel.is_set():
                _kill(proc)
                raise InstallCancelled(f"runtime installation cancelled ({label})")
            if line is None:
                break
            if line and not line.startswith("WARNING: Location"):  # pip's note on each local index
                tail = (tail + [line])[-30:]
                seen += 1
                progress(min(0.95, seen / (seen + 20)), f"{label}: {line[:120]}")
        if proc.wait() != 0:
            raise RuntimeInstallError(_failure_message(label, tail, proc.returncode))


def _read_lines(proc: subprocess.Popen) -> "queue.Queue[str | None]":
    """The subprocess's output lines, read by a thread; None once it closed its output."""
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            if raw.strip():
                lines.put(raw.rstrip())
        lines.put(None)

    threading.Thread(target=read, name="runtime-install-output", daemon=True).start()
    return lines


def _kill(proc: subprocess.Popen) -> None:
    try:
        if sys.platform == "win32":
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(proc.pid)], capture_output=True)  # untested
        else:
            os.killpg(proc.pid, signal.SIGKILL)
    except (OSError, ProcessLookupError):
        proc.kill()
    proc.wait()


def _failure_message(label: str, tail: list[str], code: int) -> str:
    text = "\n".join(tail)
    last = "\n  ".join(tail[-6:])
    if _OFFLINE.search(text):
        return (f"{label} failed: the package index could not be reached (is this machine offline, or behind a "
                f"proxy? pip reads HTTPS_PROXY). Nothing is lost: run the install again once online, it resumes "
                f"where it stopped.\n  pip said:\n  {last}")
    if _NOT_FOUND.search(text):
        return (f"{label} failed: the package index has no matching package for this machine (Python "
                f"version or platform), or it could not be reached.\n  pip said:\n  {last}")
    return f"{label} failed (exit code {code}):\n  {last}"


def _restore_library_path(env: dict[str, str]) -> None:
    """A frozen app's loader puts its own folder on LD_LIBRARY_PATH: the runtime's Python must not see it."""
    if not getattr(sys, "frozen", False):
        return
    for name in ("LD_LIBRARY_PATH", "DYLD_LIBRARY_PATH"):
        original = env.pop(f"{name}_ORIG", None)
        if original is not None:
            env[name] = original
        else:
            env.pop(name, None)


def child_environment(code_root: Path) -> dict[str, str]:
    """The environment of a process on the runtime's Python: the app's code importable from ``code_root``."""
    env = dict(os.environ)
    for name in ("PYTHONHOME", "VIRTUAL_ENV"):
        env.pop(name, None)
    _restore_library_path(env)
    env["PYTHONPATH"] = str(code_root)
    return env
