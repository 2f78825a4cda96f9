"""The tray menu: the state on its first line, the models one level down, then the app's actions.

::

    Serving at http://127.0.0.1:8000/v1 — model tiny ready on exllamav3, continuous batching (16)  (disabled)
    ─────────
    ● tiny        ▸ Load / Unload / Settings…
      other       ▸ Load / Unload / Settings…
    ─────────
    Add model… / Server settings… / Status window / Copy API URL / Open log folder / Install runtime… /
    Start on login (checkable) / Add to applications menu (freedesktop desktops)
    ─────────
    Quit

The model submenus are also the entries of :attr:`TrayMenu.models_menu`, the "Models" menu of the
window-first mode's menu bar (one set of model actions, wherever it is shown). Lifetimes: the menu
is a top-level widget owned by the :class:`~app.ui.tray.TrayApp`, which deletes it; the model
submenus and the models menu are its Qt children.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from PySide6.QtGui import QAction
from PySide6.QtWidgets import QMenu

from app.engine.catalog.registry import RegistryError, display_name
from app.engine.facade import ModelState

#: the app's actions, in menu order (label, TrayApp method name); "Quit" comes last, after a separator
APP_ACTIONS = (("Add model…", "open_add_model"), ("Server settings…", "open_server_settings"),
               ("Status window", "show_status"), ("Copy API URL", "copy_url"), ("Open log folder", "open_log_folder"),
               ("Install runtime…", "open_install_runtime"), ("Start on login", "toggle_start_on_login"),
               ("Add to applications menu", "install_desktop_entry"))


@dataclass(frozen=True)
class MenuState:
    """What the menu's first line says."""

    url: str
    listening: bool
    listen_error: str | None
    models: list[ModelState]
    error: str | None


def status_line(state: MenuState) -> str:
    """E.g. "Serving at http://127.0.0.1:8000/v1 — model tiny ready on exllamav3, continuous batching (16)"."""
    if not state.listening:
        head = f"API server not running: {state.listen_error}" if state.listen_error else "Starting the API server"
    else:
        head = f"Serving at {state.url}"
    parts = []
    for m in state.models:
        name = display_name(m.name)
        if m.state == "loading":
            parts.append(f"loading {name} {m.progress * 100:.0f}%")
        elif m.state == "ready":
            busy = f", {m.active_jobs} running" if m.active_jobs else ""
            on = f" on {m.backend}" if m.backend else ""
            parts.append(f"model {name} ready{on}, {m.batching_summary}{busy}")
        else:
            parts.append(f"{name} {m.state}")
    if not parts:
        parts.append(f"error: {state.error}" if state.error else "no model loaded")
    line = f"{head} — {'; '.join(parts)}"
    return line if len(line) <= 140 else line[:139] + "…"


class TrayMenu:
    """The menu and its actions; ``on_model(verb, key)`` runs a model's Load / Unload / Settings…."""

    def __init__(self, actions: dict[str, Callable[[], object]], on_model: Callable[[str, str], None]) -> None:
        self.menu = QMenu()
        self.menu.setToolTipsVisible(True)
        self.status = self.menu.addAction("Starting…")
        self.status.setEnabled(False)
        self.menu.addSeparator()
        #: the models section ends at this separator (model entries are inserted before it)
        self._models_end = self.menu.addSeparator()
        self.models_menu = QMenu("Models", self.menu)
        self.actions: dict[str, QAction] = {}
        for label, _ in APP_ACTIONS:
            self.actions[label] = self.menu.addAction(label, actions[label])
        self.actions["Start on login"].setCheckable(True)  # checked by the TrayApp from app.desktop.autostart
        self.menu.addSeparator()
        self.actions["Quit"] = self.menu.addAction("Quit", actions["Quit"])
        self._on_model = on_model
        self._open_add = actions["Add model…"]
        self.model_actions: dict[str, dict[str, QAction]] = {}
        self._entries: list[QAction] = []  # what the models section holds now (menus and placeholders)
        self._submenus: list[QMenu] = []

    def set_status(self, state: MenuState) -> None:
        text = status_line(state)
        if text != self.status.text():
            self.status.setText(text)
            self.status.setToolTip(text)

    # -- models -----------------------------------------------------------------------------
    def rebuild(self, names: list[str] | RegistryError) -> None:
        """One entry per registered model (or why there is none), in both menus."""
        self._clear()
        if isinstance(names, RegistryError):
            self._placeholder(f"models.json is broken: {str(names)[:80]}…", enabled=False)
            return
        if not names:
            self._placeholder("No models yet — Add model…", enabled=True)
            return
        for key in names:
            sub = QMenu(display_name(key), self.menu)
            sub.triggered.connect(self._triggered)
            acts = {}
            for label, verb in (("Load", "load"), ("Unload", "unload"), ("Settings…", "settings")):
                acts[label] = sub.addAction(label)
                acts[label].setData((verb, key))
            acts["menu"] = sub.menuAction()
            self.menu.insertAction(self._models_end, acts["menu"])
            self.models_menu.addAction(acts["menu"])
            self._entries.append(acts["menu"])
            self._submenus.append(sub)
            self.model_actions[key] = acts

    def _placeholder(self, text: str, *, enabled: bool) -> None:
        action = QAction(text, self.menu)
        action.setEnabled(enabled)
        action.triggered.connect(self._open_add)
        self.menu.insertAction(self._models_end, action)
        self.models_menu.addAction(action)
        self._entries.append(action)

    def _clear(self) -> None:
        for action in self._entries:
            self.menu.removeAction(action)
            self.models_menu.removeAction(action)
            if action.menu() is None:
                action.deleteLater()
        for sub in self._submenus:
            sub.deleteLater()  # with its actions and its menu action
        self._entries, self._submenus, self.model_actions = [], [], {}

    def _triggered(self, action: QAction) -> None:
        data = action.data()
        if isinstance(data, tuple) and len(data) == 2:
            self._on_model(*data)

    def mark(self, states: list[ModelState]) -> None:
        """● before a loaded model, ◌ and its progress before a loading one; Load / Unload enabled as
        they apply."""
        by_name = {s.name: s for s in states}
        for key, acts in self.model_actions.items():
            s = by_name.get(key)
            label = display_name(key)
            if s is not None and s.state == "ready":
                label = "● " + display_name(key)
            elif s is not None and s.state == "loading":
                label = f"◌ {display_name(key)} ({s.progress * 100:.0f}%)"
            acts["menu"].setText(label)
            acts["Load"].setEnabled(s is None)
            acts["Unload"].setEnabled(s is not None and s.state == "ready")
