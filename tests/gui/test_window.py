"""Story 1 (open) and the window: File ▸ Open, bad files, recent files, drag and drop, settings, clean close."""

from __future__ import annotations

import time
from pathlib import Path

from PySide6.QtCore import QMimeData, QPointF, Qt, QUrl
from PySide6.QtGui import QDropEvent
from PySide6.QtWidgets import QApplication


def test_open_shows_incident_and_title(window, demo_bundle):
    assert window.session.bundle is not None
    assert demo_bundle.name in window.windowTitle()
    text = window.incident.plain_text()
    b = window.session.bundle
    assert "Prompt" in text and "Output" in text
    assert b.failure_spec in text and "FAILS" in text
    assert b.continuation_text.strip()[:20] in text
    assert window.act_close.isEnabled() and window.act_run_cf.isEnabled()
    assert "Expected" in text and b.expected in text and "log-prob of the failing text" in text
    n_gen = len(b.tokens) - b.n_prompt_tokens
    assert n_gen > 0 and f"({b.n_prompt_tokens} tokens; {n_gen} generated, tinted blue)" in text
    # the failing span's tokens are marked red in the rendered panel, and nothing else but the FAILS badge
    from workbench.views.incident import FAIL_BG, _tok

    doc, marked = window.incident.view.document(), []
    block = doc.begin()
    while block.isValid():
        it = block.begin()
        while not it.atEnd():
            frag = it.fragment()
            if frag.charFormat().background().color().name() == FAIL_BG:
                marked.append(frag.text().replace("\u00a0", " ").strip())
            it += 1
        block = block.next()
    span = [_tok(t) for t in b.tokens[b.target_start:b.target_start + b.target_length]]
    assert b.target_length > 0 and marked == span + ["FAILS"], marked
    # the panel is as tall as its text: everything visible, no scroll bar, no empty band under it
    panel = window.incident
    assert panel.view.verticalScrollBar().maximum() == 0
    assert panel.height() <= panel.view.document().size().height() + 20


def test_open_via_file_dialog_and_recent_files(qtbot, demo_bundle, monkeypatch, boxes):
    from PySide6.QtWidgets import QFileDialog

    from workbench.app import MainWindow

    monkeypatch.setattr(QFileDialog, "getOpenFileName", lambda *a, **k: (str(demo_bundle), ""))
    win = MainWindow()
    qtbot.addWidget(win)
    assert win.session.bundle is None and not win.act_close.isEnabled()
    win.act_open.trigger()
    assert win.session.bundle is not None
    assert win.recent_files()[0] == str(demo_bundle.resolve())
    assert [a.data() for a in win.recent_menu.actions()] == [str(demo_bundle.resolve())]
    win.close()
    # a new window (new process in real life) sees the persisted list and can re-open from it
    win2 = MainWindow()
    qtbot.addWidget(win2)
    acts = win2.recent_menu.actions()
    assert acts and acts[0].data() == str(demo_bundle.resolve())
    acts[0].trigger()
    assert win2.session.path == Path(str(demo_bundle.resolve()))
    win2.close()


def test_bad_file_shows_dialog_and_keeps_previous(window, tmp_path, boxes, demo_bundle):
    bad = tmp_path / "broken.h5"
    bad.write_bytes(b"this is not an HDF5 file at all")
    assert not window.open_path(bad)
    assert len(boxes) == 1
    title, text = boxes[0]
    assert title == "Cannot open bundle" and "broken.h5" in text
    assert len(text.split("\n\n", 1)[1].splitlines()) == 1      # the engine's one-line reason
    assert window.session.bundle is not None and window.session.path == Path(demo_bundle)
    assert "Could not open broken.h5" in window.statusBar().currentMessage()
    missing = tmp_path / "nope.h5"
    assert not window.open_path(missing)
    assert len(boxes) == 2 and "nope.h5" in boxes[1][1]


def test_drop_h5_opens_it(qtbot, demo_bundle, boxes):
    from workbench.app import MainWindow

    win = MainWindow()
    qtbot.addWidget(win)
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(demo_bundle))])
    ev = QDropEvent(QPointF(10, 10), Qt.DropAction.CopyAction, mime, Qt.MouseButton.NoButton,
                    Qt.KeyboardModifier.NoModifier)
    win.dropEvent(ev)
    assert win.session.bundle is not None and win.session.path == Path(demo_bundle)
    win.close()


