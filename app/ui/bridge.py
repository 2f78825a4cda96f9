"""Turns the engine's plain callbacks into Qt signals (the engine never touches Qt)."""

from __future__ import annotations

from PySide6.QtCore import QObject, Signal

from app.engine.facade import Engine


class EngineBridge(QObject):
    #: a model started/finished loading or unloading
    statusChanged = Signal()
    #: a metrics sample was taken (once a second)
    sampled = Signal()
    #: models.json changed (added/removed/edited models)
    registryChanged = Signal()

    def __init__(self, engine: Engine, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.engine = engine
        self._registry_stamp = self._stamp()
        self._attached = True
        engine.add_listener(self._on_status)
        engine.add_sample_listener(self._on_sample)

    def detach(self) -> None:
        """Stop listening to the engine (the engine outlives the UI: its callbacks must not reach a
        deleted bridge). Called by the tray's shutdown; safe to call twice."""
        if self._attached:
            self._attached = False
            self.engine.remove_listener(self._on_status)
            self.engine.remove_sample_listener(self._on_sample)

    def _stamp(self) -> object:
        try:
            st = self.engine.registry.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def _on_status(self) -> None:
        self.statusChanged.emit()

    def _on_sample(self) -> None:
        stamp = self._stamp()
        if stamp != self._registry_stamp:
            self._registry_stamp = stamp
            self.registryChanged.emit()
        self.sampled.emit()

    def notify_registry_changed(self) -> None:
        self._registry_stamp = self._stamp()
        self.registryChanged.emit()
