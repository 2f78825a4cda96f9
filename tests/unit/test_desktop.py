"""Desktop integration: the menu entry and icons in XDG_DATA_HOME, start on login in XDG_CONFIG_HOME (and the
untested Windows / macOS forms as text), and the crash log of a real process that crashes."""

from __future__ import annotations

import configparser
import os
import plistlib
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from app.desktop import autostart
from app.desktop.entries import ICON_SIZES, desktop_entry, install_desktop, uninstall_desktop
from app.desktop.launch_command import exec_line, launch_command

ROOT = Path(__file__).resolve().parents[2]


def _entry(path: Path) -> configparser.SectionProxy:
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign] - keys are case-sensitive
    parser.read(path, encoding="utf-8")
    return parser["Desktop Entry"]


def parse_exec(value: str) -> list[str]:
    """An ``Exec`` value as the Desktop Entry spec reads it: the string escapes first (``\\\\`` is one
    backslash), then the arguments, each plain or double-quoted with ``\\`` before ``"`$\\``; ``%%`` is ``%``."""
    text = re.sub(r"\\(.)", lambda m: {"s": " ", "n": "\n", "t": "\t", "r": "\r", "\\": "\\"}.get(
        m.group(1), "\\" + m.group(1)), value)
    args: list[str] = []
    i = 0
    while i < len(text):
        if text[i] == " ":
            i += 1
            continue
        arg = ""
        if text[i] == '"':
            i += 1
            while text[i] != '"':
                if text[i] == "\\" and text[i + 1] in '"`$\\':
                    i += 1
                arg += text[i]
                i += 1
            i += 1
        else:
            while i < len(text) and text[i] != " ":
                arg += text[i]
                i += 1
        args.append(arg.replace("%%", "%"))
    return args


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@pytest.fixture
def xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    return tmp_path


def test_install_desktop_writes_the_entry_and_every_icon_size(xdg: Path) -> None:
    installed = install_desktop()
    assert installed.entry == xdg / "data" / "applications" / "exllama-tray.desktop"
    entry = _entry(installed.entry)
    assert entry["Type"] == "Application" and entry["Name"] == "ExLlama Tray" and entry["Icon"] == "exllama-tray"
    command = parse_exec(entry["Exec"])
    assert command == launch_command() and os.access(command[0], os.X_OK)
    assert Path(entry["Path"], "app", "__main__.py").is_file()  # a source checkout runs -m app from its root
    assert [_png_size(p) for p in installed.icons] == [(s, s) for s in ICON_SIZES]
    assert all(f"/{s}x{s}/apps/" in str(p) for p, s in zip(installed.icons, ICON_SIZES))
    removed = uninstall_desktop()
    assert set(removed) == {installed.entry, *installed.icons} and not installed.entry.exists()


def test_exec_line_quotes_as_the_desktop_entry_spec_says() -> None:
    args = ["/opt/My Apps/exllama tray", "--name", 'a"b', "$HOME", "back\\slash", "100%"]
    line = exec_line(args)
    assert line.startswith('"/opt/My Apps/exllama tray" --name ')
    assert "%%" in line and "\\$HOME" in line
    assert "back\\\\\\\\slash" in line  # quoted (two) then string-escaped (four)
    assert parse_exec(line) == args


def test_start_on_login_is_an_xdg_autostart_entry(xdg: Path) -> None:
    assert not autostart.is_enabled()
    autostart.set_enabled(True)
    path = xdg / "config" / "autostart" / "exllama-tray.desktop"
    assert autostart.is_enabled() and autostart.autostart_path() == path
    entry = _entry(path)
    assert entry["X-GNOME-Autostart-enabled"] == "true" and parse_exec(entry["Exec"]) == launch_command()
    autostart.set_enabled(False)
    assert not autostart.is_enabled() and not path.exists()
    autostart.set_enabled(False)  # off twice is no error


def test_windows_and_macos_forms() -> None:
    agent = plistlib.loads(autostart.launch_agent(["/Applications/ExLlama Tray.app/Contents/MacOS/exllama-tray"]))
    assert agent["ProgramArguments"] == ["/Applications/ExLlama Tray.app/Contents/MacOS/exllama-tray"]
    assert agent["RunAtLoad"] is True and agent["Label"] == autostart.LAUNCH_AGENT_LABEL
    assert autostart.run_key_command([r"C:\Program Files\ExLlama Tray\exllama-tray.exe"]) == \
        r'"C:\Program Files\ExLlama Tray\exllama-tray.exe"'
    assert "X-GNOME-Autostart-enabled" not in desktop_entry(["x"])


CRASHER = """
import sys, threading, faulthandler
from pathlib import Path
from app.desktop.crash_log import install_crash_log
install_crash_log(Path(sys.argv[1]))
worker = threading.Thread(target=lambda: 1 / 0, name="worker")
worker.start()
worker.join()
if sys.argv[2] == "segv":
    faulthandler._sigsegv()
raise RuntimeError("boom in main")
"""


@pytest.mark.parametrize("how", ["exception", "segv"])
def test_crash_log_records_a_real_crash(tmp_path: Path, how: str) -> None:
    done = subprocess.run([sys.executable, "-c", CRASHER, str(tmp_path), how], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0
    text = (tmp_path / "crash.log").read_text()
    assert "uncaught exception in thread worker" in text and "ZeroDivisionError" in text
    if how == "segv":
        assert "Fatal Python error: Segmentation fault" in text
    else:
        assert "uncaught exception\nTraceback" in text and "RuntimeError: boom in main" in text
        assert "RuntimeError: boom in main" in done.stderr  # the default hook still prints


def test_cli_install_desktop_and_autostart(tmp_path: Path) -> None:
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "d"), "XDG_CONFIG_HOME": str(tmp_path / "c")}

    def cli(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "app", *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert "applications/exllama-tray.desktop" in cli("install-desktop")
    assert (tmp_path / "d" / "icons" / "hicolor" / "256x256" / "apps" / "exllama-tray.png").is_file()
    assert "start on login: on" in cli("autostart", "on")
    assert (tmp_path / "c" / "autostart" / "exllama-tray.desktop").is_file()
    assert "start on login: off" in cli("autostart", "off")
    assert "removed" in cli("install-desktop", "--uninstall")
