"""``forensics-workbench``: the desktop application's main window.

Layout: the incident panel (prompt tokens with the failing span marked, output, failure spec and metric) is a dock
at the top and always visible; the centre is a tab widget holding the views — the layer browser and the
intervention editor (this package), and the CF / CCA / review views (``workbench/views/cf_view.py`` …), which are
added with :meth:`MainWindow.add_view` as they exist.  All engine work runs on the one engine thread
(:class:`workbench.worker.EngineRunner`), shared through :class:`workbench.session.Session`.

Settings (``QSettings``, INI format, organisation "ModelForensics", application "Workbench"): window geometry and
dock/toolbar state, the open tab, the recent-files list (10 entries).
"""

from __future__ import annotations

import gc
import importlib
import sys
from pathlib import Path

from PySide6.QtCore import QCoreApplication, QEvent, QSettings, Qt, Slot
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import (QApplication, QDockWidget, QFileDialog, QMainWindow, QMenu, QMessageBox,
                               QProgressBar, QTabWidget, QWidget)

from engine.errors import ForensicsError
from workbench.session import Session
from workbench.views.incident import IncidentPanel
from workbench.worker import GC, EngineRunner, describe_error

ORGANISATION = "ModelForensics"
APPLICATION = "Workbench"
MAX_RECENT = 10
BUNDLE_FILTER = "Incident bundles (*.h5 *.hdf5);;All files (*)"
RESULT_FILTER = "CF / CCA results and certificates (*.json);;All files (*)"
REPLAY_JOB = "verify-replay"
RECORD_JOB = "record"          # workbench.views.record.JOB
# the widget of each view that takes the keyboard focus when the view is shown (View menu, Ctrl+1..5), so the arrow
# keys work in it at once instead of moving the tab bar
VIEW_FOCUS = {"Browser": "tree", "Interventions": "table", "CF": "findings", "CCA": "fix_table", "Review": "elements"}


def settings() -> QSettings:
    """The application's settings store (INI format, user scope; tests point it at a temporary folder)."""
    return QSettings(QSettings.Format.IniFormat, QSettings.Scope.UserScope, ORGANISATION, APPLICATION)


def demo_cache_path() -> Path:
    """Where Help ▸ Open demo records the demo incident when ``demo-out/demo-incident.h5`` does not exist."""
    from PySide6.QtCore import QStandardPaths

    base = QStandardPaths.writableLocation(QStandardPaths.StandardLocation.CacheLocation)
    return Path(base or Path.home() / ".cache" / "forensics-workbench") / "demo-incident.h5"


def ask_unsaved(parent: QWidget, text: str) -> str:
    """Ask what to do with results that are in no file: ``"save"``, ``"discard"`` or ``"cancel"`` (the window
    calls this before it closes the bundle; tests replace it)."""
    B = QMessageBox.StandardButton
    box = QMessageBox(QMessageBox.Icon.Warning, "Unsaved results", text, B.Save | B.Discard | B.Cancel, parent)
    box.setDefaultButton(B.Save)
    answer = box.exec()
    return {B.Save: "save", B.Discard: "discard"}.get(B(answer), "cancel")


