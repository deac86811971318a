"""Story 6: review the fix set, accept or reject its elements, and re-evaluate the accepted ones.

Shows ``session.cca``: every element with its drop-one and single effects (accept checkbox per row), the flip
rate over held-out variants, the side effects on benign prompts (which changed, expected vs got, KL), the
control distribution with the observed value marked, and a layer × position map of the set.

The analyst's decisions live in ``session.analyst = {"accepted": [...], "rejected": [...], "note": str}`` (each
element as ``FixElement.to_dict()``), which the certificate records.  "Re-evaluate accepted" runs
``engine.cca.evaluate_fix_set`` on the accepted elements on the engine thread; the new result (evidence measured
for exactly the accepted set) becomes ``session.cca``, and the rejected elements stay listed in the analyst record.
"""

from __future__ import annotations

import math

from PySide6.QtCore import Qt, Slot
from PySide6.QtWidgets import (QFormLayout, QGroupBox, QHBoxLayout, QHeaderView, QLabel, QLineEdit, QPushButton,
                               QSizePolicy, QSpinBox, QSplitter, QTableWidgetItem, QTabWidget, QVBoxLayout, QWidget)

from workbench.views.cca_view import (_GREEN, _RED, CRITERIA_HEADERS, FIX_SET_HEADERS, _item, fill_criteria_table,
                                      fill_fix_set_table, make_table, summary_lines, vertical_scroll)
from workbench.views.plots import HistogramPlot, PositionMap, _fmt

JOB = "review"
SIDE_EFFECT_HEADERS = ["changed", "prompt", "expected", "got", "KL (nats)"]


def element_key(d: dict) -> tuple:
    """Identity of an element dict (the intervention part of ``FixElement.to_dict()``)."""
    pos = d.get("positions")
    return (int(d.get("layer", -1)), str(d.get("component", "")),
            "all" if pos == "all" else tuple(int(p) for p in (pos or ())), str(d.get("op", "")),
            tuple(d.get("indices") or ()), d.get("value"))


