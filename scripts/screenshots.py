#!/usr/bin/env python3
"""Render each dialog and the status window (after a few seconds of real traffic from the tiny CPU
model) offscreen to PNG files.

Usage: QT_QPA_PLATFORM=offscreen python scripts/screenshots.py OUT_DIR

The tray menu and the window-first mode are taken from the real app on an X server instead (menus
are popups that only a real screen shows as they are): ``bash scripts/ui/drive_app.sh``.

The Ollama metadata shown in the add-model dialog comes from a loopback server that speaks the
registry protocol (the one the tests use), so nothing is downloaded.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


def main() -> int:
    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        print(__doc__)
        return 0 if sys.argv[1:] in (["-h"], ["--help"]) else 2
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="exllama-tray-shots-"))
    model_dir = work / "tiny"
    subprocess.check_call([sys.executable, str(ROOT / "scripts" / "make_tiny_model.py"), str(model_dir)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    import keyring
    import openai
    import qasync
    from keyring.backends.null import Keyring as NullKeyring
    from PySide6.QtWidgets import QApplication

    from app.engine.catalog.registry import Registry
    from app.server_config import ServerSettingsStore
    from app.ui.controller import AppController
    from app.ui.tray import TrayApp
    from tests.fake_ollama import CHATML_OLLAMA, FakeModel, FakeRegistry

    keyring.set_keyring(NullKeyring())  # never touch the user's real keyring from a script
    fake = FakeRegistry().start()
    fake.add(("library", "tinychat", "latest"), FakeModel(
        CHATML_OLLAMA, system="You are a tiny test model.", license="MIT License (example)",
        params={"stop": ["<|im_end|>", "<|im_start|>"], "temperature": 0.7, "num_ctx": 2048}))
    app = QApplication.instance() or QApplication(sys.argv)
    app.setQuitOnLastWindowClosed(False)
    loop = qasync.QEventLoop(app)
    asyncio.set_event_loop(loop)
    controller = AppController(Registry(work / "models.json"), ServerSettingsStore(work / "server.json"), port=0)
    tray = TrayApp(controller, registry_url=fake.url)

    def shot(widget, name: str) -> None:
        if widget.size().width() < 200:
            widget.adjustSize()
        widget.grab().save(str(out / name))
        print(f"wrote {out / name}")

    async def scenario() -> None:
        await controller.start()
        dlg = tray.open_add_model()
        dlg.folder.setText(str(model_dir))
        dlg.ollama.setCurrentText("tinychat")
        await dlg.start_fetch()
        dlg.name.setText("tinychat")
        dlg.resize(720, 640)
        shot(dlg, "add-model.png")
        dlg.save()
        tray.rebuild_models_menu()
        await controller.load("tinychat")
        tray.refresh()
        client = openai.OpenAI(base_url=controller.url, api_key="x", max_retries=0, timeout=60)

        def traffic(i: int) -> None:
            end = time.monotonic() + 6
            while time.monotonic() < end:
                for _ in client.chat.completions.create(
                        model="tinychat", messages=[{"role": "user", "content": f"hello {i}"}], max_tokens=40 + i * 7,
                        stream=True, logit_bias={"2": -100, "5": -100}):
                    pass

        tray.show_status()
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            await asyncio.gather(*(loop.run_in_executor(pool, traffic, i) for i in range(4)))
        await asyncio.sleep(2.2)
        tray.status_window.refresh()
        tray.status_window.resize(1100, 760)
        shot(tray.status_window, "status.png")
        sdlg = tray.open_model_settings("tinychat:latest")
        sdlg.tabs.setCurrentIndex(2)
        sdlg.resize(720, 700)
        shot(sdlg, "model-settings.png")
        sdlg.tabs.setCurrentIndex(1)
        shot(sdlg, "model-settings-sampling.png")
        shot(tray.open_server_settings(), "server-settings.png")
        await controller.stop()

    with loop:
        loop.run_until_complete(scenario())
    fake.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
