"""Story 7 (File ▸ Export certificate…): the analyst exports the RCA certificate of the open demo incident.

* After a CCA run and a review: the export replays the incident and runs CF on the engine thread, writes the PDF and
  the JSON (plus the CF / CCA results its reproduction commands name), shows progress in the status bar and the
  written paths at the end; the PDF carries the verdict and the analyst's note, and the CF view gets the CF result.
* With nothing run yet: the export runs CF and CCA itself, and the CCA view then shows the fix set.
* A result that belongs to another file: a dialog names the problem and nothing is written.

The file dialog and message boxes are monkeypatched; the evidence is real (test_certificate.demo_evidence).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess

import pytest

pytest.importorskip("PySide6")
pytest.importorskip("pytestqt")

from PySide6.QtWidgets import QFileDialog  # noqa: E402

from test_certificate import demo_cf, demo_evidence  # noqa: E402

TIMEOUT_MS = 240_000


@pytest.fixture
def save_as(monkeypatch):
    """Make File ▸ Export certificate…'s save dialog answer with a chosen path (records what it was offered)."""
    offered: list[str] = []
    answer: dict[str, str] = {}

    def fake(parent, caption, directory="", filter="", *a, **k):
        offered.append(directory)
        return answer["path"], filter

    monkeypatch.setattr(QFileDialog, "getSaveFileName", fake)

    def choose(path) -> list[str]:
        answer["path"] = str(path)
        return offered

    return choose


def pdf_text(pdf) -> str:
    out = subprocess.run(["pdftotext", "-enc", "UTF-8", str(pdf), "-"], capture_output=True, text=True, check=True)
    return " ".join(out.stdout.split())


def status(window) -> str:
    return window.statusBar().currentMessage()


def record_status(window) -> list[str]:
    """Every status-bar message from now on (the status bar's own GUI-thread signal)."""
    seen: list[str] = []
    window.statusBar().messageChanged.connect(seen.append)
    return seen


def test_export_after_review_writes_pdf_and_json(qtbot, window, demo_bundle, tmp_path, save_as, boxes):
    from engine.certificate import load_certificate

    session = window.session
    _, cca, _ = demo_evidence(demo_bundle)
    session.set_cca(cca)                                     # as if the CCA view had run
    review = window.view("Review")
    if review is not None:                                   # the analyst's note, typed in the review view
        review.note.setText("attention at ':' carries the injected instruction")
        review.note.editingFinished.emit()
    assert session.cf is None
    pdf = tmp_path / "demo certificate.pdf"
    # a user's own files whose names the export once used for its temporary files stay as they were
    own = [tmp_path / f".demo certificate{ext}.tmp" for ext in (".json", ".cca.json", ".cf.json")]
    for f in own:
        f.write_text("mine\n", encoding="utf-8")
    offered = save_as(pdf)
    assert window.act_export.isEnabled()
    messages = record_status(window)
    window.act_export.trigger()
    assert offered == [str(demo_bundle.with_name(demo_bundle.stem + "-certificate.pdf"))]
    assert window.progress.isVisible()                       # busy indicator in the status bar
    assert status(window).startswith("Exporting the certificate")
    qtbot.waitUntil(lambda: "Certificate written" in status(window), timeout=TIMEOUT_MS)
    assert any("replaying the incident" in m for m in messages), messages
    assert any("Compression Forensics" in m for m in messages), messages
    js = pdf.with_suffix(".json")
    msg = status(window)
    assert str(pdf) in msg and str(js) in msg and boxes == []
    mask = os.umask(0)
    os.umask(mask)
    for p in (pdf, js, tmp_path / "demo certificate.cca.json", tmp_path / "demo certificate.cf.json"):
        assert p.is_file(), p
        assert p.stat().st_mode & 0o777 == 0o666 & ~mask, p       # as any new file, not owner-only
    assert all(f.read_text(encoding="utf-8") == "mine\n" for f in own)
    assert sorted(f.name for f in tmp_path.iterdir() if f.name.endswith(".tmp")) == sorted(f.name for f in own)
    doc = load_certificate(js)
    assert doc["cca"]["flip_rate"] == cca.flip_rate and doc["cf"] is not None
    assert session.cf is not None and doc["cf"]["threshold"] == session.cf.threshold   # published to the views
    if review is not None:
        assert doc["analyst"]["note"] == "attention at ':' carries the injected instruction"
        assert [d["decision"] for d in doc["analyst"]["decisions"]] == ["accepted"]
    if shutil.which("pdftotext"):
        text = pdf_text(pdf)
        assert " ".join(doc["verdict"].split()) in text
        assert doc["model"]["weights_sha256"] in text
        if review is not None:
            assert "attention at ':' carries the injected instruction" in text
    qtbot.waitUntil(lambda: not window.runner.busy, timeout=10_000)
    assert not window.progress.isVisible()


