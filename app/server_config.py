"""Server-wide settings of the tray app (port, listen address, CORS) and the API key in the OS keyring.

The API key is kept with ``keyring`` (never in this file, models.json or the logs); on a desktop without
an OS keyring, in a file of its own readable only by the user, and the server settings say so.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

KEYRING_SERVICE = "exllama-tray"
KEYRING_USER = "api-key"
OS_KEYRING = "the OS keyring"


class ServerConfigError(ValueError):
    pass


@dataclass
class ServerSettings:
    port: int = 8000
    on_network: bool = False  # False: 127.0.0.1 only
    cors_origins: list[str] = field(default_factory=list)
    cors_enabled: bool = False
    #: also serve the Ollama-compatible API on Ollama's own port (never where Ollama itself answers)
    ollama_port_enabled: bool = False
    ollama_port: int = 11434

    @property
    def host(self) -> str:
        return "0.0.0.0" if self.on_network else "127.0.0.1"

    def validate(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ServerConfigError(f"port must be between 1 and 65535, not {self.port}")
        if not 1 <= self.ollama_port <= 65535:
            raise ServerConfigError(f"the Ollama port must be between 1 and 65535, not {self.ollama_port}")
        if self.ollama_port_enabled and self.ollama_port == self.port:
            raise ServerConfigError(f"the Ollama port must differ from the server's port ({self.port}): both "
                                    "APIs are served on the server's port anyway")
        for origin in self.cors_origins:
            if origin != "*" and not origin.startswith(("http://", "https://")):
                raise ServerConfigError(f"CORS origin {origin!r} must start with http:// or https:// (or be *)")


class ServerSettingsStore:
    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> ServerSettings:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return ServerSettings()
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable %s: %s", self.path, exc)
            return ServerSettings()
        fields = {k: v for k, v in data.items() if k in ServerSettings.__dataclass_fields__}
        try:
            settings = ServerSettings(**fields)
            settings.validate()
        except (TypeError, ServerConfigError) as exc:
            log.warning("ignoring invalid %s: %s", self.path, exc)
            return ServerSettings()
        return settings

    def save(self, settings: ServerSettings) -> None:
        settings.validate()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name + ".", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(asdict(settings), fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)


def key_file() -> Path:
    """Where the API key is kept when there is no OS keyring (readable only by the user)."""
    from app.paths import config_dir

    return config_dir() / "api-key"


def get_api_key() -> str | None:
    """The API key from the OS keyring, or from :func:`key_file` on a desktop without one."""
    return _from_keyring() or _from_file()


def api_key_location() -> str | None:
    """Where the API key is kept: "the OS keyring", the fallback file's path, or None (no key)."""
    if _from_keyring():
        return OS_KEYRING
    return str(key_file()) if _from_file() else None


def set_api_key(key: str | None) -> str | None:
    """Keep ``key`` (None: forget it) in the OS keyring, or where there is none in :func:`key_file`
    with a warning in the log; returns where it went (see :func:`api_key_location`). Raises
    ServerConfigError when the keyring refuses (locked, say) or the file cannot be written."""
    import keyring
    from keyring.errors import NoKeyringError

    path = key_file()
    if key is None:
        try:
            keyring.delete_password(KEYRING_SERVICE, KEYRING_USER)
        except Exception:  # nothing stored, or no keyring
            pass
        path.unlink(missing_ok=True)
        return None
    try:
        keyring.set_password(KEYRING_SERVICE, KEYRING_USER, key)
    except NoKeyringError:
        try:
            _write_private(path, key)
        except OSError as exc:
            raise ServerConfigError(f"no OS keyring, and {path} cannot be written: {exc.strerror or exc}") from None
        log.warning("no OS keyring: the API key is kept in %s, readable only by you", path)
        return str(path)
    except Exception as exc:  # keyring backends raise their own error types (a locked keyring...)
        raise ServerConfigError(f"the OS keyring did not take the API key: {exc or type(exc).__name__}") from None
    path.unlink(missing_ok=True)  # a copy from a time without keyring is not kept
    return OS_KEYRING


def _from_keyring() -> str | None:
    import keyring
    from keyring.errors import NoKeyringError

    try:
        return keyring.get_password(KEYRING_SERVICE, KEYRING_USER)
    except NoKeyringError:
        return None
    except Exception as exc:  # keyring backends raise their own error types
        log.warning("cannot read the API key from the keyring: %s", type(exc).__name__)
        return None


def _from_file() -> str | None:
    try:
        key = key_file().read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return key or None


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` with permissions for its owner only (0600 on POSIX)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text + "\n")
    if os.name == "posix":
        os.chmod(path, 0o600)  # also when the file existed with other permissions


def new_api_key() -> str:
    return "sk-local-" + secrets.token_urlsafe(24)
