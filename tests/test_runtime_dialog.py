"""Install runtime…: the real dialog, offscreen, on a qasync loop, installing into a temporary folder with an
unreachable package index: progress, the offline error and Retry, Cancel by closing (pip killed), and the
dialog deleted after it closes."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

pytest.importorskip("PySide6")

from app.engine.runtime.layout import Runtime  # noqa: E402
from app.engine.runtime.service import RuntimeService  # noqa: E402
from tests.test_runtime import OFFLINE_PIP  # noqa: E402
from tests.test_ui import qloop, until  # noqa: E402,F401  the qasync loop fixture and the wait of the UI tests


def test_install_runtime_dialog(qapp, qloop, tmp_path: Path) -> None:
    import shiboken6
    from PySide6.QtCore import QCoreApplication, QEvent

    from app.ui.runtime_dialog import RuntimeDialog

    qapp.setQuitOnLastWindowClosed(False)  # as the app sets it (launch.py): a window closing quits nothing
    runtime = Runtime(tmp_path / "rt")
    service = RuntimeService(runtime, torch_index=None, base_python=sys.executable, env=OFFLINE_PIP)
    dlg = RuntimeDialog(service, "transformers", asyncio.ensure_future,
                        reason="model tiny failed to load: the transformers backend is not installed")
    assert dlg.text.text().startswith("model tiny failed to load") and str(runtime.root) in dlg.text.text()
    assert dlg.install_button.isDefault()
    dlg.show()

    async def scenario() -> None:
        dlg.install_button.click()
        assert not dlg.install_button.isEnabled() and dlg.close_button.text() == "Cancel"
        await until(lambda: not dlg.running, 60)
        assert "package index could not be reached" in dlg.step.text()
        qapp.processEvents()
        for label in (dlg.text, dlg.step):  # the wrapped texts are whole, not cut at the bottom
            assert label.height() >= label.heightForWidth(label.width())
        assert dlg.install_button.text() == "Retry" and dlg.install_button.isEnabled()
        assert 0 < dlg.progress.value() < 1000 and runtime.is_done("venv")
        dlg.install_button.click()  # Retry: the venv is done before, torch runs again; closing cancels it
        await until(lambda: dlg.step.text().startswith("installing torch"), 60)
        task = dlg._task
        dlg.close()
        await asyncio.wait_for(task, 30)
        assert service.installing is None and runtime.status().partial_steps == ["torch"]

    qloop.run_until_complete(asyncio.wait_for(scenario(), 120))
    QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
    assert not shiboken6.isValid(dlg)


def test_tray_offers_the_runtime_and_starts_on_login(qapp, qloop, tmp_path: Path, tiny_model_dir: Path,
                                                     memory_keyring, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.engine.catalog.add_model import add_model
    from app.engine.catalog.registry import Registry
    from app.engine.runtime.launcher import MISSING
    from app.server_config import ServerSettingsStore
    from app.ui.controller import AppController
    from app.ui.runtime_dialog import RuntimeDialog
    from app.ui.tray import TrayApp

    qapp.setQuitOnLastWindowClosed(False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("EXLLAMA_TRAY_RUNTIME_DIR", str(tmp_path / "rt"))
    monkeypatch.setenv("EXLLAMA_TRAY_RUNTIME_ONLY", "1")  # as in the bundle: no backend in this interpreter
    registry = Registry(tmp_path / "models.json")
    add_model(registry, "tiny", tiny_model_dir)
    controller = AppController(registry, ServerSettingsStore(tmp_path / "server.json"), port=0)
    tray = TrayApp(controller)
    qloop.run_until_complete(controller.start())
    tray.show()
    try:
        login = tray.actions["Start on login"]
        assert login.isCheckable() and not login.isChecked()
        login.trigger()
        autostart_file = tmp_path / "config" / "autostart" / "exllama-tray.desktop"
        assert login.isChecked() and autostart_file.is_file()
        login.trigger()
        assert not login.isChecked() and not autostart_file.exists()
        tray.actions["Add to applications menu"].trigger()
        assert (tmp_path / "data" / "applications" / "exllama-tray.desktop").is_file()

        def offers() -> list[RuntimeDialog]:
            return [d for d in tray.dialogs if isinstance(d, RuntimeDialog)]

        async def scenario() -> None:
            await controller.load("tiny")  # refused: the transformers backend is missing
            await until(lambda: offers(), 10)
            offer = offers()[0]
            assert offer.backend.currentText() == "transformers" and offer.isVisible()
            assert offer.text.text().startswith("A model failed to load: the transformers backend is not installed.")
            tray.refresh()
            assert len(offers()) == 1  # offered once per run
            tray.actions["Install runtime…"].trigger()
            assert len(offers()) == 2 and offers()[1].backend.currentText() == "transformers"

        qloop.run_until_complete(asyncio.wait_for(scenario(), 60))
    finally:
        try:
            qloop.run_until_complete(controller.stop())
        finally:
            tray.shutdown()
            MISSING.discard("transformers")
