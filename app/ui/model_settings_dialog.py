"""Per-model settings dialog, built from the settings model's declaration.

An empty field means "not set by you": the value comes from a lower layer, shown beside it with its
source (model default, Ollama, model folder, server). Invalid values are refused at the field.
"""

from __future__ import annotations

import logging
from typing import Any, get_args

from pydantic import ValidationError
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QComboBox, QDialog, QDialogButtonBox, QFormLayout, QLabel, QLineEdit, QPlainTextEdit, QTabWidget,
    QVBoxLayout, QWidget,
)

from app.engine.catalog.registry import RegistryError, normalize_name
from app.engine.facade import Engine, InvalidRequest, ModelNotFound
from app.engine.prompting.builders import ChatInput
from app.engine.settings.schema import GROUPS, LOAD_TIME_FIELDS, Settings, format_validation_error

log = logging.getLogger(__name__)
SOURCE_NAMES = {"default": "built-in default", "folder": "model folder", "ollama": "Ollama", "model": "you",
                "server": "server setting", "request": "request"}
MULTILINE = {"system_prompt", "custom_template", "stop"}
SAMPLE_CHAT = ChatInput([{"role": "user", "content": "Hello! Who are you?"},
                         {"role": "assistant", "content": "I am a helpful assistant."},
                         {"role": "user", "content": "Write a haiku about GPUs."}])
ERROR_STYLE = "color: #b91c1c;"


def literal_choices(name: str) -> list[str] | None:
    for arg in get_args(Settings.model_fields[name].annotation):
        values = get_args(arg)
        if values and all(isinstance(v, str) for v in values):
            return list(values)
    return None


class ModelSettingsDialog(QDialog):
    #: emitted with the model's key after a successful save
    saved = Signal(str)
    #: emitted with the note to show when the saved settings apply only after a reload
    reloadNeeded = Signal(str)

    def __init__(self, engine: Engine, name: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        self.engine = engine
        self.key = normalize_name(name)
        self.entry = engine.model_entry(self.key)
        self.setWindowTitle(f"Settings — {name}")
        self.setMinimumWidth(640)
        self.needs_reload = False
        self.inputs: dict[str, QWidget] = {}
        self.errors: dict[str, QLabel] = {}
        self.sources: dict[str, QLabel] = {}
        tabs = QTabWidget()
        self.tabs = tabs
        self.tab_of: dict[str, int] = {}
        layers = engine.layers(self.key)
        resolved = layers.resolve()
        user = self.entry.settings.set_fields()
        for group, names in GROUPS.items():
            page = QWidget()
            form = QFormLayout(page)
            for field in names:
                self.tab_of[field] = tabs.count()
                widget = self._make_input(field, user.get(field))
                self.inputs[field] = widget
                source = QLabel(self._source_text(field, resolved.values[field], resolved.source(field)))
                source.setStyleSheet("color: #6b7280;")
                source.setWordWrap(True)
                self.sources[field] = source
                err = QLabel("")
                err.setStyleSheet(ERROR_STYLE)
                err.setVisible(False)
                self.errors[field] = err
                box = QVBoxLayout()
                box.addWidget(widget)
                box.addWidget(source)
                box.addWidget(err)
                form.addRow(field.replace("_", " "), box)
            if group == "Prompt":
                self.preview = QPlainTextEdit()
                self.preview.setReadOnly(True)
                self.preview.setMinimumHeight(140)
                form.addRow("Preview", self.preview)
            tabs.addTab(page, group.replace("&", "&&"))  # a lone & would mark a shortcut key
        self.reload_note = QLabel("")
        self.reload_note.setWordWrap(True)
        self.status = QLabel("")
        self.status.setStyleSheet(ERROR_STYLE)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Save | QDialogButtonBox.StandardButton.Cancel)
        buttons.accepted.connect(self.save)
        buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addWidget(tabs)
        layout.addWidget(self.reload_note)
        layout.addWidget(self.status)
        layout.addWidget(buttons)
        self._watch_fields()
        self.update_preview()

    def _watch_fields(self) -> None:
        """The preview follows the prompt fields; a typed value is checked as it is typed, at its field."""
        for field in ("template", "system_prompt", "custom_template", "stop"):
            self._on_change(self.inputs[field], self.update_preview)
        self._field_of = {widget: field for field, widget in self.inputs.items()}
        for widget in self.inputs.values():
            if isinstance(widget, QLineEdit):
                widget.textChanged.connect(self._field_edited)

    # -- widgets ------------------------------------------------------------------------
    def _make_input(self, field: str, value: Any) -> QWidget:
        choices = literal_choices(field)
        if choices:
            combo = QComboBox()
            combo.addItem("(not set)")
            combo.addItems(choices)
            if value is not None:
                combo.setCurrentText(str(value))
            return combo
        if field in MULTILINE:
            edit = QPlainTextEdit()
            edit.setMaximumHeight(90 if field != "custom_template" else 160)
            if field == "stop":
                edit.setPlaceholderText("one stop string per line (\\n for a newline)")
                if value:
                    edit.setPlainText("\n".join(s.replace("\n", "\\n") for s in value))
            elif value:
                edit.setPlainText(str(value))
            return edit
        line = QLineEdit("" if value is None else str(value))
        line.setPlaceholderText("not set")
        return line

    @staticmethod
    def _on_change(widget: QWidget, slot: Any) -> None:
        if isinstance(widget, QComboBox):
            widget.currentTextChanged.connect(slot)
        elif isinstance(widget, QPlainTextEdit):
            widget.textChanged.connect(slot)
        elif isinstance(widget, QLineEdit):
            widget.textChanged.connect(slot)

    @staticmethod
    def _source_text(field: str, value: Any, source: str) -> str:
        shown = "(none)" if value in (None, "", []) else repr(value) if isinstance(value, (str, list)) else value
        text = f"now: {shown} — from {SOURCE_NAMES.get(source, source)}"
        return text if len(text) < 160 else text[:157] + "…"

    def set_value(self, field: str, text: str) -> None:
        """Set a field the way a user would type it (tests and scripts use this)."""
        widget = self.inputs[field]
        if isinstance(widget, QComboBox):
            widget.setCurrentText(text or "(not set)")
        elif isinstance(widget, QPlainTextEdit):
            widget.setPlainText(text)
        elif isinstance(widget, QLineEdit):
            widget.setText(text)

    def raw_value(self, field: str) -> Any:
        widget = self.inputs[field]
        if isinstance(widget, QComboBox):
            return None if widget.currentIndex() == 0 else widget.currentText()
        if isinstance(widget, QPlainTextEdit):
            text = widget.toPlainText()
            if field == "stop":
                lines = [line.replace("\\n", "\n") for line in text.splitlines() if line]
                return lines or None
            return text or None
        text = widget.text().strip()  # type: ignore[attr-defined]
        if not text:
            return None
        annotation = str(Settings.model_fields[field].annotation)
        if "int" in annotation and "float" not in annotation:
            try:
                return int(text)
            except ValueError:
                raise ValueError("must be a whole number") from None
        if "float" in annotation:
            try:
                return float(text)
            except ValueError:
                raise ValueError("must be a number") from None
        return text

    # -- validation and save ---------------------------------------------------------
    def check_field(self, field: str) -> tuple[bool, Any]:
        """Whether ``field`` holds a valid value (its message shown at the field when not), and the value."""
        self.errors[field].setVisible(False)
        try:
            value = self.raw_value(field)
            if value is not None:
                Settings(**{field: value})
        except ValueError as exc:
            message = format_validation_error(exc) if isinstance(exc, ValidationError) else str(exc)
            message = message.split(": ", 1)[-1] if isinstance(exc, ValidationError) else message
            self.errors[field].setText(message)
            self.errors[field].setVisible(True)
            return False, None
        return True, value

    def _field_edited(self) -> None:
        field = self._field_of.get(self.sender())  # type: ignore[call-overload]
        if field is not None:
            self.check_field(field)

    def collect(self) -> Settings | None:
        """The edited settings, or None after showing a message at each invalid field."""
        data: dict[str, Any] = {}
        ok = True
        for field in self.inputs:
            valid, value = self.check_field(field)
            ok = ok and valid
            if valid and value is not None:
                data[field] = value
        return Settings(**data) if ok else None

    def update_preview(self) -> None:
        edited = self.collect()
        if edited is None:
            self.preview.setPlainText("(fix the fields marked in red to see the preview)")
            return
        try:
            text = self.engine.prompt_preview(self.key, SAMPLE_CHAT, model=edited)
        except InvalidRequest as exc:
            text = f"(template error) {exc}"
        self.preview.setPlainText(text)

    def save(self) -> bool:
        self.status.setText("")
        edited = self.collect()
        if edited is None:
            self.status.setText("Some values are invalid; see the messages at the fields.")
            first = next(f for f in self.inputs if not self.errors[f].isHidden())
            self.tabs.setCurrentIndex(self.tab_of[first])
            self.inputs[first].setFocus()
            return False
        before = self.entry.settings.set_fields()
        after = edited.set_fields()
        try:
            self.engine.save_model_settings(self.key, edited)
        except (RegistryError, ModelNotFound) as exc:  # removed meanwhile, or models.json is broken
            self.status.setText(str(exc))
            return False
        changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
        loaded = any(s.name == self.key and s.state == "ready" for s in self.engine.model_states())
        reload = sorted(changed & LOAD_TIME_FIELDS)
        if loaded and reload:
            self.reload_note.setText("Saved. Unload and load the model to apply: " + ", ".join(reload))
        self.needs_reload = bool(loaded and reload)
        self.saved.emit(self.key)
        if self.needs_reload:
            self.reloadNeeded.emit(self.reload_note.text())
        self.accept()
        return True
