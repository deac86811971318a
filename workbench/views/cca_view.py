"""Story 4: run Causal Circuit Analysis with progress, a live plot of the search, Cancel, and the result.

The CCA job (``engine.cca.run_cca``) runs on the engine thread; its ``progress`` and ``on_step`` callbacks reach
the view through the runner's ``progress`` signal.  Slots only store the latest state; a ~10 Hz :class:`QTimer`
updates the progress bar, the label (stage, passes, best metric) and the search-trace plot, and stops when the
run ends.  Cancel sets the job's event: the engine returns its best-so-far set marked ``partial``, which is shown
(and labelled PARTIAL) like any result.  Finished results are published with ``session.set_cca``.

The table/summary helpers here (:func:`fill_fix_set_table`, :func:`fill_criteria_table`, :func:`summary_lines`)
are shared with the review view.
"""

from __future__ import annotations

import math

import pyqtgraph as pg
from PySide6.QtCore import Qt, QTimer, Slot
from PySide6.QtGui import QColor
from PySide6.QtWidgets import (QAbstractItemView, QCheckBox, QComboBox, QFormLayout, QFrame, QGroupBox,
                               QHBoxLayout, QHeaderView, QLabel, QProgressBar, QPushButton, QScrollArea, QSpinBox,
                               QSplitter, QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget)

from workbench.views.plots import _fmt, _styled_plot

JOB = "cca"
OK_MARK, FAIL_MARK = "\u2713", "\u2717"   # ✓ ✗
_GREEN, _RED = QColor(0, 128, 60), QColor(190, 30, 30)


# ----------------------------------------------------------------------------------------------------------------
# Shared rendering of a CCAResult
# ----------------------------------------------------------------------------------------------------------------
def _pct(x) -> str:
    return "—" if x is None or not math.isfinite(float(x)) else f"{100 * float(x):.1f}%"


def positions_text(positions) -> str:
    return "all" if positions == "all" else ", ".join(str(p) for p in positions)


def tokens_text(positions, tokens, limit: int = 4) -> str:
    """The tokens at ``positions`` as the browser labels them (``“:”, “·HACKED” +2 more``); ``every token`` for
    ``all``; empty when the bundle's tokens are not known."""
    from workbench.views.browser import token_label

    if positions == "all":
        return "every token"
    if not tokens:
        return ""
    ps = [int(p) for p in positions]
    shown = [f"\u201c{token_label(str(tokens[p]))}\u201d" for p in ps[:limit] if 0 <= p < len(tokens)]
    return ", ".join(shown) + (f" +{len(ps) - limit} more" if len(ps) > limit else "")


def make_table(headers: list[str]) -> QTableWidget:
    t = QTableWidget(0, len(headers))
    t.setHorizontalHeaderLabels(headers)
    t.verticalHeader().setVisible(False)
    t.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
    t.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
    t.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
    t.horizontalHeader().setStretchLastSection(True)
    t.setWordWrap(False)
    return t


def vertical_scroll(widget: QWidget) -> QScrollArea:
    """``widget`` in a frameless scroll area that scrolls vertically only (it fills the width), so a short window
    scrolls the content instead of squeezing it or growing its own minimum height."""
    area = QScrollArea()
    area.setWidget(widget)
    area.setWidgetResizable(True)
    area.setFrameShape(QFrame.Shape.NoFrame)
    area.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    return area


def _item(text: str, numeric: bool = False) -> QTableWidgetItem:
    it = QTableWidgetItem(text)
    if numeric:
        it.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
    return it


FIX_SET_HEADERS = ["#", "layer", "site", "positions", "op", "drop-one metric", "necessary", "alone metric",
                   "tokens"]


