"""Add-model dialog: pick a folder (validated on the spot), an Ollama library entry (fetched and shown
before saving), a name and optional overrides. Saving goes through the registry."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import get_args

from pydantic import ValidationError

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QComboBox, QDialog, QDialogButtonBox, QFileDialog, QFormLayout, QHBoxLayout, QLabel, QLineEdit,
    QPlainTextEdit, QProgressBar, QPushButton, QVBoxLayout, QWidget,
)

from app.engine.catalog.model_folder import ModelFolderError, ModelInfo, inspect_model_folder
from app.engine.catalog.ollama_client import OllamaError, OllamaRegistryClient
from app.engine.catalog.ollama_names import InvalidName, parse_name
from app.engine.catalog.add_model import add_model
from app.engine.catalog.registry import OllamaMetadata, Registry, RegistryError, normalize_name
from app.engine.settings.schema import CacheType, Settings
from app.resources import ollama_suggestions

log = logging.getLogger(__name__)
ERROR_STYLE = "color: #b91c1c;"


class AddModelDialog(QDialog):
    #: emitted with the registered name after a successful save
    modelAdded = Signal(str)

    def __init__(self, registry: Registry, *, registry_url: str | None = None, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        self.setWindowTitle("Add model")
        self.setMinimumWidth(620)
        self.registry = registry
        self.client = OllamaRegistryClient(registry_url)
        self.info: ModelInfo | None = None
        self.metadata: OllamaMetadata | None = None
        self._fetch_task: asyncio.Task | None = None
        self._closed = False

        row = self._folder_row()
        orow = self._ollama_row()
        self.name = QLineEdit()
        self.name.setPlaceholderText("name[:tag] used by clients, e.g. mistral:7b")
        self.context = QLineEdit()
        self.context.setPlaceholderText("model default")
        self.cache = QComboBox()
        self.cache.addItems(["(default)", *get_args(CacheType)])
        self.error = QLabel("")
        self.error.setStyleSheet(ERROR_STYLE)
        self.error.setWordWrap(True)

        form = QFormLayout()
        form.addRow("Model folder", row)
        form.addRow("", self.folder_info)
        form.addRow("Ollama library", orow)
        form.addRow("", self.progress)
        form.addRow("", self.fetch_status)
        form.addRow("Registry says", self.preview)
        form.addRow("Name", self.name)
        form.addRow("Context length", self.context)
        form.addRow("Cache type", self.cache)
        self.buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Save | QDialogButtonBox.StandardButton.Cancel)
        self.buttons.accepted.connect(self.save)
        self.buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.error)
        layout.addWidget(self.buttons)
        self.folder.textChanged.connect(self.validate_folder)
        self.ollama.currentTextChanged.connect(self._ollama_changed)
        self.validate_folder()

    def _folder_row(self) -> QHBoxLayout:
        """The folder field with its Browse button (checked on the spot)."""
        self.folder = QLineEdit()
        self.folder.setPlaceholderText("Folder with config.json and *.safetensors (EXL2, GPTQ or FP16)")
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse)
        row = QHBoxLayout()
        row.addWidget(self.folder, 1)
        row.addWidget(browse)
        self.folder_info = QLabel("")
        self.folder_info.setWordWrap(True)
        return row

    def _ollama_row(self) -> QHBoxLayout:
        """The Ollama library entry with Fetch, its progress and the preview of what the registry says."""
        self.ollama = QComboBox()
        self.ollama.setEditable(True)
        self.ollama.addItem("")
        self.ollama.addItems(ollama_suggestions())
        self.ollama.lineEdit().setPlaceholderText("Ollama library entry, e.g. mistral:7b (optional)")
        self.fetch_button = QPushButton("Fetch")
        self.fetch_button.clicked.connect(self.start_fetch)
        orow = QHBoxLayout()
        orow.addWidget(self.ollama, 1)
        orow.addWidget(self.fetch_button)
        self.progress = QProgressBar()
        self.progress.setVisible(False)
        self.fetch_status = QLabel("")
        self.fetch_status.setWordWrap(True)
        self.preview = QPlainTextEdit()
        self.preview.setReadOnly(True)
        self.preview.setPlaceholderText("What the Ollama registry returns (template, system prompt, parameters, "
                                        "license) shows here before you save.")
        self.preview.setMinimumHeight(160)
        return orow

    def done(self, result: int) -> None:
        """Closing (Save, Cancel, Esc, the window's close button) stops a fetch in progress: the
        dialog is deleted once closed, and the fetch must not write to its widgets afterwards."""
        self._closed = True
        if self._fetch_task is not None and not self._fetch_task.done():
            self._fetch_task.cancel()
        super().done(result)

    # -- folder -----------------------------------------------------------------------
    def _browse(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Choose the model folder", self.folder.text())
        if folder:
            self.folder.setText(folder)

    def validate_folder(self) -> bool:
        text = self.folder.text().strip()
        self.info = None
        if not text:
            self.folder_info.setText("")
            return False
        try:
            self.info = inspect_model_folder(text)
        except ModelFolderError as exc:
            self.folder_info.setStyleSheet(ERROR_STYLE)
            self.folder_info.setText(str(exc))
            return False
        self.folder_info.setStyleSheet("")
        self.folder_info.setText(self.info.summary())
        if not self.name.text():
            self.name.setPlaceholderText(Path(self.info.path).name.lower())
        return True

    # -- Ollama ----------------------------------------------------------------------
    def _ollama_changed(self, text: str) -> None:
        self.metadata = None
        self.preview.clear()
        self.fetch_status.setText("")
        if text and not self.name.text():
            self.name.setPlaceholderText(text.strip())

    def start_fetch(self) -> asyncio.Task | None:
        name = self.ollama.currentText().strip()
        if not name:
            self.fetch_status.setStyleSheet(ERROR_STYLE)
            self.fetch_status.setText("Type or pick an Ollama library entry first.")
            return None
        try:
            parse_name(name)
        except InvalidName as exc:
            self.fetch_status.setStyleSheet(ERROR_STYLE)
            self.fetch_status.setText(str(exc))
            return None
        self.fetch_button.setEnabled(False)
        self.progress.setVisible(True)
        self.progress.setValue(0)
        self.fetch_status.setStyleSheet("")
        self.fetch_status.setText(f"Fetching {name}…")
        self._fetch_task = asyncio.ensure_future(self._fetch(name))
        return self._fetch_task

    async def _fetch(self, name: str) -> None:
        def progress(what: str, done: int, total: int) -> None:
            if self._closed:
                return
            self.progress.setMaximum(max(total, 1))
            self.progress.setValue(done)
            self.fetch_status.setText(what)

        error = ""
        try:
            metadata = await self.client.fetch(name, progress)
        except OllamaError as exc:
            metadata, error = None, str(exc)
        finally:
            if not self._closed:
                self.fetch_button.setEnabled(True)
                self.progress.setVisible(False)
        if self._closed:  # closed while fetching: its widgets are gone
            return
        self.metadata = metadata
        if metadata is None:
            self.fetch_status.setStyleSheet(ERROR_STYLE)
            self.fetch_status.setText(error)
        else:
            self.fetch_status.setText(f"Fetched {metadata.name}")
            self.preview.setPlainText(describe_metadata(metadata))

    # -- save ------------------------------------------------------------------------
    def chosen_name(self) -> str:
        return (self.name.text().strip() or self.name.placeholderText().strip()
                or self.ollama.currentText().strip())

    def save(self) -> bool:
        self.error.setText("")
        if not self.validate_folder() or self.info is None:
            self.error.setText(self.folder_info.text() or "Choose a model folder first.")
            return False
        if self.ollama.currentText().strip() and self.metadata is None:
            self.error.setText("Press Fetch to get the Ollama metadata first (or clear the Ollama field).")
            return False
        settings = Settings()
        context = self.context.text().strip()
        try:
            if context:
                settings.context_length = context  # type: ignore[assignment]  # pydantic parses the text
            if self.cache.currentIndex() > 0:
                settings.cache_type = self.cache.currentText()  # type: ignore[assignment]
        except ValidationError as exc:  # the cache type comes from the list: only the typed context can be wrong
            message = exc.errors()[0].get("msg", "invalid") if exc.errors() else str(exc)
            self.error.setText(f"Context length: {message} (you typed {context!r})")
            return False
        name = self.chosen_name()
        try:
            key = add_model(self.registry, name, self.info.path, settings=settings, ollama=self.metadata,
                            info=self.info).key
        except RegistryError as exc:
            self.error.setText(str(exc))
            return False
        self.modelAdded.emit(normalize_name(key))
        self.accept()
        return True


def describe_metadata(meta: OllamaMetadata) -> str:
    parts = [f"# {meta.name}"]
    if meta.system:
        parts.append(f"## System prompt\n{meta.system}")
    if meta.params:
        parts.append("## Parameters\n" + json.dumps(meta.params, indent=2))
    if meta.template:
        parts.append(f"## Template\n{meta.template}")
    if meta.messages:
        parts.append("## Messages\n" + json.dumps(meta.messages, indent=2))
    if meta.license:
        first = meta.license.strip().splitlines()[:8]
        parts.append("## License (start)\n" + "\n".join(first))
    return "\n\n".join(parts)
