"""Story 2: browse the recorded activations layer by layer.

Left: a tree of layers and sites with their shapes and CF badges (score, ⚑ when flagged; filled from
``session.cf`` / ``session.cf_changed``).  Middle: the selected site as a heatmap — token positions down, model
dimensions across, prompt tokens as the row labels, a colour bar — and beside it the L2 norm of every token's
vector.  Right: the token list.

Only the **visible slice** is read from the bundle (pyqtgraph's ``examples/hdf5.py`` approach): when the view range
changes (pan / zoom, debounced), the view reads ``[positions in view, dims in view]`` of the one dataset shown, in
blocks of rows, and peak-downsamples (the value of largest magnitude per block of cells) when the slice holds more
cells than the plot has pixels.  The norms need whole token vectors, so for the positions in view the rows are read
across ``d_model`` once (cached while the position range does not change).  Every read is logged in
:attr:`BrowserView.read_log`.  Opening a bundle reads no activation data; selecting a site reads only its window.

Right-click a site in the tree, a heatmap row or a token ▸ *Ablate here (mean)*, *Zero here*, *Patch from
counterpart*, *Scale…*; for ``attn`` a single head, for ``mlp`` chosen neurons, and when zoomed in on a dimension
range, those dimensions only.  The choice is emitted as :attr:`BrowserView.intervention_requested`
(an :class:`engine.interventions.Intervention`); the main window connects it to the intervention editor.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QPoint, QRectF, Qt, QTimer, Signal, Slot
from PySide6.QtGui import QAction, QBrush, QColor, QKeySequence
from PySide6.QtWidgets import (QAbstractItemView, QHBoxLayout, QHeaderView, QInputDialog, QLabel, QListWidget,
                               QListWidgetItem, QMenu, QPushButton, QSplitter, QStackedWidget, QTreeWidget,
                               QTreeWidgetItem, QVBoxLayout, QWidget)

from engine.errors import ForensicsError
from workbench.views.incident import FAIL_BG, FAIL_FG
from workbench.views.plots import _fmt, _styled_plot

#: Most cells one view may ask for (positions × dims in view); zooming out further is not allowed, so a single
#: refresh never reads more than this from the file (16 MB of float32).
MAX_VIEW_CELLS = 4_000_000
#: The first view of a site shows at most this many token positions.
INITIAL_POSITIONS = 512
#: Rows read per h5py call (a multiple of the bundle's 64-position chunks).
READ_BLOCK = 256
#: Debounce of view-range changes before the visible slice is re-read (ms).
RANGE_DEBOUNCE_MS = 40

_ROLE = Qt.ItemDataRole.UserRole


def token_label(tok: str) -> str:
    """A token as an axis / list label (BPE leading-space markers shown as ``·``, newlines as ``⏎``)."""
    return tok.replace("Ġ", "·").replace("▁", "·").replace("\n", "⏎").replace("\t", "⇥")


def peak_downsample(arr: np.ndarray, sp: int, sd: int) -> np.ndarray:
    """Reduce ``arr [rows, cols]`` by blocks of ``sp × sd`` cells, keeping the value of largest magnitude per block
    (so a single large activation stays visible when zoomed out)."""
    if sp <= 1 and sd <= 1:
        return arr
    r, c = arr.shape
    R, C = math.ceil(r / sp), math.ceil(c / sd)
    pad = np.full((R * sp, C * sd), np.nan, dtype=np.float32)
    pad[:r, :c] = arr
    blocks = pad.reshape(R, sp, C, sd)
    hi = np.nanmax(blocks, axis=(1, 3))
    lo = np.nanmin(blocks, axis=(1, 3))
    return np.where(np.abs(lo) > np.abs(hi), lo, hi).astype(np.float32)


class _HeatViewBox(pg.ViewBox):
    """A ViewBox whose right-click raises the browser's intervention menu instead of pyqtgraph's view menu."""

    def __init__(self, owner: "BrowserView") -> None:
        super().__init__()
        self._owner = owner
        self.setMenuEnabled(False)

    def mouseClickEvent(self, ev) -> None:  # noqa: N802 - pyqtgraph naming
        if ev.button() == Qt.MouseButton.RightButton:
            ev.accept()
            p = self.mapSceneToView(ev.scenePos())
            sp = ev.screenPos()
            self._owner.heatmap_context_menu(p.x(), p.y(), QPoint(int(sp.x()), int(sp.y())))
            return
        super().mouseClickEvent(ev)


class BrowserView(QWidget):
    """Layers × sites tree, heatmap of the selected site (visible slice only), per-token norms, token list.

    Args:
        session: the window's :class:`workbench.session.Session`.
        runner: the window's :class:`workbench.worker.EngineRunner` (unused: the browser reads only small visible
            slices on the GUI thread, as pyqtgraph's HDF5 example does; kept for the common view signature).
    """

    intervention_requested = Signal(object)   # engine.interventions.Intervention
    site_shown = Signal(int, str)             # a site's first slice is drawn
    slice_drawn = Signal()                    # the heatmap / norms were redrawn from a new read

    def __init__(self, session, runner=None, parent=None) -> None:
        super().__init__(parent)
        self.setObjectName("BrowserView")
        self.session = session
        self.runner = runner if runner is not None else session.runner
        self.layer: int | None = None
        self.site: str | None = None
        self.read_log: list[tuple[int, str, tuple[int, int], tuple[int, int]]] = []
        #: what the heatmap shows (the slice read): positions ``[p0, p1)``, dims ``[d0, d1)``, strides, image ``[rows, cols]``
        self.slice_info: dict = {}
        self.image_data = np.zeros((0, 0), dtype=np.float32)
        self.norm_positions = np.zeros(0, dtype=np.int64)
        self.norm_values = np.zeros(0, dtype=np.float32)
        self.tick_labels: list[tuple[float, str]] = []
        self.last_menu: QMenu | None = None
        self._norm_cache: tuple | None = None     # (layer, site, p0, p1, norms)
        self._suppress_range = False
        self._needs_load = False

        # --- tree of layers and sites
        self.tree = QTreeWidget()
        self.tree.setColumnCount(3)
        self.tree.setHeaderLabels(["Layer / site", "Shape", "CF"])
        self.tree.setRootIsDecorated(True)
        self.tree.setUniformRowHeights(True)
        self.tree.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.tree.header().setSectionResizeMode(0, QHeaderView.ResizeMode.ResizeToContents)
        self.tree.header().setSectionResizeMode(1, QHeaderView.ResizeMode.ResizeToContents)
        self.tree.header().setStretchLastSection(True)
        self.tree.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)
        self.tree.setToolTip("Recorded sites: select one to show its activations; right-click to intervene there")
        self.tree.setMinimumWidth(170)

        # --- heatmap (positions down, dims across) with a colour bar
        self.heat = pg.GraphicsLayoutWidget()
        self.heat.setBackground("w")
        self.heat_vb = _HeatViewBox(self)
        self.heat_plot = self.heat.addPlot(row=0, col=0, viewBox=self.heat_vb)
        _styled_plot_item(self.heat_plot, "token", "dimension", left_units=None, bottom_units="index")
        self.heat_plot.invertY(True)
        self.heat_plot.showGrid(x=False, y=False)
        self.heat_plot.hideButtons()
        self.image = pg.ImageItem(axisOrder="row-major")
        self.heat_plot.addItem(self.image)
        self.cmap = pg.colormap.get("CET-D1")
        self.colorbar = pg.ColorBarItem(values=(-1.0, 1.0), colorMap=self.cmap, label="activation (model units)",
                                        interactive=False, width=14)
        self.colorbar.setImageItem(self.image, insert_in=self.heat_plot)
        self.boundary = pg.InfiniteLine(angle=0, movable=False,
                                        pen=pg.mkPen((30, 30, 160), width=1.5, style=Qt.PenStyle.DashLine),
                                        label="generated ↓", labelOpts={"position": 0.99, "color": (30, 30, 160),
                                                                        "fill": (255, 255, 255, 200),
                                                                        "anchors": [(1, 1), (1, 1)]})
        self.boundary.setVisible(False)
        self.heat_plot.addItem(self.boundary, ignoreBounds=True)
        self.highlight = pg.LinearRegionItem(orientation="horizontal", movable=False,
                                             brush=pg.mkBrush(255, 220, 0, 60), pen=pg.mkPen((200, 150, 0), width=1))
        self.highlight.setVisible(False)
        self.heat_plot.addItem(self.highlight, ignoreBounds=True)
        self.heat.setToolTip("Activations of the selected site: drag to pan, wheel to zoom, Ctrl+0 to fit; "
                             "right-click a row to intervene at that token")

        # --- per-token norms, sharing the token axis with the heatmap
        self.norm_widget = pg.PlotWidget()
        _styled_plot(self.norm_widget, "token", "‖x‖₂", bottom_units="model units")
        self.norm_plot = self.norm_widget.getPlotItem()
        self.norm_plot.invertY(True)
        self.norm_plot.showGrid(x=True, y=False, alpha=0.25)
        self.norm_plot.hideButtons()
        self.norm_plot.getAxis("left").setStyle(showValues=False)
        self.norm_plot.setLabel("left", "")
        self.norm_plot.setYLink(self.heat_plot)
        self.norm_plot.setMouseEnabled(x=False, y=True)
        self.norm_curve = pg.PlotDataItem(pen=pg.mkPen((0, 114, 178), width=1.5), symbol="o", symbolSize=4,
                                          symbolBrush=(0, 114, 178), symbolPen=None)
        self.norm_plot.addItem(self.norm_curve)
        self.norm_widget.setMinimumWidth(160)
        self.norm_widget.setMaximumWidth(260)
        self.norm_widget.setToolTip("L2 norm of each token's full d_model vector (positions in view)")

        # --- token list
        self.tokens = QListWidget()
        self.tokens.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.tokens.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)
        self.tokens.setToolTip("Tokens of the incident (red: failing span, blue: generated). Double-click to show "
                               "it in the heatmap; right-click to intervene at the selected tokens")
        self.tokens.setMinimumWidth(100)
        self.tokens.setMaximumWidth(220)

        # --- header line and buttons
        self.title = QLabel("Open a bundle to browse its activations.")
        self.title.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.title.setWordWrap(True)        # a long site description wraps instead of widening the window
        self.title.setMinimumWidth(200)
        self.hover_label = QLabel("")
        self.hover_label.setStyleSheet("QLabel { color: #333; }")
        self.fit_button = QPushButton("Fit")
        self.fit_button.setToolTip("Show the whole site again (Ctrl+0)")
        self.fit_button.setShortcut(QKeySequence("Ctrl+0"))
        self.fit_button.setEnabled(False)

        head = QHBoxLayout()
        head.addWidget(self.title, 1)
        head.addWidget(self.fit_button)
        plots = QSplitter(Qt.Orientation.Horizontal)
        plots.addWidget(self.heat)
        plots.addWidget(self.norm_widget)
        plots.setStretchFactor(0, 5)
        plots.setStretchFactor(1, 1)
        # with no bundle open, a hint instead of empty axes and a colour bar of nothing
        self.placeholder = QLabel("No incident open.\n\nFile ▸ Open (Ctrl+O), drop an .h5 bundle on the window, "
                                  "or Help ▸ Open demo incident (F1).")
        self.placeholder.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.placeholder.setWordWrap(True)
        self.placeholder.setStyleSheet("QLabel { color: #666; font-size: 14px; }")
        self.plot_stack = QStackedWidget()
        self.plot_stack.addWidget(self.placeholder)
        self.plot_stack.addWidget(plots)
        middle = QWidget()
        ml = QVBoxLayout(middle)
        ml.setContentsMargins(0, 0, 0, 0)
        ml.addLayout(head)
        ml.addWidget(self.plot_stack, 1)
        ml.addWidget(self.hover_label)
        split = QSplitter(Qt.Orientation.Horizontal)
        split.addWidget(self.tree)
        split.addWidget(middle)
        split.addWidget(self.tokens)
        split.setStretchFactor(0, 0)
        split.setStretchFactor(1, 1)
        split.setStretchFactor(2, 0)
        split.setSizes([280, 900, 170])
        lay = QVBoxLayout(self)
        lay.addWidget(split)

        self.range_timer = QTimer(self)
        self.range_timer.setSingleShot(True)
        self.range_timer.setInterval(RANGE_DEBOUNCE_MS)
        self.range_timer.timeout.connect(self._load_visible)

        self.tree.currentItemChanged.connect(self._on_tree_current)
        self.tree.customContextMenuRequested.connect(self._on_tree_menu)
        self.tokens.customContextMenuRequested.connect(self._on_tokens_menu)
        self.tokens.itemDoubleClicked.connect(self._on_token_activated)
        self.tokens.itemSelectionChanged.connect(self._on_token_selection)
        self.fit_button.clicked.connect(self.fit)
        self.heat_vb.sigRangeChanged.connect(self._on_range_changed)
        self.heat_vb.sigResized.connect(self._on_vb_resized)
        self.heat.scene().sigMouseMoved.connect(self._on_mouse_moved)
        session.bundle_opened.connect(self._on_bundle_opened)
        session.bundle_closed.connect(self._on_bundle_closed)
        session.cf_changed.connect(self._on_cf_changed)
        session.site_requested.connect(self.select_site)

        if session.bundle is not None:
            self._on_bundle_opened(session.bundle)

    # ------------------------------------------------------------------ bundle / CF
    @property
    def bundle(self):
        return self.session.bundle

    @Slot(object)
    def _on_bundle_opened(self, bundle) -> None:
        self.read_log = []
        self._norm_cache = None
        self.layer = self.site = None
        self.plot_stack.setCurrentIndex(1)
        self.tree.blockSignals(True)
        self.tree.clear()
        shape_txt = f"{bundle.n_positions} × {bundle.model_info['d_model']}"
        for i in range(bundle.n_layers):
            top = QTreeWidgetItem([f"Layer {i}", "", ""])
            top.setData(0, _ROLE, (i, None))
            top.setToolTip(0, f"block {i} (0-based)")
            for site in bundle.sites:
                ds = bundle.activation_dataset(i, site)      # metadata only: no data is read
                it = QTreeWidgetItem([site, f"{ds.shape[0]} × {ds.shape[1]}", ""])
                it.setData(0, _ROLE, (i, site))
                it.setToolTip(0, f"layer {i} {site}: right-click to intervene on it")
                it.setToolTip(1, f"[positions, d_model] = {list(ds.shape)}, {ds.dtype}, chunks {ds.chunks}")
                top.addChild(it)
            self.tree.addTopLevelItem(top)
            top.setExpanded(True)
        self.tree.blockSignals(False)
        self._fill_tokens(bundle)
        self.title.setText(f"{bundle.n_layers} layers × {len(bundle.sites)} sites, each [{shape_txt}] "
                           f"(positions × d_model). Select a site.")
        self._on_cf_changed(self.session.cf)
        if bundle.n_layers and bundle.sites:
            self.select_site(0, bundle.sites[0])

    @Slot()
    def _on_bundle_closed(self) -> None:
        self.range_timer.stop()
        self.tree.clear()
        self.tokens.clear()
        self.layer = self.site = None
        self.slice_info = {}
        self._norm_cache = None
        self.image.clear()
        self.image_data = np.zeros((0, 0), dtype=np.float32)
        self.norm_curve.setData([], [])
        self.norm_positions = np.zeros(0, dtype=np.int64)
        self.norm_values = np.zeros(0, dtype=np.float32)
        self.boundary.setVisible(False)
        self.highlight.setVisible(False)
        self.fit_button.setEnabled(False)
        self.title.setText("Open a bundle to browse its activations.")
        self.hover_label.setText("")
        self.plot_stack.setCurrentIndex(0)

    def _fill_tokens(self, bundle) -> None:
        self.tokens.clear()
        start, length = bundle.target_start, bundle.target_length
        for i, tok in enumerate(bundle.tokens):
            it = QListWidgetItem(f"{i:>4}  {token_label(tok)}")
            it.setData(_ROLE, i)
            tip = f"position {i}: {tok!r}"
            if start >= 0 and start <= i < start + length:
                it.setBackground(QBrush(QColor(FAIL_BG)))
                it.setForeground(QBrush(QColor(FAIL_FG)))
                tip += " (failing span)"
            elif i >= bundle.n_prompt_tokens:
                it.setBackground(QBrush(QColor("#e6eefb")))
                tip += " (generated)"
            it.setToolTip(tip)
            self.tokens.addItem(it)

    @Slot(object)
    def _on_cf_changed(self, result) -> None:
        scores = {}
        threshold = None
        if result is not None:
            scores = {(int(s.layer), str(s.site)): s for s in result.scores}
            threshold = result.threshold
        red = QBrush(QColor(FAIL_BG))
        for t in range(self.tree.topLevelItemCount()):
            top = self.tree.topLevelItem(t)
            flagged = 0
            best = None
            for c in range(top.childCount()):
                it = top.child(c)
                layer, site = it.data(0, _ROLE)
                s = scores.get((layer, site))
                if s is None:
                    it.setText(2, "")
                    it.setToolTip(2, "run CF (Ctrl+R) to score this site")
                    it.setBackground(2, QBrush())
                    continue
                score = float(s.score)
                best = score if best is None or (math.isfinite(score) and score > best) else best
                if s.flagged:
                    flagged += 1
                    it.setText(2, f"⚑ {_fmt(score)}")
                    it.setBackground(2, red)
                    it.setForeground(2, QBrush(QColor(FAIL_FG)))
                else:
                    it.setText(2, _fmt(score))
                    it.setBackground(2, QBrush())
                    it.setForeground(2, QBrush())
                it.setToolTip(2, f"CF anomaly score {_fmt(score)} (threshold {_fmt(threshold)}), "
                                 f"p = {_fmt(s.p_value)}" + (" — FLAGGED" if s.flagged else ""))
            if best is None:
                top.setText(2, "")
                top.setToolTip(2, "")
            else:
                top.setText(2, (f"⚑ {flagged} flagged" if flagged else f"max {_fmt(best)}"))
                top.setToolTip(2, f"{flagged} of {top.childCount()} sites above the CF threshold "
                                  f"{_fmt(threshold)}; highest score {_fmt(best)}")

    def badge(self, layer: int, site: str) -> str:
        """The CF badge text shown for a site ("" when CF has not run)."""
        it = self._site_item(layer, site)
        return it.text(2) if it is not None else ""

    def _site_item(self, layer: int, site: str) -> QTreeWidgetItem | None:
        if not 0 <= layer < self.tree.topLevelItemCount():
            return None
        top = self.tree.topLevelItem(layer)
        for c in range(top.childCount()):
            it = top.child(c)
            if it.data(0, _ROLE) == (layer, site):
                return it
        return None

    # ------------------------------------------------------------------ selection
    @Slot(int, str)
    def select_site(self, layer: int, site: str) -> None:
        """Select ``(layer, site)`` in the tree and show it (``session.site_requested`` lands here)."""
        it = self._site_item(int(layer), str(site))
        if it is None:
            self.session.status.emit(f"layer {layer} {site} is not in this bundle")
            return
        if self.tree.currentItem() is it:
            self.show_site(int(layer), str(site))
        else:
            self.tree.setCurrentItem(it)      # → _on_tree_current → show_site
        self.tree.scrollToItem(it)

    @Slot(QTreeWidgetItem, QTreeWidgetItem)
    def _on_tree_current(self, cur, _prev) -> None:
        if cur is None:
            return
        layer, site = cur.data(0, _ROLE)
        if site is None:
            return
        self.show_site(layer, site)

    def show_site(self, layer: int, site: str) -> None:
        """Show a site: the first window (all dims, up to :data:`INITIAL_POSITIONS` tokens) is read at once."""
        b = self.bundle
        if b is None:
            return
        ds = b.activation_dataset(layer, site)
        n_pos, d = int(ds.shape[0]), int(ds.shape[1])
        self.layer, self.site = layer, site
        self._norm_cache = None
        max_rows = max(16, min(n_pos, MAX_VIEW_CELLS // max(1, d)))
        self._suppress_range = True
        try:
            self.heat_vb.setLimits(xMin=0, xMax=d, yMin=0, yMax=n_pos, minXRange=1, minYRange=1,
                                   maxYRange=max_rows)
            self.heat_vb.setRange(xRange=(0, d), yRange=(0, min(n_pos, INITIAL_POSITIONS, max_rows)), padding=0)
        finally:
            self._suppress_range = False
        self.boundary.setValue(b.n_prompt_tokens)
        self.boundary.setVisible(b.n_prompt_tokens < n_pos)
        self.fit_button.setEnabled(True)
        if self.isVisible():
            self._load_visible()
        else:
            self._needs_load = True
        self.site_shown.emit(layer, site)

    @Slot()
    def fit(self) -> None:
        if self.layer is None:
            return
        ds = self.bundle.activation_dataset(self.layer, self.site)
        n_pos, d = ds.shape
        max_rows = max(16, min(n_pos, MAX_VIEW_CELLS // max(1, d)))
        self.heat_vb.setRange(xRange=(0, d), yRange=(0, min(n_pos, max_rows)), padding=0)

    # ------------------------------------------------------------------ visible-slice reading
    def visible_window(self) -> tuple[int, int, int, int]:
        """``(p0, p1, d0, d1)``: the positions and dims the heatmap's view range covers (clipped to the site)."""
        ds = self.bundle.activation_dataset(self.layer, self.site)
        n_pos, d = int(ds.shape[0]), int(ds.shape[1])
        (x0, x1), (y0, y1) = self.heat_vb.viewRange()
        d0 = min(max(int(math.floor(x0)), 0), d - 1)
        d1 = max(min(int(math.ceil(x1)), d), d0 + 1)
        p0 = min(max(int(math.floor(y0)), 0), n_pos - 1)
        p1 = max(min(int(math.ceil(y1)), n_pos), p0 + 1)
        return p0, p1, d0, d1

    @Slot(object, object, object)
    def _on_range_changed(self, *_args) -> None:
        if self._suppress_range or self.layer is None:
            return
        self.range_timer.start()

    @Slot(object)
    def _on_vb_resized(self, *_args) -> None:
        if self.layer is not None and self.slice_info and self.isVisible():
            p0, p1, d0, d1 = self.slice_info["p0"], self.slice_info["p1"], self.slice_info["d0"], self.slice_info["d1"]
            if self._strides(p1 - p0, d1 - d0) != (self.slice_info["sp"], self.slice_info["sd"]):
                self.range_timer.start()

    def _strides(self, rows: int, cols: int) -> tuple[int, int]:
        """Downsampling steps so the image has about one cell per pixel (at least 1)."""
        w = max(64, int(self.heat_vb.width()))
        h = max(32, int(self.heat_vb.height()))
        return max(1, math.ceil(rows / h)), max(1, math.ceil(cols / w))

    def _read(self, p0: int, p1: int, d0: int, d1: int) -> np.ndarray:
        self.read_log.append((self.layer, self.site, (p0, p1), (d0, d1)))
        return self.bundle.activation(self.layer, self.site, slice(p0, p1), slice(d0, d1))

    @Slot()
    def _load_visible(self) -> None:
        """Read the visible slice (block by block, peak-downsampled to the pixel size) and redraw."""
        self._needs_load = False
        if self.bundle is None or self.layer is None:
            return
        t0 = time.perf_counter()
        ds = self.bundle.activation_dataset(self.layer, self.site)
        d = int(ds.shape[1])
        p0, p1, d0, d1 = self.visible_window()
        sp, sd = self._strides(p1 - p0, d1 - d0)
        key = (self.layer, self.site, p0, p1)
        need_norms = self._norm_cache is None or self._norm_cache[:4] != key
        block = max(sp, (READ_BLOCK // sp) * sp)
        parts, norms = [], []
        try:
            for b0 in range(p0, p1, block):
                b1 = min(p1, b0 + block)
                if need_norms:   # whole vectors of these positions (the chunks span d_model anyway)
                    rows = self._read(b0, b1, 0, d)
                    norms.append(np.linalg.norm(rows.astype(np.float64), axis=1))
                    rows = rows[:, d0:d1]
                else:
                    rows = self._read(b0, b1, d0, d1)
                parts.append(peak_downsample(np.asarray(rows, dtype=np.float32), sp, sd))
        except ForensicsError as exc:
            msg = str(exc).splitlines()[0]
            self.title.setText(f"Cannot read layer {self.layer} {self.site}: {msg}")
            self.session.status.emit(f"Cannot read layer {self.layer} {self.site}: {msg}")
            return
        img = np.concatenate(parts, axis=0) if parts else np.zeros((0, 0), dtype=np.float32)
        if need_norms:
            self._norm_cache = (*key, np.concatenate(norms).astype(np.float32))
        self.slice_info = {"p0": p0, "p1": p1, "d0": d0, "d1": d1, "sp": sp, "sd": sd}
        self.image_data = img
        self._draw(img, p0, p1, d0, d1)
        self.norm_positions = np.arange(p0, p1)
        self.norm_values = self._norm_cache[4]
        self.norm_curve.setData(self.norm_values, self.norm_positions + 0.5)
        if self.norm_values.size:
            self.norm_plot.setXRange(0, float(self.norm_values.max()) * 1.05 or 1.0, padding=0)
        ms = 1000 * (time.perf_counter() - t0)
        down = f", downsampled {sp}×{sd} (peak)" if sp > 1 or sd > 1 else ""
        self.title.setText(
            f"<b>Layer {self.layer} · {self.site}</b> [{ds.shape[0]} × {d}] {ds.dtype} — showing positions "
            f"{p0}–{p1 - 1}, dims {d0}–{d1 - 1}{down}; read {(p1 - p0) * (d if need_norms else d1 - d0):,} values "
            f"in {ms:.0f} ms")
        self.slice_drawn.emit()

    def _draw(self, img: np.ndarray, p0: int, p1: int, d0: int, d1: int) -> None:
        if img.size == 0:
            self.image.clear()
            return
        m = float(np.percentile(np.abs(img), 99.5)) if img.size else 1.0
        if not math.isfinite(m) or m <= 0:
            m = float(np.abs(img).max()) or 1.0
        self.image.setImage(img, autoLevels=False, levels=(-m, m))
        self.colorbar.setLevels((-m, m))
        self.image.setRect(QRectF(d0, p0, d1 - d0, p1 - p0))
        self._set_ticks(p0, p1)

    def _set_ticks(self, p0: int, p1: int) -> None:
        toks = self.bundle.tokens
        h = max(32.0, float(self.heat_vb.height()))
        step = max(1, math.ceil((p1 - p0) * 14.0 / h))     # one label per 14 px at most
        first = (p0 + step - 1) // step * step
        self.tick_labels = [(i + 0.5, f"{i} {token_label(toks[i])}") for i in range(first, p1, step)]
        self.heat_plot.getAxis("left").setTicks([self.tick_labels])

    # ------------------------------------------------------------------ hover / tokens
    @Slot(object)
    def _on_mouse_moved(self, scene_pos) -> None:
        if self.layer is None or not self.slice_info or not self.heat_vb.sceneBoundingRect().contains(scene_pos):
            return
        p = self.heat_vb.mapSceneToView(scene_pos)
        w = self.slice_info
        pos, dim = int(math.floor(p.y())), int(math.floor(p.x()))
        if not (w["p0"] <= pos < w["p1"] and w["d0"] <= dim < w["d1"]):
            self.hover_label.setText("")
            return
        r, c = (pos - w["p0"]) // w["sp"], (dim - w["d0"]) // w["sd"]
        if r >= self.image_data.shape[0] or c >= self.image_data.shape[1]:
            return
        v = float(self.image_data[r, c])
        what = "value" if w["sp"] == 1 and w["sd"] == 1 else f"peak of {w['sp']}×{w['sd']} cells"
        self.hover_label.setText(f"position {pos} {token_label(self.bundle.tokens[pos])!r}, dim {dim}: "
                                 f"{what} {_fmt(v, 4)}; right-click to intervene at this token")

    @Slot(QListWidgetItem)
    def _on_token_activated(self, item) -> None:
        pos = int(item.data(_ROLE))
        if self.layer is None:
            return
        (y0, y1) = self.heat_vb.viewRange()[1]
        half = max(4.0, (y1 - y0) / 2)
        self.heat_vb.setYRange(pos + 0.5 - half, pos + 0.5 + half, padding=0)

    @Slot()
    def _on_token_selection(self) -> None:
        pos = self.selected_positions()
        if not pos:
            self.highlight.setVisible(False)
            return
        self.highlight.setRegion((min(pos), max(pos) + 1))
        self.highlight.setVisible(True)

    def selected_positions(self) -> list[int]:
        return sorted(int(it.data(_ROLE)) for it in self.tokens.selectedItems())

    # ------------------------------------------------------------------ context menus → interventions
    @Slot(QPoint)
    def _on_tree_menu(self, point: QPoint) -> None:
        it = self.tree.itemAt(point)
        if it is None:
            return
        layer, site = it.data(0, _ROLE)
        if site is None:
            return
        self.popup_menu(self.build_menu(layer, site, "all"), self.tree.viewport().mapToGlobal(point))

    @Slot(QPoint)
    def _on_tokens_menu(self, point: QPoint) -> None:
        it = self.tokens.itemAt(point)
        if it is None or self.layer is None:
            return
        pos = int(it.data(_ROLE))
        sel = self.selected_positions()
        positions = tuple(sel) if pos in sel and len(sel) > 1 else (pos,)
        self.popup_menu(self.build_menu(self.layer, self.site, positions), self.tokens.viewport().mapToGlobal(point))

    def heatmap_context_menu(self, x: float, y: float, global_pos: QPoint) -> None:
        """Right-click at data point ``(x = dim, y = position)`` of the heatmap."""
        if self.layer is None or not self.slice_info:
            return
        n_pos = self.bundle.n_positions
        pos = int(math.floor(y))
        if not 0 <= pos < n_pos:
            return
        w = self.slice_info
        ds = self.bundle.activation_dataset(self.layer, self.site)
        dims = (w["d0"], w["d1"]) if (w["d0"], w["d1"]) != (0, int(ds.shape[1])) else None
        self.popup_menu(self.build_menu(self.layer, self.site, (pos,), dims=dims), global_pos)

    def popup_menu(self, menu: QMenu, global_pos: QPoint) -> None:
        self.last_menu = menu
        menu.popup(global_pos)

    def build_menu(self, layer: int, site: str, positions, dims: tuple[int, int] | None = None) -> QMenu:
        """The intervention menu for a site at ``positions`` (a tuple of ints or ``"all"``).

        Each action's data is the :class:`Intervention` it requests (``None`` for *Scale…* / *Neurons…*, which ask
        for a number first).
        """
        from engine.interventions import Intervention

        b = self.bundle
        toks = b.tokens
        if positions == "all":
            where = "all positions"
        elif len(positions) == 1:
            where = f"position {positions[0]} {token_label(toks[positions[0]])!r}"
        else:
            where = f"positions {', '.join(map(str, positions))}"
        menu = QMenu(self)
        menu.setToolTipsVisible(True)
        head = menu.addAction(f"L{layer} {site} · {where}")
        head.setEnabled(False)
        menu.addSeparator()
        has_donor = bool(b.prompt_sets.get("counterpart"))
        has_mean = bool(b.has_benign)

        def add(text: str, iv, tip: str, enabled: bool = True, parent: QMenu = menu, kind: str = "") -> QAction:
            act = parent.addAction(text)
            act.setData((kind, iv))
            act.setToolTip(tip)
            act.setEnabled(enabled)
            return act

        add("Ablate here (mean)", Intervention(layer, site, positions, "mean"),
                "Replace by the mean over the bundle's benign reference runs", has_mean)
        add("Zero here", Intervention(layer, site, positions, "zero"), "Set the activation to 0")
        add("Patch from counterpart", Intervention(layer, site, positions, "patch"),
            "Copy the activation of the benign counterpart prompt at the aligned position" if has_donor else
            "This bundle has no counterpart prompt to patch from", has_donor)
        add("Scale…", None, "Multiply the activation by a factor you choose", kind="scale:" + site)
        if dims is not None:
            d0, d1 = dims
            sub = menu.addMenu(f"Dims {d0}–{d1 - 1} in view")
            sub.setToolTipsVisible(True)
            idx = tuple(range(d0, d1))
            add("Ablate these dims (mean)", Intervention(layer, site, positions, "mean", indices=idx),
                f"Mean-ablate only dimensions {d0}–{d1 - 1} of the {site} vector", has_mean, sub)
            add("Zero these dims", Intervention(layer, site, positions, "zero", indices=idx),
                f"Zero only dimensions {d0}–{d1 - 1}", True, sub)
        info = b.model_info
        if site == "attn":
            sub = menu.addMenu("One head (mean) ▸")
            sub.setToolTipsVisible(True)
            for h in range(int(info["n_heads"])):
                add(f"Head {h}", Intervention(layer, "head", positions, "mean", indices=(h,)),
                    f"Mean-ablate head {h} of layer {layer} (its {info['d_head']} values before the out-projection)",
                    has_mean, sub)
        if site == "mlp":
            add("Neurons (mean)…", None, f"Mean-ablate chosen MLP neurons (0..{info['d_mlp'] - 1})", has_mean,
                kind="neurons")
        menu.triggered.connect(self._on_menu_action)
        menu.setProperty("layer", layer)
        menu.setProperty("positions", "all" if positions == "all" else list(positions))
        return menu

    @Slot(QAction)
    def _on_menu_action(self, act: QAction) -> None:
        data = act.data()
        if not isinstance(data, tuple):
            return
        kind, iv = data
        menu = act.parent()
        while isinstance(menu, QMenu) and menu.property("layer") is None:
            menu = menu.parent()
        if iv is None and isinstance(menu, QMenu):
            layer = int(menu.property("layer"))
            pos = menu.property("positions")
            positions = "all" if pos == "all" else tuple(int(p) for p in pos)
            iv = self._ask(kind, layer, positions)
            if iv is None:
                return
        self.request(iv)

    def _ask(self, kind: str, layer: int, positions):
        from engine.errors import InterventionError
        from engine.interventions import Intervention
        from workbench.views.editor import parse_int_list

        where = "all positions" if positions == "all" else "position(s) " + ", ".join(map(str, positions))
        if kind.startswith("scale:"):
            site = kind.split(":", 1)[1]
            value, ok = QInputDialog.getDouble(self, "Scale activation",
                                               f"Multiply layer {layer} {site} at {where} by:", 0.5, -1e6, 1e6, 3)
            if not ok:
                return None
            return Intervention(layer, site, positions, "scale", value=float(value))
        if kind == "neurons":
            d_mlp = int(self.bundle.model_info["d_mlp"])
            text, ok = QInputDialog.getText(self, "Ablate MLP neurons",
                                            f"Neurons of layer {layer} (0..{d_mlp - 1}), e.g. 3, 10-12:")
            if not ok or not text.strip():
                return None
            try:
                idx = parse_int_list(text, "neuron", upper=d_mlp)
                return Intervention(layer, "neuron", positions, "mean", indices=idx)
            except InterventionError as exc:
                self.session.status.emit(f"Not added: {exc}")
                self.title.setText(f"<span style='color:#be1e1e'>Not added: {exc}</span>")
                return None
        return None

    def request(self, iv) -> None:
        """Emit ``intervention_requested`` for ``iv`` and say so in the status bar."""
        self.intervention_requested.emit(iv)
        self.session.status.emit(f"Intervention {iv.describe()} sent to the editor (Ctrl+2)")

    # ------------------------------------------------------------------ lifetime
    def showEvent(self, event) -> None:  # noqa: N802 - Qt naming
        super().showEvent(event)
        if self._needs_load and self.layer is not None:
            QTimer.singleShot(0, self._load_visible)

    def hideEvent(self, event) -> None:  # noqa: N802 - Qt naming
        if self.range_timer.isActive():
            self.range_timer.stop()
            self._needs_load = True
        super().hideEvent(event)

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt naming
        self.range_timer.stop()
        super().closeEvent(event)

    def shutdown(self) -> None:
        self.range_timer.stop()


def _styled_plot_item(item: pg.PlotItem, left: str, bottom: str, left_units: str | None = None,
                      bottom_units: str | None = None) -> None:
    """:func:`workbench.views.plots._styled_plot` for a PlotItem inside a GraphicsLayoutWidget."""
    item.setLabel("left", left, units=left_units)
    item.setLabel("bottom", bottom, units=bottom_units)
    for name in ("left", "bottom"):
        axis = item.getAxis(name)
        axis.setPen(pg.mkPen((60, 60, 60)))
        axis.setTextPen(pg.mkPen((30, 30, 30)))
        axis.enableAutoSIPrefix(False)

