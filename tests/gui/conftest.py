"""GUI test fixtures: temporary settings, a leak check for threads and timers, and the main window on the demo bundle.

* ``_qt_leak_check`` (autouse) FAILS any test that leaves a ``QThread`` running or a ``QTimer`` active after the
  test (and after pytest-qt closed the widgets registered with ``qtbot.addWidget``).  Threads and timers are tracked
  by wrapping ``QThread.start`` / ``QTimer.start`` for the duration of the test, so only the ones started during the
  test count.  Views therefore stop their refresh timers in ``hideEvent``/``closeEvent`` (or when their job ends),
  and whoever owns an :class:`~workbench.worker.EngineRunner` calls ``shutdown()`` (the main window does it in
  ``closeEvent``).
* ``_qt_settings_tmp`` (autouse) points ``QSettings`` (INI format, user scope) into a temporary folder, so tests
  never read or write the user's real recent files / window geometry.
* ``unsaved`` (autouse): the main window's Save / Discard / Cancel question about results in no file
  (``workbench.app.ask_unsaved``) is answered ``unsaved.answer`` (``"discard"`` unless a test sets it) and recorded in
  ``unsaved.asked``, instead of a modal dialog that would wait for a click when a test closes a window.
* ``window``: a shown :class:`workbench.app.MainWindow` with the demo incident open.
* ``session``: a :class:`workbench.session.Session` on its own engine thread with the demo incident open (for
  testing one view on its own).
* ``boxes``: ``QMessageBox.critical/information/warning`` captured as ``(title, text)`` instead of modal dialogs.
"""

from __future__ import annotations

import os
import time
import weakref

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

pytest.importorskip("PySide6")
pytest.importorskip("pytestqt")

from PySide6.QtCore import QCoreApplication, QSettings, QThread, QTimer  # noqa: E402


def _alive(obj) -> bool:
    try:
        import shiboken6

        return shiboken6.isValid(obj)
    except Exception:  # noqa: BLE001
        return False


@pytest.fixture(autouse=True)
def _qt_settings_tmp(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qsettings")
    QSettings.setDefaultFormat(QSettings.Format.IniFormat)
    QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope, str(folder))
    QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.SystemScope, str(folder / "system"))
    yield folder


class _Unsaved:
    def __init__(self) -> None:
        self.answer = "discard"
        self.asked: list[str] = []

    def __call__(self, parent, text: str) -> str:
        self.asked.append(text)
        return self.answer


@pytest.fixture(autouse=True)
def unsaved(monkeypatch):
    import workbench.app

    fake = _Unsaved()
    monkeypatch.setattr(workbench.app, "ask_unsaved", fake)
    return fake


@pytest.fixture(autouse=True)
def _qt_leak_check(qapp, request):
    """Fail the test if it leaves a QThread running or a QTimer active."""
    threads: list[weakref.ref] = []
    timers: list[weakref.ref] = []
    orig_thread_start = QThread.start
    orig_timer_start = QTimer.start

    def thread_start(self, *args, **kwargs):
        threads.append(weakref.ref(self))
        return orig_thread_start(self, *args, **kwargs)

    def timer_start(self, *args, **kwargs):
        timers.append(weakref.ref(self))
        return orig_timer_start(self, *args, **kwargs)

    QThread.start = thread_start
    QTimer.start = timer_start
    try:
        yield
    finally:
        QThread.start = orig_thread_start
        QTimer.start = orig_timer_start
    # a short grace period: deleteLater / queued finished signals
    deadline = time.monotonic() + 0.5
    while True:
        QCoreApplication.processEvents()
        running = [t for t in (r() for r in threads) if t is not None and _alive(t) and t.isRunning()]
        active = [t for t in (r() for r in timers) if t is not None and _alive(t) and t.isActive()]
        if (not running and not active) or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    problems = []
    for t in running:
        problems.append(f"QThread {t.objectName() or type(t).__name__!r} still running")
        t.quit()
        t.wait(5000)
    for t in active:
        parent = t.parent()
        owner = type(parent).__name__ if parent is not None else "no parent"
        problems.append(f"QTimer {t.objectName() or ''!r} (interval {t.interval()} ms, owner {owner}) still active")
        t.stop()
    if problems:
        pytest.fail("test left Qt work running: " + "; ".join(problems), pytrace=False)


@pytest.fixture
def window(qtbot, demo_bundle):
    """The main window with the demo incident open (shown, offscreen)."""
    from workbench.app import MainWindow

    win = MainWindow()
    qtbot.addWidget(win)
    win.resize(1400, 900)
    win.show()
    qtbot.waitExposed(win)
    assert win.open_path(demo_bundle)
    yield win
    win.close()


@pytest.fixture
def session(qtbot, demo_bundle):
    """A session with its own engine thread and the demo incident open; shut down after the test."""
    from workbench.session import Session
    from workbench.worker import EngineRunner

    runner = EngineRunner()
    s = Session(runner)
    s.open(demo_bundle)
    yield s
    s.close()
    assert runner.shutdown(10_000)


@pytest.fixture
def boxes(monkeypatch):
    """Capture QMessageBox.critical/information/warning instead of showing modal dialogs."""
    from PySide6.QtWidgets import QMessageBox

    seen: list[tuple[str, str]] = []

    def fake(parent, title, text, *a, **k):
        seen.append((title, text))
        return QMessageBox.StandardButton.Ok

    monkeypatch.setattr(QMessageBox, "critical", fake)
    monkeypatch.setattr(QMessageBox, "information", fake)
    monkeypatch.setattr(QMessageBox, "warning", fake)
    return seen
