"""Shared pyqtgraph plots of the analysis views: anomaly bars with a threshold line, a layer × position map, and a
histogram with the observed value marked.

The plots hold their items and are updated with ``set_*`` calls from a GUI-thread timer (CONVENTIONS.md: never
from a worker signal per event).  Each keeps the numbers it shows as plain attributes, so tests (and screenshots)
can check that what is drawn is what the engine computed.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QPointF, Qt, Signal, Slot
from PySide6.QtGui import QFontMetrics

#: One colour per activation site (colour-blind-safe Okabe–Ito palette).
SITE_COLORS = {
    "resid_pre": (0, 114, 178),
    "attn": (230, 159, 0),
    "mlp": (0, 158, 115),
    "resid_post": (204, 121, 167),
}
_FALLBACK_COLORS = [(86, 180, 233), (213, 94, 0), (240, 228, 66), (120, 120, 120)]


def site_color(site: str, index: int = 0) -> tuple[int, int, int]:
    return SITE_COLORS.get(site, _FALLBACK_COLORS[index % len(_FALLBACK_COLORS)])


def _fmt(x: float, digits: int = 3) -> str:
    if x is None:
        return "—"
    x = float(x)
    if math.isnan(x):
        return "—"            # not measured (e.g. a cancelled run): a dash, not a raw "nan"
    if not math.isfinite(x):
        return str(x)
    if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}"


def _styled_plot(widget: pg.PlotWidget, left: str, bottom: str, left_units: str | None = None,
                 bottom_units: str | None = None) -> None:
    widget.setBackground("w")
    item = widget.getPlotItem()
    item.showGrid(x=False, y=True, alpha=0.25)
    item.setLabel("left", left, units=left_units)
    item.setLabel("bottom", bottom, units=bottom_units)
    for name in ("left", "bottom"):
        axis = item.getAxis(name)
        axis.setPen(pg.mkPen((60, 60, 60)))
        axis.setTextPen(pg.mkPen((30, 30, 30)))
    item.getAxis("left").enableAutoSIPrefix(False)
    item.getAxis("bottom").enableAutoSIPrefix(False)


class AnomalyBarPlot(pg.PlotWidget):
    """Per-layer anomaly scores as grouped bars (one colour per site) with the calibrated threshold as a line.

    ``set_scores`` takes objects with ``layer``, ``site``, ``score``, ``p_value``, ``statistic`` and ``flagged``
    (``engine.cf.LayerScore``).  Clicking a bar's column emits :attr:`bar_clicked` ``(layer, site)``; hovering
    shows the score, p-value and raw statistic as a tooltip.
    """

    bar_clicked = Signal(int, str)

    def __init__(self, sites: Sequence[str] = (), n_layers: int = 0, parent=None) -> None:
        super().__init__(parent=parent)
        _styled_plot(self, "anomaly score", "layer", left_units="robust z")
        self.plotItem.setMouseEnabled(x=False, y=False)
        self.plotItem.hideButtons()
        # one legend row at the top right; set_scores leaves head room above the tallest bar for it
        self.legend = self.plotItem.addLegend(offset=(-10, 4), labelTextColor=(30, 30, 30), colCount=4)
        self.threshold_line = pg.InfiniteLine(
            pos=0.0, angle=0, movable=False,
            pen=pg.mkPen((200, 30, 30), width=2, style=Qt.PenStyle.DashLine),
            label="threshold {value:.2f}", labelOpts={"position": 0.05, "color": (200, 30, 30), "fill": (255, 255, 255, 200)})
        self.threshold_line.setVisible(False)
        self.threshold_line.setZValue(10)   # over the bars: a tall first bar hid the label ("thresh…")
        self.plotItem.addItem(self.threshold_line, ignoreBounds=False)
        self._bars: dict[str, pg.BarGraphItem] = {}
        self._sites: list[str] = []
        self._n_layers = 0
        self.scores: dict[tuple[int, str], object] = {}   # (layer, site) -> LayerScore shown
        self.threshold: float | None = None
        self.statistic_name = ""
        self.scene().sigMouseClicked.connect(self._on_click)
        self.scene().sigMouseMoved.connect(self._on_move)
        self.configure(sites, n_layers)

    # ----------------------------------------------------------------- layout
    def configure(self, sites: Sequence[str], n_layers: int, statistic: str = "") -> None:
        """Start an empty plot for ``n_layers`` layers × ``sites``."""
        for bar in self._bars.values():
            self.plotItem.removeItem(bar)
        self.legend.clear()
        self._bars = {}
        self._sites = list(sites)
        self._n_layers = int(n_layers)
        self.scores = {}
        self.statistic_name = statistic
        self.threshold = None
        self.threshold_line.setVisible(False)
        for i, site in enumerate(self._sites):
            color = site_color(site, i)
            bar = pg.BarGraphItem(x=[], height=[], width=self.bar_width, brush=pg.mkBrush(*color), pen=None)
            self.plotItem.addItem(bar)
            self.legend.addItem(bar, site)
            self._bars[site] = bar
        if self._n_layers:
            self.plotItem.setXRange(-0.6, self._n_layers - 0.4, padding=0)
            ticks = [(i, str(i)) for i in range(self._n_layers)]
            self.plotItem.getAxis("bottom").setTicks([ticks])
        else:                              # no bundle: no leftover layer ticks or score range of the last one
            self.plotItem.getAxis("bottom").setTicks(None)
            self.plotItem.setXRange(0, 1, padding=0)
            self.plotItem.setYRange(0, 1, padding=0)
        self.setToolTip("")

    @property
    def bar_width(self) -> float:
        return 0.8 / max(1, len(self._sites))

    def bar_x(self, layer: int, site: str) -> float:
        """x (data coordinates) of the centre of the bar of ``(layer, site)``."""
        i = self._sites.index(site)
        n = len(self._sites)
        return layer + (i - (n - 1) / 2.0) * self.bar_width

    # ----------------------------------------------------------------- data
    def set_scores(self, scores: Iterable, threshold: float | None = None) -> None:
        """Show ``scores`` (replacing what was shown) and the threshold line."""
        self.scores = {}
        for s in scores:
            if s.site not in self._sites:
                continue
            self.scores[(int(s.layer), s.site)] = s
        for site, bar in self._bars.items():
            rows = sorted((k[0], v) for k, v in self.scores.items() if k[1] == site)
            xs = [self.bar_x(layer, site) for layer, _ in rows]
            hs = [self._height(v) for _, v in rows]
            color = site_color(site, self._sites.index(site))
            pens = [pg.mkPen((20, 20, 20), width=2) if getattr(v, "flagged", False) else pg.mkPen(None)
                    for _, v in rows]
            # pyqtgraph 0.14 fails on an empty ``pens`` list (UnboundLocalError): no rows -> the single-pen path
            bar.setOpts(x=xs, height=hs, width=self.bar_width, brush=pg.mkBrush(*color), pen=None,
                        pens=pens or None)
        if threshold is not None and math.isfinite(float(threshold)):
            self.threshold = float(threshold)
            self.threshold_line.setVisible(True)   # before setValue: a hidden line's label ignores the new value
            self.threshold_line.setValue(self.threshold)
        ys = [self._height(v) for v in self.scores.values()] + ([self.threshold] if self.threshold is not None else [])
        if ys:
            lo, hi = min(0.0, min(ys)), max(0.0, max(ys))
            span = hi - lo or 1.0
            self.plotItem.setYRange(lo - 0.06 * span, hi + 0.16 * span, padding=0)

    @staticmethod
    def _height(score) -> float:
        v = float(score.score)
        return v if math.isfinite(v) else 0.0

    def bar_heights(self, site: str) -> list[tuple[float, float]]:
        """``[(x, height), ...]`` actually drawn for ``site`` (test and screenshot helper)."""
        bar = self._bars[site]
        xs = bar.opts.get("x")
        hs = bar.opts.get("height")
        if xs is None or hs is None:
            return []
        return [(float(x), float(h)) for x, h in zip(xs, hs)]

    def bar_scene_pos(self, layer: int, site: str) -> QPointF:
        """Scene position of the middle of a bar (for clicking it)."""
        s = self.scores.get((layer, site))
        h = self._height(s) if s is not None else 0.0
        return self.plotItem.vb.mapViewToScene(QPointF(self.bar_x(layer, site), h / 2.0))

    def hit(self, x: float, y: float) -> tuple[int, str] | None:
        """The ``(layer, site)`` whose bar column contains data point ``(x, y)``, if any was scored."""
        if not self._sites:
            return None
        layer = int(round(x))
        w = self.bar_width
        for site in self._sites:
            if (layer, site) in self.scores and abs(x - self.bar_x(layer, site)) <= w / 2.0:
                return layer, site
        return None

    def tooltip_for(self, layer: int, site: str) -> str:
        s = self.scores.get((layer, site))
        if s is None:
            return ""
        lines = [f"layer {layer} · {site}",
                 f"anomaly score {_fmt(s.score)} (threshold {_fmt(self.threshold)})",
                 f"p = {_fmt(s.p_value)}",
                 f"{self.statistic_name or 'statistic'} = {_fmt(s.statistic)}"]
        if getattr(s, "flagged", False):
            lines.append("FLAGGED: above the threshold")
        lines.append("click to show this site")
        return "\n".join(lines)

    # ----------------------------------------------------------------- mouse
    def _view_point(self, scene_pos) -> QPointF | None:
        vb = self.plotItem.vb
        if not vb.sceneBoundingRect().contains(scene_pos):
            return None
        return vb.mapSceneToView(scene_pos)

    @Slot(object)
    def _on_click(self, ev) -> None:
        if ev.button() != Qt.MouseButton.LeftButton:
            return
        p = self._view_point(ev.scenePos())
        if p is None:
            return
        key = self.hit(p.x(), p.y())
        if key is not None:
            ev.accept()
            self.bar_clicked.emit(key[0], key[1])

    @Slot(object)
    def _on_move(self, scene_pos) -> None:
        p = self._view_point(scene_pos)
        key = self.hit(p.x(), p.y()) if p is not None else None
        self.setToolTip(self.tooltip_for(*key) if key else "")


class PositionMap(pg.PlotWidget):
    """A layer × token-position map: each cell holds a value (e.g. the fix-set element touching it), NaN = empty."""

    def __init__(self, parent=None, value_label: str = "element") -> None:
        super().__init__(parent=parent)
        _styled_plot(self, "layer", "token position")
        self.plotItem.setMouseEnabled(x=False, y=False)
        self.plotItem.hideButtons()
        self.plotItem.invertY(True)
        self.image = pg.ImageItem(axisOrder="row-major")
        self.plotItem.addItem(self.image)
        self.image.setColorMap(pg.colormap.get("viridis"))
        self.value_label = value_label
        self.matrix = np.zeros((0, 0), dtype=np.float32)   # [n_layers, n_positions]
        self._labels: list[pg.TextItem] = []
        self._tokens: list[str] | None = None
        #: the token-position ticks drawn on the x axis: ``[(x, label), ...]`` (thinned to the plot's width)
        self.x_ticks: list[tuple[float, str]] = []

    def set_cells(self, n_layers: int, n_positions: int, cells: Iterable[tuple[int, Sequence[int], float]],
                  tokens: Sequence[str] | None = None) -> None:
        """Fill cells ``(layer, positions, value)``; every other cell stays empty (NaN, drawn white).

        Args:
            n_layers: rows of the map.
            n_positions: columns (incident token positions).
            cells: ``(layer, positions, value)``; ``value`` is drawn as a colour and written in the cell.
            tokens: optional prompt tokens for the x axis, ``len == n_positions``.
        """
        m = np.full((max(0, n_layers), max(0, n_positions)), np.nan, dtype=np.float32)
        for layer, positions, value in cells:
            for p in positions:
                if 0 <= layer < m.shape[0] and 0 <= p < m.shape[1]:
                    m[layer, p] = value
        self.matrix = m
        for t in self._labels:
            self.plotItem.removeItem(t)
        self._labels = []
        if m.size == 0:
            self.image.clear()
            return
        finite = m[np.isfinite(m)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if hi <= lo:
            hi = lo + 1.0
        rgba = np.full(m.shape + (4,), 255, dtype=np.ubyte)
        cmap = pg.colormap.get("viridis")
        for (r, c), v in np.ndenumerate(m):
            if np.isfinite(v):
                rgba[r, c] = cmap.map((v - lo) / (hi - lo), mode="byte")
                label = pg.TextItem(str(int(v)) if float(v).is_integer() else _fmt(v, 2),
                                    color=(255, 255, 255), anchor=(0.5, 0.5))
                label.setPos(c + 0.5, r + 0.5)
                self.plotItem.addItem(label)
                self._labels.append(label)
        self.image.setImage(rgba, autoLevels=False)
        self.image.setRect(0, 0, m.shape[1], m.shape[0])
        self._tokens = list(tokens) if tokens is not None and len(tokens) == m.shape[1] else None
        self._update_x_ticks()
        step = max(1, m.shape[0] // 12)
        self.plotItem.getAxis("left").setTicks([[(r + 0.5, str(r)) for r in range(0, m.shape[0], step)]])
        self.plotItem.setXRange(0, m.shape[1], padding=0.01)
        self.plotItem.setYRange(0, m.shape[0], padding=0.01)

    #: Token steps the x axis may use when not every position fits (positions 0, step, 2·step, … are labelled).
    _STEPS = (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 5000, 10000)

    def _update_x_ticks(self) -> None:
        """Label as many token positions as fit the plot's width without overlapping (every position, with its
        token under the number, when there is room; else every 2nd / 5th / 10th … position, numbers only)."""
        n = int(self.matrix.shape[1]) if self.matrix.ndim == 2 else 0
        bottom = self.plotItem.getAxis("bottom")
        if n == 0:
            self.x_ticks = []
            bottom.setTicks(None)
            return
        width = max(50.0, float(self.plotItem.vb.width()) or float(self.width()) * 0.9)
        fm = QFontMetrics(bottom.font() if hasattr(bottom, "font") else self.font())
        gap = 8
        cell_px = width / n          # a cell's number is drawn only where the cell is wide enough to hold it
        for label in self._labels:
            label.setVisible(fm.horizontalAdvance(label.toPlainText()) + 2 <= cell_px)
        if self._tokens is not None:
            labels = [f"{i}\n{t}" for i, t in enumerate(self._tokens)]
            need = max(max(fm.horizontalAdvance(part) for part in lab.split("\n")) for lab in labels) + gap
            if need * n <= width:
                self.x_ticks = [(i + 0.5, lab) for i, lab in enumerate(labels)]
                bottom.setTicks([self.x_ticks])
                return
        need = fm.horizontalAdvance(str(n - 1)) + gap
        step = next((s for s in self._STEPS if need * math.ceil(n / s) <= width), self._STEPS[-1])
        self.x_ticks = [(i + 0.5, str(i)) for i in range(0, n, step)]
        bottom.setTicks([self.x_ticks])

    def resizeEvent(self, event) -> None:  # noqa: N802 - Qt naming
        super().resizeEvent(event)
        m = self.__dict__.get("matrix")        # None while pg.PlotWidget.__init__ resizes the view
        if m is not None and m.size:
            self._update_x_ticks()


class HistogramPlot(pg.PlotWidget):
    """A histogram of control values with the observed value as a vertical line."""

    def __init__(self, parent=None, x_label: str = "value", x_units: str | None = None) -> None:
        super().__init__(parent=parent)
        _styled_plot(self, "count", x_label, bottom_units=x_units)
        self.plotItem.setMouseEnabled(x=False, y=False)
        self.plotItem.hideButtons()
        self.curve = pg.PlotDataItem(stepMode="center", fillLevel=0, brush=(0, 114, 178, 120),
                                     pen=pg.mkPen((0, 114, 178), width=1.5))
        self.plotItem.addItem(self.curve)
        self.observed_line = pg.InfiniteLine(
            angle=90, movable=False, pen=pg.mkPen((200, 30, 30), width=2),
            label="observed {value:.3g}", labelOpts={"position": 0.9, "color": (200, 30, 30),
                                                      "fill": (255, 255, 255, 200)})
        self.observed_line.setVisible(False)
        self.plotItem.addItem(self.observed_line)
        self.counts = np.zeros(0, dtype=np.int64)
        self.edges = np.zeros(0, dtype=np.float64)
        self.observed: float | None = None

    def set_data(self, values: Sequence[float], observed: float | None, bins: int = 20,
                 value_range: tuple[float, float] | None = None) -> None:
        vals = np.asarray([v for v in values if v is not None and math.isfinite(float(v))], dtype=np.float64)
        lo_hi = value_range
        if lo_hi is None:
            pool = list(vals) + ([float(observed)] if observed is not None and math.isfinite(float(observed)) else [])
            lo_hi = (min(pool), max(pool)) if pool else (0.0, 1.0)
            if lo_hi[1] <= lo_hi[0]:
                lo_hi = (lo_hi[0] - 0.5, lo_hi[1] + 0.5)
        self.counts, self.edges = np.histogram(vals, bins=bins, range=lo_hi)
        self.curve.setData(self.edges, self.counts)
        if observed is not None and math.isfinite(float(observed)):
            self.observed = float(observed)
            self.observed_line.setVisible(True)   # before setValue: a hidden line's label ignores the new value
            self.observed_line.setValue(self.observed)
        else:
            self.observed = None
            self.observed_line.setVisible(False)
        top = max(1, int(self.counts.max()) if self.counts.size else 1)
        self.plotItem.setYRange(0, top * 1.15, padding=0)
        self.plotItem.setXRange(lo_hi[0], lo_hi[1], padding=0.05)
