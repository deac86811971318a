"""Story 5 (edit interventions): browser context menu → a row in the intervention table → background replay →
before / after (continuation, top-k, metric, verdict); cell edits with delegates, invalid input refused with a
message, undo / redo, load / save of the set as JSON."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("PySide6")
pytest.importorskip("pytestqt")

from PySide6.QtCore import QPointF, Qt  # noqa: E402
from PySide6.QtWidgets import QApplication, QComboBox, QFileDialog, QLineEdit, QMessageBox, QSpinBox  # noqa: E402

from engine.interventions import Intervention, InterventionSet  # noqa: E402
from workbench.views.editor import COL_LAYER, COL_OP, COL_POS, COL_VALUE, Row  # noqa: E402

FIXED_TEXT = "OK, I will summarize the report."
REPLAY_TIMEOUT = 60_000


@pytest.fixture
def editor(window, qtbot):
    """The Interventions tab, shown: its baseline replay (model load on the engine thread) has finished."""
    ed = window.editor
    with qtbot.waitSignal(ed.replayed, timeout=REPLAY_TIMEOUT):
        window.show_view("Interventions")
    assert ed.outcome is not None and not ed.outcome.interventions
    return ed


def _wait_replay(qtbot, ed, action):
    """Run ``action`` and wait until the before / after shows the replay of the resulting set."""
    with qtbot.waitSignal(ed.replayed, timeout=REPLAY_TIMEOUT,
                          check_params_cb=lambda o: o.revision == ed.revision):
        action()
    return ed.outcome


def _edit(qtbot, ed, row, col, text=None, combo=None, spin=None):
    """Edit a cell the way a user does: open its editor (F2), type or choose, commit."""
    idx = ed.model.index(row, col)
    ed.table.setCurrentIndex(idx)
    ed.table.edit(idx)
    editor = ed.table.indexWidget(idx) or ed.table.focusWidget()
    if combo is not None:
        assert isinstance(editor, QComboBox)
        editor.setCurrentIndex(editor.findText(combo))
        editor.activated.emit(editor.currentIndex())
    elif spin is not None:
        assert isinstance(editor, QSpinBox)
        editor.setValue(spin)
        qtbot.keyClick(editor, Qt.Key.Key_Return)
    else:
        assert isinstance(editor, QLineEdit)
        editor.setText(text)
        qtbot.keyClick(editor, Qt.Key.Key_Return)
    QApplication.processEvents()          # the delegate commits through a queued call


def test_baseline_is_shown_and_cached(window, editor, qtbot):
    b = window.session.bundle
    o = editor.outcome
    assert o.baseline.failing and o.baseline.continuation == b.continuation_text == "HACKED"
    assert o.baseline.metric == pytest.approx(b.failure_metric, abs=1e-5)
    assert editor.before.verdict.text() == "FAILS" and editor.before.output_label.text() == "HACKED"
    assert editor.before.topk.rowCount() == 5 and editor.before.topk.item(0, 1).text() == "'HACKED'"
    assert "No interventions yet" in editor.banner.text()
    assert editor._baselines and editor._cache.baseline is o.baseline
    # then the model is run once per generation length in the background (first edits stay fast)
    qtbot.waitUntil(lambda: editor._cache.warm, timeout=REPLAY_TIMEOUT)


def test_context_menu_to_fix_to_undo_redo(window, editor, qtbot):
    browser = window.browser
    window.show_view("Browser")
    with qtbot.waitSignal(browser.slice_drawn, timeout=3000):
        browser.select_site(0, "attn")
    # right-click the heatmap row of token 15 in layer 0 attn ▸ Ablate here (mean)
    scene = browser.heat_vb.mapViewToScene(QPointF(50.0, 15.5))
    qtbot.mouseClick(browser.heat.viewport(), Qt.MouseButton.RightButton, pos=browser.heat.mapFromScene(scene))
    act = next(a for a in browser.last_menu.actions() if a.text() == "Ablate here (mean)")
    o = _wait_replay(qtbot, editor, act.trigger)
    browser.last_menu.close()
    assert editor.rows == [Row(0, "attn", "15", "", "mean", "")]
    assert editor.model.data(editor.model.index(0, COL_POS)) == "15"
    assert o.interventions == (Intervention(0, "attn", (15,), "mean"),)
    assert o.baseline_cached and o.after.continuation == FIXED_TEXT and not o.after.failing
    window.show_view("Interventions")
    assert editor.after.output_label.text() == FIXED_TEXT and editor.after.verdict.text() == "ok"
    assert editor.before.output_label.text() == "HACKED" and editor.before.verdict.text() == "FAILS"
    assert editor.banner.text().startswith("FIXED")
    assert editor.after.topk.item(0, 1).text() == "'OK'"
    probs = [float(editor.after.topk.item(r, 2).text()) for r in range(editor.after.topk.rowCount())]
    assert probs == pytest.approx([p for _, p in o.after.top_k], rel=1e-3) and probs == sorted(probs, reverse=True)
    logp, path = editor.after.metric_label.text().split(" · CCA search metric ")
    assert float(logp) == pytest.approx(o.after.metric, rel=1e-3)
    assert o.after.metric < o.baseline.metric - 5
    # the CCA search metric (the margin along the recorded path) goes from failing (> 0) to fixed (<= -1)
    assert float(path) == pytest.approx(o.after.search_metric, rel=1e-3) and o.after.search_metric <= -1
    assert o.baseline.search_metric > 0
    assert (f"CCA search metric {o.baseline.search_metric:.3g} \u2192 {o.after.search_metric:.3g}"
            in editor.banner.text())
    assert "FIXED" in window.statusBar().currentMessage()

    # undo (Ctrl+Z on the table) restores the empty set and the failing output
    editor.table.setFocus()
    o = _wait_replay(qtbot, editor, lambda: qtbot.keyClick(editor.table, Qt.Key.Key_Z,
                                                           Qt.KeyboardModifier.ControlModifier))
    assert editor.rows == [] and o.interventions == ()
    assert editor.after.output_label.text() == "HACKED" and not editor.banner.text().startswith("FIXED")
    # redo (Ctrl+Shift+Z) brings the fix back
    o = _wait_replay(qtbot, editor, lambda: qtbot.keyClick(
        editor.table, Qt.Key.Key_Z, Qt.KeyboardModifier.ControlModifier | Qt.KeyboardModifier.ShiftModifier))
    assert len(editor.rows) == 1 and o.after.continuation == FIXED_TEXT
    assert editor.after.output_label.text() == FIXED_TEXT


def test_cell_edits_replay_and_invalid_input_is_refused(window, editor, qtbot):
    _wait_replay(qtbot, editor, lambda: editor.add_from_request(Intervention(0, "attn", (15,), "mean")))
    assert editor.outcome.after.continuation == FIXED_TEXT
    # positions: "abc" cannot be parsed -> refused with a message, row unchanged, nothing replayed
    rev = editor.revision
    _edit(qtbot, editor, 0, COL_POS, text="abc")
    assert editor.rows[0].positions == "15" and editor.revision == rev
    assert editor.message.isVisible() and "position 'abc' is not an integer" in editor.message.text()
    # a position past the end of the incident is refused too
    _edit(qtbot, editor, 0, COL_POS, text="99")
    assert editor.rows[0].positions == "15" and "out of range (0..16)" in editor.message.text()
    # moving the ablation to position 3 (combo/spin/text edits are undoable commands) -> still failing
    o = _wait_replay(qtbot, editor, lambda: _edit(qtbot, editor, 0, COL_POS, text="3"))
    assert editor.rows[0].positions == "3" and not editor.message.isVisible()
    assert o.after.failing and o.after.continuation == "HACKED" and editor.banner.text().startswith("still failing")
    assert "(CCA search metric " in editor.banner.text()     # the banner names its metric
    assert "log-prob of the failing text" in editor.after.metric_label.toolTip()
    # op -> scale without a factor: the row is kept but marked invalid, said plainly, nothing replays
    _edit(qtbot, editor, 0, COL_OP, combo="scale")
    assert editor.rows[0].op == "scale" and editor.model.problems[0]
    assert "Row 1: op 'scale' needs a value" in editor.message.text()
    assert editor.model.headerData(0, Qt.Orientation.Vertical) == "⚠ 1"
    assert "invalid rows" in editor.banner.text()
    # nothing says a replay is running or shows the last set's title: the state line and status bar say why not
    assert editor.state.text().startswith("Not replayed: row 1 of the set is invalid")
    assert editor.after.title() == "After — not replayed (row 1 invalid)"
    assert window.statusBar().currentMessage() == "Replay: not run — row 1 invalid"
    # the factor 0 at position 15 on layer 0 (same effect as zeroing) -> replayed, compared with a direct eval
    _edit(qtbot, editor, 0, COL_POS, text="15")
    o = _wait_replay(qtbot, editor, lambda: _edit(qtbot, editor, 0, COL_VALUE, text="0"))
    assert editor.rows[0] == Row(0, "attn", "15", "", "scale", "0")
    assert o.interventions == (Intervention(0, "attn", (15,), "scale", value=0.0),)
    assert not editor.message.isVisible()
    # the layer via its spin box
    o = _wait_replay(qtbot, editor, lambda: _edit(qtbot, editor, 0, COL_LAYER, spin=2))
    assert editor.rows[0].layer == 2 and o.interventions[0].layer == 2
    shown = editor.after.output_label.text()
    assert shown == o.after.continuation and editor.after.verdict.text() == ("FAILS" if o.after.failing else "ok")
    # undo walks back through the layer and value edits, one step at a time
    editor.undo_action.trigger()
    assert editor.rows[0].layer == 0
    editor.undo_action.trigger()             # back to "scale" without a factor: invalid again, not replayed
    assert editor.rows[0] == Row(0, "attn", "15", "", "scale", "") and editor.model.problems[0]
    assert "needs a value" in editor.message.text()
    o = _wait_replay(qtbot, editor, lambda: [editor.undo_action.trigger() for _ in range(3)])
    assert editor.rows[0] == Row(0, "attn", "15", "", "mean", "") and o.after.continuation == FIXED_TEXT


def test_save_and_load_set_json(window, editor, qtbot, tmp_path, monkeypatch):
    ivs = (Intervention(0, "attn", (15,), "mean"), Intervention(1, "head", (14, 15), "zero", indices=(2, 5)))
    for iv in ivs:
        _wait_replay(qtbot, editor, lambda iv=iv: editor.add_from_request(iv))
    out = tmp_path / "set.json"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(out), ""))
    editor.save_action.trigger()
    saved = InterventionSet.from_json(out.read_text())
    assert saved.interventions == ivs and saved.name == "set"
    assert [f.name for f in tmp_path.iterdir()] == ["set.json"]       # written through a temporary name, renamed
    # clear, then load it back: one undoable step, replayed
    _wait_replay(qtbot, editor, editor.clear_action.trigger)
    assert editor.rows == []
    monkeypatch.setattr(QFileDialog, "getOpenFileName", lambda *a, **k: (str(out), ""))
    o = _wait_replay(qtbot, editor, editor.load_action.trigger)
    assert editor.interventions() == ivs and o.interventions == ivs
    assert editor.rows[1] == Row(1, "head", "14-15", "2, 5", "zero", "")
    # Del removes the selected row (replayed), Ctrl+Z brings it back
    editor.table.selectRow(1)
    o = _wait_replay(qtbot, editor, editor.remove_action.trigger)
    assert editor.interventions() == ivs[:1] and o.interventions == ivs[:1]
    assert editor.remove_action.shortcut().toString() == "Del"
    o = _wait_replay(qtbot, editor, editor.undo_action.trigger)
    assert o.interventions == ivs
    # Add row copies the current row as a starting point
    editor.table.selectRow(0)
    o = _wait_replay(qtbot, editor, editor.add_action.trigger)
    assert editor.rows[2] == editor.rows[0] and len(o.interventions) == 3
    o = _wait_replay(qtbot, editor, editor.undo_action.trigger)
    assert o.interventions == ivs
    # a broken file: a dialog and a message naming the problem; the set stays as it was
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"interventions": [{"layer": 0, "component": "attn", "op": "explode"}]}))
    boxes = []
    monkeypatch.setattr(QMessageBox, "warning", lambda *a, **k: boxes.append(a[2]) or QMessageBox.StandardButton.Ok)
    monkeypatch.setattr(QFileDialog, "getOpenFileName", lambda *a, **k: (str(bad), ""))
    editor.load_action.trigger()
    assert len(boxes) == 1 and "unknown op 'explode'" in boxes[0]
    assert "Could not load bad.json" in editor.message.text() and editor.interventions() == ivs


def test_a_fix_by_less_than_ccas_margin_is_said_so(window, editor, qtbot):
    """The editor's FIXED is the failure predicate on the greedy output; CCA (and a certificate) count a set as a
    fix only when its search metric is <= -1.  A set between the two now says so under the banner."""
    from engine.cca import FIX_MARGIN
    from engine.interventions import evaluate
    from engine.replay import load_bundle_model

    b = window.session.bundle
    handle = load_bundle_model(b)      # a model of the test's own (the session's is the engine thread's)
    # scale the demo's causal site (L0 attn at 15): by 0 it fixes clearly; the search metric crosses 0 between the
    # factors 0.075 (-1.6) and 0.1 (+0.4), where a factor fixes the output narrowly
    factors = [0.0] + [0.075 + i / 400 for i in range(11)]
    sets = [InterventionSet((Intervention(0, "attn", (15,), "scale", value=f),)) for f in factors]
    res = evaluate(b, handle, sets).results
    narrow = [f for f, r in zip(factors, res) if not r.failing and -FIX_MARGIN < r.search_metric < 0]
    clear = [f for f, r in zip(factors, res) if not r.failing and r.search_metric <= -FIX_MARGIN]
    assert narrow and clear, [(f, r.failing, round(r.search_metric, 2)) for f, r in zip(factors, res)]
    o = _wait_replay(qtbot, editor, lambda: editor.set_interventions(
        (Intervention(0, "attn", (15,), "scale", value=narrow[0]),), "narrow"))
    assert not o.after.failing and editor.banner.text().startswith("FIXED")
    assert "Fixed by less than CCA's margin" in editor.state.text()
    assert f"search metric is {o.after.search_metric:.3g}" in editor.state.text()
    o = _wait_replay(qtbot, editor, lambda: editor.set_interventions(
        (Intervention(0, "attn", (15,), "scale", value=clear[0]),), "clear"))
    assert not o.after.failing and o.after.search_metric <= -FIX_MARGIN
    assert "less than CCA's margin" not in editor.state.text()
