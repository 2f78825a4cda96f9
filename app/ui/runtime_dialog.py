"""Install runtime…: the offer to install a backend's runtime (torch and its library), with the install's
progress, its cancel and its error.

The install runs as an asyncio task of the app (``spawn``), in a thread of the runtime service; its
progress comes back on the event loop. Closing the dialog while it runs cancels it (pip is killed; a later
install resumes). The dialog deletes itself when closed; the task never touches it after that.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (QComboBox, QDialog, QDialogButtonBox, QLabel, QProgressBar, QPushButton,
                               QVBoxLayout)

from app.engine.facade import RuntimeService

log = logging.getLogger(__name__)
BACKENDS = ("transformers", "exllamav2", "exllamav3")
SIZES = {"transformers": "about 1 GB with the CPU build of torch", "exllamav2": "several GB (torch with CUDA)",
         "exllamav3": "several GB (torch with CUDA)"}


class RuntimeDialog(QDialog):
    """Offer ``backend``'s runtime; ``reason`` (why it is offered) heads the text. ``installed(backend)``
    is emitted once it is installed."""

    installed = Signal(str)

    def __init__(self, service: RuntimeService, backend: str, spawn: Callable[[Any], asyncio.Task],
                 reason: str | None = None) -> None:
        super().__init__()
        self.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        self.setWindowTitle("Install runtime")
        self.setMinimumWidth(520)
        self._service, self._spawn = service, spawn
        self._task: asyncio.Task | None = None
        self._closed = False
        layout = QVBoxLayout(self)
        self.text = QLabel(self)
        self.text.setWordWrap(True)
        layout.addWidget(self.text)
        self.backend = QComboBox(self)
        self.backend.addItems(BACKENDS)
        self.backend.setCurrentText(backend)
        self.backend.currentTextChanged.connect(self._describe)
        layout.addWidget(self.backend)
        self.progress = QProgressBar(self)
        self.progress.setRange(0, 1000)
        self.progress.setVisible(False)
        layout.addWidget(self.progress)
        self.step = QLabel(self)
        self.step.setWordWrap(True)
        self.step.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        layout.addWidget(self.step)
        self.buttons = QDialogButtonBox(self)
        self.install_button = QPushButton("Install", self)
        self.buttons.addButton(self.install_button, QDialogButtonBox.ButtonRole.AcceptRole)
        self.close_button = self.buttons.addButton(QDialogButtonBox.StandardButton.Close)
        self.install_button.setDefault(True)
        self.install_button.clicked.connect(self.start)
        self.close_button.clicked.connect(self.reject)
        layout.addWidget(self.buttons)
        self._reason = reason
        self._describe(backend)

    def _describe(self, backend: str) -> None:
        head = f"{self._reason}\n\n" if self._reason else ""
        self.text.setText(f"{head}The {backend} backend's runtime (torch and {backend}, {SIZES[backend]}) is "
                          f"installed from the package index into {self._service.runtime.root}. Models of that "
                          "backend then run on it. An install that is stopped resumes where it stopped.")

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        if self.running:
            return
        backend = self.backend.currentText()
        self.install_button.setEnabled(False)
        self.backend.setEnabled(False)
        self.close_button.setText("Cancel")
        self.progress.setVisible(True)
        self.progress.setValue(0)
        self.step.setText("starting…")
        self._fit()
        self._task = self._spawn(self._install(backend))

    async def _install(self, backend: str) -> None:
        try:
            await self._service.install(backend, self._on_progress)
        except Exception as exc:  # noqa: BLE001 - RuntimeInstallError, InstallCancelled, or another install running
            log.warning("runtime install: %s", exc)
            self._finished(False, str(exc))
        else:
            self._finished(True, f"The {backend} runtime is installed. Load the model again.")
            if not self._closed:
                self.installed.emit(backend)

    def _on_progress(self, fraction: float, message: str) -> None:
        if not self._closed:
            self.progress.setValue(int(fraction * 1000))
            self.step.setText(message if len(message) <= 110 else message[:109] + "…")
            self._fit()

    def _fit(self) -> None:
        """Grow to the height the wrapped texts need at this width (Qt does not grow a top-level window)."""
        self.layout().activate()
        needed = self.layout().totalHeightForWidth(self.width())
        if needed > self.height():
            self.resize(self.width(), needed)

    def _finished(self, ok: bool, message: str) -> None:
        if self._closed:
            return
        self.step.setText(message)
        self._fit()
        self.close_button.setText("Close")
        self.install_button.setEnabled(not ok)
        self.install_button.setText("Retry" if not ok else "Install")
        self.backend.setEnabled(not ok)
        if ok:
            self.progress.setValue(1000)

    def done(self, result: int) -> None:
        """Close, Cancel, Escape, the window's close button and the app's shutdown all end here."""
        self._closed = True
        if self.running:
            self._service.cancel()  # pip is killed; the task ends with InstallCancelled
        super().done(result)
