"""The one engine thread of the GUI (CONVENTIONS.md: a worker QObject moved to a QThread, signals to GUI slots).

Views never call the engine on the GUI thread.  They hand a job to :class:`EngineRunner`::

    def job(emit, cancel):                  # runs on the engine thread
        return run_cf(bundle, handle, cancel=cancel, on_layer=emit)
    window.runner.submit("cf", job)

and connect to the runner's signals (which are emitted on the GUI thread, so plain slots are fine):

* ``progress(name, data)`` — whatever the job passed to ``emit`` (plain data: dicts, frozen dataclasses, arrays);
* ``finished(name, result)`` — the job's return value;
* ``failed(name, message)`` — one line; :class:`engine.errors.ForensicsError` messages verbatim, anything else
  as ``Type: message`` (its traceback goes to stderr: a ForensicsError is the
  user's bad input, not a bug, and prints none);
* ``busy_changed(bool)``.

Inside a slot of ``progress``, ``finished`` or ``failed``, :meth:`EngineRunner.delivering` says whether the signal
comes from a given job (the cancel event ``submit`` returned).  A view that keeps the event of the job it started
and forgets it when the bundle closes therefore never shows a cancelled job's partial result on the *next*
bundle, nor an old run's result on top of a newer run's::

    self._job = runner.submit("cf", job, replace=True)
    ...
    def _on_finished(self, name, result):
        if name != "cf" or not self.runner.delivering(self._job):
            return                           # a job this view no longer waits for

Jobs run one at a time in submission order.  Submitting a job under a name that is still *waiting* replaces the
waiting one (an intervention edited five times in a row replays once, with the last edit); ``replace=True`` also
cancels a *running* job of that name.  :meth:`cancel` sets the job's ``threading.Event``; the engine checks it at
least every ~100 ms and returns a partial result, which arrives through ``finished`` as usual.  :meth:`shutdown`
cancels everything and joins the thread (the main window calls it from ``closeEvent``).
"""

from __future__ import annotations

import sys
import threading
import traceback
from collections import OrderedDict
from typing import Any, Callable

from PySide6.QtCore import QObject, QThread, Signal, Slot

from engine.errors import ForensicsError

Job = Callable[[Callable[[Any], None], threading.Event], Any]


def describe_error(exc: BaseException) -> str:
    """One line for a dialog or the status bar."""
    if isinstance(exc, ForensicsError):
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class EngineWorker(QObject):
    """Lives on the engine thread; runs the jobs the runner queued.  Never touches widgets."""

    progress = Signal(str, object, object)    # name, data, the job's cancel event
    finished = Signal(str, object, object)
    failed = Signal(str, str, object)
    idle = Signal()

    def __init__(self, runner: "EngineRunner") -> None:
        super().__init__()
        self._runner = runner

    @Slot()
    def drain(self) -> None:
        while True:
            item = self._runner._take()
            if item is None:
                self.idle.emit()
                return
            name, fn, cancel = item

            def emit(data: Any, _name: str = name, _cancel: threading.Event = cancel) -> None:
                self.progress.emit(_name, data, _cancel)

            try:
                result = fn(emit, cancel)
            except Exception as exc:  # noqa: BLE001 - every failure becomes one line in the GUI
                if not isinstance(exc, ForensicsError):   # a bad file or input is the user's one line, not a bug
                    traceback.print_exc(file=sys.stderr)
                self._runner._done(name)
                self.failed.emit(name, describe_error(exc), cancel)
            else:
                self._runner._done(name)
                self.finished.emit(name, result, cancel)


class EngineRunner(QObject):
    """GUI-thread owner of the engine thread and its job queue."""

    progress = Signal(str, object)
    finished = Signal(str, object)
    failed = Signal(str, str)
    busy_changed = Signal(bool)
    _wake = Signal()

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._lock = threading.Lock()
        self._pending: OrderedDict[str, tuple[Job, threading.Event]] = OrderedDict()
        self._running: dict[str, threading.Event] = {}
        self._busy = False
        self._closed = False
        self._delivering: threading.Event | None = None
        self._thread = QThread()
        self._thread.setObjectName("forensics-engine")
        self._worker = EngineWorker(self)
        self._worker.moveToThread(self._thread)
        self._wake.connect(self._worker.drain)
        self._worker.progress.connect(self._on_progress)
        self._worker.finished.connect(self._on_finished)
        self._worker.failed.connect(self._on_failed)
        self._worker.idle.connect(self._on_idle)
        self._thread.finished.connect(self._worker.deleteLater)
        self._thread.start()

    # ---------------------------------------------------------------- GUI-thread API
    def submit(self, name: str, fn: Job, *, replace: bool = False) -> threading.Event:
        """Queue ``fn(emit, cancel)`` under ``name``; returns its cancel event."""
        if self._closed:
            raise RuntimeError("the engine thread has been shut down")
        cancel = threading.Event()
        with self._lock:
            old = self._pending.pop(name, None)
            if old is not None:
                old[1].set()
            if replace and name in self._running:
                self._running[name].set()
            self._pending[name] = (fn, cancel)
        self._set_busy(True)
        self._wake.emit()
        return cancel

    def cancel(self, name: str | None = None) -> None:
        """Cancel the named job (waiting or running), or every job."""
        with self._lock:
            for key in list(self._pending):
                if name is None or key == name:
                    self._pending.pop(key)[1].set()
            for key, ev in self._running.items():
                if name is None or key == name:
                    ev.set()

    def is_running(self, name: str | None = None) -> bool:
        with self._lock:
            if name is None:
                return bool(self._running or self._pending)
            return name in self._running or name in self._pending

    @property
    def busy(self) -> bool:
        return self._busy

    def delivering(self, job: threading.Event | None) -> bool:
        """True inside a ``progress`` / ``finished`` / ``failed`` slot when the signal comes from ``job`` (the
        event :meth:`submit` returned for it); False for any other job, outside those slots, or for ``None``."""
        return job is not None and job is self._delivering

    def shutdown(self, timeout_ms: int = 10_000) -> bool:
        """Cancel all jobs, stop the thread and wait for it; True when it stopped in time."""
        if self._closed:
            return True
        self._closed = True
        self.cancel()
        self._thread.quit()
        ok = self._thread.wait(timeout_ms)
        return bool(ok)

    # ---------------------------------------------------------------- worker side (called on the engine thread)
    def _take(self):
        with self._lock:
            if not self._pending:
                return None
            name, (fn, cancel) = self._pending.popitem(last=False)
            self._running[name] = cancel
            return name, fn, cancel

    def _done(self, name: str) -> None:
        with self._lock:
            self._running.pop(name, None)

    # ---------------------------------------------------------------- slots (GUI thread)
    def _set_busy(self, value: bool) -> None:
        if value != self._busy:
            self._busy = value
            self.busy_changed.emit(value)

    def _deliver(self, signal, job: threading.Event, *args) -> None:
        outer, self._delivering = self._delivering, job
        try:
            signal.emit(*args)
        finally:
            self._delivering = outer

    @Slot(str, object, object)
    def _on_progress(self, name: str, data: object, job: threading.Event) -> None:
        self._deliver(self.progress, job, name, data)

    @Slot(str, object, object)
    def _on_finished(self, name: str, result: object, job: threading.Event) -> None:
        self._deliver(self.finished, job, name, result)

    @Slot(str, str, object)
    def _on_failed(self, name: str, message: str, job: threading.Event) -> None:
        self._deliver(self.failed, job, name, message)

    @Slot()
    def _on_idle(self) -> None:
        with self._lock:
            busy = bool(self._running or self._pending)
        self._set_busy(busy)
