"""Story 7: File ▸ Export certificate… — the RCA certificate (PDF + JSON) of the open incident.

:func:`export_certificate` (what ``MainWindow.export_certificate`` calls) asks for the PDF path, then runs on the
engine thread whatever the certificate still needs: the bit-identical replay always, Compression Forensics when
``session.cf`` is empty, CCA when ``session.cca`` is empty (with :data:`CCA_CONTROLS` random control sets, as the
CLI does) — and, when the user asks for it, in place of a partial (cancelled) CF or CCA result — and builds the
certificate data (``engine.certificate.build_certificate``) with the analyst's accept/reject decisions from
``session.analyst``. Progress goes to the status bar; Esc (Analysis ▸ Cancel) cancels
and nothing is written.

The job also writes the JSON and keeps the CF / CCA results as ``CERT.cf.json`` / ``CERT.cca.json`` (the files
the certificate's reproduction commands name), all to temporary names, and has the PDF drawn from the certificate
JSON by a child process (``python -m workbench.pdf``, ~2.5 s, most of it Qt starting): ``workbench.pdf`` paints with
QPdfWriter/QPainter/QTextDocument, which must run on a process's GUI thread — drawing on this process's GUI thread
froze the window 0.3–2 s, and drawing on the engine thread deadlocked in QTextDocument (a PySide6 lock-order
inversion with the GIL).  Once every file is there the job renames them into place; a failure or a cancel
removes them.  Results computed here are also published to the session, so the CF and CCA views show them.  A
failure shows a dialog and a status message; success a status message naming every file written.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

from PySide6.QtCore import QObject, Signal, Slot
from PySide6.QtWidgets import QFileDialog, QMessageBox

JOB = "certificate"
CCA_CONTROLS = 200          # control sets when CCA runs for the certificate (the p-value criterion needs >= 200)
PDF_FILTER = "PDF documents (*.pdf)"
OBJECT_NAME = "certificate-export"
NO_SET_TEXT = ("The CCA run was cancelled before it found a fix set, so there is no partial result to certify "
               "(a certificate names a fix set).")
ANALYSIS_JOBS = {"cf": "CF", "cca": "CCA", "review": "re-evaluation"}   # the CF, CCA and review views' jobs


def _draw_pdf_in_child(cert_json: Path, pdf_tmp: Path, final: Path, cancel) -> bool:
    """Draw the PDF from the certificate JSON in a child process (``python -m workbench.pdf``), so the window
    keeps running: Qt paints only on a process's GUI thread, and drawing on a second thread of this process
    deadlocked in QTextDocument.  Polls ``cancel`` (the child is killed); returns False when cancelled.  Raises
    :class:`CertificateError` with the child's one-line message (naming ``final``, not the temporary name)."""
    import subprocess
    import sys

    from engine.errors import CertificateError

    env = dict(os.environ, QT_QPA_PLATFORM="offscreen")
    root = str(Path(__file__).resolve().parents[2])       # the checkout, for a workbench not installed
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.Popen([sys.executable, "-m", "workbench.pdf", str(cert_json), str(pdf_tmp)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        while True:
            try:
                _, err = proc.communicate(timeout=0.05)
                break
            except subprocess.TimeoutExpired:
                if cancel.is_set():
                    proc.kill()
                    proc.communicate()
                    return False
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    if proc.returncode != 0:
        lines = err.decode("utf-8", "replace").strip().splitlines()
        msg = next((ln for ln in reversed(lines) if ln.startswith("error: ")), lines[-1] if lines else "")
        msg = msg.removeprefix("error: ").replace(str(pdf_tmp), str(final))
        raise CertificateError(f"cannot write the PDF {final}: {msg or f'exit status {proc.returncode}'}")
    return True


def _write_json(doc: dict, json_path: Path, results: list) -> list[tuple[str, str]]:
    """Write the certificate JSON and the CF / CCA results it names (engine thread) to temporary names beside
    their targets; returns ``[(temporary, target), ...]``.  The job renames them (:func:`_publish_all`) once the
    PDF is drawn (so a failed PDF leaves every earlier file as it was).  On a failure removes what it wrote."""
    from engine.atomic import discard, temp_beside
    from engine.certificate import write_certificate

    pairs: list[tuple[str, str]] = []
    try:
        tmp = temp_beside(json_path)
        pairs.append((str(tmp), str(json_path)))
        write_certificate(doc, tmp)
        # the results are kept beside the certificate: its reproduction commands name them (certify --result/--cf)
        for obj, path in results:
            tmp = temp_beside(path)
            pairs.append((str(tmp), str(path)))
            tmp.write_text(json.dumps(obj.to_dict(), indent=1) + "\n", encoding="utf-8")
    except BaseException:
        discard(t for t, _ in pairs)
        raise
    return pairs


def _publish_all(pairs: list[tuple[str, str]]) -> list[str]:
    """Rename every ``(temporary, target)`` into place, in order; returns the targets.  On a failure removes the
    temporaries not yet renamed and raises."""
    from engine.atomic import discard, publish

    done: list[str] = []
    try:
        for tmp, target in pairs:
            publish(tmp, target)
            done.append(target)
    except BaseException:
        discard(t for t, _ in pairs[len(done):])
        raise
    return done


def default_pdf_path(session) -> Path:
    """``<bundle folder>/<bundle stem>-certificate.pdf``."""
    p = Path(session.path) if session.path else Path.cwd() / "incident.h5"
    return p.with_name(p.stem + "-certificate.pdf")


class CertificateExport(QObject):
    """One export in flight: the engine job (which has the PDF drawn by a child process and renames every file
    into place), then its results published to the session on the GUI thread.

    Signals:
        done(pdf_path, json_path): both files are written.
        failed(message): one line; nothing (or only what the message names) was written.
        cancelled(): the job was cancelled; nothing was written.
    """

    done = Signal(str, str)
    failed = Signal(str)
    cancelled = Signal()

    def __init__(self, window, session, runner, pdf_path: str | os.PathLike, *, rerun_partial: bool = False) -> None:
        super().__init__(window)
        self.setObjectName(OBJECT_NAME)
        self.window = window
        self.session = session
        self.runner = runner
        self.pdf_path = Path(pdf_path)
        self.json_path = self.pdf_path.with_suffix(".json")
        self.written: list[str] = []
        self.finished_ok = False
        self._over = False
        self.rerun_partial = rerun_partial   # a cancelled (partial) CF / CCA result is computed afresh
        self._job = None
        runner.progress.connect(self._on_progress)
        runner.finished.connect(self._on_finished)
        runner.failed.connect(self._on_failed)
        runner.busy_changed.connect(self._on_busy_changed)

    # ------------------------------------------------------------------ start (GUI thread)
    def start(self) -> None:
        session = self.session
        bundle, bundle_path = session.bundle, Path(session.path)
        cf_given, cca_given = session.cf, session.cca
        if self.rerun_partial:
            cf_given = None if cf_given is not None and cf_given.partial else cf_given
            cca_given = None if cca_given is not None and cca_given.partial else cca_given
        analyst = copy.deepcopy(session.analyst or {})
        pdf = self.pdf_path
        stem = pdf.with_suffix("")
        cf_path = stem.with_name(stem.name + ".cf.json")
        cca_path = stem.with_name(stem.name + ".cca.json")
        json_path = self.json_path
        steps = 2 + (cf_given is None) + (cca_given is None)

        def job(emit, cancel):
            from engine.atomic import discard, temp_beside
            from engine.certificate import build_certificate, reproduction_commands
            from engine.errors import CFError
            from engine.replay import replay

            k = 0

            def say(what: str) -> None:
                emit({"done": k, "total": steps, "what": what})

            say("loading the model")
            handle = session.model()
            say("replaying the incident bit for bit")
            rep = replay(bundle, handle=handle)
            k += 1
            if cancel.is_set():
                return None
            cf, cf_note = cf_given, ""
            if cf is None:
                from engine.cf import run_cf

                say("running Compression Forensics")
                try:
                    cf = run_cf(bundle, handle, cancel=cancel,
                                progress=lambda d, t, what: say(f"Compression Forensics: {what} ({d}/{t})"))
                except CFError as exc:   # e.g. no benign reference runs: the certificate says CF was not run
                    cf, cf_note = None, f"CF not available ({exc})"
                k += 1
                if cancel.is_set() or (cf is not None and cf.partial):
                    return None
            cca = cca_given
            if cca is None:
                from engine.cca import run_cca

                say("running CCA")
                cca = run_cca(bundle, handle, cf=cf, n_controls=CCA_CONTROLS, cancel=cancel,
                              progress=lambda d, t, what: say(f"CCA: {what} ({d}/{t})"))
                k += 1
                if cancel.is_set() or cca.partial:
                    return None
            say("building the certificate")
            commands = reproduction_commands(bundle_path, pdf_path=pdf, result_path=cca_path,
                                             cf_path=cf_path if cf is not None else None,
                                             n_controls=cca.n_controls or None, with_cf=cf is not None)
            doc = build_certificate(bundle_path, cca=cca, cf=cf, replay_report=rep, analyst=analyst,
                                    commands=commands)
            if cancel.is_set():
                return None
            # every file is written here, off the GUI thread, to temporary names, and renamed into place once the
            # PDF is drawn (here too: a window closed before the result's slot runs leaves no temporary files)
            say("writing the certificate JSON")
            results = {"cca": (cca, cca_path), "cf": (cf, cf_path)}
            written = _write_json(doc, json_path, [(obj, path) for obj, path in results.values() if obj is not None])
            drawn = False
            try:    # the PDF in a child process (see the module docstring)
                say(f"drawing {pdf.name} (in a separate process)")
                cert_tmp = Path(written[0][0])
                pdf_tmp = temp_beside(pdf)
                written.insert(0, (str(pdf_tmp), str(pdf)))
                drawn = _draw_pdf_in_child(cert_tmp, pdf_tmp, pdf, cancel) and not cancel.is_set()
            finally:
                if not drawn:         # failed or cancelled: nothing of this export is left behind
                    discard(tmp for tmp, _ in written)
            if not drawn:
                return None
            say("renaming the files into place")
            targets = _publish_all(written)      # the PDF first, then the JSON files
            return {"doc": doc, "cf": cf, "cca": cca, "cf_computed": cf_given is None and cf is not None,
                    "cca_computed": cca_given is None, "cf_path": str(cf_path), "cca_path": str(cca_path),
                    "note": cf_note, "written": targets}

        self._bundle = bundle
        self._job = self.runner.submit(JOB, job)
        self._status(f"Exporting the certificate to {pdf.name}: starting…")

    # ------------------------------------------------------------------ runner slots (GUI thread)
    @Slot(bool)
    def _on_busy_changed(self, busy: bool) -> None:
        # a job cancelled while it was still waiting in the queue never runs and reports nothing: the engine thread
        # going idle without our result means exactly that (our finished/failed would have arrived first)
        if not busy and not self._over:
            self._status("Certificate export cancelled; nothing was written")
            self._finish()
            self.cancelled.emit()

    @Slot(str, object)
    def _on_progress(self, name: str, data: object) -> None:
        if name != JOB or not isinstance(data, dict):
            return
        self._status(f"Exporting the certificate [{data.get('done', 0)}/{data.get('total', 0)}]: "
                     f"{data.get('what', '')}…")

    @Slot(str, object)
    def _on_finished(self, name: str, result: object) -> None:
        if name != JOB:
            return
        if result is None:
            self._status("Certificate export cancelled; nothing was written")
            self._finish()
            self.cancelled.emit()
            return
        try:
            self._write(result)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a dialog, the app stays up
            from workbench.worker import describe_error

            self._fail(describe_error(exc))
            return
        extra = [p for p in self.written if p not in (str(self.pdf_path), str(self.json_path))]
        msg = f"Certificate written: {self.pdf_path} and {self.json_path}"
        if extra:
            msg += " (also kept: " + ", ".join(Path(p).name for p in extra) + ")"
        if result.get("note"):
            msg += f"; {result['note']}"
        self._status(msg)
        self.finished_ok = True
        self._finish()
        self.done.emit(str(self.pdf_path), str(self.json_path))

    @Slot(str, str)
    def _on_failed(self, name: str, message: str) -> None:
        if name != JOB:
            return
        self._fail(message)

    # ------------------------------------------------------------------ helpers
    def _write(self, result: dict) -> None:
        """Note the files the job wrote (the PDF first, then the JSON files) and publish its results."""
        self.written = list(result.get("written") or [])
        if self.session.bundle is self._bundle:   # the views show what the certificate carries
            if result.get("cf_computed") and (self.session.cf is None or self.session.cf.partial):
                self.session.set_cf(result["cf"])
            if result.get("cca_computed") and (self.session.cca is None or self.session.cca.partial):
                self.session.set_cca(result["cca"])
            # a certificate exported beside the bundle under its name wrote the bundle's own result files
            own = self.session.result_paths()
            for kind in ("cf", "cca"):
                obj, path = result.get(kind), result.get(f"{kind}_path")
                if (obj is not None and obj is getattr(self.session, kind) and path and path in self.written
                        and Path(path) == own.get(kind)):
                    self.session.mark_saved(kind, obj)

    def _fail(self, message: str) -> None:
        self._status(f"Certificate export failed: {message}")
        self._finish()
        QMessageBox.critical(self.window, "Export certificate", f"The certificate could not be exported:\n\n{message}")
        self.failed.emit(message)

    def _status(self, message: str) -> None:
        show = getattr(self.window, "show_status", None)
        if callable(show):
            show(message)
        else:
            self.session.status.emit(message)

    def _finish(self) -> None:
        self._over = True
        self.runner.busy_changed.disconnect(self._on_busy_changed)
        self.runner.progress.disconnect(self._on_progress)
        self.runner.finished.disconnect(self._on_finished)
        self.runner.failed.disconnect(self._on_failed)
        self.deleteLater()


def export_certificate(window, session, runner, path: str | os.PathLike | None = None, *,
                       rerun_partial: bool | None = None) -> CertificateExport | None:
    """File ▸ Export certificate…: ask for the PDF path (unless ``path`` is given) and start the export.

    When the CF or CCA result in the session is partial (its run was cancelled), ``rerun_partial`` says whether to
    compute it afresh for the certificate (True) or certify it as it is (False: the certificate then says PARTIAL,
    NOT CERTIFIED); ``None`` asks the user.

    Returns the :class:`CertificateExport` in flight, or ``None`` when there is nothing to do (no bundle open, the
    dialog was cancelled, an export is already running).
    """
    if session.bundle is None or session.path is None:
        window.show_status("Open an incident bundle before exporting its certificate")
        return None
    running = window.findChild(CertificateExport, OBJECT_NAME)
    if running is not None and not running.finished_ok and runner.is_running(JOB):
        window.show_status("A certificate export is already running")
        return None
    busy = [word for name, word in ANALYSIS_JOBS.items() if runner.is_running(name)]
    if busy:   # their result is what the certificate should carry: wait for it rather than compute it twice
        window.show_status(f"Wait for the running {' and '.join(busy)} to finish (or cancel it with Esc) before "
                           "exporting the certificate")
        return None
    if path is None:
        chosen, _ = QFileDialog.getSaveFileName(window, "Export certificate", str(default_pdf_path(session)),
                                                PDF_FILTER)
        if not chosen:
            return None
        path = chosen
    path = Path(path)
    if path.suffix.lower() != ".pdf":
        path = path.with_name(path.name + ".pdf")
    partial = [w for w, r in (("CF", session.cf), ("CCA", session.cca)) if r is not None and r.partial]
    # a CCA run cancelled before it found any set leaves nothing a certificate can name (the certificate needs a
    # non-empty fix set): the only way on is to run CCA again
    no_set = session.cca is not None and session.cca.partial and not session.cca.fix_set
    if no_set and rerun_partial is False:
        QMessageBox.information(window, "Export certificate", NO_SET_TEXT + "\n\nRun CCA again (Ctrl+Shift+R), or "
                                "export again and choose to run it again for the certificate.")
        window.show_status("Certificate not exported: the cancelled CCA run found no fix set")
        return None
    if partial and rerun_partial is None:
        what = " and ".join(partial)
        box = QMessageBox(QMessageBox.Icon.Question, "Export certificate",
                          f"The {what} result is partial: its run was cancelled.", parent=window)
        if no_set:
            box.setInformativeText(f"{NO_SET_TEXT} Run {what} again for the certificate?")
        else:
            box.setInformativeText(f"Run {what} again for the certificate, or certify the partial result as it is "
                                   "(the certificate will say PARTIAL and certify no root cause)?")
        rerun = box.addButton(f"Run {what} again", QMessageBox.ButtonRole.AcceptRole)
        keep = (None if no_set else
                box.addButton("Certify the partial result", QMessageBox.ButtonRole.DestructiveRole))
        box.addButton(QMessageBox.StandardButton.Cancel)
        box.setDefaultButton(rerun)
        box.exec()
        if box.clickedButton() is None or box.clickedButton() not in (rerun, keep):
            window.show_status("Certificate export cancelled")
            return None
        rerun_partial = box.clickedButton() is rerun
    export = CertificateExport(window, session, runner, path, rerun_partial=bool(rerun_partial))
    export.start()
    return export


__all__ = ["CCA_CONTROLS", "CertificateExport", "JOB", "default_pdf_path", "export_certificate"]