def test_export_with_nothing_run_runs_cf_and_cca(qtbot, window, tmp_path, save_as, boxes, monkeypatch):
    from engine.certificate import load_certificate
    from workbench.views import export

    monkeypatch.setattr(export, "CCA_CONTROLS", 10)        # the default 200 controls take minutes on 2 cores
    session = window.session
    assert session.cf is None and session.cca is None
    pdf = tmp_path / "fresh.pdf"
    save_as(pdf)
    messages = record_status(window)
    window.act_export.trigger()
    qtbot.waitUntil(lambda: "Certificate written" in status(window), timeout=TIMEOUT_MS)
    assert any("CCA:" in m for m in messages), messages
    doc = load_certificate(pdf.with_suffix(".json"))
    assert session.cca is not None and session.cca.fix_set              # the CCA view now shows the set
    assert doc["cca"]["n_controls"] == 10 and len(doc["cca"]["fix_set"]) == len(session.cca.fix_set)
    assert doc["cca"]["flipped"] == session.cca.flipped
    saved = json.loads((tmp_path / "fresh.cca.json").read_text(encoding="utf-8"))
    assert saved["fix_set"] == doc["cca"]["fix_set"]
    assert any(c.startswith("forensics cca ") and "--controls 10" in c for c in doc["commands"])
    if shutil.which("pdftotext"):
        assert " ".join(doc["verdict"].split()) in pdf_text(pdf)


def test_export_failure_shows_a_dialog_and_writes_nothing(qtbot, window, demo_bundle, tmp_path, save_as, boxes):
    _, cca, _ = demo_evidence(demo_bundle)
    stale = dataclasses.replace(cca, bundle_sha256="0" * 64)       # a CCA result computed on another file
    window.session.set_cca(stale)
    pdf = tmp_path / "stale.pdf"
    save_as(pdf)
    window.act_export.trigger()
    qtbot.waitUntil(lambda: bool(boxes), timeout=TIMEOUT_MS)
    title, text = boxes[0]
    assert title == "Export certificate" and "different file" in text
    assert "Certificate export failed" in status(window) and "different file" in status(window)
    assert list(tmp_path.iterdir()) == []
    qtbot.waitUntil(lambda: not window.runner.busy, timeout=10_000)


def test_cancel_during_cca_writes_nothing(qtbot, window, tmp_path, save_as, boxes, monkeypatch):
    from workbench.views import export

    monkeypatch.setattr(export, "CCA_CONTROLS", 5000)   # a CCA run long enough to cancel in the middle
    pdf = tmp_path / "stopped.pdf"
    save_as(pdf)
    messages = record_status(window)
    window.act_export.trigger()
    qtbot.waitUntil(lambda: any("CCA:" in m for m in messages), timeout=TIMEOUT_MS)
    assert window.act_cancel.isEnabled()
    window.act_cancel.trigger()                                   # Analysis ▸ Cancel running job (Esc)
    qtbot.waitUntil(lambda: "export cancelled" in status(window), timeout=60_000)
    assert status(window) == "Certificate export cancelled; nothing was written"
    assert list(tmp_path.iterdir()) == [] and boxes == []
    assert window.session.cca is None                             # a partial search is not published either
    qtbot.waitUntil(lambda: not window.runner.busy, timeout=10_000)


