"""Story 2 (browse layer by layer): the tree of layers and sites, the heatmap of the visible slice with prompt
tokens as row labels, per-token norms, CF badges, jumping to a site, and the right-click intervention menus."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

pytest.importorskip("PySide6")
pytest.importorskip("pytestqt")

from PySide6.QtCore import QPoint, QPointF, Qt  # noqa: E402
from PySide6.QtWidgets import QInputDialog, QMenu  # noqa: E402

from engine.interventions import Intervention  # noqa: E402
from workbench.views.browser import peak_downsample  # noqa: E402


@pytest.fixture
def browser(window, qtbot):
    window.show_view("Browser")
    b = window.browser
    qtbot.waitUntil(lambda: b.image_data.size > 0, timeout=5000)
    return b


@pytest.fixture
def reads(monkeypatch):
    """Every h5py dataset read during the test: (dataset name, selection)."""
    seen: list[tuple[str, object]] = []
    orig = h5py.Dataset.__getitem__

    def spy(self, key, *a, **k):
        seen.append((self.name, key))
        return orig(self, key, *a, **k)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", spy)
    return seen


def _actions(menu: QMenu) -> dict[str, object]:
    out = {}
    for a in menu.actions():
        if a.menu() is not None:
            out[a.text()] = a.menu()
        elif a.text():
            out[a.text()] = a
    return out


def _item_of(browser, layer, site):
    top = browser.tree.topLevelItem(layer)
    return next(top.child(c) for c in range(top.childCount()) if top.child(c).text(0) == site)


def test_tree_lists_layers_sites_and_shapes(window, browser):
    b = window.session.bundle
    tree = browser.tree
    assert tree.topLevelItemCount() == b.n_layers == 4
    for i in range(b.n_layers):
        top = tree.topLevelItem(i)
        assert top.text(0) == f"Layer {i}" and top.isExpanded()
        assert [top.child(c).text(0) for c in range(top.childCount())] == list(b.sites)
        for c in range(top.childCount()):
            n, d = b.activation_dataset(i, b.sites[c]).shape
            assert top.child(c).text(1) == f"{n} × {d}" == f"{b.n_positions} × 256"
            assert top.child(c).text(2) == ""          # no CF run yet: no badge
    # the first site is shown right after opening
    assert (browser.layer, browser.site) == (0, b.sites[0])
    assert tree.currentItem() is _item_of(browser, 0, b.sites[0])


def test_selecting_a_site_shows_heatmap_ticks_and_norms(window, browser, qtbot):
    b = window.session.bundle
    item = _item_of(browser, 2, "mlp")
    with qtbot.waitSignal(browser.slice_drawn, timeout=3000):
        rect = browser.tree.visualItemRect(item)
        qtbot.mouseClick(browser.tree.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())
    assert (browser.layer, browser.site) == (2, "mlp")
    full = b.activation(2, "mlp")
    w = browser.slice_info
    # the whole (small) site is in view: the image is the visible slice, cell for cell
    assert (w["p0"], w["p1"], w["d0"], w["d1"]) == (0, b.n_positions, 0, 256) and w["sp"] == w["sd"] == 1
    assert browser.image_data.shape == (b.n_positions, 256)
    np.testing.assert_array_equal(browser.image_data, full)
    assert browser.image.image.shape == browser.image_data.shape
    rect = browser.image.mapRectToView(browser.image.boundingRect())
    assert (rect.left(), rect.top(), rect.width(), rect.height()) == (0, 0, 256, b.n_positions)
    # prompt tokens label the rows
    labels = [t for _, t in browser.tick_labels]
    assert labels == [f"{i} {tok}" for i, tok in enumerate(b.tokens)]
    assert [p for p, _ in browser.tick_labels] == [i + 0.5 for i in range(b.n_positions)]
    # the colour bar spans the symmetric level range of the image
    lo, hi = browser.colorbar.levels()
    assert lo == -hi and hi > 0 and browser.image.getLevels()[1] == pytest.approx(hi)
    # per-token L2 norms of the full d_model vectors, drawn against the token axis
    expect = np.linalg.norm(full.astype(np.float64), axis=1)
    np.testing.assert_allclose(browser.norm_values, expect, rtol=1e-6)
    xs, ys = browser.norm_curve.getData()
    np.testing.assert_allclose(xs, expect, rtol=1e-6)
    assert list(ys) == [i + 0.5 for i in range(b.n_positions)]
    assert "Layer 2 · mlp" in browser.title.text() and "showing positions 0–16" in browser.title.text()
    # keyboard: Down moves to the next site (layer 2 resid_post)
    browser.tree.setFocus()
    with qtbot.waitSignal(browser.slice_drawn, timeout=3000):
        qtbot.keyClick(browser.tree, Qt.Key.Key_Down)
    assert (browser.layer, browser.site) == (2, "resid_post")
    np.testing.assert_array_equal(browser.image_data, b.activation(2, "resid_post"))


def test_only_the_visible_slice_is_read(window, browser, qtbot, reads):
    b = window.session.bundle
    with qtbot.waitSignal(browser.slice_drawn, timeout=3000):
        browser.select_site(1, "attn")
    name = b.activation_dataset(1, "attn").name
    assert reads and all(n == name for n, _ in reads), "selecting a site reads only that site"
    # zoom in on tokens 4..11 and dims 32..95 (debounced re-read after the view range changed)
    reads.clear()
    with qtbot.waitSignal(browser.slice_drawn, timeout=3000):
        browser.heat_vb.setRange(xRange=(32, 96), yRange=(4, 12), padding=0)
    assert reads and all(n == name for n, _ in reads)
    for _, (ps, ds) in reads:
        assert 4 <= ps.start and ps.stop <= 12          # only the positions in view
    w = browser.slice_info
    assert (w["p0"], w["p1"], w["d0"], w["d1"]) == (4, 12, 32, 96)
    full = b.activation(1, "attn")
    np.testing.assert_array_equal(browser.image_data, full[4:12, 32:96])
    np.testing.assert_allclose(browser.norm_values, np.linalg.norm(full[4:12].astype(np.float64), axis=1),
                               rtol=1e-6)
    assert [t for _, t in browser.tick_labels] == [f"{i} {b.tokens[i]}" for i in range(4, 12)]
    # pan across dims only: the norms of these tokens are cached, so exactly [4:12, 40:72] is read
    reads.clear()
    with qtbot.waitSignal(browser.slice_drawn, timeout=3000):
        browser.heat_vb.setRange(xRange=(40, 72), yRange=(4, 12), padding=0)
    assert [(n, (k[0].start, k[0].stop, k[1].start, k[1].stop)) for n, k in reads] == [(name, (4, 12, 40, 72))]
    np.testing.assert_array_equal(browser.image_data, full[4:12, 40:72])
    assert browser.image_data.size == 8 * 32 < full.size
    # Fit shows the whole site again
    with qtbot.waitSignal(browser.slice_drawn, timeout=3000):
        browser.fit_button.click()
    w = browser.slice_info
    assert (w["p0"], w["p1"], w["d0"], w["d1"]) == (0, b.n_positions, 0, 256)
    np.testing.assert_array_equal(browser.image_data, full)


def test_wide_view_is_peak_downsampled_to_the_pixels(window, browser, qtbot):
    b = window.session.bundle
    browser.heat.setFixedWidth(140)          # far fewer pixels than 256 dims
    qtbot.waitUntil(lambda: browser.heat_vb.width() < 128, timeout=3000)
    with qtbot.waitSignal(browser.slice_drawn, timeout=3000):
        browser.select_site(3, "resid_post")
    w = browser.slice_info
    assert w["sd"] > 1 and w["sp"] == 1
    full = b.activation(3, "resid_post")
    assert browser.image_data.shape == (b.n_positions, -(-256 // w["sd"]))
    np.testing.assert_array_equal(browser.image_data, peak_downsample(full, 1, w["sd"]))
    # the peak keeps each block's value of largest magnitude
    blk = full[:, :w["sd"]]
    idx = np.abs(blk).argmax(axis=1)
    np.testing.assert_array_equal(browser.image_data[:, 0], blk[np.arange(len(blk)), idx])
    assert f"downsampled 1×{w['sd']} (peak)" in browser.title.text()


def test_site_requested_selects_that_site(window, browser, qtbot):
    b = window.session.bundle
    window.show_view("CF")
    with qtbot.waitSignal(browser.slice_drawn, timeout=3000):
        window.session.site_requested.emit(3, "attn")      # what a click on a CF bar emits
    assert window.tabs.currentWidget() is browser
    assert browser.tree.currentItem() is _item_of(browser, 3, "attn")
    assert "Layer 3 · attn" in browser.title.text()
    np.testing.assert_array_equal(browser.image_data, b.activation(3, "attn"))


def test_cf_badges_follow_session_cf(window, browser):
    from engine.cf import CFResult, LayerScore

    b = window.session.bundle
    # a CF result as the CF view publishes it (values chosen to cover a flagged and an unflagged site)
    scores = [LayerScore(i, s, 1.0, 4.5 if (i, s) == (1, "mlp") else 0.25 * i, 0.01 if (i, s) == (1, "mlp") else 0.5,
                         (i, s) == (1, "mlp"), tuple([0.0] * b.n_positions)) for i in range(b.n_layers)
              for s in b.sites]
    res = CFResult("bits", 2.7, scores, [], None, "", "", 0.1)
    window.session.set_cf(res)
    assert browser.badge(1, "mlp") == "⚑ 4.5"
    assert browser.badge(2, "attn") == "0.5"
    assert browser.tree.topLevelItem(1).text(2) == "⚑ 1 flagged"
    assert browser.tree.topLevelItem(3).text(2) == "max 0.75"
    assert "p = 0.01" in _item_of(browser, 1, "mlp").toolTip(2) and "FLAGGED" in _item_of(browser, 1, "mlp").toolTip(2)


def test_context_menus_request_interventions(window, browser, qtbot, monkeypatch):
    got: list[Intervention] = []
    browser.intervention_requested.connect(got.append)
    # --- right-click a site in the tree: whole site, every position
    item = _item_of(browser, 2, "attn")
    browser.tree.customContextMenuRequested.emit(browser.tree.visualItemRect(item).center())
    menu = browser.last_menu
    acts = _actions(menu)
    assert menu.actions()[0].text() == "L2 attn · all positions"
    assert {"Ablate here (mean)", "Zero here", "Patch from counterpart", "Scale…", "One head (mean) ▸"} <= set(acts)
    assert acts["Patch from counterpart"].isEnabled()          # the demo carries a counterpart prompt
    acts["Ablate here (mean)"].trigger()
    assert got[-1] == Intervention(2, "attn", "all", "mean")
    menu.close()

    # --- right-click the heatmap row of token 15 (':') in layer 0 attn
    with qtbot.waitSignal(browser.slice_drawn, timeout=3000):
        browser.select_site(0, "attn")
    scene = browser.heat_vb.mapViewToScene(QPointF(100.0, 15.5))
    pos = browser.heat.mapFromScene(scene)
    qtbot.mouseClick(browser.heat.viewport(), Qt.MouseButton.RightButton, pos=pos)
    menu = browser.last_menu
    assert menu is not None and menu.actions()[0].text() == "L0 attn · position 15 ':'"
    acts = _actions(menu)
    acts["Zero here"].trigger()
    assert got[-1] == Intervention(0, "attn", (15,), "zero")
    heads = _actions(acts["One head (mean) ▸"])
    assert list(heads) == [f"Head {h}" for h in range(8)]
    heads["Head 3"].trigger()
    assert got[-1] == Intervention(0, "head", (15,), "mean", indices=(3,))
    monkeypatch.setattr(QInputDialog, "getDouble", lambda *a, **k: (0.25, True))
    acts["Scale…"].trigger()
    assert got[-1] == Intervention(0, "attn", (15,), "scale", value=0.25)
    menu.close()

    # --- zoomed in on dims 0..63: the menu offers those dims only
    with qtbot.waitSignal(browser.slice_drawn, timeout=3000):
        browser.heat_vb.setRange(xRange=(0, 64), yRange=(0, 17), padding=0)
    browser.heatmap_context_menu(10.0, 14.5, QPoint(0, 0))
    dims = _actions(_actions(browser.last_menu)["Dims 0–63 in view"])
    dims["Ablate these dims (mean)"].trigger()
    assert got[-1] == Intervention(0, "attn", (14,), "mean", indices=tuple(range(64)))
    browser.last_menu.close()

    # --- the token list: two selected tokens, right-click one of them; an mlp site offers neurons
    with qtbot.waitSignal(browser.slice_drawn, timeout=3000):
        browser.select_site(1, "mlp")
    browser.tokens.item(12).setSelected(True)
    browser.tokens.item(15).setSelected(True)
    assert browser.highlight.isVisible() and browser.highlight.getRegion() == (12, 16)
    browser.tokens.customContextMenuRequested.emit(browser.tokens.visualItemRect(browser.tokens.item(15)).center())
    acts = _actions(browser.last_menu)
    assert browser.last_menu.actions()[0].text() == "L1 mlp · positions 12, 15"
    acts["Patch from counterpart"].trigger()
    assert got[-1] == Intervention(1, "mlp", (12, 15), "patch")
    monkeypatch.setattr(QInputDialog, "getText", lambda *a, **k: ("3, 10-12", True))
    acts["Neurons (mean)…"].trigger()
    assert got[-1] == Intervention(1, "neuron", (12, 15), "mean", indices=(3, 10, 11, 12))
    n = len(got)
    monkeypatch.setattr(QInputDialog, "getText", lambda *a, **k: ("5000", True))   # out of range: refused, said
    acts["Neurons (mean)…"].trigger()
    assert len(got) == n and "neuron 5000 out of range (0..1023)" in window.statusBar().currentMessage()
    browser.last_menu.close()
