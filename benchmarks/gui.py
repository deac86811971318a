"""GUI responsiveness benchmark: the real main window (offscreen), measured in one run.

1. **Event-loop stall during CCA**: a 1 ms ``QTimer`` probe on the GUI thread records the gaps between its ticks
   while CCA (``engine.cca.run_cca``) runs on the engine thread, started from the CCA view's Run button on the demo
   incident, with the view's live 10 Hz progress / trace refresh.  Reported: the longest gap (target <= 50 ms), the
   99.9th percentile and the number of gaps above 50 ms — for the first run in a fresh process ("cold": the job
   loads the model and, with it, torch / transformers / scipy on the engine thread) and for a second run
   ("warm").  The bundles are made in a subprocess, so this process has not imported the engine's libraries.
2. **Open a >= 100 MB bundle -> first heatmap drawn**: ``MainWindow.open_path`` on a real bundle recorded here (a
   GPT-2-architecture model, 16 layers x 768, random init seed 0, on a 1024-token prompt; all four sites of every
   layer) until the browser has read its first visible slice and the heatmap widget has painted it (target <= 1 s).
   The bundle is cached between runs (``--large``).
3. **Certificate export**: the longest gap of the same probe during File ▸ Export certificate… after the CCA runs
   (replay, CF, the JSON, the PDF drawn by a child process) until it is written (target <= 50 ms, as for CCA).
4. **Intervention edit -> updated before / after**: on the demo incident's model, an edit of the position cell of
   the intervention table (the same ``setData`` path a cell editor commits through) until the before / after panel
   shows the replay of the new set (engine thread job, baseline cached) and has repainted (target <= 300 ms;
   median and max of ``--edits`` edits after one warm-up edit, whose time is printed too).  The editor's
   background warm-up after the baseline (one forward per generation length) is waited for and timed first.

Usage::

    QT_QPA_PLATFORM=offscreen HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/gui.py [--controls N] [--edits N]
        [--large PATH] [--demo PATH]

Shared machine: timings include whatever else the CPU is doing (the load average is printed); numbers are measured,
never adjusted.
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from PySide6.QtCore import QEventLoop, QObject, QSettings, Qt, QTimer, Slot  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402

TARGET_STALL_MS = 50.0
TARGET_HEATMAP_S = 1.0
TARGET_EDIT_MS = 300.0
LARGE_LAYERS, LARGE_WIDTH, LARGE_TOKENS, LARGE_VOCAB = 16, 768, 1024, 2000


# ----------------------------------------------------------------------------------------------------------------
# Bundles
# ----------------------------------------------------------------------------------------------------------------
def demo_bundle(path: Path | None) -> Path:
    """The demo incident: ``--demo``, ``demo-out/demo-incident.h5``, the app's cached demo, or recorded now."""
    from workbench.app import demo_cache_path

    for p in ([path] if path else []) + [ROOT / "demo-out" / "demo-incident.h5", demo_cache_path()]:
        if p is not None and p.is_file():
            return p
    import scenarios
    from workbench.cli import build_scenario_bundle

    target = demo_cache_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tmp = target.with_suffix(".h5.part")
    build_scenario_bundle(scenarios.get("gpt2-prompt-injection"), tmp)
    tmp.replace(target)
    print(f"  recorded the demo incident in {time.perf_counter() - t0:.0f} s -> {target}", flush=True)
    return target


def _word_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1}
    for i in range(2, vocab_size):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>",
                                   clean_up_tokenization_spaces=False)