def test_cancel_while_waiting_in_the_queue(qtbot, window, tmp_path, save_as, boxes):
    """Esc while the export still waits behind another job: it never runs, and the status bar says so."""
    save_as(tmp_path / "queued.pdf")
    window.runner.submit("replay-edit", lambda emit, cancel: cancel.wait(30))   # the engine thread is busy
    window.act_export.trigger()
    assert window.runner.is_running("certificate")
    window.runner.cancel()                                        # Esc (see test_cancel_during_cca_writes_nothing)
    qtbot.waitUntil(lambda: "export cancelled" in status(window), timeout=30_000)
    assert list(tmp_path.iterdir()) == [] and boxes == []


def test_export_waits_for_a_running_analysis(qtbot, window, tmp_path, save_as):
    """While the CCA view's run is going, exporting would compute CCA a second time: the user is told to wait."""
    cca_view = window.view("CCA")
    if cca_view is None:
        pytest.skip("no CCA view in this build")
    cca_view.controls.setValue(5000)
    save_as(tmp_path / "early.pdf")
    window.act_run_cca.trigger()
    assert window.runner.is_running("cca")
    window.act_export.trigger()
    assert "Wait for the running CCA to finish" in status(window)
    window.runner.cancel()
    qtbot.waitUntil(lambda: not window.runner.busy, timeout=60_000)
    assert list(tmp_path.iterdir()) == []


def test_a_partial_result_is_rerun_or_certified_as_partial_by_choice(qtbot, window, demo_bundle, tmp_path, save_as,
                                                                       boxes, monkeypatch):
    """A cancelled CCA in the session: Export asks whether to run CCA again or certify the partial result; Cancel
    in that question writes nothing, "run again" gives a complete certificate and shows its result in the views."""
    from PySide6.QtWidgets import QMessageBox

    from engine.certificate import load_certificate
    from workbench.views import export

    monkeypatch.setattr(export, "CCA_CONTROLS", 10)
    _, cca, _ = demo_evidence(demo_bundle)
    window.session.set_cca(dataclasses.replace(cca, partial=True))
    asked: list[str] = []
    monkeypatch.setattr(QMessageBox, "exec", lambda box: asked.append(box.text() + " " + box.informativeText()) or 0)
    save_as(tmp_path / "asked.pdf")
    window.act_export.trigger()                       # the question is answered with Cancel (no button clicked)
    assert len(asked) == 1 and "CCA result is partial" in asked[0] and "PARTIAL" in asked[0]
    assert status(window) == "Certificate export cancelled" and list(tmp_path.iterdir()) == []

    export.export_certificate(window, window.session, window.runner, tmp_path / "rerun.pdf", rerun_partial=True)
    qtbot.waitUntil(lambda: "Certificate written" in status(window), timeout=TIMEOUT_MS)
    doc = load_certificate(tmp_path / "rerun.json")
    assert doc["cca"]["partial"] is False and doc["cca"]["n_controls"] == 10
    assert window.session.cca is not None and not window.session.cca.partial   # the views show what was certified
    qtbot.waitUntil(lambda: not window.runner.busy, timeout=10_000)


def test_a_cancelled_cca_with_no_fix_set_is_not_offered_for_certification(qtbot, window, demo_bundle, tmp_path,
                                                                         save_as, boxes, monkeypatch):
    """CCA cancelled before it found any set (a big incident, Esc after a few seconds): Export does not offer to
    certify the partial result (the engine cannot: a certificate names a fix set, and it failed with the schema's
    "cca.fix_set: [] should be non-empty"); it says why in words and writes nothing."""
    from PySide6.QtWidgets import QMessageBox

    from workbench.views import export

    _, cca, _ = demo_evidence(demo_bundle)
    window.session.set_cca(dataclasses.replace(cca, partial=True, fix_set=[]))
    buttons: list[list[str]] = []
    monkeypatch.setattr(QMessageBox, "exec", lambda box: buttons.append([b.text() for b in box.buttons()]) or 0)
    save_as(tmp_path / "asked.pdf")
    window.act_export.trigger()
    assert len(buttons) == 1 and not any("partial" in b.lower() for b in buttons[0])    # only "run again" / Cancel
    assert list(tmp_path.iterdir()) == []

    assert export.export_certificate(window, window.session, window.runner, tmp_path / "kept.pdf",
                                     rerun_partial=False) is None
    title, text = boxes[-1]
    assert title == "Export certificate" and "before it found a fix set" in text and "should be non-empty" not in text
    assert "found no fix set" in status(window)
    assert list(tmp_path.iterdir()) == [] and not window.runner.busy


