"""Where the app keeps its files."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP_NAME = "exllama-tray"
SOURCE_ROOT = Path(__file__).resolve().parent.parent


def is_source_checkout() -> bool:
    return (SOURCE_ROOT / "pyproject.toml").is_file() and (SOURCE_ROOT / "app").is_dir()


def default_models_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """``--models PATH``, else ``models.json`` of a source checkout, else the user's config dir."""
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get("EXLLAMA_TRAY_MODELS")
    if env:
        return Path(env).expanduser()
    if is_source_checkout():
        return SOURCE_ROOT / "models.json"
    return Path(platformdirs.user_config_dir(APP_NAME, appauthor=False)) / "models.json"


def log_dir() -> Path:
    path = Path(platformdirs.user_log_dir(APP_NAME, appauthor=False))
    path.mkdir(parents=True, exist_ok=True)
    return path


def config_dir() -> Path:
    path = Path(platformdirs.user_config_dir(APP_NAME, appauthor=False))
    path.mkdir(parents=True, exist_ok=True)
    return path
