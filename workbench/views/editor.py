"""Story 5: edit an intervention set and see its effect on the incident, replayed in the background.

The table holds one row per :class:`engine.interventions.Intervention` (layer, component, positions, heads / neurons
/ dims, op, value); cells are edited in place (spin box for the layer, combo boxes for component and op, text for
the rest), rows are added / removed, sets are loaded from and saved to the engine's JSON format.  Every change is
one :class:`QUndoCommand` (Ctrl+Z / Ctrl+Shift+Z) holding the rows before and after.

After each change the set is replayed on the engine thread (job ``"replay-edit"``; a burst of edits coalesces in
the runner, so only the latest waiting edit replays).  The job calls ``engine.interventions.evaluate_ids`` on an
evaluation context built once per bundle and cached with the bundle's **baseline** (the empty set's result), so an
edit costs one replay; after the first baseline a background job runs the model once per sequence length the
replays will use, so the first edits do not pay torch's one-time per-shape cost.  The panel shows before / after: the continuation (or label), the top-k next tokens with
probabilities, the failure metric, and a FIXED / still failing verdict.  Results of edits that were superseded
are dropped (each replay carries the revision it was made for).

Bad input never crashes the view: a cell that cannot be parsed is refused with a message; a row that parses but
is not a valid intervention for this bundle (``scale`` without a factor, a head index out of range, …) is marked
red with the engine's message and nothing is replayed until it is fixed.
"""

from __future__ import annotations

import math
import re
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from PySide6.QtCore import QAbstractTableModel, QModelIndex, QObject, Qt, Signal, Slot
from PySide6.QtGui import QAction, QBrush, QColor, QFont, QKeySequence, QUndoCommand, QUndoStack
from PySide6.QtWidgets import (QAbstractItemView, QComboBox, QFileDialog, QGridLayout, QGroupBox, QHBoxLayout,
                               QHeaderView, QLabel, QMessageBox, QPushButton, QSpinBox, QSplitter,
                               QStyledItemDelegate, QTableView, QTableWidget, QTableWidgetItem, QToolButton,
                               QVBoxLayout, QWidget)

from engine.certificate import position_ranges
from engine.errors import ForensicsError, InterventionError
from workbench.views.incident import FAIL_BG, FAIL_FG, metric_name
from workbench.views.plots import _fmt

JOB = "replay-edit"
WARMUP_JOB = "replay-warmup"
TOP_K = 5
COLUMNS = ("layer", "component", "positions", "heads / neurons / dims", "op", "value")
COL_LAYER, COL_COMP, COL_POS, COL_IDX, COL_OP, COL_VALUE = range(6)
SET_FILTER = "Intervention sets (*.json);;All files (*)"
_OK_BG = "#c9f0c9"


# ----------------------------------------------------------------------------------------------------------------
# Text <-> values
# ----------------------------------------------------------------------------------------------------------------
def parse_int_list(text: str, what: str = "position", upper: int | None = None) -> tuple[int, ...]:
    """``"3, 5-7"`` → ``(3, 5, 6, 7)``; raises :class:`InterventionError` naming the bad part.

    Args:
        text: comma / space separated integers and ``a-b`` ranges (inclusive).
        what: what the numbers are (for the message).
        upper: exclusive upper bound, checked when given.
    """
    out: list[int] = []
    parts = [p for p in re.split(r"[,;\s]+", re.sub(r"\s*-\s*", "-", text.strip())) if p]
    if not parts:
        raise InterventionError(f"no {what}s given: write numbers like 3, 5-7")
    for part in parts:
        m = re.fullmatch(r"(\d+)-(\d+)", part)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if hi < lo:
                raise InterventionError(f"{what} range {part!r} runs backwards")
            out.extend(range(lo, hi + 1))
            continue
        try:
            out.append(int(part))
        except ValueError:
            raise InterventionError(f"{what} {part!r} is not an integer (write numbers like 3, 5-7)") from None
    if min(out) < 0:
        raise InterventionError(f"{what} {min(out)} is negative")
    if upper is not None and max(out) >= upper:
        raise InterventionError(f"{what} {max(out)} out of range (0..{upper - 1})")
    return tuple(sorted(set(out)))


def format_int_list(values) -> str:
    """``(3, 5, 6, 7)`` → ``"3, 5-7"`` (ASCII dash: the cell text is parsed back by :func:`parse_int_list`)."""
    return position_ranges(values, dash="-")


@dataclass(frozen=True)
class Row:
    """One table row, as the user typed it (text fields), convertible to an :class:`Intervention`."""

    layer: int = 0
    component: str = "attn"
    positions: str = "all"
    indices: str = ""
    op: str = "mean"
    value: str = ""

    @classmethod
    def from_intervention(cls, iv) -> "Row":
        value = ""
        if iv.value is not None:
            value = f"{iv.value:g}"
        elif iv.values is not None:
            value = ", ".join(f"{v:g}" for v in iv.values)
        return cls(iv.layer, iv.component, "all" if iv.positions == "all" else format_int_list(iv.positions),
                   format_int_list(iv.indices) if iv.indices else "", iv.op, value)

    def to_intervention(self):
        """The :class:`Intervention` of this row; raises :class:`InterventionError` with the reason."""
        from engine.interventions import Intervention

        pos = "all" if self.positions.strip().lower() == "all" else parse_int_list(self.positions, "position")
        idx = parse_int_list(self.indices, "index") if self.indices.strip() else ()
        value = values = None
        v = self.value.strip()
        if self.op == "scale":
            if not v:
                raise InterventionError("op 'scale' needs a value (the factor) in the value column")
            value = _parse_float(v, "scale factor")
        elif self.op == "set":
            if not v:
                raise InterventionError("op 'set' needs values (comma-separated numbers) in the value column")
            values = tuple(_parse_float(x, "value") for x in v.replace(";", ",").split(",") if x.strip())
        elif v:
            raise InterventionError(f"op {self.op!r} takes no value (clear the value column)")
        return Intervention(int(self.layer), self.component, pos, self.op, indices=idx, value=value, values=values)