def test_certificate_json_is_written_off_the_gui_thread(qtbot, window, demo_bundle, tmp_path, save_as, boxes,
                                                       monkeypatch):
    """On a 150-token, 12-layer incident the export froze the window for ~1.1 s after the engine was done: the PDF
    and the validated JSON were both written there.  The JSON is now validated and written by the job (the PDF is
    drawn by a child process); the files still appear together."""
    import threading

    import engine.certificate as certificate

    threads: list[str] = []
    real = certificate.write_certificate

    def spy(doc, path, *a, **k):
        threads.append(threading.current_thread().name)
        return real(doc, path, *a, **k)

    monkeypatch.setattr(certificate, "write_certificate", spy)
    _, cca, _ = demo_evidence(demo_bundle)
    window.session.set_cca(cca)                       # CF runs for the certificate, as in the first test
    pdf = tmp_path / "off.pdf"
    save_as(pdf)
    window.act_export.trigger()
    qtbot.waitUntil(lambda: "Certificate written" in status(window), timeout=TIMEOUT_MS)
    assert threads and threading.main_thread().name not in threads
    assert sorted(p.name for p in tmp_path.iterdir()) == ["off.cca.json", "off.cf.json", "off.json", "off.pdf"]
    assert certificate.load_certificate(pdf.with_suffix(".json"))["cca"]["flip_rate"] == cca.flip_rate
    qtbot.waitUntil(lambda: not window.runner.busy, timeout=10_000)


def test_the_pdf_is_drawn_by_a_child_process_the_window_keeps_running(qtbot, window, demo_bundle, tmp_path,
                                                                       save_as, boxes, monkeypatch):
    """Drawing the PDF on the GUI thread froze the window 0.3-2 s per export; it is now drawn from the certificate
    JSON by ``python -m workbench.pdf`` in a child process.  This process's renderer is made to fail: the export
    still writes the PDF, with the certificate's verdict in it, while the event loop keeps turning."""
    import workbench.pdf

    def not_here(*a, **k):
        raise AssertionError("the PDF was drawn in the GUI process")

    monkeypatch.setattr(workbench.pdf, "render_certificate_pdf", not_here)
    _, cca, _ = demo_evidence(demo_bundle)
    window.session.set_cca(cca)
    window.session.set_cf(demo_cf(demo_bundle))        # nothing left to compute: the export is the PDF and files
    pdf = tmp_path / "child.pdf"
    save_as(pdf)
    messages = record_status(window)
    ticks: list[int] = []
    from PySide6.QtCore import QTimer

    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(1) if any("drawing child.pdf" in m for m in messages) else None)
    timer.start(20)
    window.act_export.trigger()
    qtbot.waitUntil(lambda: "Certificate written" in status(window), timeout=TIMEOUT_MS)
    timer.stop()
    assert boxes == [] and pdf.is_file() and pdf.read_bytes().startswith(b"%PDF")
    assert len(ticks) >= 10        # the GUI's timer kept firing while the child drew (it takes ~2 s)
    if shutil.which("pdftotext"):
        from engine.certificate import load_certificate

        doc = load_certificate(pdf.with_suffix(".json"))
        assert " ".join(doc["verdict"].split()) in pdf_text(pdf)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_failing_pdf_child_gives_a_dialog_and_leaves_nothing(qtbot, window, demo_bundle, tmp_path, save_as,
                                                                boxes, monkeypatch):
    import sys

    _, cca, _ = demo_evidence(demo_bundle)
    window.session.set_cca(cca)
    window.session.set_cf(demo_cf(demo_bundle))        # nothing left to compute: the export is the PDF and files
    save_as(tmp_path / "broken.pdf")
    monkeypatch.setattr(sys, "executable", shutil.which("false") or "/bin/false")
    window.act_export.trigger()
    qtbot.waitUntil(lambda: bool(boxes), timeout=TIMEOUT_MS)
    title, text = boxes[-1]
    assert title == "Export certificate" and f"cannot write the PDF {tmp_path / 'broken.pdf'}" in text
    assert "exit status 1" in text and "Certificate export failed" in status(window)
    assert list(tmp_path.iterdir()) == []


