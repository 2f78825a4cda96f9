"""Render the app's icon (the tray's "ready" icon) at the freedesktop sizes into resources/icons/hicolor,
plus exllama-tray.ico for the Windows executable: ``QT_QPA_PLATFORM=offscreen python build_spec/make_icons.py``.
The PNGs are committed; run this again only when app/ui/icons.py changes."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


def main() -> int:
    from PySide6.QtCore import QSize
    from PySide6.QtGui import QGuiApplication

    from app.desktop.entries import APP_ID, ICON_SIZES
    from app.ui.icons import state_icon

    app = QGuiApplication.instance() or QGuiApplication(sys.argv)  # noqa: F841 - pixmaps need one
    out = ROOT / "resources" / "icons"
    for size in ICON_SIZES:
        target = out / "hicolor" / f"{size}x{size}" / f"{APP_ID}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        if not state_icon("ready", size=size).pixmap(QSize(size, size)).save(str(target), "PNG"):
            raise SystemExit(f"could not write {target}")
    ico = out / f"{APP_ID}.ico"
    if not state_icon("ready", size=256).pixmap(QSize(256, 256)).save(str(ico), "ICO"):
        print(f"note: Qt has no ICO writer here; {ico} not written", file=sys.stderr)
    print(f"icons written under {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
