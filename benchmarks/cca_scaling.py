"""Benchmark: how the CCA search's cost grows with the candidate space, against the exhaustive single-site sweep.

    .venv/bin/python benchmarks/cca_scaling.py [--sizes L:W,...] [--json OUT.json]

Issue 6 asks for a search that costs at most 10% of an exhaustive single-site sweep. On the shipped scenarios
(150–304 candidate sites, ``benchmarks/cca.py``) the checks the search ends with — the chosen set run on every
benign reference prompt — already cost more than that. The checks do not grow with the model or the prompt; the
sweep does (layers × components × prompt positions). This benchmark measures both on incidents whose size is the
parameter: a GPT-2 with random weights and a planted fault (``scenarios.planted``: an MLP neuron in the middle block
that answers ``cat`` to the trigger word ``HACKED``), ``L`` blocks, prompts of ``W`` random words and a last word,
40 benign reference prompts. Per size, one torch thread:

* **search to the final set** (``run_cca(..., evidence=False)`` with its defaults, CF-guided: the CF baseline is
  built from the incident's benign prompts first and not counted) — rows (one sequence through the model once, the
  unit that is fair to a side that batches 64 sites per forward), split into screening and checks, passes and wall
  time, and whether the set lands on the planted block's MLP at the trigger; the same search without CF (positions
  ordered by the attribution estimate) beside it;
* **(a)** the raw sweep (every candidate once, teacher-forced, on the incident) and **(b)** the sweep followed by the
  same checks (``ranking="exhaustive"``), with the search's share of each;
* the **floor**: the final set's own checks alone (``benchmarks/cca.py``'s ``_floor``) as a share of (a).

Every number is measured here; nothing is typed in. ``scripts/cca_doc.py`` puts the table into ``docs/cca.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from cca import TARGET_VS_SWEEP, _pct, _search, _sweep  # noqa: E402  (benchmarks/cca.py)
from engine.bundle import open_bundle  # noqa: E402
from engine.cca import torch_threads  # noqa: E402
from engine.cf import run_cf  # noqa: E402
from scenarios.planted import planted_bundle  # noqa: E402

#: (blocks, words before the last one): from the shipped scenarios' scale (4 blocks, ~10 prompt tokens) up
SIZES = ((4, 8), (4, 32), (8, 32), (8, 64), (16, 64), (16, 128))


def measure_size(n_layer: int, words: int, workdir: Path) -> dict:
    path = workdir / f"planted-{n_layer}x{words}.h5"
    plant = n_layer // 2
    with torch_threads(1):
        h = planted_bundle(path, (plant,), n_layer=n_layer, words=words)
        with open_bundle(path) as b:
            last = int(b.n_prompt_tokens) - 1
            cf = run_cf(b, h)
            ours = _search(b, h, floor=True, cf=cf)
            no_cf = _search(b, h, cf=None)
            exhaustive = _search(b, h, ranking="exhaustive")
            sw = _sweep(b, h)
    n_cands = len(sw["cands"])
    return {"n_layer": n_layer, "words": words, "n_prompt_tokens": last + 1, "n_candidates": n_cands,
            "planted": f"L{plant}.mlp@{last}:mean", "on_planted_site": ours["set"] == [f"L{plant}.mlp@{last}:mean"],
            "ours": ours,
            "no_cf": {k: no_cf[k] for k in ("rows", "screen_rows", "check_rows", "passes", "seconds", "set")},
            "exhaustive_search": {k: exhaustive[k] for k in ("rows", "passes", "seconds", "set")},
            "sweep": {"rows": sw["rows"], "passes": sw["passes"], "seconds": sw["seconds"]},
            "ratios": {"rows_vs_sweep": ours["rows"] / sw["rows"],
                       "rows_vs_exhaustive_search": ours["rows"] / exhaustive["rows"],
                       "floor_vs_sweep": ours["floor"]["rows"] / sw["rows"],
                       "no_cf_rows_vs_sweep": no_cf["rows"] / sw["rows"],
                       "seconds_vs_sweep": ours["seconds"] / sw["seconds"] if sw["seconds"] else None}}


def _print(s: dict) -> None:
    o, sw, ex, r = s["ours"], s["sweep"], s["exhaustive_search"], s["ratios"]
    ok = "met" if r["rows_vs_sweep"] <= TARGET_VS_SWEEP else "MISSED"
    print(f"== {s['n_layer']} blocks, {s['n_prompt_tokens']}-token prompt: {s['n_candidates']} candidate sites; final "
          f"set {', '.join(o['set']) or '-'} (planted {s['planted']}: {'yes' if s['on_planted_site'] else 'NO'})")
    print(f"   search: {o['rows']} rows ({o['screen_rows']} screening, {o['check_rows']} checks), {o['passes']} "
          f"passes, {o['seconds']:.2f} s | (a) sweep {sw['rows']} rows, {sw['seconds']:.2f} s | (b) sweep + same "
          f"checks {ex['rows']} rows, {ex['seconds']:.2f} s")
    print(f"   search / (a): {_pct(r['rows_vs_sweep'])} of the rows (target <= 10%: {ok}), "
          f"{_pct(r['seconds_vs_sweep'])} of the wall time; search / (b): {_pct(r['rows_vs_exhaustive_search'])}; "
          f"floor (the final set's checks alone) {o['floor']['rows']} rows = {_pct(r['floor_vs_sweep'])} of (a)")
    nc = s["no_cf"]
    print(f"   without CF (positions by attribution): {nc['rows']} rows ({nc['screen_rows']} screening, "
          f"{nc['check_rows']} checks), {nc['seconds']:.2f} s = {_pct(r['no_cf_rows_vs_sweep'])} of (a); same set: "
          f"{'yes' if nc['set'] == o['set'] else 'NO: ' + ', '.join(nc['set'])}")
    sys.stdout.flush()


def measure(sizes=SIZES) -> dict:
    out = {"measured": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
           "torch": torch.__version__, "python": platform.python_version(),
           "load_average_start": os.getloadavg()[0], "sizes": []}
    with tempfile.TemporaryDirectory() as tmp:
        for n_layer, words in sizes:
            out["sizes"].append(measure_size(n_layer, words, Path(tmp)))
            _print(out["sizes"][-1])
    out["load_average_end"] = os.getloadavg()[0]
    return out


def summary(out: dict) -> str:
    met = [s for s in out["sizes"] if s["ratios"]["rows_vs_sweep"] <= TARGET_VS_SWEEP]
    missed = [s for s in out["sizes"] if s["ratios"]["rows_vs_sweep"] > TARGET_VS_SWEEP]
    wrong = [s for s in out["sizes"] if not s["on_planted_site"]]
    line = ("TARGET search rows <= 10% of the raw sweep: " +
            (f"met from {min(s['n_candidates'] for s in met)} candidate sites up ({len(met)} of "
             f"{len(out['sizes'])} sizes)" if met else "met at no size") +
            ("; missed at " + ", ".join(f"{s['n_candidates']} ({_pct(s['ratios']['rows_vs_sweep'])})" for s in missed)
             if missed else ""))
    return line + ("" if not wrong else "\nWRONG SITE at " + ", ".join(str(s["n_candidates"]) for s in wrong))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", help="comma-separated BLOCKS:WORDS (default: " +
                    ",".join(f"{a}:{b}" for a, b in SIZES) + ")")
    ap.add_argument("--json", help="write every measurement to this JSON file")
    args = ap.parse_args(argv)
    sizes = SIZES
    if args.sizes:
        try:
            sizes = tuple(tuple(int(x) for x in item.split(":")) for item in args.sizes.split(","))
            if any(len(t) != 2 or t[0] < 2 or t[1] < 1 for t in sizes):
                raise ValueError
        except ValueError:
            print(f"--sizes: expected BLOCKS:WORDS,... with BLOCKS >= 2 and WORDS >= 1, got {args.sizes!r}",
                  file=sys.stderr)
            return 2
    out = measure(sizes)
    print(summary(out))
    print(f"load average {out['load_average_start']:.2f} at start, {out['load_average_end']:.2f} at end "
          f"({out['machine']}; shared machine: wall times are noisy)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=float), encoding="utf-8")
        print(f"written {args.json}")
    return 0 if not any(not s["on_planted_site"] for s in out["sizes"]) else 1


if __name__ == "__main__":
    sys.exit(main())
