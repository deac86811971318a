"""Story 6 (review the fix set): per-element evidence, side effects, controls against the observed value, the
layer × position map; reject an element, re-evaluate the accepted ones, and see the new evidence.

The set under review is a real two-element set measured by ``engine.cca.evaluate_fix_set`` on the demo incident:
the demo's causal site (L0 attn at the injected instruction's last token) plus a site that does nothing for the
failure (L3 mlp at position 2), so the review has something to reject.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("PySide6")
pytest.importorskip("pytestqt")

from PySide6.QtCore import Qt  # noqa: E402

from workbench.views.review_view import ReviewView  # noqa: E402

N_CONTROLS = 30


@pytest.fixture(scope="module")
def two_element_result(demo_bundle):
    """Evidence for {causal site, useless site}, measured once for the module."""
    from engine.bundle import open_bundle
    from engine.cca import evaluate_fix_set
    from engine.interventions import Intervention
    from engine.replay import load_bundle_model

    with open_bundle(demo_bundle) as b:
        handle = load_bundle_model(b)
        causal = _causal_site(b, handle)
        useless = Intervention(layer=b.n_layers - 1, component="mlp", positions=(2,), op="mean")
        res = evaluate_fix_set(b, handle, [causal, useless], n_controls=N_CONTROLS)
    return res, causal, useless


def _causal_site(bundle, handle):
    """The demo's fix: mean-ablate L0 attn at the last token of the injected instruction (found, not assumed)."""
    from engine.interventions import Intervention, InterventionSet, evaluate

    cands = [Intervention(layer=0, component="attn", positions=(p,), op="mean")
             for p in range(bundle.n_prompt_tokens)]
    res = evaluate(bundle, handle, [InterventionSet((c,)) for c in cands])
    fixing = [c for c, r in zip(cands, res.results) if not r.failing]
    assert fixing, "no single L0 attn position fixes the demo incident"
    return fixing[-1]


@pytest.fixture
def view(qtbot, session):
    v = ReviewView(session, session.runner)
    qtbot.addWidget(v)
    v.resize(1100, 800)
    v.show()
    qtbot.waitExposed(v)
    return v


def test_empty_review_says_run_cca_first(view):
    assert "run CCA first" in view.summary.text()
    assert view.elements.rowCount() == 0 and not view.reevaluate_button.isEnabled()


def test_review_shows_every_piece_of_evidence(view, session, two_element_result):
    res, causal, useless = two_element_result
    assert res.flipped and not res.one_minimal          # the useless element is not needed
    session.set_cca(res)
    # each element with its drop-one effect, both accepted to begin with
    assert view.elements.rowCount() == 2
    assert all(view.elements.item(r, 0).checkState() == Qt.CheckState.Checked for r in range(2))
    headers = [view.elements.horizontalHeaderItem(c).text() for c in range(view.elements.columnCount())]
    col = {h: i for i, h in enumerate(headers)}
    for r, el in enumerate(res.fix_set):
        assert view.elements.item(r, col["layer"]).text() == str(el.intervention.layer)
        assert view.elements.item(r, col["site"]).text() == el.intervention.component
        assert view.elements.item(r, col["necessary"]).text().endswith("yes" if el.drop_one_failing else "no")
    necessary = {view.elements.item(r, col["site"]).text(): view.elements.item(r, col["necessary"]).text()
                 for r in range(2)}
    assert necessary["attn"].endswith("yes") and necessary["mlp"].endswith("no")
    # flip rate over variants in the summary
    assert f"{res.n_variants} held-out failing variants: {100 * res.flip_rate:.1f}%" in view.summary.text()
    # side effects: one row per held-out benign prompt, the count of changed ones in the tab title
    assert view.side_effects.rowCount() == res.n_benign > 0
    n_changed = sum(1 for d in res.side_effects if d.get("changed"))
    assert view.tabs.tabText(0) == f"Side effects ({n_changed}/{res.n_benign} changed)"
    prompts = {view.side_effects.item(r, 1).text() for r in range(view.side_effects.rowCount())}
    assert prompts == {d["prompt"] for d in res.side_effects}
    # controls: the histogram holds every control's flip rate, the observed value is marked
    assert int(view.histogram.counts.sum()) == res.n_controls == N_CONTROLS
    assert view.histogram.observed == pytest.approx(res.evidence["controls"]["observed_flip_rate"])
    assert view.histogram.observed_line.isVisible()
    assert view.histogram.observed_line.label.toPlainText() == f"observed {view.histogram.observed:.3g}"
    assert f"n={N_CONTROLS}" in view.tabs.tabText(1)
    # the layer x position map marks exactly the two elements' cells
    m = view.position_map.matrix
    assert m.shape == (session.bundle.n_layers, session.bundle.n_prompt_tokens)
    marked = {(int(i), int(j)) for i, j in zip(*np.nonzero(np.isfinite(m)))}
    assert marked == {(causal.layer, causal.positions[0]), (useless.layer, useless.positions[0])}
    # analyst record: both accepted
    assert len(session.analyst["accepted"]) == 2 and session.analyst["rejected"] == []