def _parse_float(text: str, what: str) -> float:
    try:
        f = float(text)
    except ValueError:
        raise InterventionError(f"{what} {text.strip()!r} is not a number") from None
    if not math.isfinite(f):
        raise InterventionError(f"{what} must be finite, got {text.strip()!r}")
    return f


def row_problem(row: Row, bundle) -> str | None:
    """Why ``row`` is not a valid intervention for ``bundle`` (``None`` when it is).  No model needed."""
    try:
        iv = row.to_intervention()
    except InterventionError as exc:
        return str(exc)
    if bundle is None:
        return None
    info = bundle.model_info
    if iv.layer >= bundle.n_layers:
        return f"layer {iv.layer} out of range (the model has {bundle.n_layers} blocks, 0..{bundle.n_layers - 1})"
    if iv.positions != "all" and iv.positions[-1] >= bundle.n_positions:
        return f"position {iv.positions[-1]} out of range (the incident has {bundle.n_positions} tokens)"
    limit, what = {"head": (info["n_heads"], "head"), "neuron": (info["d_mlp"], "neuron")}.get(
        iv.component, (info["d_model"], "dimension"))
    if iv.indices and iv.indices[-1] >= limit:
        return f"{what} {iv.indices[-1]} out of range (0..{limit - 1})"
    if iv.op == "set":
        n = len(iv.values)
        ok = ((info["d_head"], len(iv.indices) * info["d_head"]) if iv.component == "head" else
              (len(iv.indices) if iv.indices else limit,))
        if n not in ok:
            return f"'set' needs {' or '.join(map(str, sorted(set(ok))))} values, got {n}"
    if iv.op == "mean" and not bundle.has_benign:
        return "op 'mean' needs benign reference runs; this bundle has none"
    if iv.op == "patch" and not bundle.prompt_sets.get("counterpart"):
        return "op 'patch' needs a counterpart prompt; this bundle has none"
    return None


# ----------------------------------------------------------------------------------------------------------------
# Engine side (plain data; runs on the engine thread)
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReplayOutcome:
    """What one ``replay-edit`` job measured."""

    revision: int
    key: tuple
    interventions: tuple           # the Interventions replayed
    baseline: object               # engine.interventions.SetResult of the empty set (cached per bundle)
    after: object                  # SetResult of the set (the baseline itself for an empty set)
    seconds: float                 # wall time of the job
    forward_passes: int
    baseline_cached: bool


@dataclass(frozen=True)
class ReplayFailure:
    """A ``replay-edit`` job that raised: the one-line reason, for the revision it was made for."""

    revision: int
    key: tuple
    message: str


