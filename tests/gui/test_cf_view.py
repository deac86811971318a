"""Story 3 (Run CF): the per-layer anomaly plot — bars equal the scores, threshold line, click a bar to jump."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

pytest.importorskip("PySide6")
pytest.importorskip("pytestqt")

from PySide6.QtCore import Qt  # noqa: E402

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
    assert "p = 0.167" in plot.tooltip_for(2, "attn") and "FLAGGED" in plot.tooltip_for(2, "attn")

    hits = []
    plot.bar_clicked.connect(lambda layer, site: hits.append((layer, site)))
    pos = plot.mapFromScene(plot.bar_scene_pos(1, "mlp"))
    qtbot.mouseClick(plot.viewport(), Qt.MouseButton.LeftButton, pos=pos)
    assert hits == [(1, "mlp")]
