"""Story 3: run Compression Forensics and watch the per-layer anomaly plot fill in live.

The CF job runs on the engine thread (``engine.cf.run_cf`` with ``on_layer`` → the runner's ``progress``
signal).  The view's slots only store what arrives; a ~10 Hz :class:`QTimer` redraws the bar plot from the latest
state and stops once the run is over.  Clicking a bar (or a row of the findings table) emits
``session.site_requested(layer, site)`` so the layer browser jumps there.  The final result is published with
``session.set_cf``.  Under the state line a badge gives the run-level (family-wise) verdict: is the run as a whole
anomalous (its maximum site score above the run threshold calibrated on benign runs), with the share of held-out
benign runs that threshold flags; with too few benign runs for a 5% test it says there is no verdict, and why.
"""

from __future__ import annotations

import math

from PySide6.QtCore import Qt, QTimer, Slot
from PySide6.QtWidgets import (QAbstractItemView, QComboBox, QHBoxLayout, QHeaderView, QLabel, QProgressBar,
                               QPushButton, QSplitter, QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget)

from workbench.views.cca_view import tokens_text
from workbench.views.incident import FAIL_BG, FAIL_FG
from workbench.views.plots import AnomalyBarPlot, _fmt

JOB = "cf"
_DEFAULT_STATISTICS = ("bits", "distance")
_UNITS = {"bits": "bits/value", "distance": "distance from benign mean"}
_BADGE = {True: (FAIL_BG, FAIL_FG), False: ("#c9f0c9", "#145214"), None: ("#e4e4e4", "#444")}


def run_verdict_text(result) -> tuple[str, str]:
    """``(badge, detail)`` of a ``CFResult``'s run-level verdict, as the view shows them."""
    from engine.cf import format_score, run_no_verdict_text

    missed = False
    if result.heldout_run_fpr is None:
        why = ("the run was cancelled" if result.partial else "no held-out benign prompts" if not result.n_heldout else
               "rebuild the baseline with forensics baseline build to measure it")
        fpr = f"held-out benign runs flagged: not measured ({why})"
    else:
        missed = result.heldout_run_fpr > 0.05
        fpr = (f"held-out benign runs flagged: {result.heldout_run_fpr:.1%} of {result.n_run_heldout}"
               + (" others" if result.run_calibration == "heldout" else "")
               + (" (target ≤ 5%: MISSED, so this verdict is a false alarm more often than 1 run in 20)" if missed
                  else " (target ≤ 5%)"))
    if result.run_anomalous is None:
        reason = result.run_no_verdict_reason or ("partial" if result.partial else "")
        why = run_no_verdict_text(reason, n_calibration=result.n_run_reference, calibration=result.run_calibration,
                                  run_statistic=result.run_statistic, run_p_value=result.run_p_value,
                                  min_calibration=result.run_min_calibration)
        if reason == "too_few_calibration_runs":   # no run threshold, so no rate of it to measure
            return "No run verdict", f"{why[0].upper()}{why[1:]}."
        return "No run verdict", f"{why[0].upper()}{why[1:]}. {fpr[0].upper()}{fpr[1:]}."
    calib = ("held-out benign calibration runs" if result.run_calibration == "heldout" else
             "benign reference runs")
    rel = ">" if result.run_anomalous else "≤"
    return (("Run ANOMALOUS" if result.run_anomalous else "Run not anomalous") + (" ⚠" if missed else ""),
            f"max site score {format_score(result.run_statistic)} {rel} run threshold "
            f"{format_score(result.run_threshold)}, p = {_fmt(result.run_p_value)} against {result.n_run_reference} "
            f"{calib}; {fpr}.")


def _cf_module():
    """``engine.cf`` or ``None`` while it has not landed (the button then says so)."""
    try:
        import engine.cf as cf
    except ModuleNotFoundError as exc:
        if exc.name != "engine.cf":
            raise
        return None
    return cf