def fill_fix_set_table(table: QTableWidget, result, first_col: int = 0, tokens=None) -> None:
    """One row per fix-set element: where, what, its drop-one / single effects, and the tokens it acts at
    (``tokens``: the bundle's tokens).

    Columns start at ``first_col`` (the review view puts its accept checkbox in column 0).
    """
    table.setRowCount(len(result.fix_set))
    for r, el in enumerate(result.fix_set):
        iv = el.intervention
        op = iv.op + (f"({iv.value:g})" if getattr(iv, "value", None) is not None else "")
        if getattr(iv, "indices", None):
            op += f" dims {','.join(map(str, iv.indices))}"
        necessary = "—" if result.partial and not math.isfinite(el.drop_one_metric) else (
            f"{OK_MARK} yes" if el.drop_one_failing else f"{FAIL_MARK} no")
        cells = [(str(r + 1), True), (str(iv.layer), True), (iv.component, False),
                 (positions_text(iv.positions), False), (op, False), (_fmt(el.drop_one_metric), True),
                 (necessary, False), (_fmt(el.single_metric), True), (tokens_text(iv.positions, tokens), False)]
        for c, (text, num) in enumerate(cells):
            it = _item(text, num)
            if c == 6 and text != "—":
                it.setForeground(_GREEN if el.drop_one_failing else _RED)
                it.setToolTip("removing this element makes the incident fail again" if el.drop_one_failing else
                              "the incident stays fixed without this element")
            if c == 5:
                it.setToolTip("search metric (logit margin; > 0 = fails) of the incident with this element removed "
                              "from the set")
            if c == 7:
                it.setToolTip("search metric (logit margin; > 0 = fails) of the incident with this element alone")
            table.setItem(r, first_col + c, it)


CRITERIA_HEADERS = ["", "criterion", "target", "measured", "detail"]
#: Criteria whose measured value is a share (shown as a percentage).
_PERCENT_CRITERIA = ("flip_rate", "side_effect_rate", "fraction_of_activations")
#: Criteria whose measured value is a yes (1) / no (0).
_FLAG_CRITERIA = ("one_minimal", "incident_flipped")


def fill_criteria_table(table: QTableWidget, result) -> None:
    """✓/✗ per criterion with its target, measured value and detail."""
    crit = result.criteria or {}
    table.setRowCount(len(crit))
    for r, (name, c) in enumerate(crit.items()):
        ok = bool(c.get("ok"))
        mark = _item(OK_MARK if ok else FAIL_MARK)
        mark.setForeground(_GREEN if ok else _RED)
        mark.setTextAlignment(Qt.AlignmentFlag.AlignCenter)
        value = c.get("value")
        table.setItem(r, 0, mark)
        table.setItem(r, 1, _item(name.replace("_", " ")))
        table.setItem(r, 2, _item(str(c.get("target", ""))))
        if isinstance(value, bool) or (name in _FLAG_CRITERIA and value in (0, 1)):
            shown = "yes" if value else "no"
        elif not isinstance(value, (int, float)):
            shown = "—" if value is None else str(value)
        elif name in _PERCENT_CRITERIA:
            shown = f"{100 * float(value):.2f}%" if 0 < abs(float(value)) < 0.01 else _pct(value)
        else:
            shown = _fmt(value)
        table.setItem(r, 3, _item(shown, True))
        detail = _item(str(c.get("detail", "")))
        detail.setToolTip(str(c.get("detail", "")))
        table.setItem(r, 4, detail)