class ReviewView(QWidget):
    """Review a CCA fix set: per-element evidence, side effects, controls, the set's map; accept/reject/re-evaluate.

    Args:
        session: the window's :class:`workbench.session.Session`.
        runner: the window's :class:`workbench.worker.EngineRunner` (defaults to ``session.runner``).
    """

    def __init__(self, session, runner=None, parent=None) -> None:
        super().__init__(parent)
        self.setObjectName("ReviewView")
        self.session = session
        self.runner = runner if runner is not None else session.runner
        self.result = None
        self._own_result = None        # the result our re-evaluation produced (keeps the analyst's rejections)
        self._removed: list[dict] = []  # elements rejected before a re-evaluation (no longer in the set)
        self._filling = False
        self._job = None                # the cancel event of the re-evaluation this view waits for

        self.summary = QLabel("No fix set yet: run CCA first.")
        self.summary.setWordWrap(True)
        self.summary.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        self.elements = make_table(["accept"] + FIX_SET_HEADERS)
        self.elements.setToolTip("Tick the elements you accept; untick to reject. Then re-evaluate.")
        # the table takes the height left in its box (at least two rows) rather than asking for its preferred one,
        # so the note and the Re-evaluate button below it stay in view
        self.elements.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Ignored)
        self.elements.setMinimumHeight(self.elements.horizontalHeader().sizeHint().height()
                                       + 2 * self.elements.verticalHeader().defaultSectionSize() + 4)
        self.rejected_label = QLabel("")
        self.rejected_label.setWordWrap(True)
        self.note = QLineEdit()
        self.note.setPlaceholderText("Analyst note (goes into the certificate)")
        self.controls = QSpinBox()
        self.controls.setRange(0, 5000)
        self.controls.setSingleStep(50)
        self.controls.setValue(200)
        self.controls.setToolTip("Random control sets for the re-evaluation's significance test")
        self.reevaluate_button = QPushButton("Re-evaluate accepted")
        self.reevaluate_button.setToolTip("Measure all the evidence again for the accepted elements only")
        self.cancel_button = QPushButton("Cancel")
        self.state_label = QLabel("")
        self.state_label.setWordWrap(True)

        actions = QHBoxLayout()
        form = QFormLayout()
        form.addRow("Controls", self.controls)
        actions.addLayout(form)
        actions.addWidget(self.reevaluate_button)
        actions.addWidget(self.cancel_button)
        actions.addWidget(self.state_label, 1)

        el_box = QGroupBox("Fix-set elements")
        el = QVBoxLayout(el_box)
        el.addWidget(self.elements, 1)
        el.addWidget(self.rejected_label)
        el.addWidget(self.note)
        el.addLayout(actions)

        self.side_effects = make_table(SIDE_EFFECT_HEADERS)
        # prompt / expected / got share the width (elided, full text in the tooltip), so a laptop-sized window shows
        # every column without scrolling sideways
        head = self.side_effects.horizontalHeader()
        head.setStretchLastSection(False)
        for c in (1, 2, 3):
            head.setSectionResizeMode(c, QHeaderView.ResizeMode.Stretch)
        self.criteria = make_table(CRITERIA_HEADERS)
        self.histogram = HistogramPlot(x_label="flip rate of a random control set")
        self.histogram.getPlotItem().setTitle("controls vs the fix set (red line)", color=(30, 30, 30))
        self.position_map = PositionMap()
        self.position_map.getPlotItem().setTitle("fix set: layer \u00d7 token position (cell = element #)",
                                                 color=(30, 30, 30))
        self.tabs = QTabWidget()
        self.tabs.addTab(self.side_effects, "Side effects")
        self.tabs.addTab(self.histogram, "Controls")
        self.tabs.addTab(self.position_map, "Layer \u00d7 position map")
        self.tabs.addTab(self.criteria, "Criteria")

        # the summary and the elements box scroll as a whole when the window is short (a laptop screen), so the
        # evidence tabs below keep their share instead of being squeezed to a row or two
        top = QWidget()
        tl = QVBoxLayout(top)
        tl.setContentsMargins(0, 0, 0, 0)
        tl.addWidget(self.summary)
        tl.addWidget(el_box, 1)
        top_scroll = vertical_scroll(top)
        split = QSplitter(Qt.Orientation.Vertical)
        split.addWidget(top_scroll)
        split.addWidget(self.tabs)
        split.setStretchFactor(0, 1)
        split.setStretchFactor(1, 1)
        self._split, self._top = split, top
        self._user_split = False          # once the analyst drags the splitter, the view leaves it where it is
        split.splitterMoved.connect(lambda *_: setattr(self, "_user_split", True))

        lay = QVBoxLayout(self)
        lay.addWidget(split, 1)

        self.elements.itemChanged.connect(self._on_item_changed)
        self.note.editingFinished.connect(self._store_analyst)
        self.reevaluate_button.clicked.connect(self.reevaluate)
        self.cancel_button.clicked.connect(self.cancel)
        self.runner.finished.connect(self._on_finished)
        self.runner.failed.connect(self._on_failed)
        session.cca_changed.connect(self._on_cca_changed)
        session.bundle_closed.connect(self._on_bundle_closed)
        if session.cca is not None:
            self._on_cca_changed(session.cca)
        self._update_enabled()

    # ------------------------------------------------------------------ state
    @property
    def running(self) -> bool:
        return self.runner.is_running(JOB)

    def accepted_rows(self) -> list[int]:
        return [r for r in range(self.elements.rowCount())
                if self.elements.item(r, 0) is not None
                and self.elements.item(r, 0).checkState() == Qt.CheckState.Checked]

    def _update_enabled(self) -> None:
        running = self.running
        has = self.result is not None and self.session.bundle is not None
        self.reevaluate_button.setEnabled(has and not running and bool(self.accepted_rows()))
        self.cancel_button.setEnabled(running)
        self.elements.setEnabled(not running)
        self.controls.setEnabled(not running)

    def set_accepted(self, row: int, accepted: bool) -> None:
        """Tick / untick the accept box of ``row`` (what a click on it does)."""
        self.elements.item(row, 0).setCheckState(Qt.CheckState.Checked if accepted else Qt.CheckState.Unchecked)

    # ------------------------------------------------------------------ analyst record
    @Slot(QTableWidgetItem)
    def _on_item_changed(self, item: QTableWidgetItem) -> None:
        if self._filling or item.column() != 0:
            return
        self._store_analyst()
        self._update_enabled()

    @Slot()
    def _store_analyst(self) -> None:
        if self.result is None:
            return
        accepted_rows = set(self.accepted_rows())
        accepted, rejected = [], [dict(d) for d in self._removed]
        for r, el in enumerate(self.result.fix_set):
            (accepted if r in accepted_rows else rejected).append(el.to_dict())
        self.session.analyst = {"accepted": accepted, "rejected": rejected, "note": self.note.text().strip()}
        self._show_rejected()

    def _show_rejected(self) -> None:
        rej = (self.session.analyst or {}).get("rejected", [])
        if not rej:
            self.rejected_label.setText("")
            return
        from engine.interventions import Intervention

        names = []
        for d in rej:
            iv = {k: d[k] for k in ("layer", "component", "positions", "op", "indices", "value", "values")
                  if k in d and d[k] is not None}
            try:
                names.append(Intervention.from_dict(iv).describe())
            except Exception:  # noqa: BLE001 - a malformed record is shown raw rather than hidden
                names.append(str(iv))
        self.rejected_label.setText("Rejected by the analyst: " + "; ".join(names))

    # ------------------------------------------------------------------ actions
    @Slot()
    def reevaluate(self) -> None:
        """Run ``evaluate_fix_set`` on the accepted elements (engine thread)."""
        if self.result is None or self.session.bundle is None or self.running:
            return
        rows = self.accepted_rows()
        if not rows:
            return
        self._store_analyst()
        ivs = [self.result.fix_set[r].intervention for r in rows]
        bundle, session, n_controls = self.session.bundle, self.session, self.controls.value()

        def job(emit, cancel):
            from engine.cca import evaluate_fix_set

            return evaluate_fix_set(bundle, session.model(), ivs, n_controls=n_controls, cancel=cancel,
                                    progress=lambda d, t, what: emit((int(d), int(t), str(what))))

        self._job = self.runner.submit(JOB, job, replace=True)
        self.state_label.setText(f"Re-evaluating {len(ivs)} accepted element(s)…")
        self.session.status.emit("Re-evaluating the accepted fix set…")
        self._update_enabled()

    @Slot()
    def cancel(self) -> None:
        self.runner.cancel(JOB)

    @Slot(str, object)
    def _on_finished(self, name: str, result: object) -> None:
        if name != JOB:
            return
        if not self.runner.delivering(self._job):   # a re-evaluation of a bundle since closed
            self._update_enabled()
            return
        self._job = None
        old = self.result
        self._own_result = result
        # elements the analyst rejected leave the set; they stay in the record as rejected
        self._removed = [dict(d) for d in (self.session.analyst or {}).get("rejected", [])]
        self.session.set_cca(result)
        before = f"{old.flip_rate:.1%}" if old is not None and math.isfinite(old.flip_rate) else "—"
        after = f"{result.flip_rate:.1%}" if math.isfinite(result.flip_rate) else "—"
        self.state_label.setText(("PARTIAL re-evaluation (cancelled). " if result.partial else "Re-evaluated: ") +
                                 f"{len(result.fix_set)} element(s); flip rate {before} \u2192 {after}")
        self._update_enabled()

    @Slot(str, str)
    def _on_failed(self, name: str, message: str) -> None:
        if name != JOB:
            return
        if not self.runner.delivering(self._job):
            self._update_enabled()
            return
        self._job = None
        self.state_label.setText(f"Re-evaluation failed: {message}")
        self.session.status.emit(f"Re-evaluation failed: {message}")
        self._update_enabled()

    # ------------------------------------------------------------------ session slots
    @Slot()
    def _on_bundle_closed(self) -> None:
        self._job = None
        self.note.clear()                  # the note is about this incident: never carried to the next one
        self._clear()

    def _clear(self) -> None:
        """No fix set: empty tables, plots and tab titles (the note stays: it is about the incident)."""
        self.result = None
        self._own_result = None
        self._removed = []
        self.elements.setRowCount(0)
        self.side_effects.clearSpans()
        self.side_effects.setRowCount(0)
        self.criteria.setRowCount(0)
        self.histogram.set_data([], None, bins=20, value_range=(0.0, 1.0))
        self.position_map.set_cells(0, 0, [])
        for i, title in enumerate(("Side effects", "Controls", "Layer \u00d7 position map", "Criteria")):
            self.tabs.setTabText(i, title)
        self.summary.setText("No fix set yet: run CCA first.")
        self.rejected_label.setText("")
        self.state_label.setText("")
        self._update_enabled()

    @Slot(object)
    def _on_cca_changed(self, result) -> None:
        if result is None:
            self._clear()
            return
        ours = result is self._own_result
        self.result = result
        if not ours:                       # a new CCA run: a fresh review
            self._removed = []
            self.session.analyst = {"accepted": [], "rejected": [], "note": self.note.text().strip()}
            self.state_label.setText("")
        self._fill(result)
        self._store_analyst()
        self._update_enabled()

    # ------------------------------------------------------------------ layout
    def _balance(self) -> None:
        """Give the summary and elements all the height they need, up to half the view; the tabs get the rest."""
        if self._user_split:
            return
        total = sum(self._split.sizes())
        if total <= 0:
            return
        need = min(self._top.minimumSizeHint().height() + 2, total // 2)
        self._split.setSizes([need, total - need])

    def resizeEvent(self, event) -> None:  # noqa: N802 - Qt naming
        super().resizeEvent(event)
        self._balance()

    # ------------------------------------------------------------------ drawing
    def _fill(self, result) -> None:
        self._filling = True
        try:
            fill_fix_set_table(self.elements, result, first_col=1, tokens=getattr(self.session.bundle, "tokens", None))
            for r in range(len(result.fix_set)):
                box = QTableWidgetItem("")
                box.setFlags(Qt.ItemFlag.ItemIsUserCheckable | Qt.ItemFlag.ItemIsEnabled | Qt.ItemFlag.ItemIsSelectable)
                box.setCheckState(Qt.CheckState.Checked)
                box.setToolTip("accepted (untick to reject this element)")
                self.elements.setItem(r, 0, box)
        finally:
            self._filling = False
        kind = self.session.bundle.failure.kind if self.session.bundle is not None else None
        self.summary.setText("\n".join(summary_lines(result, kind)))
        # side effects: changed first, then by KL
        rows = sorted(result.side_effects, key=lambda d: (not d.get("changed", False), -(d.get("kl") or 0.0)))
        self.side_effects.setRowCount(len(rows))
        for r, d in enumerate(rows):
            changed = bool(d.get("changed", d.get("got") != d.get("expected")))
            mark = _item("\u2717 changed" if changed else "\u2713 same")
            mark.setForeground(_RED if changed else _GREEN)
            self.side_effects.setItem(r, 0, mark)
            for c, key in enumerate(("prompt", "expected", "got"), start=1):
                it = _item(str(d.get(key, "")))
                it.setToolTip(str(d.get(key, "")))
                self.side_effects.setItem(r, c, it)
            self.side_effects.setItem(r, 4, _item(_fmt(d.get("kl")), True))
        self.side_effects.clearSpans()
        if rows:
            self.tabs.setTabText(0, f"Side effects ({sum(1 for d in rows if d.get('changed'))}/{len(rows)} changed)")
        else:  # say why the table is empty instead of showing "0/0 changed"
            from engine.cca import not_measured  # here, not at import: engine.cca loads torch

            self.tabs.setTabText(0, "Side effects (not measured)")
            self.side_effects.setRowCount(1)
            self.side_effects.setSpan(0, 0, 1, self.side_effects.columnCount())
            self.side_effects.setItem(0, 0, _item(not_measured("side_effect_rate", result)))
        fill_criteria_table(self.criteria, result)
        self._balance()
        # controls vs observed
        ctrl = result.evidence.get("controls", {}) if isinstance(getattr(result, "evidence", None), dict) else {}
        observed = ctrl.get("observed_flip_rate")
        if observed is None and result.control_flip_rates:
            observed = 1.0 if result.flipped else 0.0
        n_prompts = int(ctrl.get("n_prompts", 0) or 0)
        if n_prompts > 0:       # flip rates are k / n_prompts: one bin per possible value
            half = 0.5 / n_prompts
            self.histogram.set_data(result.control_flip_rates, observed, bins=n_prompts + 1,
                                    value_range=(-half, 1 + half))
        else:
            self.histogram.set_data(result.control_flip_rates, observed, bins=20, value_range=(0.0, 1.0))
        self.tabs.setTabText(1, f"Controls (n={result.n_controls}, p={_fmt(result.p_value)})")
        # layer x position map of the set
        bundle = self.session.bundle
        if bundle is not None:
            n_pos = int(getattr(bundle, "n_prompt_tokens", bundle.n_positions))
            cells = []
            for i, el in enumerate(result.fix_set):
                iv = el.intervention
                pos = range(n_pos) if iv.positions == "all" else iv.positions
                cells.append((iv.layer, list(pos), float(i + 1)))
            tokens = list(bundle.tokens[:n_pos])     # the map labels as many as fit its width
            self.position_map.set_cells(bundle.n_layers, n_pos, cells, tokens)

    # ------------------------------------------------------------------ lifetime
    def closeEvent(self, event) -> None:  # noqa: N802 - Qt naming
        if self.running:
            self.runner.cancel(JOB)
        super().closeEvent(event)