def large_bundle(path: Path) -> Path:
    """Record (once) a real >= 100 MB bundle: GPT-2 architecture, 16 x 768, 1024-token prompt, token: failure."""
    if path.is_file() and path.stat().st_size >= 100e6:
        return path
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from engine.bundle import write_bundle
    from engine.models import ModelHandle
    from engine.recorder import record_incident

    t0 = time.perf_counter()
    cfg = GPT2Config(n_layer=LARGE_LAYERS, n_embd=LARGE_WIDTH, n_head=12, vocab_size=LARGE_VOCAB,
                     n_positions=LARGE_TOKENS, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, eos_token_id=1,
                     bos_token_id=1)
    torch.manual_seed(0)
    handle = ModelHandle(model=GPT2LMHeadModel(cfg).eval(), tokenizer=_word_tokenizer(LARGE_VOCAB), source="")
    ids = np.random.default_rng(0).integers(2, LARGE_VOCAB, size=LARGE_TOKENS)
    prompt = " ".join(f"w{i}" for i in ids)
    inc = record_incident(handle, prompt, f"token:w{int(ids[0])}", embed_weights=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_suffix(".part.h5")
    write_bundle(part, inc)
    part.replace(path)
    print(f"  recorded the large bundle in {time.perf_counter() - t0:.0f} s -> {path}", flush=True)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------
class Probe(QObject):
    """A 1 ms precise timer on the GUI thread; ``gaps`` are the seconds between consecutive ticks."""

    def __init__(self) -> None:
        super().__init__()
        self.timer = QTimer(self)
        self.timer.setTimerType(Qt.TimerType.PreciseTimer)
        self.timer.setInterval(1)
        self.timer.timeout.connect(self.tick)
        self.last: float | None = None
        self.gaps: list[float] = []
        self.long: list[tuple[float, float]] = []     # (end time, gap) of every gap > 30 ms

    def start(self) -> None:
        self.last, self.gaps, self.long = None, [], []
        self.timer.start()

    def stop(self) -> None:
        self.timer.stop()

    @Slot()
    def tick(self) -> None:
        now = time.perf_counter()
        if self.last is not None:
            gap = now - self.last
            if gap > 0.03:
                self.long.append((now, gap))
            self.gaps.append(gap)
        self.last = now


class Waiter(QObject):
    """Runs a nested event loop until :meth:`done` is called (connected to a GUI-thread signal) or a timeout."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = QEventLoop()
        self.args: tuple = ()
        self.accept = None

    @Slot()
    def done(self) -> None:
        self.args = ()
        self.loop.quit()

    @Slot(object)
    def done_with(self, value) -> None:
        if self.accept is not None and not self.accept(value):
            return
        self.args = (value,)
        self.loop.quit()

    def wait(self, timeout_s: float) -> bool:
        self.args = ()
        guard = QTimer()
        guard.setSingleShot(True)
        guard.timeout.connect(self.loop.quit)
        guard.start(int(timeout_s * 1000))
        self.loop.exec()
        ok = guard.isActive()
        guard.stop()
        return ok


def pump(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        QApplication.processEvents()
        time.sleep(0.002)


# ----------------------------------------------------------------------------------------------------------------
# Measures
# ----------------------------------------------------------------------------------------------------------------
class GCWatch:
    """Records every garbage collection (end time, duration, generation, thread) while installed."""

    def __init__(self) -> None:
        self.events: list[tuple[float, float, int, str]] = []
        self._t0: dict[int, float] = {}

    def __call__(self, phase: str, info: dict) -> None:
        tid = threading.get_ident()
        if phase == "start":
            self._t0[tid] = time.perf_counter()
        elif tid in self._t0:
            end = time.perf_counter()
            self.events.append((end, end - self._t0.pop(tid), int(info["generation"]),
                                threading.current_thread().name))

    def __enter__(self) -> "GCWatch":
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self)

    def overlapping(self, end: float, gap: float) -> float:
        """Seconds of garbage collection inside the gap ``(end - gap, end)``."""
        start = end - gap
        return sum(max(0.0, min(end, e) - max(start, e - d)) for e, d, _, _ in self.events)


def measure_stall(win, controls: int) -> dict:
    """Longest GUI-thread gap while CCA runs from the CCA view; each gap > 30 ms is listed with the garbage
    collection time inside it (a collection holds the GIL, whichever thread runs it)."""
    view = win.view("CCA")
    view.controls.setValue(controls)
    win.show_view("CCA")
    pump(0.3)
    probe = Probe()
    waiter = Waiter()
    win.session.cca_changed.connect(waiter.done_with)
    load0 = os.getloadavg()[0]
    with GCWatch() as gcw:
        probe.start()
        t0 = time.perf_counter()
        view.run_button.click()
        ok = waiter.wait(600)
        t_run = time.perf_counter() - t0
        pump(0.1)      # the probe's next tick ends the gap the result's own slots made (stopped at once, it was lost)
        probe.stop()
    win.session.cca_changed.disconnect(waiter.done_with)
    res = win.session.cca
    gaps_ms = np.asarray(probe.gaps) * 1e3
    long = ", ".join(f"+{end - t0:.1f}s {gap * 1e3:.0f} ms (gc {1e3 * gcw.overlapping(end, gap):.0f})"
                     for end, gap in probe.long) or "none"
    gc_max = max((d for _, d, _, _ in gcw.events), default=0.0)
    return dict(ok=ok and res is not None, seconds=t_run, ticks=len(gaps_ms), max_ms=float(gaps_ms.max()), long=long,
                p999_ms=float(np.percentile(gaps_ms, 99.9)), p99_ms=float(np.percentile(gaps_ms, 99)),
                over=int((gaps_ms > TARGET_STALL_MS).sum()), passes=getattr(res, "forward_passes", 0),
                fix=len(getattr(res, "fix_set", []) or []), gc_n=len(gcw.events), gc_max_ms=gc_max * 1e3,
                load=(load0 + os.getloadavg()[0]) / 2)


def measure_export(win, out_dir: Path) -> dict:
    """Longest GUI-thread gap during File > Export certificate… with the CCA result of the stall runs in the session
    (the export replays the incident, runs CF when the session has none, writes the JSON and has the PDF drawn by a
    child process), until the status bar says it was written."""
    from workbench.views.export import export_certificate

    pump(0.3)
    probe = Probe()
    load0 = os.getloadavg()[0]
    pdf = out_dir / "bench-certificate.pdf"
    probe.start()
    t0 = time.perf_counter()
    export = export_certificate(win, win.session, win.runner, pdf, rerun_partial=False)
    waiter = Waiter()
    if export is not None:
        export.done.connect(waiter.done)
        export.failed.connect(waiter.done)
    ok = export is not None and waiter.wait(600)
    t_run = time.perf_counter() - t0
    pump(0.1)          # as in measure_stall: the gap that ends with the result is measured too
    probe.stop()
    gaps_ms = np.asarray(probe.gaps) * 1e3
    return dict(ok=ok and pdf.is_file(), seconds=t_run, max_ms=float(gaps_ms.max()), ticks=len(gaps_ms),
                over=int((gaps_ms > TARGET_STALL_MS).sum()), size_kb=pdf.stat().st_size / 1024 if pdf.is_file() else 0,
                load=(load0 + os.getloadavg()[0]) / 2)


def measure_edit(win, edits: int) -> dict:
    """Intervention edit -> before / after updated (demo model, baseline cached)."""
    from engine.interventions import Intervention
    from workbench.views.editor import COL_POS

    ed = win.editor
    waiter = Waiter()
    ed.replayed.connect(waiter.done_with)
    t0 = time.perf_counter()
    win.show_view("Interventions")            # replays the baseline (cached after the first replay)
    assert waiter.wait(300), "baseline replay did not finish"
    t_baseline = time.perf_counter() - t0
    t0 = time.perf_counter()                   # the editor's background per-length warm-up, as a user reads
    while win.runner.is_running("replay-warmup"):
        pump(0.01)
    t_warmup = time.perf_counter() - t0
    waiter.accept = lambda o: o.revision == ed.revision

    def timed(action) -> tuple[float, object]:
        t = time.perf_counter()
        action()
        assert waiter.wait(60), "replay did not finish"
        ed.after.repaint()                      # the panel is drawn with the new result
        ed.banner.repaint()
        return time.perf_counter() - t, waiter.args[0]

    t_first, o = timed(lambda: ed.add_from_request(Intervention(0, "attn", (15,), "mean")))
    assert o.after.continuation == "OK, I will summarize the report.", o.after.continuation
    times, engine = [], []
    idx = ed.model.index(0, COL_POS)
    for i in range(edits):
        text = "14" if i % 2 == 0 else "15"
        dt, o = timed(lambda text=text: ed.model.setData(idx, text))
        assert o.interventions[0].positions == (int(text),)
        times.append(dt)
        engine.append(o.seconds)
        pump(0.05)
    ed.replayed.disconnect(waiter.done_with)
    return dict(baseline_s=t_baseline, warmup_s=t_warmup, first_ms=t_first * 1e3, median_ms=statistics.median(times) * 1e3,
                max_ms=max(times) * 1e3, engine_median_ms=statistics.median(engine) * 1e3,
                all=" ".join(f"{t * 1e3:.0f}/{g * 1e3:.0f}" for t, g in zip(times, engine)),
                fixed_text=o.after.continuation, n=edits)


def measure_open(win, path: Path) -> dict:
    """open_path(large bundle) -> the browser's first heatmap read and painted."""
    browser = win.browser
    win.show_view("Browser")
    pump(0.2)
    waiter = Waiter()
    browser.slice_drawn.connect(waiter.done)
    browser.read_log.clear()
    t0 = time.perf_counter()
    assert win.open_path(path)
    t_opened = time.perf_counter() - t0
    if not browser.image_data.size:              # the first slice is read synchronously when visible
        assert waiter.wait(30), "no heatmap"
    t_read = time.perf_counter() - t0
    browser.heat.viewport().repaint()            # paint the scene holding the new image, now
    t_drawn = time.perf_counter() - t0
    browser.slice_drawn.disconnect(waiter.done)
    b = win.session.bundle
    read_values = sum((p1 - p0) * (d1 - d0) for _, _, (p0, p1), (d0, d1) in browser.read_log)
    total_values = b.n_layers * len(b.sites) * b.n_positions * b.model_info["d_model"]
    return dict(size_mb=path.stat().st_size / 1e6, open_s=t_opened, read_s=t_read, drawn_s=t_drawn,
                shape=browser.image_data.shape, window=dict(browser.slice_info), read_values=read_values,
                total_values=total_values, site=(browser.layer, browser.site),
                layers=b.n_layers, positions=b.n_positions, d=b.model_info["d_model"])


# ----------------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--controls", type=int, default=200, help="CCA control sets (the view's default: 200)")
    ap.add_argument("--edits", type=int, default=10, help="timed intervention edits (after one warm-up edit)")
    ap.add_argument("--large", type=Path, default=Path(tempfile.gettempdir()) / "forensics-gui-bench" /
                    f"gpt2-{LARGE_LAYERS}x{LARGE_WIDTH}-{LARGE_TOKENS}tok.h5", help="the >= 100 MB bundle (cached)")
    ap.add_argument("--demo", type=Path, default=None, help="the demo incident bundle (default: found or recorded)")
    ap.add_argument("--make-bundles", action="store_true", help=argparse.SUPPRESS)   # the subprocess's job
    ap.add_argument("--watchdog", type=float, default=900.0,
                    help="seconds after which a stuck run prints every thread's traceback and exits (default 900)")
    args = ap.parse_args(argv)
    if args.watchdog > 0:      # a wait loop that never ends says where it waits instead of hanging silently
        faulthandler.dump_traceback_later(args.watchdog, exit=True)
    if args.make_bundles:
        print(demo_bundle(args.demo))
        large_bundle(args.large)
        return 0
    t_start = time.perf_counter()
    # bundles in a subprocess: this process stays cold (no torch / transformers / scipy imported yet)
    cmd = [sys.executable, __file__, "--make-bundles", "--large", str(args.large)] + \
        (["--demo", str(args.demo)] if args.demo else [])
    made = subprocess.run(cmd, check=True, capture_output=True, text=True)
    demo = Path(made.stdout.strip().splitlines()[-1])
    for line in made.stdout.strip().splitlines()[:-1]:
        print(line)
    large = args.large
    assert "torch" not in sys.modules and "transformers" not in sys.modules

    app = QApplication.instance() or QApplication(sys.argv[:1])
    # a fresh settings folder: the user's window layout / recent files neither shape nor receive the measurement
    settings_dir = tempfile.TemporaryDirectory(prefix="forensics-gui-bench-settings-")
    QSettings.setDefaultFormat(QSettings.Format.IniFormat)
    QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope, settings_dir.name)
    from importlib.metadata import version

    print(f"torch {version('torch')}, CPU; Qt platform {app.platformName()}; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    from workbench.app import MainWindow

    import workbench.app

    workbench.app.ask_unsaved = lambda parent, text: "discard"   # no Save / Discard question: nothing here is kept
    win = MainWindow()
    win.resize(1400, 900)
    win.show()
    pump(0.3)
    assert win.open_path(demo)
    rows = []
    try:
        stalls = {}
        for kind in ("cold", "warm"):
            s = stalls[kind] = measure_stall(win, args.controls)
            print(f"  stall ({kind}): CCA ({args.controls} controls) ran {s['seconds']:.1f} s, {s['passes']} forward "
                  f"passes, fix set of {s['fix']}; {s['ticks']} probe ticks: max gap {s['max_ms']:.1f} ms, p99.9 "
                  f"{s['p999_ms']:.1f} ms, p99 {s['p99_ms']:.1f} ms, {s['over']} gap(s) > {TARGET_STALL_MS:.0f} ms; "
                  f"{s['gc_n']} garbage collections (longest {s['gc_max_ms']:.0f} ms); load average ~{s['load']:.1f}; "
                  f"gaps > 30 ms [time into the run, gap (ms of gc inside)]: {s['long']}", flush=True)
        x = measure_export(win, Path(settings_dir.name))
        print(f"  export: certificate (replay, CF, JSON, PDF by a child process) {x['seconds']:.1f} s, "
              f"{x['size_kb']:.0f} kB PDF; {x['ticks']} probe ticks: max gap {x['max_ms']:.1f} ms, {x['over']} gap(s) "
              f"> {TARGET_STALL_MS:.0f} ms; load average ~{x['load']:.1f}", flush=True)
        e = measure_edit(win, args.edits)
        print(f"  edit: baseline (first replay) {e['baseline_s']:.2f} s, then background warm-up "
              f"{e['warmup_s']:.2f} s; first edit {e['first_ms']:.0f} ms; "
              f"{e['n']} edits: median {e['median_ms']:.0f} ms, max {e['max_ms']:.0f} ms (engine job median "
              f"{e['engine_median_ms']:.0f} ms; all: {e['all']}); fixed output {e['fixed_text']!r}", flush=True)
        o = measure_open(win, large)
        w = o["window"]
        print(f"  open: {large.name} {o['size_mb']:.1f} MB ({o['layers']} layers x 4 sites x {o['positions']} tokens "
              f"x {o['d']}); open_path {o['open_s'] * 1e3:.0f} ms, first slice read {o['read_s'] * 1e3:.0f} ms, "
              f"drawn {o['drawn_s'] * 1e3:.0f} ms; heatmap L{o['site'][0]} {o['site'][1]} image {o['shape']} for "
              f"positions {w['p0']}-{w['p1'] - 1} x dims {w['d0']}-{w['d1'] - 1} (downsampled {w['sp']}x{w['sd']}); "
              f"read {o['read_values']:,} of {o['total_values']:,} activation values "
              f"({100 * o['read_values'] / o['total_values']:.2f}%)", flush=True)
        for kind, s in stalls.items():
            rows.append((f"longest event-loop stall during CCA, {kind} (ms)", f"{s['max_ms']:.1f}",
                         f"<= {TARGET_STALL_MS:.0f}", s["ok"] and s["max_ms"] <= TARGET_STALL_MS))
        rows.append(("longest event-loop stall during certificate export (ms)", f"{x['max_ms']:.1f}",
                     f"<= {TARGET_STALL_MS:.0f}", x["ok"] and x["max_ms"] <= TARGET_STALL_MS))
        rows += [
            (f"open {o['size_mb']:.0f} MB bundle -> first heatmap drawn (s)", f"{o['drawn_s']:.3f}",
             f"<= {TARGET_HEATMAP_S:g}", o["drawn_s"] <= TARGET_HEATMAP_S),
            (f"intervention edit -> before/after updated (ms, median of {e['n']})", f"{e['median_ms']:.0f}",
             f"<= {TARGET_EDIT_MS:.0f}", e["median_ms"] <= TARGET_EDIT_MS),
            (f"intervention edit -> before/after updated (ms, max of {e['n']})", f"{e['max_ms']:.0f}",
             f"<= {TARGET_EDIT_MS:.0f}", e["max_ms"] <= TARGET_EDIT_MS),
        ]
    finally:
        win.close()
    width = max(len(r[0]) for r in rows) if rows else 10
    print()
    print(f"{'measure':<{width}}  {'value':>8}  {'target':>8}  result")
    print(f"{'-' * width}  {'-' * 8}  {'-' * 8}  ------")
    for name, value, target, ok in rows:
        print(f"{name:<{width}}  {value:>8}  {target:>8}  {'PASS' if ok else 'MISS'}")
    print(f"\n(total benchmark time {time.perf_counter() - t_start:.0f} s; load average now "
          f"{os.getloadavg()[0]:.1f})")
    return 0 if rows and all(r[3] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