class _EngineCache:
    """Evaluation context and baseline of the open bundle; touched only by jobs (serialised on the engine thread)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.key: tuple | None = None
        self.ctx = None
        self.baseline = None
        self.warm = False


def _warmup_job(session, key, cache: _EngineCache):
    """Run the model once at every sequence length a replay's generation will use.

    torch's CPU kernels pay a one-time cost per new input shape: measured on the demo, the first three intervened
    replays after loading took 2.8 / 0.9 / 0.9 s, later ones 0.01-0.2 s; after these forwards (prompt length ..
    prompt + max_new_tokens, batch 1) the first edit took 0.33 s.  Runs after the baseline, in the background,
    cancellable between forwards; results are not used.
    """
    def job(emit, cancel):
        import torch

        with cache.lock:
            if cache.key != key or cache.ctx is None or cache.warm:
                return None
            ctx = cache.ctx
        handle = session.model()
        if not handle.is_causal_lm or ctx.kind not in ("contains", "wordlist"):
            return None
        prompt = ctx.input_ids[:ctx.n_prompt]
        with torch.no_grad():
            for n in range(ctx.n_prompt, ctx.n_prompt + ctx.max_new_tokens + 1):
                if cancel.is_set():
                    return None
                ids = torch.cat([prompt, prompt[-1:].expand(n - ctx.n_prompt)])[None]
                handle.model(input_ids=ids)
        with cache.lock:
            cache.warm = cache.key == key
        return None

    return job


def _replay_job(session, bundle, key, cache: _EngineCache, interventions: tuple, revision: int, top_k: int):
    def job(emit, cancel):
        try:
            return run(cancel)
        except ForensicsError as exc:         # bad input for this model: a message in the view, not a crash
            from workbench.worker import describe_error

            return ReplayFailure(revision, key, describe_error(exc))

    def run(cancel):
        from engine.interventions import InterventionSet, context_from_bundle, evaluate_ids, validate_for

        t0 = time.perf_counter()
        handle = session.model()
        with cache.lock:
            if cache.key != key:
                cache.key, cache.ctx, cache.baseline = key, None, None
            ctx, baseline = cache.ctx, cache.baseline
        passes = 0
        if ctx is None:
            ctx = context_from_bundle(bundle, handle)
        cached = baseline is not None
        if baseline is None:
            ev = evaluate_ids(handle, ctx, [InterventionSet((), "baseline")], top_k=top_k, cancel=cancel)
            baseline, passes = ev.results[0], ev.forward_passes
        with cache.lock:
            if cache.key == key:
                cache.ctx, cache.baseline = ctx, baseline
        after = baseline
        if interventions:
            s = InterventionSet(interventions, "edited")
            validate_for(handle, [s], bundle.n_positions)
            ev = evaluate_ids(handle, ctx, [s], top_k=top_k, cancel=cancel)
            after, passes = ev.results[0], passes + ev.forward_passes
        return ReplayOutcome(revision, key, interventions, baseline, after, time.perf_counter() - t0, passes, cached)

    return job


# ----------------------------------------------------------------------------------------------------------------
# Table model, delegates, undo
# ----------------------------------------------------------------------------------------------------------------
class InterventionTableModel(QAbstractTableModel):
    """Rows of the set; edits are routed to ``edit_handler(row, col, value) -> bool`` (the view pushes an undo
    command) instead of changing the rows directly."""

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.rows: list[Row] = []
        self.problems: list[str | None] = []
        self.edit_handler = None

    def set_rows(self, rows: list[Row], problems: list[str | None]) -> None:
        if len(rows) == len(self.rows) and rows:
            # same shape: update in place, so an open cell editor (mid-commit) is not destroyed by a reset
            self.rows = list(rows)
            self.problems = list(problems)
            self.dataChanged.emit(self.index(0, 0), self.index(len(rows) - 1, len(COLUMNS) - 1))
            self.headerDataChanged.emit(Qt.Orientation.Vertical, 0, len(rows) - 1)
            return
        self.beginResetModel()
        self.rows = list(rows)
        self.problems = list(problems)
        self.endResetModel()

    def rowCount(self, parent=QModelIndex()) -> int:  # noqa: N802
        return 0 if parent.isValid() else len(self.rows)

    def columnCount(self, parent=QModelIndex()) -> int:  # noqa: N802
        return 0 if parent.isValid() else len(COLUMNS)

    def headerData(self, section, orientation, role=Qt.ItemDataRole.DisplayRole):  # noqa: N802
        if orientation == Qt.Orientation.Horizontal:
            if role == Qt.ItemDataRole.DisplayRole:
                return COLUMNS[section]
            if role == Qt.ItemDataRole.ToolTipRole:
                return _COLUMN_TIPS[section]
            return None
        if role == Qt.ItemDataRole.DisplayRole:
            bad = section < len(self.problems) and self.problems[section]
            return f"{'⚠ ' if bad else ''}{section + 1}"
        if role == Qt.ItemDataRole.ToolTipRole and section < len(self.problems):
            return self.problems[section] or "valid"
        return None

    def flags(self, index):
        return Qt.ItemFlag.ItemIsEnabled | Qt.ItemFlag.ItemIsSelectable | Qt.ItemFlag.ItemIsEditable

    def data(self, index, role=Qt.ItemDataRole.DisplayRole):
        if not index.isValid():
            return None
        row = self.rows[index.row()]
        col = index.column()
        value = (row.layer, row.component, row.positions, row.indices, row.op, row.value)[col]
        if role == Qt.ItemDataRole.DisplayRole:
            return str(value)
        if role == Qt.ItemDataRole.EditRole:
            return value
        problem = self.problems[index.row()] if index.row() < len(self.problems) else None
        if role == Qt.ItemDataRole.BackgroundRole and problem:
            return QBrush(QColor(FAIL_BG))
        if role == Qt.ItemDataRole.ToolTipRole:
            return problem or _COLUMN_TIPS[col]
        if role == Qt.ItemDataRole.TextAlignmentRole and col == COL_LAYER:
            return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        return None

    def setData(self, index, value, role=Qt.ItemDataRole.EditRole) -> bool:  # noqa: N802
        if role != Qt.ItemDataRole.EditRole or not index.isValid() or self.edit_handler is None:
            return False
        return bool(self.edit_handler(index.row(), index.column(), value))


_COLUMN_TIPS = (
    "block index (0-based)",
    "site: resid_pre, attn, mlp, resid_post, head (needs heads) or neuron (needs neurons)",
    "token positions: 'all' or numbers like 15 or 3, 5-7",
    "heads (head), neurons (neuron) or dimensions (other sites); empty = the whole vector",
    "zero, mean (benign mean), patch (from the counterpart prompt), scale (by value), set (to values)",
    "the factor for scale, comma-separated numbers for set; empty otherwise",
)


class _ComboDelegate(QStyledItemDelegate):
    """A combo box editor that commits as soon as an entry is chosen."""

    def __init__(self, items, parent=None) -> None:
        super().__init__(parent)
        self.items = list(items)

    def createEditor(self, parent, option, index):  # noqa: N802
        box = QComboBox(parent)
        box.addItems(self.items)
        box.activated.connect(self._commit)
        return box

    def setEditorData(self, editor, index):  # noqa: N802
        i = editor.findText(str(index.data(Qt.ItemDataRole.EditRole)))
        editor.setCurrentIndex(max(0, i))

    def setModelData(self, editor, model, index):  # noqa: N802
        model.setData(index, editor.currentText(), Qt.ItemDataRole.EditRole)

    @Slot(int)
    def _commit(self, _i: int) -> None:
        editor = self.sender()
        self.commitData.emit(editor)
        self.closeEditor.emit(editor, QStyledItemDelegate.EndEditHint.NoHint)


class _LayerDelegate(QStyledItemDelegate):
    def __init__(self, view: "EditorView") -> None:
        super().__init__(view)
        self._view = view

    def createEditor(self, parent, option, index):  # noqa: N802
        spin = QSpinBox(parent)
        b = self._view.session.bundle
        spin.setRange(0, max(0, (b.n_layers - 1) if b is not None else 999))
        return spin

    def setEditorData(self, editor, index):  # noqa: N802
        editor.setValue(int(index.data(Qt.ItemDataRole.EditRole)))

    def setModelData(self, editor, model, index):  # noqa: N802
        editor.interpretText()
        model.setData(index, editor.value(), Qt.ItemDataRole.EditRole)


class _SetRows(QUndoCommand):
    """Replace the table's rows (every edit is one of these: small lists, exact undo)."""

    def __init__(self, view: "EditorView", old: list[Row], new: list[Row], text: str) -> None:
        super().__init__(text)
        self._view, self._old, self._new = view, list(old), list(new)

    def redo(self) -> None:
        self._view._apply_rows(self._new)

    def undo(self) -> None:
        self._view._apply_rows(self._old)


