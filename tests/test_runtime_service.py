"""The runtime service the interface uses: the offer (backends that were missing), an install's progress on
the event loop, its cancel and its offline error, one install at a time."""

from __future__ import annotations

import asyncio
import sys
import threading
from pathlib import Path

import pytest

from app.engine.runtime.installer import InstallCancelled, RuntimeInstallError
from app.engine.runtime.launcher import MISSING, BackendMissing, launcher_for
from app.engine.runtime.layout import Runtime
from app.engine.runtime.service import RuntimeService
from tests.test_runtime import OFFLINE_PIP


def test_a_missing_backend_is_offered_until_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXLLAMA_TRAY_RUNTIME_ONLY", "1")
    MISSING.discard("transformers")
    runtime = Runtime(tmp_path / "rt")
    service = RuntimeService(runtime)
    assert service.missing() == []
    with pytest.raises(BackendMissing) as failed:
        launcher_for("transformers", runtime)
    assert failed.value.backend == "transformers" and service.missing() == ["transformers"]
    runtime.venv.mkdir(parents=True)  # a runtime whose every step is done counts as installed
    Path(runtime.python).parent.mkdir(parents=True, exist_ok=True)
    Path(runtime.python).symlink_to(sys.executable)
    for step in ("venv", "torch", "engine", "backend-transformers"):
        runtime.mark(step, "done")
    assert service.missing() == []
    assert launcher_for("transformers", runtime) is not None
    MISSING.discard("transformers")


async def test_install_reports_on_the_loop_cancels_and_fails_offline(tmp_path: Path) -> None:
    service = RuntimeService(Runtime(tmp_path / "rt"), torch_index=None, base_python=sys.executable,
                             env=OFFLINE_PIP)
    loop_thread = threading.get_ident()
    seen: list[tuple[int, str]] = []

    def progress(fraction: float, message: str) -> None:
        seen.append((threading.get_ident(), message))
        if message.startswith("making the virtual environment"):
            service.cancel()

    with pytest.raises(InstallCancelled):
        await service.install("transformers", progress)
    assert seen and all(ident == loop_thread for ident, _ in seen) and service.installing is None

    task = asyncio.ensure_future(service.install("transformers", lambda f, m: None))
    await asyncio.sleep(0.05)
    assert service.installing == "transformers"
    with pytest.raises(RuntimeError, match="being installed already"):
        await service.install("transformers", lambda f, m: None)
    with pytest.raises(RuntimeInstallError, match="could not be reached"):
        await task
    assert service.status().partial_steps == ["torch"] and service.installing is None
