"""Write docs/benchmarks.md: run the speed / memory benchmarks and keep what they printed (run: make benchmarks-doc).

Runs ``benchmarks/record.py``, ``benchmarks/interventions.py`` and ``benchmarks/gui.py`` one after the other, each in
a fresh process with this venv's Python (``QT_QPA_PLATFORM=offscreen``, ``HF_HUB_OFFLINE=1``), and writes their
output verbatim into the document with the date, the machine, the load average before and after each, the exit
status and the wall time. Nothing is edited or summarised by hand: the PASS / MISS lines are the benchmarks' own.
CF and CCA have documents of their own, written by their benchmarks (``docs/cf.md``, ``docs/cca.md``).

    .venv/bin/python scripts/benchmarks_doc.py [--only record,interventions,gui]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "benchmarks.md"

BENCHES = {
    "record": ("benchmarks/record.py", "Recording: hook overhead, bundle size, lazy open (issue 2)"),
    "interventions": ("benchmarks/interventions.py", "Intervention engine: batching, prefix reuse, memory (issue 4)"),
    "gui": ("benchmarks/gui.py", "GUI responsiveness: event-loop stall during CCA, open -> heatmap, edit -> "
                                 "before/after (issue 8)"),
}


def _load() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def _run(script: str) -> tuple[int, str, float, str, str]:
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    before = _load()
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, script], cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    out = proc.stdout.rstrip()
    if proc.returncode != 0:
        out += "\n\n[stderr, last lines]\n" + "\n".join(proc.stderr.rstrip().splitlines()[-15:])
    return proc.returncode, out, wall, before, _load()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated subset of: " + ", ".join(BENCHES))
    args = ap.parse_args(argv)
    names = args.only.split(",") if args.only else list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        ap.error(f"unknown benchmark(s): {', '.join(unknown)}")
    import torch

    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Measured: speed and memory benchmarks",
        "",
        "Written by `scripts/benchmarks_doc.py` (`make benchmarks-doc`), which ran each benchmark below in a fresh "
        "process and pasted what it printed, unedited. CF and CCA are measured by their own benchmarks and "
        "documents: [cf.md](cf.md) (held-out false-positive rate, localisation against an exhaustive sweep) and "
        "[cca.md](cca.md) (fix sets, search budget, wall time).",
        "",
        f"Run on {when}: torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}. The machine may be shared: the load "
        "average (1 / 5 / 15 min) is given before and after each benchmark; wall-time targets are noisy under "
        "load, sizes and counts are not.",
        "",
    ]
    status = 0
    for name in names:
        script, title = BENCHES[name]
        print(f"running {script} ...", file=sys.stderr, flush=True)
        rc, out, wall, before, after = _run(script)
        status = status or rc
        lines += [f"## {title}", "",
                  f"`{script}`: exit {rc}, {wall:.0f} s wall; load average {before} before, {after} after.", "",
                  "```text", out, "```", ""]
    tmp = OUT.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    tmp.replace(OUT)
    print(f"written {OUT}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