# ----------------------------------------------------------------------------------------------------------------
# Result panels
# ----------------------------------------------------------------------------------------------------------------
def _search_metric_tip() -> str:
    """Tooltip text of the CCA search metric (called once a replay exists, so engine.cca's import costs nothing)."""
    from engine.cca import FIX_MARGIN

    return ("CCA search metric: the smallest logit margin of the recorded tokens over their best competitor, "
            "teacher-forced, from the first generated token through the failing span (> 0 = still on the failing "
            f"path; CCA's fix needs <= -{_fmt(FIX_MARGIN)})")


def _path_metric(res, bundle) -> float | None:
    """CCA's search metric of a generation incident's replay (None for label / token incidents, whose failure
    metric is already that margin, and for results without it)."""
    if bundle is None or bundle.failure.kind not in ("contains", "wordlist"):
        return None
    return getattr(res, "search_metric", None)


class ResultPanel(QGroupBox):
    """One side of before / after: verdict, output, failure metric, top-k next tokens."""

    def __init__(self, title: str, parent=None) -> None:
        super().__init__(title, parent)
        self.verdict = QLabel("—")
        self.verdict.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.output_label = QLabel("—")
        self.output_label.setWordWrap(True)
        self.output_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        mono = QFont("monospace")
        mono.setStyleHint(QFont.StyleHint.Monospace)
        self.output_label.setFont(mono)
        self.output_label.setToolTip("Greedy continuation generated under the interventions (or the predicted label)")
        self.metric_label = QLabel("—")
        self.metric_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.topk = QTableWidget(0, 3)
        self.topk.setHorizontalHeaderLabels(["#", "next token", "probability"])
        self.topk.verticalHeader().setVisible(False)
        self.topk.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.topk.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.topk.horizontalHeader().setStretchLastSection(True)
        self.topk.setToolTip("Most probable next tokens (or labels) at the decision position")
        grid = QGridLayout(self)
        grid.addWidget(self.verdict, 0, 0, 1, 2)
        grid.addWidget(QLabel("<b>Output</b>"), 1, 0, Qt.AlignmentFlag.AlignTop)
        grid.addWidget(self.output_label, 1, 1)
        grid.addWidget(QLabel("<b>Metric</b>"), 2, 0)
        grid.addWidget(self.metric_label, 2, 1)
        grid.addWidget(self.topk, 3, 0, 1, 2)
        grid.setColumnStretch(1, 1)
        self.result = None

    def clear(self, text: str = "—") -> None:
        self.result = None
        self.verdict.setText("—")
        self.verdict.setStyleSheet("")
        self.output_label.setText(text)
        self.metric_label.setText("—")
        self.topk.setRowCount(0)

    def show_result(self, res, bundle, pending: bool = False) -> None:
        self.result = res
        failing = bool(res.failing)
        self.verdict.setText("FAILS" if failing else "ok")
        self.verdict.setStyleSheet(
            f"QLabel {{ background: {FAIL_BG if failing else _OK_BG}; color: {FAIL_FG if failing else '#145214'}; "
            f"font-weight: bold; padding: 2px; }}")
        self.verdict.setToolTip(f"failure spec {bundle.failure_spec}, judged on the {res.failing_basis or 'output'}")
        self.output_label.setText(self.output_text(res))
        extra = f" · unaligned positions {res.unaligned}" if res.unaligned else ""
        path = _path_metric(res, bundle)
        if path is not None:
            extra = f" · CCA search metric {_fmt(path, 4)}{extra}"
        self.metric_label.setText(f"{_fmt(res.metric, 4)}{extra}")
        self.metric_label.setToolTip(metric_name(bundle) + ("" if path is None else "\n" + _search_metric_tip()))
        self.topk.setRowCount(len(res.top_k))
        for r, (tok, p) in enumerate(res.top_k):
            cells = [str(r + 1), repr(tok), _fmt(float(p), 4)]
            for c, text in enumerate(cells):
                it = QTableWidgetItem(text)
                if c != 1:
                    it.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                self.topk.setItem(r, c, it)
        self.setEnabled(not pending)

    @staticmethod
    def output_text(res) -> str:
        return res.continuation if res.continuation is not None else (res.top_k[0][0] if res.top_k else "—")