def _optional(module: str):
    """Import ``module`` if it exists (GUI-B views land independently); re-raise any other import error."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module:
            return None
        raise


_FROZEN: set[str] = set()


def freeze_long_lived_heap(session: Session | None = None) -> bool:
    """Move every live object to the garbage collector's permanent generation: once at start-up (Qt, pyqtgraph,
    numpy, h5py: ~200k objects) and once after the first model is loaded (torch, transformers, scipy, sympy: ~200k
    more).

    Every full (generation-2) collection walks all tracked objects while holding the GIL: 100-300 ms with these
    libraries loaded (measured with ``benchmarks/gui.py``), and collections run on the GUI thread
    (:class:`workbench.worker.GuiThreadGC`), so the event loop stalls (e.g. during CCA).  After :func:`gc.freeze`
    collections walk only objects created later.  :func:`gc.freeze` is O(1).  A model is freed by reference
    counting when the session drops it (it holds no reference cycles), so the freeze keeps nothing large alive.
    Returns True when it froze.
    """
    stage = "startup" if session is None else "model"
    if stage in _FROZEN or (session is not None and getattr(session, "_handle", None) is None):
        return False
    gc.freeze()
    _FROZEN.add(stage)
    if stage == "model":
        GC.enable(True)
    return True


def pause_gc_until_model_loaded(busy: bool) -> None:
    """Until the first model is loaded, collection is off while an engine job runs (the GUI thread's timer
    collections, :class:`workbench.worker.GuiThreadGC`).

    That job imports torch's and transformers' modules (~200k objects) on the engine thread; each full collection
    during the import walks all of them (40-160 ms each, several in a row, measured with ``benchmarks/gui.py``).
    Off until the model is in memory (then :func:`freeze_long_lived_heap` freezes and re-enables) or until the
    engine is idle again; only the very first loading job of a process is affected.
    """
    if "model" in _FROZEN:
        return
    GC.enable(not busy)  # on the GUI thread's timer while the engine thread exists (workbench.worker.GuiThreadGC)


class MainWindow(QMainWindow):
    """The workbench window.

    Args:
        session: the shared :class:`Session` (a new one with its own engine thread when omitted).
    """

    def __init__(self, session: Session | None = None, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.session = session if session is not None else Session(EngineRunner())
        self.runner = self.session.runner
        self.setObjectName("MainWindow")
        self.setWindowTitle("Model Forensics Workbench")
        self.setAcceptDrops(True)
        self.resize(1400, 900)
        self._views: dict[str, QWidget] = {}
        self._closing = False

        self.tabs = QTabWidget()
        self.tabs.setObjectName("views")
        self.tabs.setDocumentMode(True)
        self.setCentralWidget(self.tabs)

        self.incident = IncidentPanel(self.session)
        dock = QDockWidget("Incident", self)
        dock.setObjectName("incident-dock")
        dock.setWidget(self.incident)
        dock.setFeatures(QDockWidget.DockWidgetFeature.DockWidgetMovable |
                         QDockWidget.DockWidgetFeature.DockWidgetFloatable)
        self.addDockWidget(Qt.DockWidgetArea.TopDockWidgetArea, dock)
        self.incident_dock = dock

        self.progress = QProgressBar()
        self.progress.setMaximumWidth(180)
        self.progress.setRange(0, 0)
        self.progress.setVisible(False)
        self.statusBar().addPermanentWidget(self.progress)
        self.statusBar().showMessage("Ready")

        self._build_menus()
        self._build_views()

        self.session.status.connect(self.show_status)
        self.session.bundle_opened.connect(self.on_bundle_opened)
        self.session.bundle_closed.connect(self.on_bundle_closed)
        for sig in (self.session.cf_changed, self.session.cca_changed, self.session.saved_changed):
            sig.connect(self._on_results_changed)
        self.runner.busy_changed.connect(self.on_busy_changed)
        self.runner.failed.connect(self.on_job_failed)
        self.runner.finished.connect(self.on_job_finished)
        self.runner.progress.connect(self.on_job_progress)
        self._restore_settings()
        self._update_actions()
        freeze_long_lived_heap()

    # ------------------------------------------------------------------ construction
    def _build_menus(self) -> None:
        mb = self.menuBar()
        m = mb.addMenu("&File")
        self.act_new = self._action(m, "&New incident…", self.new_incident, QKeySequence.StandardKey.New)
        self.act_new.setToolTip("Record a failing run of a model into a new bundle, as forensics record does (Ctrl+N)")
        self.act_open = self._action(m, "&Open…", self.choose_file, QKeySequence.StandardKey.Open)
        self.recent_menu = QMenu("Open &Recent", self)
        m.addMenu(self.recent_menu)
        self.act_close = self._action(m, "&Close", self.close_bundle, QKeySequence.StandardKey.Close)
        m.addSeparator()
        self.act_load_result = self._action(m, "&Load saved result…", self.choose_result, "Ctrl+Shift+O")
        self.act_load_result.setToolTip("Attach a CF or CCA result saved by forensics cf/cca --out, or a "
                                        "certificate's, to the open incident (Ctrl+Shift+O)")
        self.act_save_results = self._action(m, "&Save results", self.save_results, "Ctrl+Shift+S")
        self.act_save_results.setToolTip("Write the CF / CCA results computed here beside the bundle as NAME.cf.json "
                                         "/ NAME.cca.json (the files opening the bundle reads back; Ctrl+Shift+S)")
        self.act_properties = self._action(m, "Bundle &properties…", self.show_properties, "Ctrl+I")
        m.addSeparator()
        self.act_export = self._action(m, "&Export certificate…", self.export_certificate, "Ctrl+E")
        m.addSeparator()
        self.act_quit = self._action(m, "&Quit", self.close, QKeySequence.StandardKey.Quit)
        self.view_menu = mb.addMenu("&View")
        self.analysis_menu = mb.addMenu("&Analysis")
        self.act_verify = self._action(self.analysis_menu, "&Verify replay", self.verify_replay, "Ctrl+Shift+V")
        self.act_verify.setToolTip("Replay the recorded forward and compare weights, tokenizer, logits and every "
                                   "recorded activation bit for bit, as forensics replay does (Ctrl+Shift+V)")
        self.analysis_menu.addSeparator()
        self.act_run_cf = self._action(self.analysis_menu, "Run &CF", self.run_cf, "Ctrl+R")
        self.act_run_cca = self._action(self.analysis_menu, "Run CC&A", self.run_cca, "Ctrl+Shift+R")
        self.act_cancel = self._action(self.analysis_menu, "Ca&ncel running job", self.cancel_jobs, "Esc")
        h = mb.addMenu("&Help")
        self.act_demo = self._action(h, "Open &demo incident", self.open_demo, "F1")
        self._action(h, "&About", self.about)

    def _action(self, menu: QMenu, text: str, slot, shortcut=None) -> QAction:
        act = QAction(text, self)
        if shortcut is not None:
            act.setShortcut(QKeySequence(shortcut))
        act.triggered.connect(slot)
        menu.addAction(act)
        return act

    def _build_views(self) -> None:
        browser = _optional("workbench.views.browser")
        if browser is not None:
            self.browser = browser.BrowserView(self.session, self.runner)
            self.add_view("Browser", self.browser, "Ctrl+1")
            self.session.site_requested.connect(self._show_browser)
        editor = _optional("workbench.views.editor")
        if editor is not None:
            self.editor = editor.EditorView(self.session, self.runner)
            self.add_view("Interventions", self.editor, "Ctrl+2")
            if browser is not None:
                self.browser.intervention_requested.connect(self.editor.add_from_request)
        for module, cls, title, key in (("workbench.views.cf_view", "CFView", "CF", "Ctrl+3"),
                                        ("workbench.views.cca_view", "CCAView", "CCA", "Ctrl+4"),
                                        ("workbench.views.review_view", "ReviewView", "Review", "Ctrl+5")):
            mod = _optional(module)
            if mod is not None and hasattr(mod, cls):
                self.add_view(title, getattr(mod, cls)(self.session, self.runner), key)

    def add_view(self, title: str, widget: QWidget, shortcut: str | None = None) -> QWidget:
        """Host a view in a tab; View menu entry (with ``shortcut``) switches to it."""
        self.tabs.addTab(widget, title)
        self._views[title] = widget
        act = QAction(title, self)
        if shortcut:
            act.setShortcut(QKeySequence(shortcut))
        act.triggered.connect(self._show_view_from_action)
        act.setData(title)
        self.view_menu.addAction(act)
        return widget

    def view(self, title: str) -> QWidget | None:
        return self._views.get(title)

    def show_view(self, title: str) -> None:
        w = self._views.get(title)
        if w is not None:
            self.tabs.setCurrentWidget(w)
            target = getattr(w, VIEW_FOCUS.get(title, ""), None)
            if isinstance(target, QWidget) and target.isEnabled():
                target.setFocus(Qt.FocusReason.ShortcutFocusReason)

    @Slot(int, str)
    def _show_browser(self, _layer: int, _site: str) -> None:
        """A view asked to show a site (CF bar click): the browser selects it; bring its tab to the front."""
        self.show_view("Browser")

    @Slot()
    def _show_view_from_action(self) -> None:
        act = self.sender()
        if isinstance(act, QAction):
            self.show_view(act.data())

    # ------------------------------------------------------------------ opening
    @Slot()
    def choose_file(self) -> None:
        start = str(self.session.path.parent) if self.session.path else ""
        path, _ = QFileDialog.getOpenFileName(self, "Open incident bundle", start, BUNDLE_FILTER)
        if path:
            self.open_path(path)

    def open_path(self, path: str | Path) -> bool:
        """Open a bundle; on a bad file show the engine's one-line error and keep the previous bundle.  Results of the
        open bundle that are in no file are offered for saving first (Cancel keeps it open: returns False)."""
        path = Path(path)
        if not self.confirm_unsaved():
            return False
        try:
            self.session.open(path)
        except ForensicsError as exc:
            msg = describe_error(exc)
            self.show_status(f"Could not open {path.name}: {msg}")
            QMessageBox.critical(self, "Cannot open bundle", f"{path}\n\n{msg}")
            return False
        except OSError as exc:
            msg = f"{type(exc).__name__}: {exc}"
            self.show_status(f"Could not open {path.name}: {msg}")
            QMessageBox.critical(self, "Cannot open bundle", f"{path}\n\n{msg}")
            return False
        self._add_recent(path)
        self.session.load_saved_results()  # NAME.cf.json / NAME.cca.json beside it (as forensics demo writes them)
        return True

    @Slot()
    def choose_result(self) -> None:
        if self.session.bundle is None:
            return
        start = str(self.session.path.parent) if self.session.path else ""
        path, _ = QFileDialog.getOpenFileName(self, "Load saved result", start, RESULT_FILTER)
        if path:
            self.load_result(path)

    def load_result(self, path: str | Path) -> bool:
        """Attach a saved CF / CCA result (or a certificate's) to the open incident; a dialog for a file that is not
        one, or belongs to another incident."""
        path = Path(path)
        try:
            kinds = self.session.load_result(path)
        except ForensicsError as exc:
            msg = describe_error(exc)
            self.show_status(f"Could not load {path.name}: {msg}")
            QMessageBox.critical(self, "Cannot load result", f"{path}\n\n{msg}")
            return False
        self.show_status(f"Loaded {' and '.join(k.upper() for k in kinds)} result{'s' if len(kinds) > 1 else ''} "
                         f"from {path.name}")
        return True

    @Slot()
    def show_properties(self) -> None:
        """File ▸ Bundle properties (Ctrl+I): what the bundle holds, as ``forensics info`` prints it."""
        if self.session.bundle is None:
            return
        from workbench.cli_info import open_bundle_summary, summary_text

        text = summary_text(open_bundle_summary(self.session.bundle, self.session.path))
        box = QMessageBox(QMessageBox.Icon.Information, "Bundle properties", self.session.path.name,
                          QMessageBox.StandardButton.Close, self)
        box.setInformativeText(text.replace("\n  ", "\n"))
        box.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.properties_box = box
        box.open()

    @Slot()
    def close_bundle(self) -> None:
        if self.confirm_unsaved():
            self.session.close()

    # ------------------------------------------------------------------ recording
    @Slot()
    def new_incident(self) -> None:
        """File ▸ New incident… (Ctrl+N): the record dialog (``workbench.views.record``); Record starts the recording
        on the engine thread, and the new bundle opens when it is written."""
        from workbench.views.record import RecordDialog

        start = self.session.path.parent if self.session.path else Path.cwd()
        dlg = RecordDialog(self, start)
        dlg.planned.connect(self._start_record)
        self.record_dialog = dlg
        dlg.open()

    @Slot(object)
    def _start_record(self, plan) -> None:
        from workbench.views.record import JOB, record_job

        self.show_status(f"Recording {plan.out.name}: loading the model {plan.request.model}…")
        self.runner.submit(JOB, record_job(plan))

    def _recorded(self, result: dict | None) -> None:
        if result is None:
            self.show_status("Recording cancelled: nothing was written")
            return
        path = Path(result["path"])
        opened = self.open_path(path)
        verdict = (f"the model FAILS ({result['spec']})" if result["failing"] else
                   f"the model does NOT fail ({result['spec']}): there is no failure to analyse on this prompt")
        text = f"Recorded {path.name}: {verdict}; output {result['output']!r}."
        self.show_status(text + ("" if opened else " (not opened)"))
        box = QMessageBox(QMessageBox.Icon.Information if result["failing"] else QMessageBox.Icon.Warning,
                          "New incident", text, QMessageBox.StandardButton.Close, self)
        if result["notes"]:
            box.setInformativeText("What the analyses will not be able to measure on it:\n" +
                                   "\n".join(f"• {n}" for n in result["notes"]))
        self.record_box = box
        box.open()

    # ------------------------------------------------------------------ saving results
    @Slot()
    def save_results(self) -> bool:
        """File ▸ Save results (Ctrl+Shift+S): the CF / CCA results that are in no file, written beside the bundle
        as NAME.cf.json / NAME.cca.json (the JSON ``forensics cf/cca --out`` writes; opening the bundle reads them
        back).  A dialog names a file that cannot be written; False then."""
        if self.session.bundle is None:
            return False
        kinds = self.session.unsaved_results()
        if not kinds:
            self.show_status("Nothing to save: every result shown is in its file")
            return True
        try:
            written = self.session.save_results(kinds)
        except ForensicsError as exc:
            msg = describe_error(exc)
            self.show_status(f"Could not save the results: {msg}")
            QMessageBox.critical(self, "Save results", msg)
            return False
        self.show_status(f"Saved {' and '.join(k.upper() for k in kinds)} to "
                         f"{', '.join(p.name for p in written)} beside the bundle (they open with it)")
        return True

    def confirm_unsaved(self) -> bool:
        """Before the bundle closes: when a result shown is in no file, ask (Save / Discard / Cancel).  True when the
        bundle may close (saved, discarded, or nothing to save)."""
        kinds = self.session.unsaved_results()
        if not kinds:
            return True
        paths = self.session.result_paths()
        what = " and ".join(f"{k.upper()} result" + (" (partial: the run was cancelled)"
                                                     if getattr(self.session, k).partial else "") for k in kinds)
        one = len(kinds) == 1
        answer = ask_unsaved(self, f"The {what} of {self.session.path.name} {'is' if one else 'are'} not saved. Save "
                                   f"{'it' if one else 'them'} beside the bundle as "
                                   f"{' and '.join(paths[k].name for k in kinds)} (opening the bundle loads "
                                   f"{'it' if one else 'them'} again)?")
        if answer == "save":
            return self.save_results()
        return answer == "discard"

    @Slot()
    @Slot(object)
    def _on_results_changed(self, *_args) -> None:
        unsaved = bool(self.session.bundle is not None and self.session.unsaved_results())
        self.setWindowModified(unsaved)
        self.act_save_results.setEnabled(unsaved)

    # ------------------------------------------------------------------ replay verification
    @Slot()
    def verify_replay(self) -> None:
        """Analysis ▸ Verify replay (Ctrl+Shift+V): on the engine thread, replay the recorded forward and compare
        everything the bundle recorded bit for bit (``engine.replay.replay``, what ``forensics replay`` runs); the
        report opens in a dialog, and the status bar says BIT-IDENTICAL or what differs."""
        session, bundle = self.session, self.session.bundle
        if bundle is None:
            return

        def job(emit, cancel):
            from engine.replay import replay

            emit({"done": 0, "total": 1, "what": "loading the model"})
            handle = session.model()
            if cancel.is_set():
                return None
            return bundle, replay(bundle, handle=handle,
                                  progress=lambda d, t, what: emit({"done": d, "total": t, "what": what}))

        self.show_status(f"Verifying the replay of {session.path.name}…")
        self.runner.submit(REPLAY_JOB, job)

    def _show_replay(self, bundle, report) -> None:
        if bundle is not self.session.bundle:     # closed (or another opened) while it ran
            return
        verdict = "BIT-IDENTICAL" if report.bit_identical else "DIFFERS"
        failed = ", ".join(c.name for c in report.failed)
        self.show_status(f"Replay {verdict}" + (f": {failed} differ" if failed else
                                                 f" ({report.seconds:.2f} s, {report.threads} thread(s))"))
        lines = [f"{'✓' if c.ok else '✗'} {c.name}: {c.detail}" for c in report.checks]
        box = QMessageBox(QMessageBox.Icon.Information if report.bit_identical else QMessageBox.Icon.Warning,
                          "Verify replay", f"Replay of {self.session.path.name}: {verdict}",
                          QMessageBox.StandardButton.Close, self)
        src = report.model_loaded_from
        src = "the weights embedded in the bundle" if src in ("", "embedded") else src
        box.setInformativeText("\n".join(lines) + f"\n\n{report.seconds:.2f} s, {report.threads} torch thread(s) "
                               f"(as recorded), model: {src}")
        if report.site_max_abs_diff:
            worst = sorted(report.site_max_abs_diff.items(), key=lambda kv: -kv[1])
            box.setDetailedText("max abs difference per recorded site (0 = bit-identical):\n" +
                                "\n".join(f"  {name}: {d:.3g}" for name, d in worst))
        box.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.replay_box = box
        box.open()

    @Slot()
    def open_demo(self) -> None:
        """Open ``demo-out/demo-incident.h5`` or the cached demo; record it on the engine thread when missing."""
        for candidate in (Path("demo-out") / "demo-incident.h5", demo_cache_path()):
            if candidate.is_file():
                self.open_path(candidate)
                return
        target = demo_cache_path()
        target.parent.mkdir(parents=True, exist_ok=True)
        self._demo_target = target
        self.show_status("Recording the demo incident (gpt2-prompt-injection)…")

        def job(emit, cancel):
            import scenarios
            from workbench.cli import build_scenario_bundle

            tmp = target.with_suffix(".h5.part")
            build_scenario_bundle(scenarios.get("gpt2-prompt-injection"), tmp,
                                  progress=lambda i, n, what: emit({"done": i, "total": n, "what": what}))
            tmp.replace(target)
            return str(target)

        self.runner.submit("demo", job)

    # ------------------------------------------------------------------ recent files
    def recent_files(self) -> list[str]:
        value = settings().value("recent", [])
        if isinstance(value, str):
            value = [value]
        return [str(v) for v in (value or [])]

    def _add_recent(self, path: Path) -> None:
        p = str(path.resolve())
        recent = [r for r in self.recent_files() if r != p]
        recent.insert(0, p)
        settings().setValue("recent", recent[:MAX_RECENT])
        self._refresh_recent_menu()

    def _refresh_recent_menu(self) -> None:
        self.recent_menu.clear()
        recent = self.recent_files()
        for i, p in enumerate(recent):
            act = QAction(f"&{i + 1} {Path(p).name}", self)
            act.setToolTip(p)
            act.setData(p)
            act.triggered.connect(self._open_recent_from_action)
            self.recent_menu.addAction(act)
        self.recent_menu.setEnabled(bool(recent))

    @Slot()
    def _open_recent_from_action(self) -> None:
        act = self.sender()
        if isinstance(act, QAction):
            self.open_path(act.data())

    # ------------------------------------------------------------------ analysis delegation
    @Slot()
    def run_cf(self) -> None:
        v = self._views.get("CF")
        if v is None or not hasattr(v, "run"):
            self.show_status("The CF view is not available in this build")
            return
        self.show_view("CF")
        v.run()

    @Slot()
    def run_cca(self) -> None:
        v = self._views.get("CCA")
        if v is None or not hasattr(v, "run"):
            self.show_status("The CCA view is not available in this build")
            return
        self.show_view("CCA")
        v.run()

    @Slot()
    def cancel_jobs(self) -> None:
        """Analysis ▸ Cancel (Esc): cancel the running job and drop the waiting ones.

        A slot of its own: connected directly, ``triggered(bool checked)`` would pass ``False`` as the job name."""
        if self.runner.busy:
            self.runner.cancel()
            self.show_status("Cancelling…")

    @Slot()
    def export_certificate(self) -> None:
        mod = _optional("workbench.views.export")
        if mod is None or not hasattr(mod, "export_certificate"):
            QMessageBox.information(self, "Export certificate", "Certificate export is not available in this build.")
            return
        mod.export_certificate(self, self.session, self.runner)

    @Slot()
    def about(self) -> None:
        import platform

        import PySide6
        from PySide6.QtCore import qVersion

        import engine

        torch = sys.modules.get("torch")      # not imported here for the box (it takes seconds): shown once loaded
        QMessageBox.about(self, "About Model Forensics Workbench",
                          f"Model Forensics Workbench {engine.__version__} — root-cause analysis of language-model "
                          "failures.\n"
                          "Record a failing run, prove its replay, run CF and CCA, edit interventions, export the "
                          "certificate.\n\n"
                          f"Python {platform.python_version()}, PySide6 {PySide6.__version__} (Qt {qVersion()})"
                          + (f", torch {torch.__version__}" if torch is not None else ""))

    # ------------------------------------------------------------------ slots
    @Slot(str)
    def show_status(self, message: str) -> None:
        self.statusBar().showMessage(message, 15_000)

    @Slot(object)
    def on_bundle_opened(self, bundle) -> None:
        name = self.session.path.name if self.session.path else "bundle"
        self.setWindowTitle(f"{name}[*] — Model Forensics Workbench")   # [*]: unsaved results
        self._update_actions()

    @Slot()
    def on_bundle_closed(self) -> None:
        self.setWindowTitle("Model Forensics Workbench")
        self.show_status("Bundle closed")   # not the last job's "CF done: …" of an incident no longer open
        self._update_actions()

    @Slot(bool)
    def on_busy_changed(self, busy: bool) -> None:
        self.progress.setVisible(busy)
        self.act_cancel.setEnabled(busy)
        pause_gc_until_model_loaded(busy)

    @Slot(str, object)
    def on_job_progress(self, name: str, data) -> None:
        freeze_long_lived_heap(self.session)      # a job that loaded the model reports progress after loading it
        if name == RECORD_JOB and isinstance(data, dict):
            self.show_status(f"Recording the incident: {data.get('what', '')} "
                             f"({data.get('done', 0)}/{data.get('total', 0)})")
        if name == REPLAY_JOB and isinstance(data, dict):
            self.show_status(f"Verifying the replay: {data.get('what', '')}")
        if name == "demo" and isinstance(data, dict):
            self.show_status(f"Recording the demo incident: {data.get('what', '')} "
                             f"({data.get('done', 0)}/{data.get('total', 0)})")

    @Slot(str, object)
    def on_job_finished(self, name: str, result) -> None:
        freeze_long_lived_heap(self.session)
        if name == "demo" and not self._closing:
            self.open_path(result)
        if name == REPLAY_JOB and result is not None and not self._closing:
            self._show_replay(*result)
        if name == RECORD_JOB and not self._closing:
            self._recorded(result)

    @Slot(str, str)
    def on_job_failed(self, name: str, message: str) -> None:
        self.show_status(f"{name} failed: {message}")
        if name == "demo" and not self._closing:
            QMessageBox.critical(self, "Open demo", f"Recording the demo incident failed:\n\n{message}")
        if name == REPLAY_JOB and not self._closing:
            QMessageBox.critical(self, "Verify replay", f"The replay could not run:\n\n{message}")
        if name == RECORD_JOB and not self._closing:
            QMessageBox.critical(self, "New incident", f"The recording failed: nothing was written.\n\n{message}")

    def _update_actions(self) -> None:
        has = self.session.bundle is not None
        for act in (self.act_close, self.act_export, self.act_run_cf, self.act_run_cca, self.act_load_result,
                    self.act_properties, self.act_verify):
            act.setEnabled(has)
        self._on_results_changed()
        self.act_cancel.setEnabled(self.runner.busy)
        self._refresh_recent_menu()

    # ------------------------------------------------------------------ drag and drop
    def _droppable(self, name: str) -> bool:
        name = name.lower()
        return name.endswith((".h5", ".hdf5")) or (name.endswith(".json") and self.session.bundle is not None)

    def dragEnterEvent(self, event) -> None:
        if any(u.isLocalFile() and self._droppable(u.toLocalFile()) for u in event.mimeData().urls()):
            event.acceptProposedAction()

    def dropEvent(self, event) -> None:
        """A bundle opens; a result JSON (with a bundle open) is attached to it."""
        for u in event.mimeData().urls():
            if u.isLocalFile() and self._droppable(u.toLocalFile()):
                event.acceptProposedAction()
                name = u.toLocalFile()
                if name.lower().endswith(".json"):
                    self.load_result(name)
                else:
                    self.open_path(name)
                return

    # ------------------------------------------------------------------ settings and shutdown
    def _restore_settings(self) -> None:
        s = settings()
        geo = s.value("window/geometry")
        if geo is not None:
            self.restoreGeometry(geo)
        state = s.value("window/state")
        if state is not None:
            self.restoreState(state)
        tab = s.value("window/tab")
        if tab:
            self.show_view(str(tab))

    def save_settings(self) -> None:
        s = settings()
        s.setValue("window/geometry", self.saveGeometry())
        s.setValue("window/state", self.saveState())
        s.setValue("window/tab", self.tabs.tabText(self.tabs.currentIndex()))
        s.sync()

    def closeEvent(self, event) -> None:
        """Offer unsaved results for saving (Cancel keeps the window open), save settings, cancel running jobs, stop
        the engine thread (waits for the current forward pass)."""
        if not self._closing and not self.confirm_unsaved():
            event.ignore()
            return
        self._closing = True
        self.save_settings()
        for w in self._views.values():
            stop = getattr(w, "shutdown", None)
            if callable(stop):
                stop()
        # objects whose deleteLater() is still pending (a finished certificate export) are deleted now, while the
        # engine thread still runs: deleted after it stopped, ~QObject crashed in QBindingStorage::clear (a
        # segmentation fault seen in tests/gui/test_export.py when the window closed right after an export)
        QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
        self.runner.shutdown(30_000)
        pause_gc_until_model_loaded(False)
        self.session.close()
        super().closeEvent(event)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``forensics-workbench [BUNDLE]`` (Qt's own options such as ``-platform`` pass through)."""
    import argparse

    argv = list(sys.argv if argv is None else argv)
    ap = argparse.ArgumentParser(prog="forensics-workbench",
                                 description="Model Forensics Workbench: browse an incident bundle, run CF and CCA, "
                                             "edit interventions, review the fix set, export the certificate.")
    ap.add_argument("bundle", nargs="?", help="incident bundle (.h5) to open")
    ap.add_argument("--version", action="version", version="forensics-workbench 0.1.0")
    args, qt_args = ap.parse_known_args(argv[1:])
    app = QApplication.instance() or QApplication([argv[0], *qt_args])
    app.setOrganizationName(ORGANISATION)
    app.setApplicationName(APPLICATION)
    win = MainWindow()
    win.show()
    if args.bundle:
        win.open_path(args.bundle)      # a bad file gets the usual dialog; the window stays up
    return app.exec()


if __name__ == "__main__":
    sys.exit(main())