class CFView(QWidget):
    """Run CF, a live per-layer anomaly bar plot with the threshold line, and the ranked findings.

    Args:
        session: the window's :class:`workbench.session.Session`.
        runner: the window's :class:`workbench.worker.EngineRunner` (defaults to ``session.runner``).
    """

    REFRESH_MS = 100

    def __init__(self, session, runner=None, parent=None) -> None:
        super().__init__(parent)
        self.setObjectName("CFView")
        self.session = session
        self.runner = runner if runner is not None else session.runner
        self.result = None                 # the CFResult shown (None while running / before any run)
        self._live: dict[tuple[int, str], object] = {}   # LayerScores received during the run
        self._dirty = False
        self._progress = (0, 0, "")
        self._job = None                   # the cancel event of the run this view waits for (runner.delivering)

        cf = _cf_module()
        self.statistic = QComboBox()
        self.statistic.setToolTip("Statistic CF scores each layer × site with")
        stats = tuple(getattr(cf, "STATISTICS", _DEFAULT_STATISTICS)) if cf else _DEFAULT_STATISTICS
        default = getattr(cf, "DEFAULT_STATISTIC", stats[0]) if cf else stats[0]
        for name in stats:
            self.statistic.addItem(f"{name} ({_UNITS.get(name, name)})", name)
        self.statistic.setCurrentIndex(max(0, list(stats).index(default) if default in stats else 0))
        self.run_button = QPushButton("Run CF")
        self.run_button.setToolTip("Score every layer × site of the incident against the benign baseline (Ctrl+R)")
        self.cancel_button = QPushButton("Cancel")
        self.progress = QProgressBar()
        self.progress.setTextVisible(True)
        self.progress.setFormat("%v / %m")
        self.state_label = QLabel("Open a bundle to run CF.")
        self.state_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.verdict_badge = QLabel()
        self.verdict_badge.setToolTip(
            "Is the run as a whole anomalous? Its largest site score is compared with the same maximum of benign runs "
            "(a family-wise test over all sites): the run threshold is their conformal 95th percentile, so about 5% "
            "of benign runs are called anomalous; the share of held-out benign runs it flags is measured. A 95th "
            f"percentile needs at least {getattr(cf, 'MIN_RUN_CALIBRATION', 19)} benign runs: with fewer there is no "
            "run verdict.")
        self.verdict_label = QLabel()
        self.verdict_label.setWordWrap(True)
        self.verdict_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.verdict_label.setToolTip(self.verdict_badge.toolTip())

        top = QHBoxLayout()
        top.addWidget(QLabel("Statistic:"))
        top.addWidget(self.statistic)
        top.addWidget(self.run_button)
        top.addWidget(self.cancel_button)
        top.addWidget(self.progress, 1)

        self.plot = AnomalyBarPlot()
        self.plot.setMinimumHeight(220)
        self.findings = QTableWidget(0, 7)
        self.findings.setHorizontalHeaderLabels(["#", "layer", "site", "positions", "score", "p-value", "tokens"])
        self.findings.verticalHeader().setVisible(False)
        self.findings.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.findings.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.findings.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.findings.horizontalHeader().setStretchLastSection(True)
        self.findings.setToolTip("Ranked anomalous sites; double-click a row to show it in the browser")

        split = QSplitter(Qt.Orientation.Vertical)
        split.addWidget(self.plot)
        split.addWidget(self.findings)
        split.setStretchFactor(0, 3)
        split.setStretchFactor(1, 2)  # the top findings in view under the plot (no minimum height: small screens)

        verdict = QHBoxLayout()
        verdict.addWidget(self.verdict_badge, 0, Qt.AlignmentFlag.AlignVCenter)
        verdict.addWidget(self.verdict_label, 1)

        lay = QVBoxLayout(self)
        lay.addLayout(top)
        lay.addWidget(self.state_label)
        lay.addLayout(verdict)
        lay.addWidget(split, 1)

        self.timer = QTimer(self)
        self.timer.setInterval(self.REFRESH_MS)
        self.timer.timeout.connect(self._refresh)

        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.plot.bar_clicked.connect(self._on_bar_clicked)
        self.findings.cellDoubleClicked.connect(self._on_finding_activated)
        self.runner.progress.connect(self._on_progress)
        self.runner.finished.connect(self._on_finished)
        self.runner.failed.connect(self._on_failed)
        session.bundle_opened.connect(self._on_bundle_opened)
        session.bundle_closed.connect(self._on_bundle_closed)
        session.cf_changed.connect(self._on_cf_changed)

        if session.bundle is not None:
            self._on_bundle_opened(session.bundle)
        self._show_verdict(None)
        if session.cf is not None:
            self._on_cf_changed(session.cf)
        self._update_enabled()

    # ------------------------------------------------------------------ state
    @property
    def running(self) -> bool:
        return self.runner.is_running(JOB)

    def _update_enabled(self) -> None:
        has_bundle = self.session.bundle is not None
        running = self.running
        available = _cf_module() is not None
        self.run_button.setEnabled(has_bundle and not running and available)
        self.statistic.setEnabled(not running)
        self.cancel_button.setEnabled(running)
        if not available:
            self.run_button.setToolTip("CF is not available in this build (engine.cf is missing)")

    # ------------------------------------------------------------------ actions
    @Slot()
    def run(self) -> None:
        """Start CF on the engine thread (no-op without a bundle or while a run is going)."""
        bundle = self.session.bundle
        if bundle is None or self.running:
            return
        statistic = self.statistic.currentData()
        session = self.session

        def job(emit, cancel):
            from engine.cf import run_cf

            handle = session.model()
            return run_cf(bundle, handle, statistic=statistic, cancel=cancel,
                          progress=lambda done, total, what: emit(("progress", int(done), int(total), str(what))),
                          on_layer=lambda score: emit(("layer", score)))

        self.result = None
        self._live = {}
        self._dirty = True
        self._show_verdict(None)
        self.plot.configure(bundle.sites, bundle.n_layers, _UNITS.get(statistic, statistic))
        self.findings.setRowCount(0)
        n_cells = bundle.n_layers * len(bundle.sites)
        self.progress.setRange(0, n_cells)
        self.progress.setValue(0)
        self._progress = (0, n_cells, "starting")
        self.state_label.setText(f"Running CF ({statistic}) on {n_cells} layer × site cells…")
        self._job = self.runner.submit(JOB, job, replace=True)
        self.timer.start()
        self._update_enabled()
        self.session.status.emit("CF running…")

    @Slot()
    def cancel(self) -> None:
        self.runner.cancel(JOB)
        self.state_label.setText("Cancelling CF…")

    # ------------------------------------------------------------------ runner slots
    @Slot(str, object)
    def _on_progress(self, name: str, data: object) -> None:
        if name != JOB or not self.runner.delivering(self._job) or not isinstance(data, tuple) or not data:
            return
        if data[0] == "layer":
            score = data[1]
            self._live[(int(score.layer), str(score.site))] = score
            self._dirty = True
        elif data[0] == "progress":
            self._progress = (data[1], data[2], data[3])
            self._dirty = True

    @Slot(str, object)
    def _on_finished(self, name: str, result: object) -> None:
        if name != JOB:
            return
        if not self.runner.delivering(self._job):   # a run of a bundle since closed, or one since replaced
            self._update_enabled()
            return
        self._job = None
        self.timer.stop()
        self._update_enabled()
        if result is None:
            self.state_label.setText("CF stopped before scoring anything.")
            return
        self.session.set_cf(result)      # → _on_cf_changed draws it
        self.session.status.emit("CF partial (cancelled)" if result.partial else
                                 f"CF done: {len(result.findings)} finding(s)")

    @Slot(str, str)
    def _on_failed(self, name: str, message: str) -> None:
        if name != JOB:
            return
        if not self.runner.delivering(self._job):
            self._update_enabled()
            return
        self._job = None
        self.timer.stop()
        self._refresh()
        self._update_enabled()
        self.state_label.setText(f"CF failed: {message}")
        self.session.status.emit(f"CF failed: {message}")

    @Slot()
    def _refresh(self) -> None:
        """Timer tick: redraw the plot from the scores received so far."""
        if not self._dirty:
            return
        self._dirty = False
        done, total, what = self._progress
        done = max(done, len(self._live))
        if total:
            self.progress.setRange(0, max(total, done))
        self.progress.setValue(done)
        self.plot.set_scores(self._live.values())
        if self.running and what:
            self.state_label.setText(f"Running CF: {what} ({len(self._live)} cells scored)")

    # ------------------------------------------------------------------ session slots
    @Slot(object)
    def _on_bundle_opened(self, bundle) -> None:
        self.result = None
        self._live = {}
        self._show_verdict(None)
        self.plot.configure(bundle.sites, bundle.n_layers, _UNITS.get(self.statistic.currentData(), ""))
        self.findings.setRowCount(0)
        self.progress.setRange(0, max(1, bundle.n_layers * len(bundle.sites)))
        self.progress.setValue(0)
        self.state_label.setText(f"{bundle.n_layers} layers × {len(bundle.sites)} sites. Press Run CF.")
        self._update_enabled()

    @Slot()
    def _on_bundle_closed(self) -> None:
        self.timer.stop()
        self._job = None                   # its partial result, when it comes, belongs to no open bundle
        self.result = None
        self._live = {}
        self._show_verdict(None)
        self.plot.configure([], 0)
        self.findings.setRowCount(0)
        self.progress.reset()              # no "0 / 16" of the closed bundle's cells
        self.state_label.setText("Open a bundle to run CF.")
        self._update_enabled()

    @Slot(object)
    def _on_cf_changed(self, result) -> None:
        if result is None:
            return
        bundle = self.session.bundle
        self.result = result
        sites = list(bundle.sites) if bundle is not None else sorted({s.site for s in result.scores})
        n_layers = bundle.n_layers if bundle is not None else 1 + max((s.layer for s in result.scores), default=-1)
        self.plot.configure(sites, n_layers, _UNITS.get(result.statistic, result.statistic))
        self.plot.set_scores(result.scores, result.threshold)
        self._live = {(s.layer, s.site): s for s in result.scores}
        self.progress.setRange(0, max(1, n_layers * len(sites)))
        self.progress.setValue(len(result.scores))
        self._fill_findings(result)
        flagged = sum(1 for s in result.scores if s.flagged)
        fpr = (f"; held-out benign FPR {result.heldout_fpr:.1%}" if result.heldout_fpr is not None else
               "; held-out benign FPR not measured (the run was cancelled)" if result.partial else
               "; held-out benign FPR not measured (no held-out benign prompts)" if not result.n_heldout else
               "; held-out benign FPR not measured")
        self.state_label.setText(
            ("PARTIAL (cancelled): " if result.partial else "") +
            f"CF ({result.statistic}) scored {len(result.scores)} cells in {result.seconds:.1f} s: "
            + (f"{flagged} above threshold {_fmt(result.threshold)}" if math.isfinite(float(result.threshold)) else
               "no threshold (cancelled before the benign baseline was built)")
            + f"{fpr}. Click a bar to show that site.")
        self._show_verdict(result)
        self._update_enabled()

    def _show_verdict(self, result) -> None:
        """The run-level verdict badge and its line; hidden until there is a result."""
        self.verdict_badge.setVisible(result is not None)
        self.verdict_label.setVisible(result is not None)
        if result is None:
            self.verdict_badge.clear()
            self.verdict_label.clear()
            return
        badge, detail = run_verdict_text(result)
        bg, fg = _BADGE[result.run_anomalous]
        self.verdict_badge.setText(badge)
        self.verdict_badge.setStyleSheet(f"QLabel {{ background: {bg}; color: {fg}; font-weight: bold; "
                                         f"padding: 2px 8px; border-radius: 3px; }}")
        self.verdict_label.setText(detail)

    def _fill_findings(self, result) -> None:
        rows = result.findings
        tokens = getattr(self.session.bundle, "tokens", None)
        self.findings.setRowCount(len(rows))
        for r, f in enumerate(rows):
            positions = ", ".join(str(p) for p in f.positions)
            values = [str(r + 1), str(f.layer), f.site, positions, _fmt(f.score), _fmt(f.p_value),
                      tokens_text(f.positions, tokens)]
            for c, text in enumerate(values):
                item = QTableWidgetItem(text)
                if c in (0, 1, 4, 5):
                    item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                item.setData(Qt.ItemDataRole.UserRole, (int(f.layer), str(f.site)))
                self.findings.setItem(r, c, item)

    # ------------------------------------------------------------------ navigation
    @Slot(int, str)
    def _on_bar_clicked(self, layer: int, site: str) -> None:
        self.session.site_requested.emit(int(layer), str(site))
        s = self.plot.scores.get((layer, site))
        if s is not None and math.isfinite(float(s.score)):
            self.session.status.emit(f"layer {layer} {site}: anomaly score {_fmt(s.score)}, p = {_fmt(s.p_value)}")

    @Slot(int, int)
    def _on_finding_activated(self, row: int, _col: int) -> None:
        item = self.findings.item(row, 0)
        if item is not None:
            layer, site = item.data(Qt.ItemDataRole.UserRole)
            self.session.site_requested.emit(layer, site)

    # ------------------------------------------------------------------ lifetime
    def closeEvent(self, event) -> None:  # noqa: N802 - Qt naming
        self.timer.stop()
        if self.running:
            self.runner.cancel(JOB)
        super().closeEvent(event)
