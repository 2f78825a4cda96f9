"""Start the tray app: one qasync event loop runs Qt, the aiohttp server and the engine's async side."""

from __future__ import annotations

import asyncio
import getpass
import logging
import logging.handlers
import os
import signal
import sys
import time
from typing import Any

from app.engine.catalog.registry import Registry, RegistryError

log = logging.getLogger(__name__)
STARTED = time.perf_counter()


def instance_name() -> str:
    return f"exllama-tray-{getpass.getuser()}"


def setup_file_logging() -> None:
    from app.paths import log_dir

    handler = logging.handlers.RotatingFileHandler(log_dir() / "exllama-tray.log", maxBytes=5_000_000,
                                                   backupCount=3, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)


def make_application() -> Any:
    """The QApplication, named and with an icon for every window; closing a window quits nothing."""
    from PySide6.QtWidgets import QApplication

    from app.ui.icons import state_icon

    app = QApplication.instance() or QApplication(sys.argv)
    app.setApplicationName("exllama-tray")  # the window class, and the name of its settings
    app.setApplicationDisplayName("ExLlama Tray")  # in every window's title bar
    app.setDesktopFileName("exllama-tray")
    app.setWindowIcon(state_icon("ready"))  # every window and dialog, not a blank icon
    app.setQuitOnLastWindowClosed(False)
    return app


def bring_forward_running_app() -> bool:
    """A second start brings the running app's status window forward instead of starting another server."""
    from PySide6.QtNetwork import QLocalSocket

    probe = QLocalSocket()
    probe.connectToServer(instance_name())
    if not probe.waitForConnected(300):
        return False
    probe.write(b"show\n")
    probe.flush()
    probe.waitForBytesWritten(1000)
    return True


def launch_tray(registry: Registry, port: int | None = None) -> int:
    import qasync
    from PySide6.QtCore import QCoreApplication, QEvent
    from PySide6.QtNetwork import QLocalServer

    from app.paths import config_dir
    from app.server_config import ServerSettingsStore
    from app.ui.controller import AppController
    from app.ui.tray import TrayApp

    app = make_application()
    if bring_forward_running_app():
        print("ExLlama Tray is already running; its status window was brought forward.", file=sys.stderr)
        return 0
    QLocalServer.removeServer(instance_name())
    server = QLocalServer(app)
    server.listen(instance_name())

    setup_file_logging()
    loop = qasync.QEventLoop(app)
    asyncio.set_event_loop(loop)
    controller = AppController(registry, ServerSettingsStore(config_dir() / "server.json"), port=port)
    tray = TrayApp(controller, registry_url=os.environ.get("EXLLAMA_TRAY_OLLAMA_REGISTRY"), parent=app)

    def on_connection() -> None:
        conn = server.nextPendingConnection()
        if conn is not None:
            conn.readyRead.connect(tray.show_status)

    server.newConnection.connect(on_connection)
    signal.signal(signal.SIGINT, lambda *_: tray.quit())
    with loop:
        loop.run_until_complete(controller.start())
        tray.show()
        # warnings are shown, not exec'd: a modal dialog's own event loop would stall the qasync loop
        try:
            registry.check_on_start()
        except RegistryError as exc:
            tray.warn(f"{exc}\n\nThe app runs without models until it is fixed.")
        if controller.listen_error:
            tray.warn(f"The API server could not start: {controller.listen_error}\n"
                      "Change the port in Server settings…")
        elif controller.ollama_error:
            tray.warn(controller.ollama_error)
        ready = time.perf_counter() - STARTED
        log.info("tray ready in %.2f s; API at %s", ready, controller.url)
        if os.environ.get("EXLLAMA_TRAY_REPORT_READY"):
            print(f"READY {ready:.3f}", flush=True)
        loop.run_forever()  # until Quit: TrayApp.shutdown has asked Qt to delete the windows
    server.close()
    QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)  # delete them now, not at exit
    log.info("the event loop has ended: exiting")
    return 0