def test_geometry_and_tab_persist(qtbot, demo_bundle):
    from workbench.app import MainWindow

    win = MainWindow()
    qtbot.addWidget(win)
    win.resize(701, 503)  # inside the offscreen screen (800 x 600): restoreGeometry clamps to it
    win.show()
    qtbot.waitExposed(win)
    if win.tabs.count() > 1:
        win.tabs.setCurrentIndex(1)
    tab = win.tabs.tabText(win.tabs.currentIndex())
    size = (win.width(), win.height())   # the minimum size hint of the views may enlarge the requested size
    assert size[0] == 701
    win.close()
    win2 = MainWindow()
    qtbot.addWidget(win2)
    assert (win2.width(), win2.height()) == size
    assert win2.tabs.tabText(win2.tabs.currentIndex()) == tab
    win2.close()


def test_close_during_running_job_exits_cleanly(qtbot, demo_bundle):
    """A long engine job is running when the window closes: the job is cancelled, the thread stops."""
    from workbench.app import MainWindow

    win = MainWindow()
    qtbot.addWidget(win)
    win.show()
    assert win.open_path(demo_bundle)
    started = []

    def job(emit, cancel):
        started.append(True)
        t0 = time.monotonic()
        while not cancel.is_set() and time.monotonic() - t0 < 30:
            time.sleep(0.01)
        return "cancelled" if cancel.is_set() else "ran out"

    win.runner.submit("long", job)
    qtbot.waitUntil(lambda: bool(started), timeout=5000)
    t0 = time.monotonic()
    win.close()
    assert time.monotonic() - t0 < 5
    assert not win.runner._thread.isRunning()
    assert win.session.bundle is None


def test_escape_cancels_the_running_job(qtbot, demo_bundle):
    """Analysis ▸ Cancel running job (Esc) really cancels: the job sees its cancel event set."""
    from workbench.app import MainWindow

    win = MainWindow()
    qtbot.addWidget(win)
    win.show()
    started, outcome = [], []

    def job(emit, cancel):
        started.append(True)
        t0 = time.monotonic()
        while not cancel.is_set() and time.monotonic() - t0 < 20:
            time.sleep(0.01)
        outcome.append("cancelled" if cancel.is_set() else "ran out")
        return outcome[-1]

    assert not win.act_cancel.isEnabled()
    with qtbot.waitSignal(win.runner.finished, timeout=10_000):
        win.runner.submit("long", job)
        qtbot.waitUntil(lambda: bool(started) and win.act_cancel.isEnabled(), timeout=5000)
        assert win.act_cancel.shortcut().toString() == "Esc"
        win.act_cancel.trigger()
    assert outcome == ["cancelled"]
    win.close()


def test_command_line_opens_the_bundle(qtbot, demo_bundle, monkeypatch):
    """``forensics-workbench BUNDLE`` shows the window with the bundle open."""
    from PySide6.QtWidgets import QApplication

    from workbench import app as appmod

    seen = []

    def fake_exec(self):               # instead of entering the event loop: look at what the user would see
        wins = [w for w in QApplication.topLevelWidgets() if isinstance(w, appmod.MainWindow) and w.isVisible()]
        for w in wins:
            # the title as shown: Qt replaces its placeholder [*] by "*" while results are unsaved
            seen.append((w.windowTitle().replace("[*]", "*" if w.isWindowModified() else ""), w.session.path))
            w.close()
        return 0

    monkeypatch.setattr(QApplication, "exec", fake_exec)
    assert appmod.main(["forensics-workbench", str(demo_bundle)]) == 0
    assert seen == [(f"{demo_bundle.name} — Model Forensics Workbench", Path(demo_bundle))]


def test_help_open_demo_records_and_opens_it(qtbot, tmp_path, monkeypatch):
    """Help ▸ Open demo incident, with no demo recorded yet: it is recorded on the engine thread, then opened."""
    from workbench import app as appmod

    monkeypatch.chdir(tmp_path)                                     # no demo-out/ here
    target = tmp_path / "cache" / "demo-incident.h5"
    monkeypatch.setattr(appmod, "demo_cache_path", lambda: target)
    win = appmod.MainWindow()
    qtbot.addWidget(win)
    win.show()
    assert win.act_demo.shortcut().toString() == "F1"
    with qtbot.waitSignal(win.session.bundle_opened, timeout=180_000):
        win.act_demo.trigger()
        assert "Recording the demo incident" in win.statusBar().currentMessage()
    assert win.session.path == target and target.is_file()
    assert win.session.bundle.failing and "HACKED" in win.incident.plain_text()
    assert not list(target.parent.glob("*.part"))                   # no half-written file left behind
    win.close()


