"""The model registry: ``models.json``.

Human-readable JSON with a schema version. Every change is a read-modify-write under an
inter-process file lock, written atomically (temp file, fsync, replace, fsync of the folder), so
two processes adding models at once lose nothing and a crash leaves either the old or the new file.
The file is re-read whenever it changed on disk. An invalid file raises :class:`RegistryError`
naming the file and the problem and is never overwritten.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from filelock import FileLock
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.engine.catalog.ollama_names import InvalidName, parse_name
from app.engine.settings.schema import Settings, format_validation_error

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1


class RegistryError(Exception):
    """models.json is unreadable or invalid, or an entry is missing."""


class OllamaMetadata(BaseModel):
    """What the Ollama library says about a model (saved with the entry)."""

    model_config = ConfigDict(extra="ignore")

    name: str
    template: str | None = None
    system: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    license: str | None = None
    messages: list[dict[str, Any]] = Field(default_factory=list)
    config: dict[str, Any] = Field(default_factory=dict)
    fetched_at: str | None = None


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model_dir: str
    settings: Settings = Field(default_factory=Settings)
    ollama: OllamaMetadata | None = None
    info: dict[str, Any] = Field(default_factory=dict)
    created_at: str = ""
    updated_at: str = ""


class RegistryFile(BaseModel):
    model_config = ConfigDict(extra="ignore")

    schema_version: int = SCHEMA_VERSION
    models: dict[str, ModelEntry] = Field(default_factory=dict)


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def normalize_name(name: str) -> str:
    """``tiny`` -> ``tiny:latest``; names are case-insensitive like Ollama's."""
    name = name.strip().lower()
    if not name:
        raise RegistryError("model name must not be empty")
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last else f"{name}:latest"


def check_name(name: str) -> None:
    """Raise RegistryError unless ``name`` is ``[namespace/]model[:tag]`` as Ollama spells names (the
    name clients send; no spaces, no path tricks such as ``../x``, one tag)."""
    try:
        parse_name(name)
    except InvalidName as exc:
        raise RegistryError(f"{str(exc).replace('Ollama model name', 'model name')}: use letters, digits, "
                            "'.', '_' and '-', as in mistral:7b or team/coder:v2") from None


def display_name(name: str) -> str:
    return name[: -len(":latest")] if name.endswith(":latest") else name


class Registry:
    """Access to one models.json file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = FileLock(str(self.path) + ".lock", timeout=30)
        self._stamp: tuple[int, int, int] | None = None
        self._cache = RegistryFile()

    # -- reading -------------------------------------------------------------
    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _read(self) -> RegistryFile:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return RegistryFile()
        except OSError as exc:
            raise RegistryError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise RegistryError(f"{self.path} is not UTF-8 text: {exc}") from None
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RegistryError(
                f"{self.path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
                "fix or move the file, it was left untouched") from None
        if not isinstance(raw, dict):
            raise RegistryError(f"{self.path} must hold a JSON object; the file was left untouched")
        version = raw.get("schema_version", SCHEMA_VERSION)
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise RegistryError(
                f"{self.path} has schema_version {version!r}; this version of the app reads up to "
                f"{SCHEMA_VERSION}; the file was left untouched")
        try:
            return RegistryFile.model_validate(raw)
        except ValidationError as exc:
            raise RegistryError(
                f"{self.path} is invalid: {format_validation_error(exc)}; the file was left untouched") from None

    def load(self) -> RegistryFile:
        """The current contents, re-read if the file changed on disk."""
        stamp = self._file_stamp()
        if stamp != self._stamp or stamp is None:
            self._cache = self._read()
            self._stamp = stamp
        return self._cache

    def names(self) -> list[str]:
        return sorted(self.load().models)

    def entries(self) -> dict[str, ModelEntry]:
        return dict(self.load().models)

    def find(self, name: str) -> tuple[str, ModelEntry] | None:
        key = normalize_name(name)
        entry = self.load().models.get(key)
        return (key, entry) if entry is not None else None

    def get(self, name: str) -> ModelEntry:
        found = self.find(name)
        if found is None:
            raise RegistryError(f"model {name!r} is not registered in {self.path}")
        return found[1]

    def backup_broken(self) -> Path | None:
        """Keep a copy of an unreadable models.json next to it (once per distinct content)."""
        try:
            data = self.path.read_bytes()
        except OSError:
            return None
        for existing in sorted(self.path.parent.glob(self.path.name + ".broken-*")):
            try:
                if existing.read_bytes() == data:
                    return existing
            except OSError:
                continue
        backup = self.path.with_name(f"{self.path.name}.broken-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
        shutil.copy2(self.path, backup)
        log.warning("kept a copy of the broken %s as %s", self.path, backup)
        return backup

    def check_on_start(self) -> None:
        """Raise RegistryError (with where a backup copy was kept) if models.json is unreadable."""
        try:
            self.load()
        except RegistryError as exc:
            backup = self.backup_broken()
            where = f"; a copy was kept as {backup}" if backup else ""
            raise RegistryError(f"{exc}{where}") from None

    # -- writing -------------------------------------------------------------
    def _write(self, data: RegistryFile) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(data.model_dump(mode="json", exclude_none=True), indent=2, sort_keys=False) + "\n"
        fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            if self.path.exists():
                shutil.copymode(self.path, tmp)
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        _fsync_dir(self.path.parent)

    def update(self, change: Callable[[RegistryFile], None]) -> RegistryFile:
        """Apply ``change`` to fresh contents under the file lock and write the result atomically."""
        with self._lock:
            data = self._read()
            change(data)
            data.schema_version = SCHEMA_VERSION
            self._write(data)
            self._stamp = self._file_stamp()
            self._cache = data
            return data

    def add(self, name: str, entry: ModelEntry, *, replace: bool = False) -> str:
        check_name(name)
        key = normalize_name(name)

        def change(data: RegistryFile) -> None:
            old = data.models.get(key)
            if old is not None and not replace:
                raise RegistryError(f"model {display_name(key)!r} is already registered (use --replace)")
            stamp = now_iso()
            entry.created_at = old.created_at if old is not None and old.created_at else stamp
            entry.updated_at = stamp
            data.models[key] = entry

        self.update(change)
        log.info("registered model %s -> %s", key, entry.model_dir)
        return key

    def remove(self, name: str) -> str:
        key = normalize_name(name)

        def change(data: RegistryFile) -> None:
            if key not in data.models:
                raise RegistryError(f"model {display_name(key)!r} is not registered in {self.path}")
            del data.models[key]

        self.update(change)
        return key

    def set_settings(self, name: str, settings: Settings) -> None:
        """Replace the user's settings of one model."""
        key = normalize_name(name)

        def change(data: RegistryFile) -> None:
            entry = data.models.get(key)
            if entry is None:
                raise RegistryError(f"model {display_name(key)!r} is not registered in {self.path}")
            entry.settings = settings
            entry.updated_at = now_iso()

        self.update(change)


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
