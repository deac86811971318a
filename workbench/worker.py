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

import gc
import sys
import threading
import traceback
from collections import OrderedDict
from typing import Any, Callable

from PySide6.QtCore import QObject, QThread, QTimer, Signal, Slot

from engine.errors import ForensicsError

Job = Callable[[Callable[[Any], None], threading.Event], Any]


def describe_error(exc: BaseException) -> str:
    """One line for a dialog or the status bar."""
    if isinstance(exc, ForensicsError):
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class GuiThreadGC:
    """Python's cyclic garbage collector runs on the GUI thread only, while an engine thread exists.

    Automatic collection runs in whichever thread happens to allocate. On the engine thread it can collect the
    wrappers of Qt objects the GUI dropped (a closed dialog, a test's widgets), and their C++ destructors take Qt's
    locks there. Meanwhile the GUI thread, deleting widgets, holds one of those locks and waits for the GIL: a
    deadlock (seen in ``tests/gui/test_export.py``: the engine thread in ``gc_collect_main`` ->
    ``QObject::~QObject`` waiting for the GIL, the GUI thread in ``QObject::~QObject`` waiting for Qt's mutex).
    pyqtgraph's ``GarbageCollector`` solves the same problem the same way. While at least one :class:`EngineRunner`
    is alive, automatic collection is off and a GUI-thread timer collects each generation whose count passed its
    threshold. :meth:`enable` is the switch for the rest of the app: with runners alive it pauses or resumes the
    timer's collections; without them it is :func:`gc.enable` / :func:`gc.disable`."""

    INTERVAL_MS = 500

    def __init__(self) -> None:
        self.users = 0
        self.wanted = True
        self.timer: QTimer | None = None

    def hold(self) -> None:
        """An engine thread starts (called on the GUI thread)."""
        self.users += 1
        if self.users == 1:
            self.wanted = gc.isenabled()
            gc.disable()
            self.timer = QTimer()
            self.timer.setInterval(self.INTERVAL_MS)
            self.timer.timeout.connect(self.collect)
            self.timer.start()

    def release(self) -> None:
        """An engine thread has stopped: the last one collects once here and gives automatic collection back."""
        if self.users == 0:
            return
        self.users -= 1
        if self.users == 0:
            if self.timer is not None:
                self.timer.stop()
                self.timer = None
            if self.wanted:
                gc.collect()
                gc.enable()

    def enable(self, on: bool) -> None:
        """Collection on or off: automatic collection without engine threads, the timer's while they exist."""
        self.wanted = on
        if self.users == 0:
            (gc.enable if on else gc.disable)()

    def collect(self) -> None:
        if not self.wanted:
            return
        counts, limits = gc.get_count(), gc.get_threshold()
        gen = -1
        for g in range(3):  # as the automatic collector does: a generation when it and the younger ones are due
            if counts[g] > limits[g]:
                gen = g
            else:
                break
        if gen >= 0:
            gc.collect(gen)


#: the one policy of this process
GC = GuiThreadGC()


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
        GC.hold()
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
        if ok:  # a thread still running keeps collection on the GUI thread
            GC.release()
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
