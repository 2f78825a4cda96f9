"""Status window: live plots of the engine's metrics (read from the engine, not over HTTP)."""

from __future__ import annotations

import math
import time

import pyqtgraph as pg
import shiboken6
from PySide6.QtCore import Signal
from PySide6.QtGui import QCloseEvent
from PySide6.QtWidgets import (
    QComboBox, QGridLayout, QHBoxLayout, QLabel, QMenuBar, QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget,
)

from app.engine.facade import Engine

RANGES = {"1 min": 60, "5 min": 300, "30 min": 1800}
#: the memory plot's line per key of the engine's memory report (others: "cuda:N reserved")
MEMORY_LABELS = {"rss": "app process RAM", "model-process-rss": "model process RAM", "cpu": "model on CPU"}
PALETTE = ["#2563eb", "#16a34a", "#d97706", "#dc2626", "#7c3aed", "#0891b2"]


class StatusWindow(QWidget):
    #: the user closed the window (in window-first mode, without a tray, that quits the app)
    closedByUser = Signal()

    def __init__(self, engine: Engine, url_provider, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.engine = engine
        self.url_provider = url_provider
        self.setWindowTitle("ExLlama Tray — status")
        self.resize(960, 720)
        pg.setConfigOptions(antialias=True, background="w", foreground="k")
        self.model_label = QLabel("No model loaded")
        self.model_label.setWordWrap(True)
        self.url_label = QLabel("")
        self.range = QComboBox()
        self.range.addItems(list(RANGES))
        self.range.currentTextChanged.connect(self.refresh)  # refresh takes no argument: PySide drops it
        top = QHBoxLayout()
        top.addWidget(self.model_label, 1)
        top.addWidget(self.url_label)
        top.addWidget(QLabel("Range"))
        top.addWidget(self.range)

        self.requests_plot = self._plot("Requests", "count")
        self.tps_plot = self._plot("Tokens per second", "tok/s")
        self.memory_plot = self._plot("Memory", "MiB")
        self.curves = {
            "running": self.requests_plot.plot(name="running", pen=pg.mkPen(PALETTE[0], width=2)),
            "waiting": self.requests_plot.plot(name="waiting", pen=pg.mkPen(PALETTE[2], width=2)),
            "generation": self.tps_plot.plot(name="generation", pen=pg.mkPen(PALETTE[1], width=2)),
            "prompt": self.tps_plot.plot(name="prompt", pen=pg.mkPen(PALETTE[4], width=2)),
        }
        self.memory_curves: dict[str, pg.PlotDataItem] = {}
        self.table = QTableWidget(0, 6)
        self.table.setHorizontalHeaderLabels(["model", "prompt tokens", "output tokens", "TTFT ms", "tok/s",
                                              "finish"])
        self.table.horizontalHeader().setStretchLastSection(True)
        grid = QGridLayout()
        grid.addWidget(self.requests_plot, 0, 0)
        grid.addWidget(self.tps_plot, 0, 1)
        grid.addWidget(self.memory_plot, 1, 0)
        grid.addWidget(self.table, 1, 1)
        layout = QVBoxLayout(self)
        layout.addLayout(top)
        layout.addLayout(grid)
        self.refresh()

    def _plot(self, title: str, unit: str) -> pg.PlotWidget:
        plot = pg.PlotWidget(self, title=title)
        plot.addLegend(offset=(5, 5))
        plot.setLabel("left", unit)
        plot.setLabel("bottom", "seconds ago")
        plot.showGrid(x=True, y=True, alpha=0.2)
        plot.getAxis("left").enableAutoSIPrefix(False)  # "count (x0.001)" said nothing useful
        plot.setMouseEnabled(x=False, y=False)  # the range follows the data; the menu still exports
        # pyqtgraph makes its right-click menus without a parent, so only Python's garbage collector
        # would free them, at any time; owned by this window, they go when it is deleted
        item = plot.getPlotItem()
        for menu in (item.ctrlMenu, item.getViewBox().menu):
            if menu is not None:
                menu.setParent(self, menu.windowFlags())
        return plot

    def set_menu_bar(self, bar: QMenuBar) -> None:
        """Window-first mode (no system tray): the tray menu's actions in a menu bar of this window."""
        bar.setParent(self)
        self.layout().setMenuBar(bar)
        self.setWindowTitle("ExLlama Tray")

    def closeEvent(self, event: QCloseEvent) -> None:
        if event.spontaneous():  # the window's close button, not a close() from the code
            self.closedByUser.emit()
        super().closeEvent(event)

    @staticmethod
    def _fit_y(plot: pg.PlotWidget, values: list[float], *, whole: bool = False) -> None:
        """From 0 to a little above the largest value (at least 1): an idle plot is a flat line at 0, not
        a -400..400 axis, and a few MiB more memory is not drawn as a cliff. Counts get whole ticks."""
        top = max([1.0, *values])
        plot.setYRange(0, top * 1.1, padding=0)
        if whole:
            step = max(1, math.ceil(top / 5))
            plot.getAxis("left").setTickSpacing(step, step)

    def release(self) -> None:
        """Before the window is deleted: close what pyqtgraph opened on its own (the Export dialog of
        a plot's menu, made on first use without a parent)."""
        for plot in (self.requests_plot, self.tps_plot, self.memory_plot):
            export = getattr(plot.scene(), "exportDialog", None)
            if export is not None and shiboken6.isValid(export):
                export.close()
                export.deleteLater()

    def point_count(self) -> int:
        return len(self.curves["running"].getData()[0] if self.curves["running"].getData()[0] is not None else [])

    def refresh(self) -> None:
        seconds = RANGES[self.range.currentText()]
        history = self.engine.metrics.history(seconds)
        now = time.time()
        xs = [s.t - now for s in history]
        self.curves["running"].setData(xs, [s.running for s in history])
        self.curves["waiting"].setData(xs, [s.waiting for s in history])
        self.curves["generation"].setData(xs, [s.generation_tps for s in history])
        self.curves["prompt"].setData(xs, [s.prompt_tps for s in history])
        devices = sorted({d for s in history for d in s.memory if not d.endswith(":allocated")})
        for device in devices:
            if device not in self.memory_curves:
                label = MEMORY_LABELS.get(device, f"{device} reserved")
                color = PALETTE[len(self.memory_curves) % len(PALETTE)]
                self.memory_curves[device] = self.memory_plot.plot(name=label, pen=pg.mkPen(color, width=2))
            self.memory_curves[device].setData(xs, [s.memory.get(device, 0) / 2**20 for s in history])
        for plot in (self.requests_plot, self.tps_plot, self.memory_plot):
            plot.setXRange(-seconds, 0, padding=0)
        self._fit_y(self.requests_plot, [v for s in history for v in (s.running, s.waiting)], whole=True)
        self._fit_y(self.tps_plot, [v for s in history for v in (s.generation_tps, s.prompt_tps)])
        self._fit_y(self.memory_plot, [s.memory.get(d, 0) / 2**20 for s in history for d in devices])
        states = self.engine.model_states()
        if states:
            self.model_label.setText("; ".join(
                f"{s.name}: {s.state}" + (f" {s.progress * 100:.0f}%" if s.state == "loading" else "")
                + f" — {s.backend} backend, {s.batching_summary}" + (f" — {s.notice}" if s.notice else "")
                for s in states))
        else:
            self.model_label.setText("No model loaded")
        self.url_label.setText(f"API: {self.url_provider()}")
        recent = list(reversed(self.engine.metrics.recent_requests()))[:50]
        self.table.setRowCount(len(recent))
        for row, r in enumerate(recent):
            values = [r.model, r.prompt_tokens, r.completion_tokens,
                      "" if r.ttft_s is None else f"{r.ttft_s * 1e3:.0f}",
                      "" if r.tokens_per_s is None else f"{r.tokens_per_s:.1f}", r.finish_reason]
            for col, value in enumerate(values):
                self.table.setItem(row, col, QTableWidgetItem(str(value)))
        self.table.resizeColumnsToContents()  # every column readable at the default width
