"""The freedesktop menu entry (``.desktop``) and the icon theme's PNGs, in the user's XDG data folder."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from app.desktop.launch_command import exec_line, launch_command, working_folder

APP_ID = "exllama-tray"
#: the icon sizes shipped in resources/icons/hicolor (freedesktop's usual ones)
ICON_SIZES = (16, 22, 24, 32, 48, 64, 128, 256)


def resources_dir() -> Path:
    """resources/ of a source checkout, or the bundle's copy of it."""
    import sys

    base = Path(getattr(sys, "_MEIPASS", Path(__file__).resolve().parents[2]))
    return base / "resources"


def xdg_data_home() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")


def xdg_config_home() -> Path:
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")


def desktop_entry(command: list[str] | None = None, *, autostart: bool = False) -> str:
    """The ``.desktop`` file's text for the tray app (``autostart``: the login item's variant)."""
    lines = ["[Desktop Entry]", "Type=Application", "Version=1.5", "Name=ExLlama Tray",
             "GenericName=Local LLM server",
             "Comment=Serve local LLMs to OpenAI-compatible clients from your own GPU",
             f"Exec={exec_line(command or launch_command())}", f"Icon={APP_ID}", "Terminal=false",
             "Categories=Development;Utility;", "Keywords=LLM;OpenAI;ExLlama;server;", "StartupNotify=false",
             f"StartupWMClass={APP_ID}"]
    folder = working_folder()
    if folder is not None:
        lines.append(f"Path={folder}")
    if autostart:
        lines += ["X-GNOME-Autostart-enabled=true", "X-KDE-autostart-after=panel"]
    return "\n".join(lines) + "\n"


@dataclass
class Installed:
    """What :func:`install_desktop` wrote."""

    entry: Path
    icons: list[Path] = field(default_factory=list)


def install_desktop(data_home: Path | None = None) -> Installed:
    """Write the menu entry and the icons under ``data_home`` (default ``$XDG_DATA_HOME``)."""
    data_home = data_home or xdg_data_home()
    icons: list[Path] = []
    source = resources_dir() / "icons" / "hicolor"
    for size in ICON_SIZES:
        png = source / f"{size}x{size}" / f"{APP_ID}.png"
        if not png.is_file():
            raise FileNotFoundError(f"icon {png} is missing from the app's resources")
        target = data_home / "icons" / "hicolor" / f"{size}x{size}" / "apps" / f"{APP_ID}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, target)
        icons.append(target)
    entry = data_home / "applications" / f"{APP_ID}.desktop"
    _write(entry, desktop_entry())
    return Installed(entry=entry, icons=icons)


def uninstall_desktop(data_home: Path | None = None) -> list[Path]:
    """Remove what :func:`install_desktop` wrote; the paths removed."""
    data_home = data_home or xdg_data_home()
    paths = [data_home / "applications" / f"{APP_ID}.desktop"]
    paths += [data_home / "icons" / "hicolor" / f"{s}x{s}" / "apps" / f"{APP_ID}.png" for s in ICON_SIZES]
    removed = [p for p in paths if p.is_file()]
    for path in removed:
        path.unlink()
    return removed


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