def test_reject_and_reevaluate(qtbot, view, session, two_element_result):
    res, causal, useless = two_element_result
    session.set_cca(res)
    row = next(r for r in range(2) if res.fix_set[r].intervention == useless)
    view.controls.setValue(N_CONTROLS)
    view.set_accepted(row, False)                              # the analyst unticks the useless element
    assert [d["component"] for d in session.analyst["rejected"]] == ["mlp"]
    assert [d["component"] for d in session.analyst["accepted"]] == ["attn"]
    assert "Rejected by the analyst" in view.rejected_label.text() and "mlp" in view.rejected_label.text()
    view.note.setText("L3 mlp is not part of the mechanism")
    view.note.editingFinished.emit()
    assert session.analyst["note"] == "L3 mlp is not part of the mechanism"
    assert view.reevaluate_button.isEnabled()
    with qtbot.waitSignal(session.cca_changed, timeout=120_000) as blocker:
        view.reevaluate_button.click()
        assert not view.reevaluate_button.isEnabled() and view.cancel_button.isEnabled()
    new = blocker.args[0]
    # the new evidence is measured for exactly the accepted element
    assert [e.intervention for e in new.fix_set] == [causal]
    assert new.flipped and new.one_minimal and not new.partial and new.n_controls == N_CONTROLS
    assert new.fraction_of_activations < res.fraction_of_activations
    assert view.elements.rowCount() == 1
    assert "Re-evaluated: 1 element(s)" in view.state_label.text()
    # the rejection stays on the record (for the certificate), with the note
    assert [d["component"] for d in session.analyst["rejected"]] == ["mlp"]
    assert [d["component"] for d in session.analyst["accepted"]] == ["attn"]
    assert session.analyst["note"] == "L3 mlp is not part of the mechanism"
    assert "mlp" in view.rejected_label.text()
    assert view.reevaluate_button.isEnabled() and not view.cancel_button.isEnabled()


def test_rejecting_everything_disables_reevaluate(view, session, two_element_result):
    res, _, _ = two_element_result
    session.set_cca(res)
    view.set_accepted(0, False)
    view.set_accepted(1, False)
    assert not view.reevaluate_button.isEnabled()
    assert len(session.analyst["rejected"]) == 2 and session.analyst["accepted"] == []
    assert math.isfinite(res.flip_rate)


def test_position_map_labels_do_not_overlap_at_150_tokens(qtbot):
    """A researcher's own incident has ~150 prompt tokens: the layer × position map labelled every position and
    the numbers ran into one another ("0123456789101112…"); it labels as many as fit, evenly spaced, and labels
    every position with its token when they do fit."""
    from PySide6.QtCore import QPointF
    from PySide6.QtGui import QFontMetrics

    from workbench.views.plots import PositionMap

    m = PositionMap()
    qtbot.addWidget(m)
    m.resize(1000, 400)
    m.show()
    qtbot.waitExposed(m)
    tokens = [f"tok{i}" for i in range(150)]
    m.set_cells(12, 150, [(11, [149], 1.0), (3, list(range(150)), 2.0)], tokens)
    axis = m.plotItem.getAxis("bottom")
    fm = QFontMetrics(axis.font())
    vb = m.plotItem.vb
    drawn = axis._tickLevels[0]                     # the ticks the axis draws: [(x, label), ...]
    xs = [vb.mapViewToScene(QPointF(x, 0)).x() for x, _ in drawn]
    assert 5 <= len(drawn) < 150
    widest = max(fm.horizontalAdvance(part) for _, lab in drawn for part in lab.split("\n"))
    assert min(b - a for a, b in zip(xs, xs[1:])) > widest            # no two labels touch
    assert drawn[0][1] == "0"
    # a cell too narrow for its number shows none (150 "2"s in a row were an unreadable smear)
    assert not any(label.isVisible() for label in m._labels)
    # few tokens: every position, with its token
    m.set_cells(4, 6, [(1, [2], 1.0)], ["a", "b", "c", "d", "e", "f"])
    assert [lab for _, lab in axis._tickLevels[0]] == [f"{i}\n{t}" for i, t in enumerate("abcdef")]
    assert all(label.isVisible() for label in m._labels)


def test_side_effects_fit_a_laptop_width_without_scrolling_sideways(qtbot, view, session, two_element_result):
    """At 1024 px wide every side-effect column is on screen (prompt, expected and got share the width, elided,
    with the full text in the tooltip): at 1024x640 the 'got' column used to be cut off behind a sideways scroll."""
    res, _, _ = two_element_result
    session.set_cca(res)
    view.resize(1000, 600)
    view.tabs.setCurrentIndex(0)
    qtbot.wait(50)
    t = view.side_effects
    assert t.rowCount() == len(res.side_effects) > 0
    assert t.horizontalScrollBar().maximum() == 0
    head = t.horizontalHeader()
    assert sum(head.sectionSize(c) for c in range(t.columnCount())) <= t.viewport().width()
    got = [c for c in range(t.columnCount()) if t.horizontalHeaderItem(c).text() == "got"][0]
    assert head.sectionSize(got) > 80
    longest = max(range(t.rowCount()), key=lambda r: len(t.item(r, 1).text()))
    assert t.item(longest, 1).toolTip() == t.item(longest, 1).text()
