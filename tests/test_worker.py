"""The GUI's engine thread: jobs run off the GUI thread, progress arrives in order, cancel and shutdown work."""

import threading
import time

import pytest

pytest.importorskip("PySide6")

from workbench.worker import EngineRunner  # noqa: E402


@pytest.fixture
def runner(qtbot):
    r = EngineRunner()
    yield r
    assert r.shutdown(5000)


def test_job_runs_on_engine_thread_and_reports(qtbot, runner):
    seen = []
    runner.progress.connect(lambda n, d: seen.append((n, d)))

    def job(emit, cancel):
        for i in range(3):
            emit(i)
        return threading.current_thread() is threading.main_thread()

    with qtbot.waitSignal(runner.finished, timeout=5000) as blocker:
        runner.submit("job", job)
    assert blocker.args == ["job", False]       # it did not run on the GUI thread
    qtbot.waitUntil(lambda: len(seen) == 3)
    assert seen == [("job", 0), ("job", 1), ("job", 2)]
    qtbot.waitUntil(lambda: not runner.busy)


def test_failure_is_one_line(qtbot, runner):
    def job(emit, cancel):
        raise ValueError("bad value\nsecond line")

    with qtbot.waitSignal(runner.failed, timeout=5000) as blocker:
        runner.submit("boom", job)
    assert blocker.args == ["boom", "ValueError: bad value"]


def test_cancel_returns_quickly_and_waiting_job_is_replaced(qtbot, runner):
    started = threading.Event()
    results = []
    runner.finished.connect(lambda n, r: results.append((n, r)))

    def slow(emit, cancel):
        started.set()
        while not cancel.wait(0.01):
            pass
        return "cancelled"

    runner.submit("slow", slow)
    assert started.wait(5)
    runner.submit("edit", lambda e, c: 1)
    runner.submit("edit", lambda e, c: 2)       # replaces the waiting edit
    t0 = time.perf_counter()
    runner.cancel("slow")
    qtbot.waitUntil(lambda: len(results) == 2, timeout=5000)
    assert time.perf_counter() - t0 < 1.0
    assert results == [("slow", "cancelled"), ("edit", 2)]


def test_shutdown_cancels_a_running_job(qtbot):
    r = EngineRunner()
    started = threading.Event()

    def slow(emit, cancel):
        started.set()
        cancel.wait(30)
        return None

    r.submit("slow", slow)
    assert started.wait(5)
    t0 = time.perf_counter()
    assert r.shutdown(5000)
    assert time.perf_counter() - t0 < 2.0


def test_session_opens_loads_model_on_engine_thread_and_refuses_bad_files(qtbot, runner, demo_bundle, tmp_path):
    from engine.errors import ForensicsError
    from workbench.session import Session

    s = Session(runner)
    with qtbot.waitSignal(s.bundle_opened, timeout=5000):
        s.open(demo_bundle)
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5 at all")
    with pytest.raises(ForensicsError):
        s.open(bad)
    assert s.bundle is not None and s.path == demo_bundle      # the good bundle stays open
    with pytest.raises(RuntimeError):
        s.model()                                              # never on the GUI thread
    with qtbot.waitSignal(runner.finished, timeout=60000) as blocker:
        runner.submit("load", lambda emit, cancel: type(s.model()).__name__)
    assert blocker.args == ["load", "ModelHandle"]
    with qtbot.waitSignal(s.bundle_closed):
        s.close()
    assert s.bundle is None


def test_a_slot_can_tell_which_job_a_signal_comes_from(qtbot, runner):
    """``delivering(job)`` is true only inside the slots of that job's own signals: a view that started a second
    run (or closed its bundle) ignores what the first one still sends."""
    started = threading.Event()
    seen = []

    def first(emit, cancel):
        started.set()
        emit("first progress")
        cancel.wait(5)
        return "first"

    old = runner.submit("cf", first)
    assert started.wait(5)
    new = runner.submit("cf", lambda emit, cancel: (emit("second progress"), "second")[1], replace=True)

    def record(name, data):
        seen.append((data, runner.delivering(old), runner.delivering(new), runner.delivering(None)))

    runner.progress.connect(record)
    runner.finished.connect(record)
    qtbot.waitUntil(lambda: any(s[0] == "second" for s in seen), timeout=5000)
    got = {s[0]: s[1:] for s in seen}
    assert got["first"] == (True, False, False) and got["second"] == (False, True, False)
    assert got["second progress"] == (False, True, False)
    assert not runner.delivering(old) and not runner.delivering(new)   # outside a slot: nobody's


def test_a_forensics_error_prints_no_traceback(qtbot, runner, capfd):
    """A bad file is the user's one line in a dialog, not a bug: no traceback on stderr (other errors keep theirs)."""
    from engine.errors import BundleContentError

    def bad(emit, cancel):
        raise BundleContentError("activations/L0/attn: bit rot")

    with qtbot.waitSignal(runner.failed, timeout=5000) as blocker:
        runner.submit("bad", bad)
    assert blocker.args == ["bad", "activations/L0/attn: bit rot"]
    with qtbot.waitSignal(runner.failed, timeout=5000):
        runner.submit("bug", lambda e, c: 1 / 0)
    err = capfd.readouterr().err
    assert "BundleContentError" not in err and "ZeroDivisionError" in err and err.count("Traceback") == 1


def test_garbage_is_collected_on_the_gui_thread_while_the_engine_thread_exists(qtbot):
    """Cyclic garbage made by a job on the engine thread is freed on the GUI thread (a collection on the engine
    thread can destroy Qt objects there and deadlock against the GUI thread); after shutdown, automatic
    collection is back as it was."""
    import gc

    assert gc.isenabled()
    r = EngineRunner()
    assert not gc.isenabled()               # no automatic collection in whatever thread allocates
    freed_on = []

    class Node:
        def __init__(self):
            self.me = self                  # a reference cycle: only the cyclic collector frees it

        def __del__(self):
            freed_on.append(threading.current_thread() is threading.main_thread())

    def job(emit, cancel):
        for _ in range(5000):               # well past generation 0's threshold
            Node()
        return len(freed_on)

    with qtbot.waitSignal(r.finished, timeout=10_000) as blocker:
        r.submit("garbage", job)
    assert blocker.args == ["garbage", 0]   # nothing was collected on the engine thread
    qtbot.waitUntil(lambda: len(freed_on) == 5000, timeout=5000)     # the GUI thread's timer collected it
    assert all(freed_on)
    assert r.shutdown(5000) and gc.isenabled()