# ----------------------------------------------------------------------------------------------------------------
class EditorView(QWidget):
    """Intervention table with undo / redo, background replay and the before / after comparison.

    Args:
        session: the window's :class:`workbench.session.Session`.
        runner: the window's :class:`workbench.worker.EngineRunner` (defaults to ``session.runner``).
    """

    replayed = Signal(object)        # ReplayOutcome now shown in the before / after panels

    def __init__(self, session, runner=None, parent=None) -> None:
        super().__init__(parent)
        self.setObjectName("EditorView")
        self.session = session
        self.runner = runner if runner is not None else session.runner
        self.revision = 0
        self.outcome: ReplayOutcome | None = None       # what the panels show
        self._cache = _EngineCache()
        self._baselines: dict[tuple, object] = {}       # GUI-side copy: bundle key -> baseline SetResult
        self._replay_started = 0.0

        # --- table
        self.model = InterventionTableModel(self)
        self.model.edit_handler = self._edit_cell
        self.table = QTableView()
        self.table.setModel(self.model)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.DoubleClicked |
                                   QAbstractItemView.EditTrigger.EditKeyPressed |
                                   QAbstractItemView.EditTrigger.AnyKeyPressed)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.table.horizontalHeader().setStretchLastSection(True)
        from engine.hooks import COMPONENTS
        from engine.interventions import OPS

        self.table.setItemDelegateForColumn(COL_LAYER, _LayerDelegate(self))
        self.table.setItemDelegateForColumn(COL_COMP, _ComboDelegate(COMPONENTS, self))
        self.table.setItemDelegateForColumn(COL_OP, _ComboDelegate(OPS, self))
        self.table.setToolTip("The intervention set: double-click (or F2) a cell to edit it; every change replays")

        # --- actions
        self.undo_stack = QUndoStack(self)
        self.undo_action = self.undo_stack.createUndoAction(self, "&Undo")
        self.undo_action.setShortcut(QKeySequence("Ctrl+Z"))
        self.redo_action = self.undo_stack.createRedoAction(self, "&Redo")
        self.redo_action.setShortcuts([QKeySequence("Ctrl+Shift+Z"), QKeySequence("Ctrl+Y")])
        self.add_action = self._act("&Add row", "Add an intervention row (Ins)", "Ins", self.add_row)
        self.remove_action = self._act("&Remove rows", "Remove the selected rows (Del)", "Del", self.remove_selected)
        self.load_action = self._act("&Load set…", "Load an intervention set from JSON (Ctrl+L)", "Ctrl+L",
                                     self.load_set)
        self.save_action = self._act("&Save set…", "Save the intervention set as JSON (Ctrl+S)", "Ctrl+S",
                                     self.save_set)
        self.clear_action = self._act("&Clear", "Remove every row (undoable)", None, self.clear_rows)
        for a in (self.undo_action, self.redo_action):
            a.setShortcutContext(Qt.ShortcutContext.WidgetWithChildrenShortcut)
            self.addAction(a)
        self.undo_action.setToolTip("Undo the last change to the set (Ctrl+Z)")
        self.redo_action.setToolTip("Redo (Ctrl+Shift+Z)")
        bar = QHBoxLayout()
        for a in (self.add_action, self.remove_action, None, self.undo_action, self.redo_action, None,
                  self.load_action, self.save_action, self.clear_action):
            if a is None:
                bar.addSpacing(12)
                continue
            b = QToolButton()
            b.setDefaultAction(a)
            b.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextOnly)
            bar.addWidget(b)
        self.replay_button = QPushButton("Replay")
        self.replay_button.setToolTip("Replay the set now (it replays by itself after every change)")
        self.replay_button.clicked.connect(self.replay)
        bar.addStretch(1)
        bar.addWidget(self.replay_button)

        self.message = QLabel("")
        self.message.setWordWrap(True)
        self.message.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.message.setVisible(False)
        self.state = QLabel("Open a bundle, then add interventions (right-click a site or token in the Browser).")
        self.state.setWordWrap(True)

        # --- before / after
        self.banner = QLabel("—")
        self.banner.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.banner.setStyleSheet("QLabel { font-size: 15px; font-weight: bold; padding: 4px; }")
        self.before = ResultPanel("Before — no intervention (cached baseline)")
        self.after = ResultPanel("After — with the set")
        sides = QHBoxLayout()
        sides.addWidget(self.before)
        sides.addWidget(self.after)
        compare = QWidget()
        cl = QVBoxLayout(compare)
        cl.setContentsMargins(0, 0, 0, 0)
        cl.addWidget(self.banner)
        cl.addLayout(sides, 1)

        top = QWidget()
        tl = QVBoxLayout(top)
        tl.setContentsMargins(0, 0, 0, 0)
        tl.addLayout(bar)
        tl.addWidget(self.table, 1)
        tl.addWidget(self.message)
        split = QSplitter(Qt.Orientation.Vertical)
        split.addWidget(top)
        split.addWidget(compare)
        split.setStretchFactor(0, 2)
        split.setStretchFactor(1, 3)
        lay = QVBoxLayout(self)
        lay.addWidget(split, 1)
        lay.addWidget(self.state)

        self.runner.finished.connect(self._on_finished)
        self.runner.failed.connect(self._on_failed)
        session.bundle_opened.connect(self._on_bundle_opened)
        session.bundle_closed.connect(self._on_bundle_closed)
        self._apply_rows([], replay=False)
        if session.bundle is not None:
            self._on_bundle_opened(session.bundle)

    def _act(self, text: str, tip: str, shortcut: str | None, slot) -> QAction:
        a = QAction(text, self)
        a.setToolTip(tip)
        if shortcut:
            a.setShortcut(QKeySequence(shortcut))
            a.setShortcutContext(Qt.ShortcutContext.WidgetWithChildrenShortcut)
        a.triggered.connect(slot)
        self.addAction(a)
        return a

    # ------------------------------------------------------------------ rows
    @property
    def rows(self) -> list[Row]:
        return list(self.model.rows)

    def interventions(self) -> tuple:
        """The valid set as :class:`Intervention` objects (raises :class:`InterventionError` on an invalid row)."""
        return tuple(r.to_intervention() for r in self.model.rows)

    def _push(self, new: list[Row], text: str) -> None:
        self.undo_stack.push(_SetRows(self, self.model.rows, new, text))

    def _apply_rows(self, rows: list[Row], replay: bool = True) -> None:
        """Show ``rows`` (called by the undo commands), check them, and replay."""
        bundle = self.session.bundle
        problems = [row_problem(r, bundle) for r in rows]
        self.model.set_rows(rows, problems)
        self.remove_action.setEnabled(bool(rows))
        self.clear_action.setEnabled(bool(rows))
        self.save_action.setEnabled(bool(rows))
        bad = [(i, p) for i, p in enumerate(problems) if p]
        if bad:
            self.show_message("; ".join(f"Row {i + 1}: {p}" for i, p in bad[:3]) +
                              (f" (and {len(bad) - 3} more)" if len(bad) > 3 else "") +
                              " — fix or undo (Ctrl+Z); nothing is replayed until the set is valid.")
        else:
            self.show_message("")
        if replay:
            self.replay()

    def show_message(self, text: str) -> None:
        """A message about the user's input in the view (red), or hide it with ``""``."""
        self.message.setText(text)
        self.message.setVisible(bool(text))
        self.message.setStyleSheet(f"QLabel {{ background: {FAIL_BG}; color: {FAIL_FG}; padding: 4px; }}"
                                   if text else "")

    def _edit_cell(self, row: int, col: int, value) -> bool:
        """A cell edit from the table: refuse what cannot be parsed (message), else one undoable command."""
        from engine.hooks import COMPONENTS
        from engine.interventions import OPS

        if not 0 <= row < len(self.model.rows):
            return False
        old = self.model.rows[row]
        b = self.session.bundle
        try:
            if col == COL_LAYER:
                layer = int(value)
                if layer < 0 or (b is not None and layer >= b.n_layers):
                    raise InterventionError(f"layer {layer} out of range (0..{(b.n_layers if b else 1) - 1})")
                new = replace(old, layer=layer)
            elif col == COL_COMP:
                if value not in COMPONENTS:
                    raise InterventionError(f"unknown component {value!r}; one of {', '.join(COMPONENTS)}")
                new = replace(old, component=str(value))
            elif col == COL_POS:
                text = str(value).strip()
                if text.lower() != "all":
                    parse_int_list(text, "position", b.n_positions if b is not None else None)
                    text = format_int_list(parse_int_list(text, "position"))
                new = replace(old, positions=text.lower() if text.lower() == "all" else text)
            elif col == COL_IDX:
                text = str(value).strip()
                new = replace(old, indices=format_int_list(parse_int_list(text, "index")) if text else "")
            elif col == COL_OP:
                if value not in OPS:
                    raise InterventionError(f"unknown op {value!r}; one of {', '.join(OPS)}")
                keep = value in ("scale", "set") and old.op == value
                new = replace(old, op=str(value), value=old.value if keep else "")
            else:
                text = str(value).strip()
                if text:
                    if old.op == "scale":
                        _parse_float(text, "scale factor")
                    elif old.op == "set":
                        [_parse_float(x, "value") for x in text.replace(";", ",").split(",") if x.strip()]
                    else:
                        raise InterventionError(f"op {old.op!r} takes no value; choose scale or set first")
                new = replace(old, value=text)
        except (InterventionError, ValueError, TypeError) as exc:
            msg = str(exc) if isinstance(exc, InterventionError) else f"{COLUMNS[col]}: {value!r} is not valid"
            self.show_message(f"Row {row + 1}, {COLUMNS[col]}: not changed — {msg}")
            self.session.status.emit(f"Edit refused: {msg}")
            return False
        if new == old:
            return True
        rows = list(self.model.rows)
        rows[row] = new
        self._push(rows, f"Edit row {row + 1} {COLUMNS[col]}")
        return True

    @Slot(object)
    def add_from_request(self, intervention) -> None:
        """Add an intervention requested elsewhere (the browser's context menu) as a new row."""
        row = Row.from_intervention(intervention)
        if row in self.model.rows:
            self.session.status.emit(f"{intervention.describe()} is already in the set")
            return
        self._push(self.model.rows + [row], f"Add {intervention.describe()}")
        self.table.selectRow(len(self.model.rows) - 1)
        self.session.status.emit(f"Added {intervention.describe()}; replaying…")

    @Slot()
    def add_row(self) -> None:
        b = self.session.bundle
        if self.model.rows:
            row = self.model.rows[self.table.currentIndex().row()] if self.table.currentIndex().isValid() \
                else self.model.rows[-1]
        else:
            last = b.n_prompt_tokens - 1 if b is not None else 0
            row = Row(layer=0, component="attn", positions=str(last), op="mean" if b is None or b.has_benign
                      else "zero")
        self._push(self.model.rows + [row], "Add row")
        self.table.selectRow(len(self.model.rows) - 1)

    @Slot()
    def remove_selected(self) -> None:
        sel = sorted({i.row() for i in self.table.selectionModel().selectedRows()})
        if not sel and self.table.currentIndex().isValid():
            sel = [self.table.currentIndex().row()]
        if not sel:
            self.session.status.emit("Select the rows to remove")
            return
        rows = [r for i, r in enumerate(self.model.rows) if i not in sel]
        self._push(rows, f"Remove {len(sel)} row(s)")

    @Slot()
    def clear_rows(self) -> None:
        if self.model.rows:
            self._push([], "Clear the set")

    def set_interventions(self, interventions, text: str = "Replace the set") -> None:
        self._push([Row.from_intervention(iv) for iv in interventions], text)

    # ------------------------------------------------------------------ files
    @Slot()
    def load_set(self) -> None:
        from engine.interventions import InterventionSet

        start = str(self.session.path.parent) if self.session.path else ""
        path, _ = QFileDialog.getOpenFileName(self, "Load intervention set", start, SET_FILTER)
        if not path:
            return
        try:
            s = InterventionSet.from_json(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ForensicsError) as exc:
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self.show_message(f"Could not load {Path(path).name}: {msg}")
            QMessageBox.warning(self, "Load intervention set", f"{path}\n\n{msg}")
            return
        self.set_interventions(s.interventions, f"Load {Path(path).name}")
        self.session.status.emit(f"Loaded {len(s)} intervention(s) from {Path(path).name}")

    @Slot()
    def save_set(self) -> None:
        from engine.interventions import InterventionSet

        try:
            ivs = self.interventions()
        except InterventionError as exc:
            self.show_message(f"Not saved: {exc}")
            return
        start = str(self.session.path.with_suffix(".interventions.json")) if self.session.path else ""
        path, _ = QFileDialog.getSaveFileName(self, "Save intervention set", start, SET_FILTER)
        if not path:
            return
        from engine.atomic import write_text

        text = InterventionSet(ivs, Path(path).stem).to_json(indent=2)
        try:
            write_text(path, text + "\n")        # a temporary name, then renamed: a failure keeps the old file
        except OSError as exc:
            QMessageBox.warning(self, "Save intervention set", f"{path}\n\n{exc}")
            return
        self.undo_stack.setClean()
        self.session.status.emit(f"Saved {len(ivs)} intervention(s) to {Path(path).name}")

    # ------------------------------------------------------------------ replay
    def _key(self, bundle) -> tuple:
        return (bundle.uuid, str(Path(bundle.path).resolve()))

    @Slot()
    def replay(self) -> None:
        """Replay the current set on the engine thread (coalesces with a waiting replay)."""
        bundle = self.session.bundle
        self.revision += 1
        if bundle is None:
            return
        if any(self.model.problems):
            self.runner.cancel(JOB)
            bad = [i + 1 for i, p in enumerate(self.model.problems) if p]
            rows = f"row{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad[:5]))}{'…' if len(bad) > 5 else ''}"
            self.after.setTitle(f"After — not replayed ({rows} invalid)")
            self.after.clear("— (the set has invalid rows)")
            self.banner.setText("Fix the invalid rows to replay")
            self.banner.setStyleSheet("QLabel { font-size: 15px; font-weight: bold; padding: 4px; color: #8b0000; }")
            self.state.setText(f"Not replayed: {rows} of the set {'are' if len(bad) > 1 else 'is'} invalid; "
                               "the After panel shows nothing until the set is valid.")
            self.session.status.emit(f"Replay: not run — {rows} invalid")
            return
        ivs = self.interventions()
        key = self._key(bundle)
        self._replay_started = time.perf_counter()
        self.runner.submit(JOB, _replay_job(self.session, bundle, key, self._cache, ivs, self.revision, TOP_K))
        self.after.setEnabled(False)
        n = len(ivs)
        self.state.setText(f"Replaying the incident with {n} intervention(s)…" if n else
                           "Replaying the incident without interventions (baseline)…")

    @Slot(str, object)
    def _on_finished(self, name: str, result) -> None:
        if name != JOB:
            return
        if isinstance(result, ReplayFailure):
            if result.revision == self.revision:
                self._on_failed(name, result.message)
            return
        if not isinstance(result, ReplayOutcome):
            return
        self._baselines[result.key] = result.baseline
        bundle = self.session.bundle
        if bundle is None or result.key != self._key(bundle):
            return
        if not result.baseline_cached:
            self.runner.submit(WARMUP_JOB, _warmup_job(self.session, result.key, self._cache))
        if self.before.result is None:
            self.before.show_result(result.baseline, bundle)
        if result.revision != self.revision:
            return                        # superseded by a newer edit, whose replay is queued
        self.show_outcome(result)

    def show_outcome(self, o: ReplayOutcome) -> None:
        bundle = self.session.bundle
        self.outcome = o
        self.before.show_result(o.baseline, bundle)
        n = len(o.interventions)
        self.after.setTitle(f"After — {n} intervention(s)" if n else "After — no interventions (same as before)")
        self.after.show_result(o.after, bundle)
        b, a = o.baseline, o.after
        delta = a.metric - b.metric
        if not n:
            text, color = "No interventions yet — right-click a site or token in the Browser, or Add row", "#333"
        elif b.failing and not a.failing:
            text, color = "FIXED ✓ — the incident no longer fails", "#145214"
        elif b.failing:
            text, color = "still failing ✗", FAIL_FG
        elif a.failing:
            text, color = "BROKEN ✗ — the set makes a passing run fail", FAIL_FG
        else:
            text, color = "not failing before or after", "#333"
        pb, pa = _path_metric(b, bundle), _path_metric(a, bundle)
        if n and pb is not None and pa is not None:
            # generation: the span's log-prob is read after the recorded prefix and stays ~0 when the set makes the
            # model leave the failing path earlier; the margin along the path is the number that moves
            text += f"   (CCA search metric {_fmt(pb)} → {_fmt(pa)}, Δ {pa - pb:+.3g})"
        elif n:
            text += f"   ({metric_name(bundle).split(' (')[0]} {_fmt(b.metric)} → {_fmt(a.metric)}, Δ {delta:+.3g})"
        bg = _OK_BG if "FIXED" in text else (FAIL_BG if color == FAIL_FG else "transparent")
        self.banner.setText(text)
        self.banner.setStyleSheet(f"QLabel {{ font-size: 15px; font-weight: bold; padding: 4px; color: {color}; "
                                  f"background: {bg}; }}")
        self.banner.setToolTip(f"failure metric: {metric_name(bundle)}" +
                               ("" if pb is None else "\n" + _search_metric_tip()))
        self.state.setText(
            f"Replayed {n} intervention(s) in {1000 * o.seconds:.0f} ms on the engine thread "
            f"({o.forward_passes} forward passes; baseline {'cached' if o.baseline_cached else 'computed'}). "
            f"Failure spec: {bundle.failure_spec}." + self._margin_note(o))
        if n:
            self.session.status.emit(f"Replay: {text.split('   ')[0]} — output {ResultPanel.output_text(a)!r}")
        self.replayed.emit(o)

    @staticmethod
    def _margin_note(o: ReplayOutcome) -> str:
        """When the set fixes the output but not by CCA's fix margin, say so: CCA (and a certificate) would count
        the same set as not fixing the incident."""
        from engine.cca import FIX_MARGIN

        sm = o.after.search_metric
        if not o.interventions or not o.baseline.failing or o.after.failing or sm is None or sm <= -FIX_MARGIN:
            return ""
        return (f"  ⚠ Fixed by less than CCA's margin: the CCA search metric is {_fmt(sm)}; CCA counts a set as a fix "
                f"only at ≤ −{_fmt(FIX_MARGIN)}, so it (and a certificate) would say this set does not fix the "
                "incident.")

    @Slot(str, str)
    def _on_failed(self, name: str, message: str) -> None:
        if name != JOB:
            return
        self.after.clear("— (replay failed)")
        self.show_message(f"Replay failed: {message}")
        self.state.setText(f"Replay failed: {message}")
        self.session.status.emit(f"Replay failed: {message}")

    # ------------------------------------------------------------------ session
    @Slot(object)
    def _on_bundle_opened(self, bundle) -> None:
        self.undo_stack.clear()
        self.outcome = None
        self.before.clear()
        self.after.clear()
        self.after.setTitle("After — with the set")
        self.banner.setText("—")
        self.banner.setStyleSheet("QLabel { font-size: 15px; font-weight: bold; padding: 4px; }")
        self._apply_rows([], replay=False)
        base = self._baselines.get(self._key(bundle))
        if base is not None:
            self.before.show_result(base, bundle)
        self.state.setText(f"{bundle.failure_spec}: add interventions (right-click a site or token in the "
                           f"Browser, or Add row); each change replays in the background.")
        if self.isVisible():
            self.replay()

    @Slot()
    def _on_bundle_closed(self) -> None:
        self.runner.cancel(JOB)
        self.runner.cancel(WARMUP_JOB)
        self.undo_stack.clear()
        self.outcome = None
        self._apply_rows([], replay=False)
        self.before.clear()
        self.after.clear()
        self.after.setTitle("After — with the set")
        self.banner.setText("—")
        self.state.setText("Open a bundle to edit interventions.")

    def showEvent(self, event) -> None:  # noqa: N802 - Qt naming
        super().showEvent(event)
        b = self.session.bundle
        if b is not None and self.outcome is None and not self.runner.is_running(JOB) \
                and not any(self.model.problems):
            self.replay()        # the baseline (or the current set) so the user sees "before" at once

    def shutdown(self) -> None:
        self.runner.cancel(JOB)
        self.runner.cancel(WARMUP_JOB)


__all__ = ["EditorView", "ReplayFailure", "ReplayOutcome", "Row", "format_int_list", "parse_int_list", "row_problem"]