def test_close_during_a_cca_run_exits_cleanly(qtbot, demo_bundle):
    """Run CCA (Ctrl+Shift+R), close the window while it searches: it stops promptly, no thread is left."""
    from workbench.app import MainWindow

    win = MainWindow()
    qtbot.addWidget(win)
    win.show()
    assert win.open_path(demo_bundle)
    cca = win.view("CCA")
    cca.controls.setValue(2000)                                     # long enough to be mid-run when we close
    win.act_run_cca.trigger()
    assert win.tabs.currentWidget() is cca
    qtbot.waitUntil(lambda: len(cca._trace) >= 1, timeout=60_000)   # the search is running
    assert win.runner.is_running()
    t0 = time.monotonic()
    win.close()
    assert time.monotonic() - t0 < 5
    assert not win.runner._thread.isRunning() and win.session.bundle is None


def test_cf_run_then_bar_click_shows_that_site_in_the_browser(window, qtbot):
    """Stories 3 and 2 joined in the main window: Analysis ▸ Run CF (Ctrl+R) on the engine thread, then a click on
    the tallest bar brings the Browser tab to the front on that site, reading its activations from the bundle."""
    import numpy as np

    b = window.session.bundle
    cf_view, browser = window.view("CF"), window.browser
    window.show_view("CF")
    with qtbot.waitSignal(window.session.cf_changed, timeout=120_000) as done:
        window.act_run_cf.trigger()
    res = done.args[0]
    assert not res.partial and window.session.cf is res
    best = max(res.scores, key=lambda s: s.score)
    pos = cf_view.plot.mapFromScene(cf_view.plot.bar_scene_pos(best.layer, best.site))
    with qtbot.waitSignal(browser.slice_drawn, timeout=5000):
        qtbot.mouseClick(cf_view.plot.viewport(), Qt.MouseButton.LeftButton, pos=pos)
    assert window.tabs.currentWidget() is browser
    item = browser.tree.currentItem()
    assert item.text(0) == best.site and item.parent() is browser.tree.topLevelItem(best.layer)
    assert f"Layer {best.layer} · {best.site}" in browser.title.text()
    np.testing.assert_array_equal(browser.image_data, b.activation(best.layer, best.site)[:browser.image_data.shape[0],
                                                                                      :browser.image_data.shape[1]])


def test_window_fits_a_laptop_screen_with_every_result_shown(window, qtbot):
    """With a bundle, a CF result and a fix set's evidence in every view, the window can still be made as small as a
    1366 x 768 laptop screen leaves (about 1366 x 700 after the taskbar and the title bar): no view's labels or tables
    set a minimum height above that (the CCA result and the tables scroll instead)."""
    from engine.cca import evaluate_fix_set
    from engine.cf import run_cf
    from engine.interventions import Intervention
    from engine.replay import load_bundle_model

    b = window.session.bundle
    handle = load_bundle_model(b)
    window.session.set_cf(run_cf(b, handle))
    fix = [Intervention(layer=0, component="attn", positions=(b.n_prompt_tokens - 1,), op="mean"),
           Intervention(layer=b.n_layers - 1, component="mlp", positions=(2,), op="mean")]
    window.session.set_cca(evaluate_fix_set(b, handle, fix, n_controls=20))
    for i in range(window.tabs.count()):
        window.tabs.setCurrentIndex(i)
        qtbot.wait(20)
        hint = window.minimumSizeHint()
        assert hint.width() <= 1366 and hint.height() <= 700, (window.tabs.tabText(i), hint.toTuple())
    window.resize(1366, 700)
    qtbot.wait(20)
    assert window.height() <= 700


