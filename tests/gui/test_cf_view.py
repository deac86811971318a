"""Story 3 (Run CF): the per-layer anomaly plot — bars equal the scores, threshold line, click a bar to jump."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import pytest

pytest.importorskip("PySide6")
pytest.importorskip("pytestqt")

import pyqtgraph as pg  # noqa: E402
from PySide6.QtCore import QPointF, Qt  # noqa: E402

from workbench.views.plots import AnomalyBarPlot  # noqa: E402


@dataclass(frozen=True)
class _Score:  # the fields of engine.cf.LayerScore the plot reads
    layer: int
    site: str
    statistic: float
    score: float
    p_value: float
    flagged: bool


def test_bar_plot_draws_scores_threshold_and_click(qtbot):
    plot = AnomalyBarPlot(["attn", "mlp"], 3)
    qtbot.addWidget(plot)
    plot.resize(600, 400)
    plot.show()
    qtbot.waitExposed(plot)
    scores = [_Score(layer, site, 1.0 + layer, 0.5 * layer + (site == "mlp"), 0.5 / (layer + 1), layer == 2)
              for layer in range(3) for site in ("attn", "mlp")]
    plot.set_scores(scores, threshold=1.5)
    assert [h for _, h in plot.bar_heights("attn")] == [0.0, 0.5, 1.0]
    assert [h for _, h in plot.bar_heights("mlp")] == [1.0, 1.5, 2.0]
    assert plot.threshold_line.isVisible() and plot.threshold_line.value() == 1.5
    assert plot.threshold_line.label.toPlainText() == "threshold 1.50"   # the label shows the value too
    assert "p = 0.167" in plot.tooltip_for(2, "attn") and "FLAGGED" in plot.tooltip_for(2, "attn")

    hits = []
    plot.bar_clicked.connect(lambda layer, site: hits.append((layer, site)))
    pos = plot.mapFromScene(plot.bar_scene_pos(1, "mlp"))
    qtbot.mouseClick(plot.viewport(), Qt.MouseButton.LeftButton, pos=pos)
    assert hits == [(1, "mlp")]


# ---------------------------------------------------------------------------------------------------------------
# The view, end to end on the demo incident (needs engine.cf)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("engine.cf") is None, reason="engine.cf has not landed")

def test_threshold_label_stays_readable_over_a_tall_bar(qtbot):
    """The threshold's label sits at the left end of its line, where the first layer's bars are: a bar far above the
    threshold (a user's incident scored against few benign runs) must not paint over it."""
    plot = AnomalyBarPlot(["resid_pre", "attn"], 2)
    qtbot.addWidget(plot)
    plot.resize(600, 400)
    plot.show()
    qtbot.waitExposed(plot)
    plot.set_scores([_Score(0, "resid_pre", 0.0, 4000.0, 0.1, True), _Score(0, "attn", 0.0, 400.0, 0.1, True),
                     _Score(1, "resid_pre", 0.0, 300.0, 0.1, True), _Score(1, "attn", 0.0, 1.0, 0.5, False)],
                    threshold=5.0)
    qtbot.wait(50)
    label = plot.threshold_line.label
    r = label.sceneBoundingRect()
    point = QPointF(r.right() - 8, r.center().y())        # the label's right end, over the first layer's tall bar
    stack = [it for it in plot.scene().items(point)       # topmost first
             if isinstance(it, pg.BarGraphItem) or it is label or label.isAncestorOf(it)]
    assert any(isinstance(it, pg.BarGraphItem) for it in stack)   # a bar is there
    assert not isinstance(stack[0], pg.BarGraphItem), "the bar paints over the threshold label"

def test_cf_run_fills_plot_live_and_bar_click_jumps(qtbot, session):
    from workbench.views.cf_view import CFView

    view = CFView(session, session.runner)
    qtbot.addWidget(view)
    view.resize(900, 600)
    view.show()
    qtbot.waitExposed(view)
    assert view.run_button.isEnabled() and not view.cancel_button.isEnabled()
    assert not view.verdict_badge.isVisible()              # no run verdict before a run
    live_counts = []
    session.runner.progress.connect(lambda name, data: live_counts.append(len(view.plot.scores)))
    with qtbot.waitSignal(session.cf_changed, timeout=120_000) as blocker:
        view.run_button.click()
        assert not view.run_button.isEnabled() and view.cancel_button.isEnabled()
        assert view.timer.isActive()
    res = blocker.args[0]
    assert session.cf is res and not res.partial
    assert not view.timer.isActive()                       # the refresh timer stops when the run is over
    assert view.run_button.isEnabled() and not view.cancel_button.isEnabled()
    # the plot filled in while scores arrived (some redraws happened before the end)
    assert live_counts and min(live_counts) < len(res.scores)
    # bar heights are the result's scores, per site, in layer order
    for site in session.bundle.sites:
        drawn = [h for _, h in view.plot.bar_heights(site)]
        expected = [s.score for s in res.scores if s.site == site]
        assert drawn == pytest.approx(expected)
    assert view.plot.threshold_line.isVisible()
    assert view.plot.threshold_line.value() == pytest.approx(res.threshold)
    assert view.findings.rowCount() == len(res.findings)
    # the run-level verdict: the demo incident is anomalous as a whole, with the measured held-out rate beside it
    assert res.run_anomalous is True
    missed = res.heldout_run_fpr > 0.05          # the badge warns when its measured false-alarm rate misses 5%
    assert view.verdict_badge.isVisible() and view.verdict_badge.text() == "Run ANOMALOUS" + (" ⚠" if missed else "")
    detail = view.verdict_label.text()
    assert ("target ≤ 5%: MISSED" in detail) == missed
    assert f"max site score {max(s.score for s in res.scores):.1f} > run threshold" in detail
    assert f"p = {res.run_p_value:.3g}" in detail
    assert f"held-out benign runs flagged: {res.heldout_run_fpr:.1%} of {res.n_run_heldout}" in detail
    assert view.verdict_label.geometry().right() <= view.width()   # wraps inside the view, not past its edge
    if res.findings:
        top = res.findings[0]
        assert view.findings.item(0, 1).text() == str(top.layer) and view.findings.item(0, 2).text() == top.site
        toks = session.bundle.tokens                               # the tokens at the site's positions
        assert view.findings.item(0, 6).text().startswith("\u201c" + toks[top.positions[0]].replace("Ġ", "·"))

    # clicking the highest bar asks the browser for that site
    best = max(res.scores, key=lambda s: s.score)
    with qtbot.waitSignal(session.site_requested, timeout=2000) as jump:
        pos = view.plot.mapFromScene(view.plot.bar_scene_pos(best.layer, best.site))
        qtbot.mouseClick(view.plot.viewport(), Qt.MouseButton.LeftButton, pos=pos)
    assert jump.args == [best.layer, best.site]
    assert "p = " in view.plot.tooltip_for(best.layer, best.site)


@pytest.mark.skipif(importlib.util.find_spec("engine.cf") is None, reason="engine.cf has not landed")
def test_too_few_benign_runs_show_no_run_verdict_and_say_why(qtbot, session):
    """The demo incident scored against a baseline of 6 benign prompts and no held-out ones (as a user's own incident
    recorded with a few prompts): the badge gives no verdict, the line says why and what would give one."""
    import scenarios
    from engine.cf import build_baseline, format_score, run_cf
    from engine.replay import load_bundle_model
    from workbench.views.cf_view import CFView

    handle = load_bundle_model(session.bundle)
    prompts = list(scenarios.get("gpt2-prompt-injection").benign_reference[:6])
    res = run_cf(session.bundle, handle, baseline=build_baseline(handle, prompts, statistic="distance"),
                 statistic="distance")
    assert res.run_anomalous is None and res.run_no_verdict_reason == "too_few_calibration_runs"
    view = CFView(session, session.runner)
    qtbot.addWidget(view)
    view.resize(900, 600)
    view.show()
    qtbot.waitExposed(view)
    session.set_cf(res)
    assert view.verdict_badge.isVisible() and view.verdict_badge.text() == "No run verdict"
    detail = view.verdict_label.text()
    assert detail.startswith("6 benign reference runs calibrate it; a 5% test needs at least 19 (give more benign "
                             "prompts: at least 19 with --benign-file, or 38 held-out ones with --heldout-file); ")
    assert f"the run's max site score {format_score(res.run_statistic)} exceeds" in detail
    assert f"(p = {res.run_p_value:.3g})" in detail
    assert "ANOMALOUS" not in detail and "run threshold" not in detail and "not measured of" not in detail
    assert "held-out benign FPR not measured (no held-out benign prompts)" in view.state_label.text()
    assert view.verdict_label.geometry().right() <= view.width()
