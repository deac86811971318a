"""Screenshots of every view of the real application on the demo incident, for ``docs/screenshots/``.

Run under a virtual X server (``make screenshots`` does this)::

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/screenshots.py [--out docs/screenshots]

It records the demo incident (``gpt2-prompt-injection``) into a temporary folder, opens it in the main window
(1400 × 900), and drives the app the way a user would: run CF, look at the browser with the CF badges and a site
selected, run CCA, put the fix set into the intervention editor and replay it, open the review; the replay proof
(Analysis ▸ Verify replay) and the record dialog (File ▸ New incident…) are grabbed on their own. After each step it
grabs the window to a PNG. Every number in the pictures comes from the real engine run this script makes. Settings
go to a temporary folder, never to the user's.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("DISPLAY") and "QT_QPA_PLATFORM" not in os.environ:
    os.environ["QT_QPA_PLATFORM"] = "xcb"

from PySide6.QtCore import QEventLoop, QSettings, QTimer  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402

SIZE = (1400, 900)


def wait_for(signal, timeout_s: float, what: str):
    """Run the event loop until ``signal`` fires; return its arguments. Raises on timeout."""
    loop = QEventLoop()
    got: list = []

    def fired(*args):
        got.append(args)
        loop.quit()

    signal.connect(fired)
    timer = QTimer()
    timer.setSingleShot(True)
    timer.timeout.connect(loop.quit)
    timer.start(int(timeout_s * 1000))
    loop.exec()
    timer.stop()
    signal.disconnect(fired)
    if not got:
        raise SystemExit(f"screenshots: timed out after {timeout_s:.0f} s waiting for {what}")
    return got[0]


def settle(ms: int = 400) -> None:
    """Let pending paints and timers run."""
    t_end = time.monotonic() + ms / 1000
    while time.monotonic() < t_end:
        QApplication.processEvents()
        time.sleep(0.02)


def grab(win, out: Path, name: str) -> Path:
    settle()
    path = out / f"{name}.png"
    if not win.grab().save(str(path)):
        raise SystemExit(f"screenshots: could not write {path}")
    print(f"wrote {path}")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "screenshots"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="forensics-shots-"))
    QSettings.setDefaultFormat(QSettings.Format.IniFormat)
    QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope, str(work / "settings"))

    import scenarios
    from workbench.cli import build_scenario_bundle

    bundle = work / "demo-incident.h5"
    print(f"recording the demo incident into {bundle} ...")
    build_scenario_bundle(scenarios.get("gpt2-prompt-injection"), bundle)

    app = QApplication.instance() or QApplication([sys.argv[0]])
    from workbench.app import MainWindow

    import workbench.app

    workbench.app.ask_unsaved = lambda parent, text: "discard"   # no Save / Discard question: nothing here is kept
    win = MainWindow()
    win.resize(*SIZE)
    win.show()
    settle(800)
    if not win.open_path(bundle):
        raise SystemExit("screenshots: the demo bundle did not open")
    session = win.session

    # 0. Analysis ▸ Verify replay: the proof that the bundle replays bit for bit (its report dialog)
    win.verify_replay()
    t_end = time.monotonic() + 300
    while getattr(win, "replay_box", None) is None:
        if time.monotonic() > t_end:
            raise SystemExit("screenshots: timed out waiting for the replay report")
        settle(100)
    grab(win.replay_box, out, "replay")
    win.replay_box.close()

    # 1. CF: run it and wait for the result
    win.show_view("CF")
    win.run_cf()
    wait_for(session.cf_changed, 300, "the CF result")
    grab(win, out, "cf")

    # 2. Browser: the site CF ranks first, with its badges in the tree
    cf = session.cf
    layer, site = cf.ranking()[0] if cf is not None and cf.ranking() else (0, "attn")
    win.show_view("Browser")
    win.browser.select_site(layer, site)
    settle(1200)
    grab(win, out, "browser")

    # 3. CCA: run the search with the default parameters
    win.show_view("CCA")
    win.run_cca()
    (res,) = wait_for(session.cca_changed, 600, "the CCA result")
    grab(win, out, "cca")

    # 4. Intervention editor: the fix set, replayed
    win.show_view("Interventions")
    ed = win.editor
    ed.set_interventions(tuple(res.interventions), "Fix set from CCA")
    wait_for(ed.replayed, 120, "the replay of the fix set")
    grab(win, out, "editor")

    # 5. Review: side effects, then the control distribution and the layer x position map
    win.show_view("Review")
    grab(win, out, "review")
    review = win.view("Review")
    for index, name in ((1, "review-controls"), (2, "review-map")):
        review.tabs.setCurrentIndex(index)
        grab(win, out, name)
    review.tabs.setCurrentIndex(0)

    # 6. File ▸ New incident…: the record dialog, filled in with the scenario's inputs (not run)
    sc = scenarios.get("gpt2-prompt-injection")
    win.new_incident()
    dlg = win.record_dialog
    dlg.model.setText("resources/models/gpt2-assistant")
    dlg.prompt.setPlainText(sc.prompt)
    dlg.failure.setText(sc.failure)
    dlg.expected.setText(sc.expected)
    dlg.counterpart.setText(sc.counterpart)
    for key, name in (("benign", "benign.txt"), ("benign_heldout", "heldout.txt"), ("variants", "variants.txt"),
                      ("variant_counterparts", "variant-counterparts.txt")):
        dlg.files[key].setText(name)
    dlg.out.setText("incident.h5")
    grab(dlg, out, "record")
    dlg.reject()

    win.close()
    app.processEvents()
    print(f"done: {len(list(out.glob('*.png')))} screenshots in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
