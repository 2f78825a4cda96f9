"""The command that starts the tray app, as a menu entry or a login item runs it."""

from __future__ import annotations

import sys
from pathlib import Path

from app.paths import SOURCE_ROOT, is_source_checkout


def launch_command() -> list[str]:
    """The bundle's executable (frozen), else this interpreter running ``-m app`` (a source checkout)."""
    if getattr(sys, "frozen", False):
        return [str(Path(sys.executable).resolve())]
    return [str(Path(sys.executable)), "-m", "app"]


def working_folder() -> Path | None:
    """Where the command runs: the source root for ``-m app`` (it must find the ``app`` package)."""
    if getattr(sys, "frozen", False) or not is_source_checkout():
        return None
    return SOURCE_ROOT


def exec_line(command: list[str]) -> str:
    """``command`` as a desktop entry's ``Exec`` value, as written in the file: each argument quoted by the
    spec's quoting rules, ``%`` doubled, then the string escape of the file applied (``\\`` -> ``\\\\``)."""
    def quote(arg: str) -> str:
        if not any(c in arg for c in ' \t\n"\'\\><~|&;$*?#()`='):
            return arg.replace("%", "%%")
        escaped = "".join("\\" + c if c in '"`$\\' else c for c in arg)
        return '"' + escaped.replace("%", "%%") + '"'

    return " ".join(quote(arg) for arg in command).replace("\\", "\\\\")
