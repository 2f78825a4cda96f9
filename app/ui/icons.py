"""Tray icons drawn at run time: the colour and badge say the state."""

from __future__ import annotations

from PySide6.QtCore import QRectF, Qt
from PySide6.QtGui import QBrush, QColor, QFont, QIcon, QPainter, QPen, QPixmap

COLORS = {"idle": "#6b7280", "ready": "#16a34a", "loading": "#d97706", "generating": "#2563eb", "error": "#dc2626"}


def state_icon(state: str, progress: float | None = None, size: int = 64) -> QIcon:
    pix = QPixmap(size, size)
    pix.fill(Qt.GlobalColor.transparent)
    p = QPainter(pix)
    p.setRenderHint(QPainter.RenderHint.Antialiasing)
    color = QColor(COLORS.get(state, COLORS["idle"]))
    p.setBrush(QBrush(color))
    p.setPen(QPen(color.darker(140), 3))
    p.drawRoundedRect(QRectF(4, 4, size - 8, size - 8), 14, 14)
    p.setPen(QPen(QColor("white")))
    font = QFont()
    font.setBold(True)
    font.setPixelSize(int(size * 0.42))
    p.setFont(font)
    # a load's first seconds (a process starting, imports) have no percentage worth showing: "…" until 1 %
    percent = None if progress is None or progress < 0.01 else int(progress * 100)
    text = {"loading": "…" if percent is None else f"{percent}", "error": "!", "generating": "▶"}.get(state, "EX")
    if state == "loading" and percent is not None:
        font.setPixelSize(int(size * 0.34))
        p.setFont(font)
    p.drawText(QRectF(0, 0, size, size), Qt.AlignmentFlag.AlignCenter, text)
    p.end()
    return QIcon(pix)
