"""The crash log: uncaught exceptions (main thread, other threads, Qt slots through sys.excepthook) and
fatal signals (faulthandler) written to ``crash.log`` in the user's log folder, beside the app's log."""

from __future__ import annotations

import faulthandler
import logging
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, TextIO

log = logging.getLogger(__name__)
CRASH_LOG = "crash.log"
_installed: dict[str, Any] = {}


def crash_log_path(folder: Path | None = None) -> Path:
    if folder is None:
        from app.paths import log_dir

        folder = log_dir()
    return folder / CRASH_LOG


def install_crash_log(folder: Path | None = None) -> Path:
    """Write crashes to the crash log from now on (once per process); its path."""
    if "path" in _installed:
        return _installed["path"]
    path = crash_log_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    stream: TextIO = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - open for the process's life
    faulthandler.enable(file=stream, all_threads=True)
    previous_hook, previous_thread_hook = sys.excepthook, threading.excepthook

    def excepthook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        record(stream, "uncaught exception", kind, value, tb)
        previous_hook(kind, value, tb)

    def thread_hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is not SystemExit:
            name = args.thread.name if args.thread else "?"
            record(stream, f"uncaught exception in thread {name}", args.exc_type, args.exc_value, args.exc_traceback)
        previous_thread_hook(args)

    sys.excepthook, threading.excepthook = excepthook, thread_hook
    _installed.update(path=path, stream=stream)
    return path


def record(stream: TextIO, what: str, kind: type[BaseException], value: BaseException | None, tb: Any) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    stream.write(f"--- {stamp} {what}\n{''.join(traceback.format_exception(kind, value, tb))}\n")
    stream.flush()
    log.error("%s: %s (written to %s)", what, value, stream.name)
