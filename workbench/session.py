"""What the open window knows: the bundle, its model, the latest CF / CCA results — shared by every view.

Views receive the :class:`Session` (not the main window) and talk to each other only through its signals, so a
view can be built and tested on its own::

    session = Session(EngineRunner())
    session.open(path)                  # raises ForensicsError for a bad file; emits bundle_opened
    view = CFView(session)

The model is loaded lazily **on the engine thread** (``session.model()`` may only be called inside a job; it
caches the handle).  Results produced by jobs are published with :meth:`set_cf` / :meth:`set_cca` from GUI-thread
slots, which emit the ``*_changed`` signals the other views listen to; a result that names another bundle is
refused.  Closing the bundle emits ``cf_changed(None)`` / ``cca_changed(None)`` for the results it drops.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from PySide6.QtCore import QObject, Signal

from engine.bundle import open_bundle
from engine.errors import ForensicsError
from workbench.worker import EngineRunner

#: where ``forensics demo`` (and ``forensics cf/cca --out NAME.cf.json / NAME.cca.json``) put a bundle's results:
#: beside it, named after it.  Opening a bundle attaches the ones found there that belong to it.
SAVED_SUFFIXES = (".cf.json", ".cca.json")


class ResultFileError(ForensicsError):
    """A file given as a saved CF / CCA result (or certificate) that is not one, or belongs to another bundle."""


class Session(QObject):
    bundle_opened = Signal(object)        # IncidentBundle
    bundle_closed = Signal()
    cf_changed = Signal(object)           # engine.cf.CFResult | None
    cca_changed = Signal(object)          # engine.cca.CCAResult | None
    site_requested = Signal(int, str)     # (layer, site): "show me this site" (browser selects it)
    status = Signal(str)                  # a status-bar message
    saved_changed = Signal()              # a result was saved or read from its file (unsaved_results changed)

    def __init__(self, runner: EngineRunner | None = None, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.runner = runner if runner is not None else EngineRunner(self)
        self.bundle = None
        self.path: Path | None = None
        self.cf = None
        self.cca = None
        self.analyst: dict[str, Any] = {}      # accepted / rejected fix-set elements (review view → certificate)
        self._saved: dict[str, object] = {}    # kind -> the result object last read from or written to its file
        self._handle = None
        self._handle_lock = threading.Lock()

    # ------------------------------------------------------------------ bundle
    def open(self, path: str | Path):
        """Open and validate a bundle (lazy: reads no activation data).  Raises ForensicsError on a bad file;
        the previously open bundle stays open in that case."""
        bundle = open_bundle(path)
        self.close()
        self.bundle = bundle
        self.path = Path(path)
        self.bundle_opened.emit(bundle)
        self.status.emit(f"Opened {self.path.name}")
        return bundle

    def result_paths(self) -> dict[str, Path]:
        """Where the open bundle's results are saved: ``{"cf": NAME.cf.json, "cca": NAME.cca.json}`` beside it (the
        names ``forensics demo`` writes and opening the bundle reads back); empty with no bundle open."""
        if self.path is None:
            return {}
        stem = self.path.name[:-3] if self.path.name.endswith(".h5") else self.path.stem
        return {suf.split(".")[1]: self.path.with_name(stem + suf) for suf in SAVED_SUFFIXES}

    def saved_results(self) -> list[Path]:
        """The result files beside the open bundle that are named after it (``NAME.cf.json``, ``NAME.cca.json``)."""
        return [q for q in self.result_paths().values() if q.is_file()]

    def unsaved_results(self) -> list[str]:
        """The kinds (``"cf"``, ``"cca"``) of the results shown that are in no file: computed in this session (or
        re-evaluated) and not saved since. A result loaded from a file, or saved, is not listed."""
        return [k for k in ("cf", "cca") if getattr(self, k) is not None and self._saved.get(k) is not getattr(self, k)]

    def mark_saved(self, kind: str, result) -> None:
        """Note that ``result`` (the ``kind`` result) is what a file holds (read from it, or written to it)."""
        self._saved[kind] = result
        self.saved_changed.emit()

    def save_results(self, kinds: list[str] | None = None) -> list[Path]:
        """Write the results shown (``kinds``: default every one that is not saved) beside the bundle as
        :meth:`result_paths` names them, in the JSON ``forensics cf/cca --out`` writes, each through a temporary
        name renamed into place (a result already there is replaced). Returns the files written.

        Raises:
            ResultFileError: no bundle is open, or a file cannot be written (the reason, in one line); the
                results written before it stay written.
        """
        import json

        from engine.atomic import write_text

        if self.bundle is None:
            raise ResultFileError("no bundle is open")
        paths = self.result_paths()
        written = []
        for kind in (self.unsaved_results() if kinds is None else kinds):
            res = getattr(self, kind)
            if res is None:
                continue
            try:
                write_text(paths[kind], json.dumps(res.to_dict(), indent=1) + "\n")
            except OSError as exc:
                raise ResultFileError(f"cannot write {paths[kind]}: {exc.strerror or exc}") from None
            self.mark_saved(kind, res)
            written.append(paths[kind])
        return written

    def load_saved_results(self) -> list[str]:
        """Attach the saved results beside the bundle that belong to it; what was loaded, in words (a file that is
        not a result of this bundle is skipped and said so in the status bar, never attached)."""
        loaded, skipped = [], []
        for q in self.saved_results():
            try:
                kinds = self.load_result(q)
            except ResultFileError as exc:
                skipped.append(f"{q.name} ({exc})")
            else:
                loaded.append(f"{' and '.join(k.upper() for k in kinds)} from {q.name}")
        if loaded or skipped:
            self.status.emit("; ".join(([f"Loaded saved {', '.join(loaded)}"] if loaded else []) +
                                       ([f"not loaded: {', '.join(skipped)}"] if skipped else [])))
        return loaded

    def load_result(self, path: str | Path) -> list[str]:
        """Attach a saved result to the open bundle: a CF result (``forensics cf --out``), a CCA result (``forensics
        cca --out``) or a certificate JSON (its CCA and CF sections).  Returns the kinds attached (``"cf"``,
        ``"cca"``).  Raises :class:`ResultFileError` for a file that is not one, or one of another incident."""
        import json

        from engine.cca import SCHEMA as CCA_SCHEMA
        from engine.cca import CCAResult
        from engine.certificate import CERT_SCHEMA
        from engine.cf import CFResult

        p = Path(path)
        if self.bundle is None:
            raise ResultFileError("open a bundle first: a result is shown with the incident it belongs to")
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise ResultFileError(f"cannot read {p.name}: {getattr(exc, 'strerror', None) or exc}") from None
        except ValueError as exc:
            raise ResultFileError(f"{p.name} is not JSON ({exc})") from None
        schema = doc.get("schema") if isinstance(doc, dict) else None
        parts: list[tuple[str, dict]] = []
        if schema == CFResult.SCHEMA:
            parts = [("cf", doc)]
        elif schema == CCA_SCHEMA:
            parts = [("cca", doc)]
        elif schema == CERT_SCHEMA:
            uuid = (doc.get("incident") or {}).get("bundle_uuid", "")
            if uuid != self.bundle.uuid:
                raise ResultFileError(f"{p.name} certifies another incident (bundle {uuid or 'unknown'}, not "
                                      f"{self.bundle.uuid})")
            parts = [(k, {**doc[k], "bundle_uuid": uuid}) for k in ("cf", "cca") if isinstance(doc.get(k), dict)]
        else:
            raise ResultFileError(f"{p.name} is not a CF result, CCA result or certificate (schema {schema!r})")
        results = []
        for kind, d in parts:
            try:
                res = (CFResult if kind == "cf" else CCAResult).from_dict(d)
            except ForensicsError as exc:
                raise ResultFileError(f"{p.name}: {exc}") from None
            uuid = getattr(res, "bundle_uuid", "") or ""
            if uuid != self.bundle.uuid:
                raise ResultFileError(f"{p.name} is the {kind.upper()} result of another incident (bundle "
                                      f"{uuid or 'not named'}, not {self.bundle.uuid})")
            results.append((kind, res))
        if not results:
            raise ResultFileError(f"{p.name} holds no CF or CCA result")
        for kind, res in results:
            (self.set_cf if kind == "cf" else self.set_cca)(res)
            self.mark_saved(kind, res)
        return [k for k, _ in results]

    def close(self) -> None:
        if self.bundle is None:
            return
        if self.runner is not None:
            self.runner.cancel()
        with self._handle_lock:
            self._handle = None
        had_cf, had_cca = self.cf is not None, self.cca is not None
        self.cf = None
        self.cca = None
        self.analyst = {}
        self._saved = {}
        bundle, self.bundle, self.path = self.bundle, None, None
        if had_cf:
            self.cf_changed.emit(None)
        if had_cca:
            self.cca_changed.emit(None)
        self.bundle_closed.emit()
        try:
            bundle.close()
        except Exception:  # noqa: BLE001 - closing a file that is already gone is not an error for the user
            pass

    # ------------------------------------------------------------------ model (engine thread only)
    def model(self):
        """The bundle's model (``engine.models.ModelHandle``); loads it on first use.  Call from a job only."""
        if threading.current_thread() is threading.main_thread():
            raise RuntimeError("Session.model() loads weights; call it from an engine job, not the GUI thread")
        with self._handle_lock:
            if self._handle is None:
                from engine.replay import load_bundle_model

                self._handle = load_bundle_model(self.bundle)
            return self._handle

    # ------------------------------------------------------------------ results (GUI thread)
    def _belongs(self, result) -> bool:
        """Whether ``result`` (a CF or CCA result, or None) may be shown with the open bundle: it names the open
        bundle's uuid, or none.  A result of another incident is never attached to this one."""
        if result is None:
            return True
        uuid = getattr(result, "bundle_uuid", "") or ""
        return self.bundle is not None and (not uuid or uuid == getattr(self.bundle, "uuid", uuid))

    def set_cf(self, result) -> bool:
        """Publish a CF result of the open bundle; False (and nothing changes) for another bundle's result."""
        if not self._belongs(result):
            return False
        self.cf = result
        self.cf_changed.emit(result)
        return True

    def set_cca(self, result) -> bool:
        """Publish a CCA result of the open bundle; False (and nothing changes) for another bundle's result."""
        if not self._belongs(result):
            return False
        self.cca = result
        self.cca_changed.emit(result)
        return True
