"""Which Python runs a backend's model process, and starting one on a runtime's Python.

The process is the same model process as in a source checkout (``child_main`` of
:mod:`app.engine.backends.model_process.child`), started with ``subprocess`` on the runtime's interpreter
(multiprocessing's spawn would hand it this process's ``sys.path``, a frozen app's included) and talking
over a ``multiprocessing`` connection: on POSIX one end of a socket pair inherited by the child.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import subprocess
import sys
import threading
import time
from functools import partial
from multiprocessing.connection import Connection, Listener, Pipe
from pathlib import Path
from typing import Any, Callable

from app.engine.backends.contract import BackendLoadError
from app.engine.runtime.installer import child_environment
from app.engine.runtime.layout import BACKEND_MODULES, Runtime

Launcher = Callable[[str], tuple[Any, Any]]
ENTRY = "app.engine.runtime.child_entry"


#: backends a model needed and found in neither this interpreter nor the runtime (the interface's offer)
MISSING: set[str] = set()


class BackendMissing(BackendLoadError):
    """The model's backend is not installed: the message says what to install and how."""

    def __init__(self, backend: str) -> None:
        super().__init__(missing_message(backend))
        self.backend = backend
        MISSING.add(backend)


def app_code_root() -> Path:
    """The folder holding the ``app`` package as source files: the bundle ships it for the runtime's Python."""
    if getattr(sys, "frozen", False):
        return Path(getattr(sys, "_MEIPASS", Path(sys.executable).parent)) / "app_src"
    return Path(__file__).resolve().parents[3]


def importable_here(backend: str) -> bool:
    """Whether this interpreter has torch and ``backend``'s library (asked without importing them); never in
    a frozen app, nor with ``EXLLAMA_TRAY_RUNTIME_ONLY=1`` (a source checkout acting as the bundle does)."""
    if getattr(sys, "frozen", False) or os.environ.get("EXLLAMA_TRAY_RUNTIME_ONLY") == "1":
        return False
    try:
        return all(importlib.util.find_spec(m) is not None for m in ("torch", BACKEND_MODULES[backend]))
    except (ImportError, ValueError):
        return False


def missing_message(backend: str) -> str:
    size = "about 1 GB" if backend == "transformers" else "several GB, with CUDA"
    return (f"the {backend} backend is not installed: its runtime (torch and {backend}, {size}) is installed on "
            f"first use. Install it from the tray menu (Install runtime…) or on the command line with "
            f"`exllama-tray runtime install {backend}`, then ask again.")


def launcher_for(backend: str, runtime: Runtime | None = None) -> Launcher | None:
    """How ``backend``'s model process starts: None for this interpreter (a source checkout's ``.venv`` that
    has it), else a launcher into the installed runtime; :class:`BackendMissing` when neither has it.
    ``$EXLLAMA_TRAY_RUNTIME_DIR`` set (or a frozen app) prefers the runtime."""
    runtime = runtime or Runtime()
    prefer_runtime = getattr(sys, "frozen", False) or bool(os.environ.get("EXLLAMA_TRAY_RUNTIME_DIR"))
    if prefer_runtime and runtime.has(backend):
        return partial(start_in_runtime, runtime.python)
    if importable_here(backend):
        return None
    if runtime.has(backend):
        return partial(start_in_runtime, runtime.python)
    raise BackendMissing(backend)


class RuntimeProcess:
    """A model process on a runtime's Python, with the part of multiprocessing.Process the client uses."""

    def __init__(self, popen: subprocess.Popen) -> None:
        self._popen = popen
        self.pid = popen.pid

    def is_alive(self) -> bool:
        return self._popen.poll() is None

    @property
    def exitcode(self) -> int | None:
        return self._popen.poll()

    def kill(self) -> None:
        if self._popen.poll() is None:
            self._popen.kill()

    def join(self, timeout: float | None = None) -> None:
        try:
            self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass


def start_in_runtime(python: Path, target: str) -> tuple[RuntimeProcess, Connection]:
    """A model process for backend class ``target`` on ``python``: (process, this side's connection)."""
    env = child_environment(app_code_root())
    if sys.platform == "win32":
        return _start_windows(python, target, env)
    here, there = Pipe()
    fd = there.fileno()
    try:
        popen = subprocess.Popen([str(python), "-m", ENTRY, "--fd", str(fd), target], pass_fds=(fd,), env=env)
    finally:
        there.close()
    return RuntimeProcess(popen), here


def _start_windows(python: Path, target: str, env: dict[str, str]) -> tuple[RuntimeProcess, Connection]:
    """Windows (untested): a named pipe the child connects to with a one-time key."""
    key = secrets.token_bytes(16)
    listener = Listener(family="AF_PIPE", authkey=key)
    env = {**env, "EXLLAMA_TRAY_PIPE_KEY": key.hex()}
    popen = subprocess.Popen([str(python), "-m", ENTRY, "--address", str(listener.address), target], env=env)
    accepted: list[Connection] = []
    thread = threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while thread.is_alive() and popen.poll() is None and time.monotonic() < deadline:
        thread.join(0.2)
    if not accepted:
        popen.kill()
        raise BackendLoadError(f"the model process on {python} did not connect (exit code {popen.poll()})")
    return RuntimeProcess(popen), accepted[0]
