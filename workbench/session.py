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
from workbench.worker import EngineRunner


class Session(QObject):
    bundle_opened = Signal(object)        # IncidentBundle
    bundle_closed = Signal()
    cf_changed = Signal(object)           # engine.cf.CFResult | None
    cca_changed = Signal(object)          # engine.cca.CCAResult | None
    site_requested = Signal(int, str)     # (layer, site): "show me this site" (browser selects it)
    status = Signal(str)                  # a status-bar message

    def __init__(self, runner: EngineRunner | None = None, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.runner = runner if runner is not None else EngineRunner(self)
        self.bundle = None
        self.path: Path | None = None
        self.cf = None
        self.cca = None
        self.analyst: dict[str, Any] = {}      # accepted / rejected fix-set elements (review view → certificate)
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