def test_closing_a_bundle_leaves_nothing_of_it_on_screen(qtbot, window):
    """File ▸ Close: the status bar, the CF plot's layer axis and its progress bar no longer speak of the closed
    incident (they said "CF done: 15 finding(s)", layers 0–3 and "0 / 16")."""
    cf = window._views["CF"]
    window.session.status.emit("CF done: 15 finding(s)")
    assert cf.progress.text() != "" and cf.plot.plotItem.getAxis("bottom")._tickLevels is not None
    window.close_bundle()
    assert window.session.bundle is None
    assert window.statusBar().currentMessage() == "Bundle closed"
    assert cf.progress.text() == ""
    assert cf.plot.plotItem.getAxis("bottom")._tickLevels is None
    assert cf.state_label.text() == "Open a bundle to run CF."


def test_view_shortcuts_put_the_keyboard_in_the_view(qtbot, window):
    """Ctrl+1..5 switch views and give the view's main list the keyboard focus, so the arrow keys work in it at once
    (they used to stay on the tab bar, where Right switched to the next view)."""
    window.activateWindow()
    qtbot.waitActive(window)
    ctrl = Qt.KeyboardModifier.ControlModifier
    qtbot.keyClick(window, Qt.Key.Key_1, ctrl)
    tree = window.browser.tree
    assert window.tabs.currentWidget() is window.browser and QApplication.focusWidget() is tree
    window.browser.select_site(0, "attn")
    assert (window.browser.layer, window.browser.site) == (0, "attn")
    qtbot.keyClick(tree, Qt.Key.Key_Down)          # the arrow key walks the tree and shows the next site
    assert window.tabs.currentWidget() is window.browser
    assert (window.browser.layer, window.browser.site) == (0, "mlp")
    for key, title, attr in ((Qt.Key.Key_2, "Interventions", "table"), (Qt.Key.Key_3, "CF", "findings"),
                             (Qt.Key.Key_4, "CCA", "fix_table"), (Qt.Key.Key_5, "Review", "elements")):
        qtbot.keyClick(window, key, ctrl)
        view = window.view(title)
        assert window.tabs.currentWidget() is view and QApplication.focusWidget() is getattr(view, attr), title


def test_verify_replay_proves_the_replay_bit_identical_and_names_what_differs(qtbot, window):
    """Analysis ▸ Verify replay runs ``engine.replay.replay`` on the engine thread (the event loop keeps running)
    and opens its report: BIT-IDENTICAL for the demo incident, every check named. With one weight of the model
    changed by 1e-3 the same action says DIFFERS and names the weights, the logits and the activations."""
    assert window.act_verify.isEnabled()
    window.act_verify.trigger()
    qtbot.waitUntil(lambda: getattr(window, "replay_box", None) is not None, timeout=120_000)
    box = window.replay_box
    b = window.session.bundle
    assert box.text().endswith("BIT-IDENTICAL") and box.isVisible()
    info = box.informativeText()
    for name in ("weights", "tokenizer", "input_ids", "logits", "activations", "continuation"):
        assert f"✓ {name}:" in info, info
    assert f"all {b.n_layers * len(b.sites)} recorded sites bit-identical" in info
    assert window.statusBar().currentMessage().startswith("Replay BIT-IDENTICAL")
    box.close()

    import torch

    window.replay_box = None
    with torch.no_grad():
        window.session._handle.model.transformer.h[1].mlp.c_fc.weight[0, 0] += 1e-3
    window.act_verify.trigger()
    qtbot.waitUntil(lambda: window.replay_box is not None, timeout=120_000)
    box = window.replay_box
    assert box.text().endswith("DIFFERS")
    info = box.informativeText()
    assert "✗ weights:" in info and "✗ logits: max abs diff" in info and "✗ activations:" in info, info
    assert "✓ tokenizer:" in info and "✓ input_ids:" in info
    assert "1.mlp: " in box.detailedText() and "0.resid_pre: 0\n" in box.detailedText() + "\n"
    msg = window.statusBar().currentMessage()
    assert msg.startswith("Replay DIFFERS: weights, logits, activations") , msg
    box.close()


def test_help_about_names_the_versions(window, monkeypatch):
    import platform

    from PySide6.QtWidgets import QMessageBox

    import engine

    seen = []
    monkeypatch.setattr(QMessageBox, "about", lambda parent, title, text: seen.append((title, text)))
    window.about()
    (title, text), = seen
    assert title == "About Model Forensics Workbench"
    assert f"Model Forensics Workbench {engine.__version__}" in text and f"Python {platform.python_version()}" in text
    assert "PySide6 " in text and "(Qt 6." in text