def summary_lines(result, kind: str | None = None) -> list[str]:
    """The headline numbers of a CCA result, one per line (all measured by the engine); ``kind``: the incident's
    failure spec kind (names the search metric: a margin along the continuation for generation incidents)."""
    from engine.cca import not_measured  # here, not at import: engine.cca loads torch
    from engine.failure import search_metric_name

    lines = []
    if result.partial:
        lines.append("PARTIAL result (the run was cancelled): the evidence below is incomplete.")
    state = ("FLIPPED (no longer fails)" if result.flipped else "still fails" if result.checked else
             "not checked (cancelled before the set was run on it)")
    margin = ((result.evidence or {}).get("incident") or {}).get("margin")
    # CCA counts the incident fixed only when the failing outcome is beaten by the fix margin: without saying so,
    # "still fails; search metric 0.07 → -0.41 (> 0 = fails)" reads as a contradiction
    rule = (f"> 0 = fails; fixed needs \u2264 \u2212{_fmt(margin)}, the fix margin"
            if isinstance(margin, (int, float)) and math.isfinite(margin) and margin > 0 else "> 0 = fails")
    lines.append(f"Fix set: {len(result.fix_set)} element(s); incident {state}; "
                 f"{'search metric' if result.checked else 'best search metric (teacher-forced)'} "
                 f"{_fmt(result.baseline_metric)} \u2192 {_fmt(result.fixed_metric)} "
                 f"({search_metric_name(kind)}; {rule})")
    lo, hi = result.flip_rate_ci
    if result.n_variants:
        lines.append(f"Flip rate over {result.n_variants} held-out failing variants: {_pct(result.flip_rate)} "
                     f"(Wilson 95% CI {_pct(lo)}\u2013{_pct(hi)})")
    else:
        lines.append(f"Flip rate over held-out variants: {not_measured('flip_rate', result)}")
    n_suff = getattr(result, "n_sufficiency", 0)
    if n_suff or math.isfinite(result.sufficiency_rate):
        lines.append(f"Sufficiency (failing activations transplanted into benign counterparts): "
                     f"{_pct(result.sufficiency_rate)}" + (f" of {n_suff}" if n_suff else ""))
    else:
        lines.append(f"Sufficiency: {not_measured('sufficiency_rate', result)}")
    if result.n_benign:
        changed = round(result.side_effect_rate * result.n_benign)
        lines.append(f"Side effects: {changed}/{result.n_benign} held-out benign prompts changed "
                     f"({_pct(result.side_effect_rate)}), mean KL {_fmt(result.side_effect_kl)} nats")
    else:
        lines.append(f"Side effects: {not_measured('side_effect_rate', result)}")
    lines.append(f"Fraction of recorded activations touched: {_pct(result.fraction_of_activations)}; "
                 f"1-minimal: {'yes' if result.one_minimal else 'no' if result.checked else 'not checked'}")
    if result.n_controls:
        held_out = (result.evidence.get("controls") or {}).get("held_out", True)
        lines.append(f"p-value vs {result.n_controls} random control sets: {_fmt(result.p_value)}"
                     + ("" if held_out else " (on the incident itself, which the set was chosen on: not a held-out "
                        "test)"))
    lines.append(f"{result.forward_passes} forward passes in {result.seconds:.1f} s")
    for big in (result.ranking or {}).get("beyond_max_size", []):
        lines.append(f"Note: {len(big['set'])} sublayer sites fix the incident only all together "
                     f"({', '.join(big['set'])}), more than the max set size {big['max_size']}: search again with "
                     f"a max set size of {len(big['set'])}")
    return lines


def trace_points(trace) -> tuple[list[float], list[float]]:
    """(passes, best metric) of the finite points of a search trace."""
    xs, ys = [], []
    for t in trace:
        y = t.get("best_metric")
        if y is None or not math.isfinite(float(y)):
            continue
        xs.append(float(t.get("passes", 0)))
        ys.append(float(y))
    return xs, ys


