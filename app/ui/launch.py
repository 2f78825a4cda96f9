"""Start the tray app."""

from __future__ import annotations

import sys

from app.engine.registry import Registry


def launch_tray(registry: Registry, port: int | None = None) -> int:
    print("The tray app is not built yet; run the headless server with `python -m app serve`.", file=sys.stderr)
    return 1
