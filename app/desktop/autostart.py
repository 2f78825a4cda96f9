"""Start on login: an XDG autostart entry on Linux; Windows' Run key and a macOS LaunchAgent (both written
as their documentation says, untested: this project's machines run Linux)."""

from __future__ import annotations

import plistlib
import sys
from pathlib import Path

from app.desktop.entries import APP_ID, _write, desktop_entry, xdg_config_home
from app.desktop.launch_command import launch_command, working_folder

RUN_KEY = r"Software\Microsoft\Windows\CurrentVersion\Run"
RUN_VALUE = "ExLlama Tray"
LAUNCH_AGENT_LABEL = "com.exllama-tray.app"


def autostart_path() -> Path:
    if sys.platform == "darwin":
        return Path.home() / "Library" / "LaunchAgents" / f"{LAUNCH_AGENT_LABEL}.plist"
    return xdg_config_home() / "autostart" / f"{APP_ID}.desktop"


def is_enabled() -> bool:
    if sys.platform == "win32":
        return _run_key_value() is not None
    return autostart_path().is_file()


def set_enabled(enabled: bool) -> None:
    """Start the tray app on login (or no longer)."""
    if sys.platform == "win32":
        _set_run_key(enabled)
    elif not enabled:
        autostart_path().unlink(missing_ok=True)
    elif sys.platform == "darwin":
        _write_bytes(autostart_path(), launch_agent())
    else:
        _write(autostart_path(), desktop_entry(autostart=True))


def launch_agent(command: list[str] | None = None) -> bytes:
    """The LaunchAgent property list that starts the app on login (macOS; untested)."""
    agent: dict = {"Label": LAUNCH_AGENT_LABEL, "ProgramArguments": command or launch_command(),
                   "RunAtLoad": True, "ProcessType": "Interactive"}
    folder = working_folder()
    if folder is not None:
        agent["WorkingDirectory"] = str(folder)
    return plistlib.dumps(agent)


def run_key_command(command: list[str] | None = None) -> str:
    """The Run key's value: the command line, each part quoted (Windows; untested)."""
    import subprocess

    return subprocess.list2cmdline(command or launch_command())


def _run_key_value() -> str | None:  # Windows only; untested
    import winreg  # type: ignore[import-not-found]

    try:
        with winreg.OpenKey(winreg.HKEY_CURRENT_USER, RUN_KEY) as key:
            return str(winreg.QueryValueEx(key, RUN_VALUE)[0])
    except OSError:
        return None


def _set_run_key(enabled: bool) -> None:  # Windows only; untested
    import winreg  # type: ignore[import-not-found]

    with winreg.OpenKey(winreg.HKEY_CURRENT_USER, RUN_KEY, 0, winreg.KEY_SET_VALUE) as key:
        if enabled:
            winreg.SetValueEx(key, RUN_VALUE, 0, winreg.REG_SZ, run_key_command())
        else:
            try:
                winreg.DeleteValue(key, RUN_VALUE)
            except FileNotFoundError:
                pass


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