# ----------------------------------------------------------------------------------------------------------------
class CCAView(QWidget):
    """Run CCA: parameters, progress (stage, passes, best metric), a live search-trace plot, Cancel, the result.

    Args:
        session: the window's :class:`workbench.session.Session`.
        runner: the window's :class:`workbench.worker.EngineRunner` (defaults to ``session.runner``).
    """

    REFRESH_MS = 100

    def __init__(self, session, runner=None, parent=None) -> None:
        super().__init__(parent)
        self.setObjectName("CCAView")
        self.session = session
        self.runner = runner if runner is not None else session.runner
        self.result = None
        self._trace: list[dict] = []
        self._progress = (0, 0, "")
        self._dirty = False
        self._job = None                   # the cancel event of the run this view waits for (runner.delivering)

        # --- parameters and controls
        self.beam = QSpinBox()
        self.beam.setRange(1, 16)
        self.beam.setValue(1)
        self.beam.setToolTip("Beam width of the search (1 = greedy)")
        self.max_size = QSpinBox()
        self.max_size.setRange(1, 16)
        self.max_size.setValue(4)
        self.max_size.setToolTip("Largest fix set searched")
        self.controls = QSpinBox()
        self.controls.setRange(0, 5000)
        self.controls.setSingleStep(50)
        self.controls.setValue(200)
        self.controls.setToolTip("Random control sets for the significance test (200 or more for a certificate)")
        self.op = QComboBox()
        self.op.addItem("mean (benign mean)", "mean")
        self.op.addItem("patch (from counterpart)", "patch")
        self.use_cf = QCheckBox("use CF as prior")
        self.use_cf.setToolTip("Weight the candidate ranking by the CF anomaly scores (run CF first)")
        self.run_button = QPushButton("Run CCA")
        self.run_button.setToolTip("Search a minimal fix set and measure its evidence (Ctrl+Shift+R)")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setToolTip("Stop the search; the best set so far is shown, marked partial")

        params = QHBoxLayout()
        form = QFormLayout()
        form.addRow("Beam width", self.beam)
        form.addRow("Max set size", self.max_size)
        form2 = QFormLayout()
        form2.addRow("Controls", self.controls)
        form2.addRow("Operation", self.op)
        params.addLayout(form)
        params.addLayout(form2)
        buttons = QVBoxLayout()
        buttons.addWidget(self.use_cf)
        row = QHBoxLayout()
        row.addWidget(self.run_button)
        row.addWidget(self.cancel_button)
        buttons.addLayout(row)
        params.addLayout(buttons)
        params.addStretch(1)

        self.progress = QProgressBar()
        self.progress.setFormat("%p%")
        self.stage_label = QLabel("Open a bundle to run CCA.")
        self.stage_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        # --- live plot of the search
        self.trace_plot = pg.PlotWidget()
        _styled_plot(self.trace_plot, "best search metric", "forward passes")
        self.trace_plot.setMinimumHeight(120)
        self.trace_plot.getPlotItem().setTitle(
            "search trace \u2014 best search metric (> 0 = fails)",
            color=(30, 30, 30), size="10pt")
        self.trace_curve = pg.PlotDataItem(pen=pg.mkPen((0, 114, 178), width=2), symbol="o", symbolSize=6,
                                           symbolBrush=(0, 114, 178))
        self.trace_plot.addItem(self.trace_curve)

        # --- result
        self.partial_label = QLabel("PARTIAL")
        self.partial_label.setStyleSheet("QLabel { color: white; background: #be1e1e; padding: 2px 8px; "
                                         "font-weight: bold; }")
        self.partial_label.setToolTip("The run was cancelled: this is the best set found so far")
        self.partial_label.setVisible(False)
        self.summary = QLabel("")
        self.summary.setWordWrap(True)
        self.summary.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.fix_table = make_table(FIX_SET_HEADERS)
        self.criteria_table = make_table(CRITERIA_HEADERS)

        result_box = QGroupBox("Result")
        rl = QVBoxLayout(result_box)
        head = QHBoxLayout()
        head.addWidget(self.partial_label)
        head.addWidget(self.summary, 1)
        rl.addLayout(head)
        rl.addWidget(QLabel("Fix set"))
        rl.addWidget(self.fix_table, 1)
        self._cap_fix_table(4)
        rl.addWidget(QLabel("Criteria"))
        rl.addWidget(self.criteria_table, 2)

        # the result scrolls as a whole when the window is short (a 1366 x 768 laptop screen), so its labels and
        # tables never set the window's minimum height
        self.result_scroll = vertical_scroll(result_box)

        split = QSplitter(Qt.Orientation.Vertical)
        split.addWidget(self.trace_plot)
        split.addWidget(self.result_scroll)
        split.setStretchFactor(0, 1)
        split.setStretchFactor(1, 4)  # room for all six criteria rows in a window of 900 px

        lay = QVBoxLayout(self)
        lay.addLayout(params)
        lay.addWidget(self.progress)
        lay.addWidget(self.stage_label)
        lay.addWidget(split, 1)

        self.timer = QTimer(self)
        self.timer.setInterval(self.REFRESH_MS)
        self.timer.timeout.connect(self._refresh)

        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.runner.progress.connect(self._on_progress)
        self.runner.finished.connect(self._on_finished)
        self.runner.failed.connect(self._on_failed)
        session.bundle_opened.connect(self._on_bundle_opened)
        session.bundle_closed.connect(self._on_bundle_closed)
        session.cca_changed.connect(self._on_cca_changed)
        session.cf_changed.connect(self._on_cf_changed)

        if session.bundle is not None:
            self._on_bundle_opened(session.bundle)
        self._on_cf_changed(session.cf)
        if session.cca is not None:
            self._on_cca_changed(session.cca)
        self._update_enabled()

    # ------------------------------------------------------------------ state
    @property
    def running(self) -> bool:
        return self.runner.is_running(JOB)

    def _update_enabled(self) -> None:
        running = self.running
        self.run_button.setEnabled(self.session.bundle is not None and not running)
        self.cancel_button.setEnabled(running)
        for w in (self.beam, self.max_size, self.controls, self.op):
            w.setEnabled(not running)
        self.use_cf.setEnabled(not running and self.session.cf is not None)

    # ------------------------------------------------------------------ actions

    def _cap_fix_table(self, rows: int) -> None:
        """At most ``rows`` rows tall (more scroll), so the rest of the height goes to the criteria table."""
        t = self.fix_table
        t.setMaximumHeight(t.horizontalHeader().sizeHint().height() + rows * t.verticalHeader().defaultSectionSize()
                           + 2 * t.frameWidth() + 2)
    @Slot()
    def run(self) -> None:
        """Start CCA on the engine thread with the chosen parameters."""
        bundle = self.session.bundle
        if bundle is None or self.running:
            return
        session = self.session
        cf = session.cf if (self.use_cf.isChecked() and session.cf is not None) else None
        kwargs = dict(op=self.op.currentData(), beam=self.beam.value(), max_size=self.max_size.value(),
                      n_controls=self.controls.value())

        def job(emit, cancel):
            from engine.cca import run_cca

            handle = session.model()
            return run_cca(bundle, handle, cf=cf, cancel=cancel,
                           progress=lambda done, total, what: emit(("progress", int(done), int(total), str(what))),
                           on_step=lambda step: emit(("step", dict(step))), **kwargs)

        self.result = None
        self._trace = []
        self._progress = (0, 1, "starting")
        self._dirty = True
        self.trace_curve.setData([], [])
        self.fix_table.setRowCount(0)
        self.criteria_table.setRowCount(0)
        self.summary.setText("")
        self.partial_label.setVisible(False)
        self.progress.setRange(0, 0)            # busy until the first progress report
        self.stage_label.setText("Running CCA: loading the model…")
        self._job = self.runner.submit(JOB, job, replace=True)
        self.timer.start()
        self._update_enabled()
        self.session.status.emit("CCA running…")

    @Slot()
    def cancel(self) -> None:
        self.runner.cancel(JOB)
        self.stage_label.setText("Cancelling CCA: keeping the best set so far…")

    # ------------------------------------------------------------------ runner slots
    @Slot(str, object)
    def _on_progress(self, name: str, data: object) -> None:
        if name != JOB or not self.runner.delivering(self._job) or not isinstance(data, tuple) or not data:
            return
        if data[0] == "step":
            self._trace.append(data[1])
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
        self.progress.setFormat("%p%")
        done, total, _what = self._progress
        if result.partial and total > 0:         # a cancelled run shows how far it got, not 100%
            self.progress.setRange(0, total)
            self.progress.setValue(min(done, total))
        else:
            self.progress.setRange(0, 1)
            self.progress.setValue(1)
        self.session.set_cca(result)     # → _on_cca_changed shows it
        self.session.status.emit("CCA partial (cancelled)" if result.partial else
                                 f"CCA done: {len(result.fix_set)}-element fix set")

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
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.progress.setFormat("%p%")
        self.stage_label.setText(f"CCA failed: {message}")
        self.session.status.emit(f"CCA failed: {message}")

    @Slot()
    def _refresh(self) -> None:
        """Timer tick: progress bar, stage label and trace plot from the latest reports."""
        if not self._dirty:
            return
        self._dirty = False
        done, total, what = self._progress
        if total > 0 and (done > 0 or what != "starting"):
            self.progress.setRange(0, total)
            self.progress.setValue(min(done, total))
            # the engine reports stages (done of total), not work within a stage: the search stage of a big
            # incident sends none for minutes, and a bar reading "0%" all that time looked hung
            self.progress.setFormat(f"stage {min(done + 1, total)} of {total}: {what}" if done < total else "%p%")
        last = self._trace[-1] if self._trace else {}
        passes = last.get("passes", 0)
        best = last.get("best_metric")
        stage = last.get("stage", "")
        bits = [f"stage: {what or stage}"]
        if last:
            bits.append(f"passes: {passes}")
            bits.append(f"best metric: {_fmt(best)}")
            bits.append(f"set size: {last.get('set_size', 0)}")
        self.stage_label.setText("Running CCA \u2014 " + " \u00b7 ".join(bits))
        self.trace_curve.setData(*trace_points(self._trace))

    # ------------------------------------------------------------------ session slots
    @Slot(object)
    def _on_bundle_opened(self, bundle) -> None:
        self._clear()
        self.stage_label.setText(f"{bundle.n_layers} layers \u00d7 {len(bundle.sites)} sites. Press Run CCA.")
        from engine.failure import search_metric_name

        self.trace_plot.getPlotItem().setTitle(
            f"search trace \u2014 search metric: {search_metric_name(bundle.failure.kind)} (> 0 = fails)",
            color=(30, 30, 30), size="10pt")
        self._update_enabled()

    @Slot()
    def _on_bundle_closed(self) -> None:
        self.timer.stop()
        self._job = None                   # its partial result, when it comes, belongs to no open bundle
        self._clear()
        self.stage_label.setText("Open a bundle to run CCA.")
        self._update_enabled()

    def _clear(self) -> None:
        self.result = None
        self._trace = []
        self.trace_curve.setData([], [])
        self.trace_plot.getPlotItem().enableAutoRange()   # no leftover axis range from the last run
        self.fix_table.setRowCount(0)
        self.criteria_table.setRowCount(0)
        self.summary.setText("")
        self.partial_label.setVisible(False)
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.progress.setFormat("%p%")

    @Slot(object)
    def _on_cf_changed(self, cf) -> None:
        self.use_cf.setChecked(cf is not None)
        self._update_enabled()

    @Slot(object)
    def _on_cca_changed(self, result) -> None:
        if result is None:
            self._clear()
            return
        self.result = result
        self._trace = list(result.trace)
        self.trace_curve.setData(*trace_points(self._trace))
        fill_fix_set_table(self.fix_table, result, tokens=getattr(self.session.bundle, "tokens", None))
        self._cap_fix_table(min(4, max(1, self.fix_table.rowCount())))
        fill_criteria_table(self.criteria_table, result)
        kind = self.session.bundle.failure.kind if self.session.bundle is not None else None
        self.summary.setText("\n".join(summary_lines(result, kind)))
        self.partial_label.setVisible(bool(result.partial))
        if not result.partial and self._job is None:   # computed elsewhere (the certificate export, a review)
            self.progress.setRange(0, 1)                # "CCA finished" over a bar reading 0% looked stuck
            self.progress.setValue(1)
            self.progress.setFormat("%p%")
        ok = sum(1 for c in result.criteria.values() if c.get("ok"))
        self.stage_label.setText(
            ("CCA cancelled: partial result" if result.partial else "CCA finished") +
            f" \u2014 {len(result.fix_set)} element(s), {result.forward_passes} passes, {result.seconds:.1f} s, "
            f"criteria met {ok}/{len(result.criteria)}")
        self._update_enabled()

    # ------------------------------------------------------------------ lifetime
    def closeEvent(self, event) -> None:  # noqa: N802 - Qt naming
        self.timer.stop()
        if self.running:
            self.runner.cancel(JOB)
        super().closeEvent(event)
