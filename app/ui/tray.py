"""The tray icon, its menu, and the windows it opens."""

from __future__ import annotations

import asyncio
import logging

from PySide6.QtCore import QObject, QUrl
from PySide6.QtGui import QAction, QDesktopServices, QGuiApplication
from PySide6.QtWidgets import QMenu, QMessageBox, QSystemTrayIcon

from app.engine.catalog.registry import RegistryError, display_name
from app.ui.add_model_dialog import AddModelDialog
from app.ui.bridge import EngineBridge
from app.ui.controller import AppController, log_folder
from app.ui.icons import state_icon
from app.ui.model_settings_dialog import ModelSettingsDialog
from app.ui.server_settings_dialog import ServerSettingsDialog
from app.ui.status_window import StatusWindow

log = logging.getLogger(__name__)


class TrayApp(QObject):
    def __init__(self, controller: AppController, *, registry_url: str | None = None) -> None:
        super().__init__()
        self.controller = controller
        self.registry_url = registry_url
        self.bridge = EngineBridge(controller.engine, self)
        self.menu = QMenu()
        self.models_menu = self.menu.addMenu("Models")
        self.actions: dict[str, QAction] = {}
        for label, slot in (("Add model…", self.open_add_model), ("Status…", self.show_status),
                            ("Copy API URL", self.copy_url), ("Server settings…", self.open_server_settings),
                            ("Open log folder", self.open_log_folder)):
            self.actions[label] = self.menu.addAction(label, slot)
        self.menu.addSeparator()
        self.actions["Quit"] = self.menu.addAction("Quit", self.quit)
        self.status_window = StatusWindow(controller.engine, lambda: controller.url)
        self.tray: QSystemTrayIcon | None = None
        if QSystemTrayIcon.isSystemTrayAvailable():
            self.tray = QSystemTrayIcon(state_icon("idle"))
            self.tray.setContextMenu(self.menu)
            self.tray.activated.connect(self._activated)
        self.bridge.statusChanged.connect(self.refresh)
        self.bridge.registryChanged.connect(self.rebuild_models_menu)
        self.bridge.sampled.connect(self.on_sample)
        self.dialogs: list[object] = []
        self.quitting: asyncio.Future | None = None
        self._icon_key: tuple | None = None
        self._idle_samples = 0
        self.tooltip = ""
        self.icon_state = "idle"
        self.rebuild_models_menu()
        self.refresh()

    # -- showing ---------------------------------------------------------------------------
    def show(self) -> None:
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
        marks = tuple((m.name, m.state, round(m.progress, 2)) for m in self.controller.engine.model_states())
        if marks != getattr(self, "_marks", None):
            self._marks = marks
            self._mark_models(state.loaded)

    # -- models menu ----------------------------------------------------------------------
    def rebuild_models_menu(self) -> None:
        self.models_menu.clear()
        self.model_actions: dict[str, dict[str, QAction]] = {}
        try:
            names = self.controller.registry.names()
        except RegistryError as exc:
            broken = self.models_menu.addAction(f"models.json is broken: {str(exc)[:80]}…")
            broken.setEnabled(False)
            return
        if not names:
            empty = self.models_menu.addAction("No models yet — Add model…")
            empty.triggered.connect(self.open_add_model)
            return
        for key in names:
            sub = self.models_menu.addMenu(display_name(key))
            acts = {
                "Load": sub.addAction("Load", lambda k=key: self.controller.spawn(self.controller.load(k))),
                "Unload": sub.addAction("Unload", lambda k=key: self.controller.spawn(self.controller.unload(k))),
                "Settings…": sub.addAction("Settings…", lambda k=key: self.open_model_settings(k)),
            }
            acts["menu"] = sub.menuAction()
            self.model_actions[key] = acts
        self._mark_models(self.controller.tray_state().loaded)

    def _mark_models(self, loaded: list[str]) -> None:
        states = {s.name: s for s in self.controller.engine.model_states()}
        for key, acts in getattr(self, "model_actions", {}).items():
            s = states.get(key)
            label = display_name(key)
            if s is not None and s.state == "ready":
                label = "● " + label
            elif s is not None and s.state == "loading":
                label = f"◌ {label} ({s.progress * 100:.0f}%)"
            acts["menu"].setText(label)
            acts["Load"].setEnabled(s is None)
            acts["Unload"].setEnabled(s is not None and s.state == "ready")

    # -- dialogs --------------------------------------------------------------------------
    def open_add_model(self) -> AddModelDialog:
        dlg = AddModelDialog(self.controller.registry, registry_url=self.registry_url)
        dlg.modelAdded.connect(lambda _: self.bridge.notify_registry_changed())
        self._keep(dlg)
        dlg.show()
        return dlg

    def open_model_settings(self, key: str) -> ModelSettingsDialog | None:
        try:
            dlg = ModelSettingsDialog(self.controller.engine, key)
        except RegistryError as exc:
            QMessageBox.warning(None, "ExLlama Tray", str(exc))
            return None
        dlg.saved.connect(lambda k: self._after_settings_saved(dlg, k))
        self._keep(dlg)
        dlg.show()
        return dlg

    def _after_settings_saved(self, dlg: ModelSettingsDialog, key: str) -> None:
        self.bridge.notify_registry_changed()
        if dlg.needs_reload and self.tray is not None:
            self.tray.showMessage("ExLlama Tray", dlg.reload_note.text())

    def open_server_settings(self) -> ServerSettingsDialog:
        dlg = ServerSettingsDialog(self.controller.settings)
        dlg.accepted.connect(lambda: self.controller.spawn(self._apply_server_settings(dlg)))
        self._keep(dlg)
        dlg.show()
        return dlg

    async def _apply_server_settings(self, dlg: ServerSettingsDialog) -> None:
        try:
            await self.controller.apply_server_settings(dlg.result_settings())
        except (OSError, ValueError) as exc:
            QMessageBox.warning(None, "ExLlama Tray", f"The server settings were not applied: {exc}")
        self.refresh()

    def _keep(self, dlg: object) -> None:
        self.dialogs = [d for d in self.dialogs if getattr(d, "isVisible", lambda: False)()]
        self.dialogs.append(dlg)

    # -- other actions --------------------------------------------------------------------
    def copy_url(self) -> None:
        QGuiApplication.clipboard().setText(self.controller.url)

    def open_log_folder(self) -> None:
        QDesktopServices.openUrl(QUrl.fromLocalFile(str(log_folder())))

    def quit(self) -> None:
        if self.quitting is None:
            self.quitting = self.controller.spawn(self._quit())

    async def _quit(self) -> None:
        await self.controller.stop()
        if self.tray is not None:
            self.tray.hide()
        self.status_window.close()
        from PySide6.QtWidgets import QApplication

        QApplication.instance().quit()
