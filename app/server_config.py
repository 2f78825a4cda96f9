"""Server-wide settings of the tray app (port, listen address, CORS) and the API key in the OS keyring.

The API key is kept with ``keyring`` only: never in this file, models.json or the logs.
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


class ServerConfigError(ValueError):
    pass


@dataclass
class ServerSettings:
    port: int = 8000
    on_network: bool = False  # False: 127.0.0.1 only
    cors_origins: list[str] = field(default_factory=list)
    cors_enabled: bool = False

    @property
    def host(self) -> str:
        return "0.0.0.0" if self.on_network else "127.0.0.1"

    def validate(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ServerConfigError(f"port must be between 1 and 65535, not {self.port}")
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


def get_api_key() -> str | None:
    import keyring

    try:
        return keyring.get_password(KEYRING_SERVICE, KEYRING_USER)
    except Exception as exc:  # keyring backends raise their own error types
        log.warning("cannot read the API key from the keyring: %s", type(exc).__name__)
        return None


def set_api_key(key: str | None) -> None:
    import keyring

    if key is None:
        try:
            keyring.delete_password(KEYRING_SERVICE, KEYRING_USER)
        except Exception:  # nothing stored
            pass
        return
    keyring.set_password(KEYRING_SERVICE, KEYRING_USER, key)


def new_api_key() -> str:
    return "sk-local-" + secrets.token_urlsafe(24)
