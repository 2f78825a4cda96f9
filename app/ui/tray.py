"""The tray icon, its menu, and the windows it opens.

Lifetimes: the :class:`TrayApp` is a child of the QApplication (Qt owns it). Its plain QObjects (the
engine bridge, the tray icon) are its Qt children. The top-level widgets it opens (the menu, the
status window, the dialogs) cannot have a QObject parent; the TrayApp holds them and deletes them in
:meth:`TrayApp.shutdown`, the one teardown path that Quit and the tests take. Dialogs delete
themselves when closed. Signals connect to bound methods only, so no closure keeps a widget alive
or reaches one that is gone, and Python's garbage collector never has a live Qt object to free.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import TypeVar

import shiboken6
from PySide6.QtCore import QCoreApplication, QObject, Qt, QUrl
from PySide6.QtGui import QAction, QDesktopServices, QGuiApplication
from PySide6.QtWidgets import QApplication, QDialog, QMenuBar, QMessageBox, QSystemTrayIcon

from app.engine.catalog.registry import RegistryError, display_name
from app.desktop import autostart, entries
from app.engine.facade import RUNTIMES, ModelNotFound
from app.server_config import ServerSettings
from app.ui.add_model_dialog import AddModelDialog
from app.ui.bridge import EngineBridge
from app.ui.controller import AppController, log_folder
from app.ui.icons import state_icon
from app.ui.model_settings_dialog import ModelSettingsDialog
from app.ui.runtime_dialog import RuntimeDialog
from app.ui.server_settings_dialog import ServerSettingsDialog
from app.ui.status_window import StatusWindow
from app.ui.tray_menu import APP_ACTIONS, MenuState, TrayMenu

log = logging.getLogger(__name__)
Dialog = TypeVar("Dialog", bound=QDialog)


class TrayApp(QObject):
    def __init__(self, controller: AppController, *, registry_url: str | None = None,
                 parent: QObject | None = None) -> None:
        super().__init__(parent if parent is not None else QCoreApplication.instance())
        self.controller = controller
        self.registry_url = registry_url
        self.bridge = EngineBridge(controller.engine, self)
        slots = {label: getattr(self, name) for label, name in APP_ACTIONS}
        self.tray_menu = TrayMenu({**slots, "Quit": self.quit}, self._model_action)
        self.menu = self.tray_menu.menu
        self.models_menu = self.tray_menu.models_menu  # the window-first mode's "Models" menu
        self.actions = self.tray_menu.actions
        self.actions["Start on login"].setChecked(autostart.is_enabled())
        self.actions["Add to applications menu"].setVisible(sys.platform.startswith("linux"))  # freedesktop only
        self._offered: set[str] = set()  # the backends whose runtime was offered (once per run)
        self.status_window = StatusWindow(controller.engine, lambda: controller.url)
        self.tray: QSystemTrayIcon | None = None
        if QSystemTrayIcon.isSystemTrayAvailable():
            self.tray = QSystemTrayIcon(state_icon("idle"), self)
            self.tray.setContextMenu(self.menu)
            self.tray.activated.connect(self._activated)
        #: no system tray on this desktop: the status window is the main window, with the menu in its bar
        self.window_first = self.tray is None
        if self.window_first:
            self._make_window_menu()
        self.bridge.statusChanged.connect(self.refresh)
        self.bridge.registryChanged.connect(self.rebuild_models_menu)
        self.bridge.sampled.connect(self.on_sample)
        #: the dialogs opened and not yet deleted (they delete themselves when closed)
        self.dialogs: list[QDialog] = []
        self.quitting: asyncio.Future | None = None
        self.shut_down = False
        self._icon_key: tuple | None = None
        self._marks: tuple | None = None
        self._idle_samples = 0
        self.tooltip = ""
        self.icon_state = "idle"
        self.rebuild_models_menu()
        self.refresh()

    def _make_window_menu(self) -> None:
        bar = QMenuBar()
        bar.addMenu(self.models_menu)  # the tray menu's model entries: one set of model actions
        app_menu = bar.addMenu("App")
        for label in ("Add model…", "Copy API URL", "Server settings…", "Open log folder", "Install runtime…",
                      "Start on login", "Add to applications menu"):
            app_menu.addAction(self.actions[label])
        app_menu.addSeparator()
        app_menu.addAction(self.actions["Quit"])
        self.status_window.set_menu_bar(bar)
        self.status_window.closedByUser.connect(self._main_window_closed)

    def _main_window_closed(self) -> None:
        """Closing the main window quits, as with any windowed app (no tray icon is left to reach)."""
        if not self.shut_down:
            self.quit()

    # -- showing ---------------------------------------------------------------------------
    def show(self) -> None:
        self.refresh()  # the listener has started (or failed) by now: the menu's first line says so
        if self.tray is not None:
            self.tray.show()
        else:  # no system tray here: the status window is the main window
            self.status_window.show()

    def _activated(self, reason: QSystemTrayIcon.ActivationReason) -> None:
        if reason in (QSystemTrayIcon.ActivationReason.Trigger, QSystemTrayIcon.ActivationReason.DoubleClick):
            self.show_status()

    def show_status(self) -> None:
        self.status_window.refresh()
        self.status_window.show()
        self.status_window.raise_()
        self.status_window.activateWindow()

    def on_sample(self) -> None:
        self.refresh()
        self._idle_samples = 0 if self.icon_state in ("generating", "loading") else self._idle_samples + 1
        # redraw the plots every second while work runs, every 10 s when idle (keeps idle CPU near 0)
        if self.status_window.isVisible() and self._idle_samples % 10 in (0, 1):
            self.status_window.refresh()

    def refresh(self) -> None:
        state = self.controller.tray_state()
        loaded = ", ".join(display_name(n) for n in state.loaded) or "no model loaded"
        tip = f"ExLlama Tray — {loaded}\n{state.tokens_per_s:.1f} tok/s\n{state.url}"
        if state.error:
            tip += f"\nerror: {state.error[:200]}"
        key = (state.state, None if state.progress is None else round(state.progress, 2))
        if key != self._icon_key:  # redraw only on change: idle must cost nothing
            self._icon_key = key
            icon = state_icon(state.state, state.progress)
            if self.tray is not None:
                self.tray.setIcon(icon)
            self.status_window.setWindowIcon(icon)
        if tip != self.tooltip and self.tray is not None:
            self.tray.setToolTip(tip)
        self.tooltip = tip
        self.icon_state = state.state
        self._offer_runtime()
        models = self.controller.engine.model_states()
        self.tray_menu.set_status(MenuState(state.url, self.controller.listener is not None,
                                            self.controller.listen_error, models, state.error))
        marks = tuple((m.name, m.state, round(m.progress, 2)) for m in models)
        if marks != self._marks:
            self._marks = marks
            self.tray_menu.mark(models)

    # -- models menu ----------------------------------------------------------------------
    @property
    def model_actions(self) -> dict[str, dict[str, QAction]]:
        """Per registered model: its "Load", "Unload", "Settings…" actions and its "menu" entry."""
        return self.tray_menu.model_actions

    def rebuild_models_menu(self) -> None:
        try:
            names: list[str] | RegistryError = self.controller.registry.names()
        except RegistryError as exc:
            names = exc
        self.tray_menu.rebuild(names)
        self.tray_menu.mark(self.controller.engine.model_states())

    def _model_action(self, verb: str, key: str) -> None:
        """A model's Load / Unload / Settings… was chosen."""
        if verb == "load":
            self.controller.spawn(self.controller.load(key))
        elif verb == "unload":
            self.controller.spawn(self.controller.unload(key))
        elif verb == "settings":
            self.open_model_settings(key)

    # -- dialogs --------------------------------------------------------------------------
    def open_add_model(self) -> AddModelDialog:
        dlg = AddModelDialog(self.controller.registry, registry_url=self.registry_url)
        dlg.modelAdded.connect(self.bridge.notify_registry_changed)
        return self._open(dlg)

    def open_model_settings(self, key: str) -> ModelSettingsDialog | None:
        try:
            dlg = ModelSettingsDialog(self.controller.engine, key)
        except (RegistryError, ModelNotFound) as exc:  # removed meanwhile, or models.json is broken
            self.warn(str(exc))
            return None
        dlg.saved.connect(self.bridge.notify_registry_changed)
        dlg.reloadNeeded.connect(self._show_reload_note)
        return self._open(dlg)

    def _show_reload_note(self, note: str) -> None:
        if self.tray is not None:
            self.tray.showMessage("ExLlama Tray", note)

    def open_server_settings(self) -> ServerSettingsDialog:
        dlg = ServerSettingsDialog(self.controller.settings)
        dlg.settingsChosen.connect(self._server_settings_chosen)
        return self._open(dlg)

    def _server_settings_chosen(self, settings: ServerSettings) -> None:
        self.controller.spawn(self._apply_server_settings(settings))

    async def _apply_server_settings(self, settings: ServerSettings) -> None:
        try:
            await self.controller.apply_server_settings(settings)
        except (OSError, ValueError) as exc:
            if not self.shut_down:
                self.warn(f"The server settings were not applied: {exc}\nThe server goes on as before.")
        else:
            if self.controller.ollama_error and not self.shut_down:
                self.warn(self.controller.ollama_error)
        if not self.shut_down:
            self.refresh()

    def warn(self, text: str) -> QMessageBox:
        """A warning shown without waiting for it: a modal exec() here would run a nested event loop
        inside the asyncio task that called it, and stall every other task of the qasync loop."""
        box = QMessageBox(QMessageBox.Icon.Warning, "ExLlama Tray", text, QMessageBox.StandardButton.Ok)
        box.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        box.setModal(False)
        return self._open(box)

    def _open(self, dlg: Dialog) -> Dialog:
        # the dialog has no parent and deletes itself when closed; until then this list holds it
        # (a Python-owned widget whose last reference goes is deleted on the spot)
        dlg.destroyed.connect(self._forget_deleted_dialogs)
        self.dialogs.append(dlg)
        dlg.show()
        return dlg

    def _forget_deleted_dialogs(self) -> None:
        self.dialogs = [d for d in self.dialogs if shiboken6.isValid(d)]

    # -- runtimes and start on login ---------------------------------------------------------
    def open_install_runtime(self, backend: str | None = None, reason: str | None = None) -> RuntimeDialog:
        """Install runtime…: ``backend`` (default: one a model lacked, else the machine's usual one)."""
        missing = RUNTIMES.missing()
        dlg = RuntimeDialog(RUNTIMES, backend or (missing[0] if missing else RUNTIMES.default_backend()),
                            self.controller.spawn, reason)
        dlg.installed.connect(self._runtime_installed)
        return self._open(dlg)

    def _offer_runtime(self) -> None:
        """A model failed for want of its backend: offer that runtime (once per backend and run)."""
        for backend in RUNTIMES.missing():
            if backend not in self._offered and RUNTIMES.installing is None:
                self._offered.add(backend)
                self.open_install_runtime(backend, f"A model failed to load: the {backend} backend is not installed.")

    def _runtime_installed(self, backend: str) -> None:
        if self.tray is not None:
            self.tray.showMessage("ExLlama Tray", f"The {backend} runtime is installed: load the model again.")

    def toggle_start_on_login(self) -> None:
        action = self.actions["Start on login"]
        try:
            autostart.set_enabled(action.isChecked())
        except OSError as exc:
            self.warn(f"Start on login could not be changed: {exc}")
        action.setChecked(autostart.is_enabled())

    def install_desktop_entry(self) -> None:
        """Add to applications menu: the .desktop entry and the icons (as ``install-desktop`` does)."""
        try:
            installed = entries.install_desktop()
        except OSError as exc:
            self.warn(f"The menu entry could not be written: {exc}")
            return
        if self.tray is not None:
            self.tray.showMessage("ExLlama Tray", f"Added to the applications menu: {installed.entry}")

    # -- other actions --------------------------------------------------------------------
    def copy_url(self) -> None:
        QGuiApplication.clipboard().setText(self.controller.url)

    def open_log_folder(self) -> None:
        QDesktopServices.openUrl(QUrl.fromLocalFile(str(log_folder())))

    def quit(self) -> None:
        if self.quitting is None:
            self.quitting = self.controller.spawn(self._quit())

    async def _quit(self) -> None:
        started = time.perf_counter()
        log.info("quitting")
        try:
            await self.controller.stop()
            log.info("engine and API server stopped in %.2f s", time.perf_counter() - started)
        finally:
            self.shutdown()
            QApplication.instance().quit()

    def shutdown(self) -> None:
        """Take the UI down (Quit and the tests come here; a second call does nothing): stop listening
        to the engine, close and delete the dialogs and the status window, hide and delete the tray
        icon and its menu, then this object. The deletions are deferred: they happen when control
        returns to the event loop (or at ``sendPostedEvents(None, QEvent.DeferredDelete)``). The
        engine itself is stopped by ``AppController.stop``, before this."""
        if self.shut_down:
            return
        self.shut_down = True
        self.bridge.detach()  # no engine callback reaches the UI from here on
        for dlg in self.dialogs:
            if shiboken6.isValid(dlg):
                dlg.close()  # an open dialog is rejected (an Ollama fetch in progress is cancelled)
                dlg.deleteLater()  # a hidden one is deleted too
        self.status_window.release()
        self.status_window.close()
        self.status_window.deleteLater()
        if self.tray is not None:
            self.tray.hide()
            self.tray.deleteLater()
        self.menu.deleteLater()  # with its submenus and actions
        self.deleteLater()
