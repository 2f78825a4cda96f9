"""The runtimes as the app's interface sees them: which backends models asked for and lacked (the offer to
install), one install at a time with progress on the event loop, and its cancel (also at Quit)."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, Callable

from app.engine.runtime.installer import RuntimeInstaller
from app.engine.runtime.layout import Runtime, RuntimeStatus
from app.engine.runtime.launcher import MISSING

log = logging.getLogger(__name__)


class RuntimeService:
    """``installer_options`` go to :class:`RuntimeInstaller` (torch_index, env, base_python)."""

    def __init__(self, runtime: Runtime | None = None, **installer_options: Any) -> None:
        self._runtime = runtime
        self._options = installer_options
        self._cancel: threading.Event | None = None
        #: the backend being installed, or None
        self.installing: str | None = None

    @property
    def runtime(self) -> Runtime:
        return self._runtime or Runtime()  # $EXLLAMA_TRAY_RUNTIME_DIR read when asked

    def missing(self) -> list[str]:
        """Backends that a model needed and did not find since the app started (not installed since)."""
        return sorted(b for b in MISSING if not self.runtime.has(b))

    @staticmethod
    def default_backend() -> str:
        """The runtime to offer when no model asked for one: exllamav2 with an NVIDIA GPU, else the CPU backend."""
        from app.engine.backends.factory import nvidia_gpu_present

        return "exllamav2" if nvidia_gpu_present() else "transformers"

    def status(self) -> RuntimeStatus:
        """What is installed (walks the folder for its size: call it off the event loop)."""
        return self.runtime.status()

    async def install(self, backend: str, progress: Callable[[float, str], None]) -> None:
        """Install ``backend``'s runtime; ``progress`` is called on the event loop. Raises
        :class:`~app.engine.runtime.installer.RuntimeInstallError` (InstallCancelled after :meth:`cancel`)."""
        if self.installing is not None:
            raise RuntimeError(f"the {self.installing} runtime is being installed already")
        loop = asyncio.get_running_loop()
        cancel = self._cancel = threading.Event()
        self.installing = backend

        def report(fraction: float, message: str) -> None:
            loop.call_soon_threadsafe(progress, fraction, message)

        installer = RuntimeInstaller(self.runtime, **self._options)
        try:
            await asyncio.to_thread(installer.install, backend, report, cancel)
        finally:
            self.installing, self._cancel = None, None
        MISSING.discard(backend)
        log.info("the %s runtime is installed in %s", backend, self.runtime.root)

    def cancel(self) -> None:
        """Stop the running install (its pip is killed); a later install resumes it."""
        if self._cancel is not None:
            self._cancel.set()


RUNTIMES = RuntimeService()
"""The app's one runtime service (the facade hands it to the interface)."""