def test_cancel_while_the_pdf_is_drawn_writes_nothing(qtbot, window, demo_bundle, tmp_path, save_as, boxes):
    _, cca, _ = demo_evidence(demo_bundle)
    window.session.set_cca(cca)
    window.session.set_cf(demo_cf(demo_bundle))        # nothing left to compute: the export is the PDF and files
    save_as(tmp_path / "stop.pdf")
    messages = record_status(window)
    window.act_export.trigger()
    qtbot.waitUntil(lambda: any("drawing stop.pdf" in m for m in messages), timeout=TIMEOUT_MS)
    window.act_cancel.trigger()
    qtbot.waitUntil(lambda: "cancelled" in status(window), timeout=10_000)
    assert "nothing was written" in status(window) and boxes == []
    qtbot.waitUntil(lambda: not window.runner.busy, timeout=10_000)
    assert list(tmp_path.iterdir()) == []


def test_files_are_in_place_even_if_the_result_never_reaches_the_window(qtbot, window, demo_bundle, tmp_path,
                                                                         save_as, boxes, monkeypatch):
    """The job renames its files into place itself: a window closed in the instant after the job returned (so its
    result slot never runs) leaves the finished certificate, not hidden ``.NAME.XXXXXXXX.tmp`` files."""
    from engine.certificate import load_certificate
    from workbench.views import export

    _, cca, _ = demo_evidence(demo_bundle)
    window.session.set_cca(cca)
    window.session.set_cf(demo_cf(demo_bundle))
    monkeypatch.setattr(export.CertificateExport, "_on_finished", lambda self, name, result: None)
    pdf = tmp_path / "closed.pdf"
    save_as(pdf)
    window.act_export.trigger()
    qtbot.waitUntil(lambda: window.runner.is_running(export.JOB), timeout=10_000)
    qtbot.waitUntil(lambda: not window.runner.is_running(export.JOB), timeout=TIMEOUT_MS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["closed.cca.json", "closed.cf.json", "closed.json",
                                                          "closed.pdf"]
    assert pdf.read_bytes().startswith(b"%PDF") and load_certificate(pdf.with_suffix(".json"))["cca"] is not None


def test_an_export_beside_the_bundle_under_its_name_saves_its_results(qtbot, demo_bundle, tmp_path, save_as, boxes,
                                                                      unsaved):
    """The export writes the CF / CCA results beside the certificate (its reproduction commands name them). A
    certificate exported beside the bundle under the bundle's name writes the bundle's own result files, so those
    results are saved (the title is no longer marked, closing asks nothing); exported elsewhere they are not."""
    from workbench.app import MainWindow

    bundle = tmp_path / "incident.h5"
    shutil.copyfile(demo_bundle, bundle)
    win = MainWindow()
    qtbot.addWidget(win)
    win.show()
    assert win.open_path(bundle)
    _, cca, _ = demo_evidence(demo_bundle)
    win.session.set_cca(cca)
    win.session.set_cf(demo_cf(demo_bundle))
    assert win.isWindowModified()
    elsewhere = tmp_path / "sent" / "cert.pdf"
    elsewhere.parent.mkdir()
    save_as(elsewhere)
    win.act_export.trigger()
    qtbot.waitUntil(lambda: "Certificate written" in status(win), timeout=TIMEOUT_MS)
    assert (elsewhere.parent / "cert.cca.json").is_file()
    assert win.session.unsaved_results() == ["cf", "cca"] and win.isWindowModified()

    save_as(tmp_path / "incident.pdf")
    win.act_export.trigger()
    qtbot.waitUntil(lambda: "Certificate written" in status(win) and not win.runner.busy, timeout=TIMEOUT_MS)
    qtbot.waitUntil(lambda: not win.isWindowModified(), timeout=5_000)
    assert win.session.unsaved_results() == []
    saved = json.loads((tmp_path / "incident.cca.json").read_text())
    assert saved["bundle_uuid"] == win.session.bundle.uuid and saved["p_value"] == cca.p_value
    win.close()
    assert unsaved.asked == [] and boxes == []
