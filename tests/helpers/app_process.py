"""The app as a user runs it: a command (``python -m app serve`` or the bundle's executable) in a process
of its own on a loopback port, and a CPU runtime installed once per test session."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Sequence

import httpx

from app.engine.catalog.add_model import add_model
from app.engine.catalog.registry import Registry
from app.engine.runtime.installer import RuntimeInstaller
from app.engine.runtime.layout import Runtime


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def registry_with_tiny(models_path: Path, tiny_model_dir: Path, name: str = "tiny") -> Path:
    add_model(Registry(models_path), name, tiny_model_dir)
    return models_path


def cpu_runtime(root: Path) -> Runtime:
    """The transformers runtime in ``root``, installed from the package index as pip is set up here (torch
    at the app's pinned release, from pip's own index: the CPU build's file on the CI machines); resumed,
    so a second call in the same session is instant."""
    runtime = Runtime(root)
    RuntimeInstaller(runtime, torch_index=None).install("transformers", lambda f, m: None)
    return runtime


class AppProcess:
    """``command`` started with ``env`` added; :meth:`wait_healthy` waits for /health on ``port``."""

    def __init__(self, command: Sequence[str], port: int, env: dict[str, str], log_path: Path) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(list(command), env={**os.environ, **env}, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait_healthy(self, timeout: float = 60.0) -> float:
        """Seconds until /health answered 200; fails with the app's output when it did not."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.proc.poll() is not None:
                raise AssertionError(f"the app exited ({self.proc.returncode}):\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"no /health answer in {timeout} s:\n{self.output()}")

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode
