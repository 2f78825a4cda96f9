"""Server settings: port, localhost or network (then an API key, kept in the keyring), CORS, and Ollama's
port for clients that only speak Ollama's API."""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QGuiApplication
from PySide6.QtWidgets import (
    QCheckBox, QDialog, QDialogButtonBox, QFormLayout, QHBoxLayout, QLabel, QLineEdit, QPushButton, QSpinBox,
    QVBoxLayout, QWidget,
)

from app.server_config import (
    OS_KEYRING, ServerConfigError, ServerSettings, api_key_location, get_api_key, new_api_key, set_api_key,
)


class ServerSettingsDialog(QDialog):
    #: emitted with the checked settings when OK is pressed, just before the dialog closes
    settingsChosen = Signal(object)

    def __init__(self, settings: ServerSettings, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        self.setWindowTitle("Server settings")
        self.port = QSpinBox()
        self.port.setRange(1, 65535)
        self.port.setValue(settings.port)
        self.network = QCheckBox("Listen on the network (other computers can connect; needs an API key)")
        self.network.setChecked(settings.on_network)
        krow = self._key_row()
        self.cors = QCheckBox("Allow browsers from these origins (CORS)")
        self.cors.setChecked(settings.cors_enabled)
        self.origins = QLineEdit(", ".join(settings.cors_origins))
        self.origins.setPlaceholderText("http://localhost:3000, https://chat.example.com")
        orow = self._ollama_row(settings)
        self.error = QLabel("")
        self.error.setStyleSheet("color: #b91c1c;")
        self.error.setWordWrap(True)
        self.key_note = QLabel("")
        self.key_note.setWordWrap(True)
        self.key_note.setStyleSheet("color: #92400e;")
        self._show_where(api_key_location())
        form = QFormLayout()
        form.addRow("Port", self.port)
        form.addRow("", self.network)
        form.addRow("API key", krow)
        form.addRow("", self.key_note)
        form.addRow("", self.cors)
        form.addRow("Origins", self.origins)
        form.addRow("Ollama", orow)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        buttons.accepted.connect(self.check_and_accept)
        buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.error)
        layout.addWidget(buttons)

    def _key_row(self) -> QHBoxLayout:
        """The API key (hidden, read-only) with Show / Generate / Copy / Reset."""
        self.key = QLineEdit(get_api_key() or "")
        self.key.setReadOnly(True)
        self.key.setEchoMode(QLineEdit.EchoMode.Password)
        self.key.setPlaceholderText("no API key")
        show = QPushButton("Show")
        show.setCheckable(True)
        show.toggled.connect(self.show_key)
        generate = QPushButton("Generate")
        generate.clicked.connect(self.generate_key)
        copy = QPushButton("Copy")
        copy.clicked.connect(self.copy_key)
        reset = QPushButton("Reset")
        reset.clicked.connect(self.reset_key)
        row = QHBoxLayout()
        for w in (self.key, show, generate, copy, reset):
            row.addWidget(w)
        return row

    def _ollama_row(self, settings: ServerSettings) -> QHBoxLayout:
        """'Also serve the Ollama API on port' and its port, enabled together."""
        self.ollama = QCheckBox("Also serve the Ollama API on port")
        self.ollama.setToolTip("For clients that only know Ollama's address (localhost:11434); the Ollama API is "
                               "always served on the port above too. Refused while Ollama itself runs there.")
        self.ollama.setChecked(settings.ollama_port_enabled)
        self.ollama_port = QSpinBox()
        self.ollama_port.setRange(1, 65535)
        self.ollama_port.setValue(settings.ollama_port)
        self.ollama_port.setEnabled(settings.ollama_port_enabled)
        self.ollama.toggled.connect(self.ollama_port.setEnabled)
        row = QHBoxLayout()
        row.addWidget(self.ollama)
        row.addWidget(self.ollama_port)
        row.addStretch(1)
        return row

    def show_key(self, shown: bool) -> None:
        self.key.setEchoMode(QLineEdit.EchoMode.Normal if shown else QLineEdit.EchoMode.Password)

    def copy_key(self) -> None:
        QGuiApplication.clipboard().setText(self.key.text())

    def generate_key(self) -> None:
        key = new_api_key()
        try:
            where = set_api_key(key)
        except ServerConfigError as exc:
            self.error.setText(str(exc))
            return
        self.error.setText("")
        self.key.setText(key)
        self._show_where(where)

    def reset_key(self) -> None:
        set_api_key(None)
        self.key.setText("")
        self._show_where(None)

    def _show_where(self, where: str | None) -> None:
        """Say so when the key is not in an OS keyring (a bare Linux desktop has none)."""
        if where is None or where == OS_KEYRING:
            self.key_note.setText("")
            self.key_note.setVisible(False)
            return
        self.key_note.setText(f"No OS keyring was found: the key is kept in {where}, readable only by you. "
                              "Install one (GNOME Keyring, KWallet, KeePassXC) to keep it there instead.")
        self.key_note.setVisible(True)

    def result_settings(self) -> ServerSettings:
        origins = [o.strip() for o in self.origins.text().split(",") if o.strip()]
        return ServerSettings(port=self.port.value(), on_network=self.network.isChecked(), cors_origins=origins,
                              cors_enabled=self.cors.isChecked(), ollama_port_enabled=self.ollama.isChecked(),
                              ollama_port=self.ollama_port.value())

    def check_and_accept(self) -> None:
        settings = self.result_settings()
        try:
            settings.validate()
        except ServerConfigError as exc:
            self.error.setText(str(exc))
            return
        if settings.on_network and not self.key.text():
            self.error.setText("Listening on the network needs an API key: press Generate.")
            return
        self.settingsChosen.emit(settings)
        self.accept()
