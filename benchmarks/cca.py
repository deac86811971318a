"""Benchmark: the CCA search (issue 6) on every shipped scenario, measured in one run.

    .venv/bin/python benchmarks/cca.py [--scenarios NAME,...] [--json OUT.json] [--no-cli]

Per scenario (bundle recorded fresh from the shipped scenario, one torch thread, see ``engine.cca.torch_threads``):

* **search to the final set** (``run_cca(..., evidence=False)``, the defaults: CF-guided): batched forward passes
  and *rows* (one sequence through the model once: a batch row of a forward, or of one generation step — the
  sequential-forward equivalent, the only unit that is fair when one side packs 64 sites into a forward), split into
  *screening* (candidate sets evaluated on the incident, teacher-forced: token ablations, group tests, sites on
  their own) and *checks* (generation confirmation, counterpart sufficiency, the benign reference prompts'
  baselines and outputs under the sets checked, pruning, refinement), and wall time;
* two baselines, both printed: the **raw exhaustive single-site sweep** (every candidate site evaluated once on the
  incident, teacher-forced, 64 rows per forward; no checks, so it does not reach a chosen set) and the **sweep +
  the same checks** (``ranking="exhaustive"``: the same sweep, then the same lazy chooser on every fixing site it
  found — the cheapest way a sweep reaches the same kind of answer). The ≤ 10% target is judged against the second
  (like for like); the first is printed beside it;
* the **floor**: the final set's own checks run alone, with no search (an oracle that knew the set), as a share of
  the raw sweep — when it is above 10%, no method that checks its answer as the search does can meet the target on
  that incident (``benchmarks/cca_scaling.py`` measures how the ratios move as the candidate space grows);
* the **same search without CF** (positions ordered by the attribution estimate instead of CF's position anomaly)
  and **without any ranking** (positions and sites in listed order): the seed's "CF cuts the CCA search ≥ 50%" is
  judged as 1 − rows(with CF) / rows(without CF), on all rows and on screening rows alone; every variant must reach
  the same set;
* **ranking quality**: Spearman rank correlation between the attribution estimate of every candidate and its exact
  single-site effect on the search metric (from the sweep), the attribution rank of the chosen site, and how many of
  the exact 10 strongest sites the attribution's top 10 holds;
* unless ``--no-cli``: the wall time of ``forensics cca`` on the demo incident (a fresh process: imports, model,
  CF, search, all evidence with 200 controls) with the default one thread and with torch's default thread count.

Every number is measured here; nothing is typed in. ``scripts/cca_doc.py`` turns the JSON into ``docs/cca.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import scenarios  # noqa: E402
from engine import stats  # noqa: E402
from engine.bundle import open_bundle  # noqa: E402
from engine.cca import _Budget, _Chooser, _Incident, candidate_sites, run_cca, torch_threads  # noqa: E402
from engine.interventions import InterventionSet  # noqa: E402
from engine.replay import load_bundle_model  # noqa: E402

SCENARIOS = ("gpt2-prompt-injection", "gpt2-toxic-generation", "llama-secret-leak", "bert-sentiment-bypass")
DEMO = "gpt2-prompt-injection"
SCREEN_STAGES = ("baseline", "search")


def _search(bundle, handle, floor: bool = False, **kw) -> dict:
    """``run_cca(..., evidence=False)``: rows / passes to the final set by kind; with ``floor`` also :func:`_floor`
    of the set it found."""
    t0 = time.perf_counter()
    res = run_cca(bundle, handle, evidence=False, n_controls=0, **kw)
    wall = time.perf_counter() - t0
    rk = res.ranking
    rows = rk.get("search_rows_by_stage", {})
    passes = rk.get("search_passes_by_stage", {})
    extra = {"floor": _floor(bundle, handle, [e.intervention for e in res.fix_set])} if floor else {}
    return {**extra, "set": [e.intervention.describe() for e in res.fix_set], "flipped": bool(res.flipped),
            "passes": int(rk["search_passes"]), "rows": int(rk["search_rows"]), "seconds": wall,
            "screen_rows": int(sum(v for k, v in rows.items() if k in SCREEN_STAGES)),
            "check_rows": int(sum(v for k, v in rows.items() if k not in SCREEN_STAGES)),
            "screen_passes": int(sum(v for k, v in passes.items() if k in SCREEN_STAGES)),
            "candidates_evaluated": int(rk.get("candidates_evaluated", 0)), "n_candidates": int(rk["n_candidates"]),
            "rounds": [r["round"] for r in rk.get("rounds", [])], "backward_passes": int(rk["backward_passes"]),
            "candidates_resolved": int(rk.get("candidates_resolved", rk.get("candidates_evaluated", 0))),
            "group_tests": int(rk.get("group_tests", 0)), "order": rk.get("order"),
            "sets_fully_checked": sum(1 for r in rk.get("selection", []) if r.get("confirmed") and
                                      not r.get("changed_is_lower_bound")),
            "sets_checked": sum(1 for r in rk.get("selection", []) if r.get("confirmed") is not None),
            "n_benign_reference": next((r.get("n_benign_reference") for r in rk.get("selection", [])
                                        if r.get("n_benign_reference") is not None), 0)}


def _floor(bundle, handle, fix) -> dict:
    """The checks the search ends with, run for ``fix`` alone, as by an oracle that knew the final set and searched
    nothing: the incident's baseline, the set's teacher-forced metric, its fix confirmation (the generated
    continuation), its sufficiency on the counterpart and every benign reference prompt (their own outputs and
    their outputs under the set). No method that ends in a set checked like this can spend fewer rows."""
    budget = _Budget(None)
    inc = _Incident(bundle, handle, "mean", budget, 1.0)
    if not fix:
        return {"rows": budget.rows, "passes": budget.passes}
    s = tuple(fix)
    chooser = _Chooser(inc)
    chooser.add([(s, inc.evaluate_tf([InterventionSet(s)])[0].metric)])
    chooser.best()
    return {"rows": budget.rows, "passes": budget.passes}


def _sweep(bundle, handle) -> dict:
    """Every candidate site once, exactly (teacher-forced metric); and the attribution estimate of each."""
    budget = _Budget(None)
    inc = _Incident(bundle, handle, "mean", budget, 1.0)
    cands = candidate_sites(bundle, handle)
    p0, r0 = budget.passes, budget.rows
    t0 = time.perf_counter()
    tf = inc.evaluate_tf([InterventionSet((c,)) for c in cands])
    wall = time.perf_counter() - t0
    exact = np.array([r.metric - inc.baseline_metric for r in tf])
    fixing = [c.describe() for c, r in zip(cands, tf) if inc.fixed_tf(r)]
    est = inc.attribution([], cands)
    return {"cands": cands, "exact": exact, "est": est, "rows": budget.rows - r0, "passes": budget.passes - p0,
            "seconds": wall, "fixing_teacher_forced": fixing, "baseline_metric": inc.baseline_metric}


def _cf(bundle, handle):
    try:
        import engine.cf as cfmod
    except ModuleNotFoundError:
        return None, None
    t0 = time.perf_counter()
    res = cfmod.run_cf(bundle, handle)
    return res, time.perf_counter() - t0


def measure_scenario(name: str, workdir: Path) -> dict:
    from workbench.cli import build_scenario_bundle

    path = workdir / f"{name}.h5"
    with torch_threads(1):
        if not path.exists():
            build_scenario_bundle(scenarios.get(name), path)
        with open_bundle(path) as b:
            handle = load_bundle_model(b)
            cf, cf_seconds = _cf(b, handle)
            ours = _search(b, handle, floor=True, cf=cf)
            no_cf = _search(b, handle, cf=None)
            unranked = _search(b, handle, ranking="none")
            exhaustive = _search(b, handle, ranking="exhaustive")
            sw = _sweep(b, handle)
    cands, exact, est = sw["cands"], sw["exact"], sw["est"]
    order_est = [cands[i].describe() for i in np.argsort(est, kind="stable")]
    order_exact = [cands[i].describe() for i in np.argsort(exact, kind="stable")]
    chosen = ours["set"][0] if ours["set"] else None
    return {
        "scenario": name, "n_candidates": len(cands), "cf_seconds": cf_seconds,
        "ours": ours, "no_cf": no_cf, "no_ranking": unranked, "exhaustive_search": exhaustive,
        "sweep": {"rows": sw["rows"], "passes": sw["passes"], "seconds": sw["seconds"],
                  "fixing_teacher_forced": sw["fixing_teacher_forced"]},
        "ranking": {"spearman_all": stats.spearman(est, exact), "n": len(cands),
                    "chosen_site": chosen, "chosen_attribution_rank": order_est.index(chosen) + 1
                    if chosen in order_est else None,
                    "chosen_exact_rank": order_exact.index(chosen) + 1 if chosen in order_exact else None,
                    "top10_overlap": len(set(order_est[:10]) & set(order_exact[:10])),
                    "fixing_attribution_ranks": sorted(order_est.index(s) + 1 for s in sw["fixing_teacher_forced"])},
        "ratios": {"rows_vs_sweep": ours["rows"] / sw["rows"], "screen_rows_vs_sweep": ours["screen_rows"] / sw["rows"],
                   "passes_vs_sweep": ours["passes"] / sw["passes"],
                   "rows_vs_no_ranking": ours["rows"] / unranked["rows"],
                   "rows_vs_no_cf": ours["rows"] / no_cf["rows"],
                   "screen_rows_vs_no_cf": ours["screen_rows"] / no_cf["screen_rows"],
                   "cf_cut_rows": 1 - ours["rows"] / no_cf["rows"],
                   "cf_cut_screen_rows": 1 - ours["screen_rows"] / no_cf["screen_rows"],
                   "rows_vs_exhaustive_search": ours["rows"] / exhaustive["rows"],
                   "passes_vs_exhaustive_search": ours["passes"] / exhaustive["passes"],
                   "seconds_vs_sweep": ours["seconds"] / sw["seconds"] if sw["seconds"] else None,
                   "floor_vs_sweep": ours["floor"]["rows"] / sw["rows"]},
        "same_set": {"no_cf": no_cf["set"] == ours["set"], "no_ranking": unranked["set"] == ours["set"],
                     "exhaustive_search": exhaustive["set"] == ours["set"]},
    }


def time_cli(bundle: Path, threads: int) -> dict:
    """``forensics cca BUNDLE --json --threads N`` in a fresh process: wall time, exit code, the set, criteria."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "QT_QPA_PLATFORM": "offscreen"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "workbench.cli", "cca", str(bundle), "--json", "--threads",
                           str(threads)], capture_output=True, text=True, env=env, timeout=1800)
    wall = time.perf_counter() - t0
    d = json.loads(proc.stdout) if proc.stdout.strip() else {}
    return {"threads": threads if threads else torch.get_num_threads(), "wall_seconds": wall,
            "exit_code": proc.returncode, "cca_seconds": d.get("seconds"),
            "set": [f"L{e['layer']}.{e['component']}@{','.join(map(str, e['positions']))}" for e in d.get("fix_set", [])],
            "failed_criteria": [k for k, c in (d.get("criteria") or {}).items() if not c.get("ok")]}


def measure(names=SCENARIOS, cli: bool = True, workdir: Path | None = None) -> dict:
    """Every measurement above; bundles are recorded into ``workdir`` (a temporary folder when ``None``; an
    existing bundle there is reused)."""
    out = {"measured": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
           "torch": torch.__version__, "python": platform.python_version(),
           "load_average_start": os.getloadavg()[0], "scenarios": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(workdir) if workdir is not None else Path(tmp)
        for name in names:
            out["scenarios"][name] = measure_scenario(name, work)
            _print_scenario(out["scenarios"][name])
        if cli and DEMO in names:
            out["demo_cli"] = [time_cli(work / f"{DEMO}.h5", 1), time_cli(work / f"{DEMO}.h5", 0)]
    out["load_average_end"] = os.getloadavg()[0]
    return out


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


TARGET_VS_SWEEP = 0.10
TARGET_CF_CUT = 0.50


def _print_scenario(s: dict) -> None:
    o, sw, r, rk, ex = s["ours"], s["sweep"], s["ratios"], s["ranking"], s["exhaustive_search"]
    print(f"== {s['scenario']}: {s['n_candidates']} candidate sites; final set {', '.join(o['set']) or '-'}")
    print(f"   search to the final set (CF-guided, default): {o['passes']} passes, {o['rows']} rows "
          f"({o['screen_rows']} screening, {o['check_rows']} checks), {o['seconds']:.2f} s; "
          f"{o['candidates_resolved']} of {s['n_candidates']} sites resolved ({o['candidates_evaluated']} on their "
          f"own, the rest cleared by {o['group_tests']} group tests); {o['sets_checked']} fixing set(s) checked, "
          f"{o['sets_fully_checked']} on all {o['n_benign_reference']} benign reference prompts")
    print(f"   (a) raw single-site sweep, incident only, no checks: {sw['passes']} passes, {sw['rows']} rows, "
          f"{sw['seconds']:.2f} s")
    print(f"   (b) sweep + the same checks on its fixing sites (ranking='exhaustive'): {ex['passes']} passes, "
          f"{ex['rows']} rows ({ex['screen_rows']} screening, {ex['check_rows']} checks), {ex['seconds']:.2f} s; "
          f"same set: {'yes' if s['same_set']['exhaustive_search'] else 'NO: ' + ', '.join(ex['set'])}")
    for label, key in (("(b) like for like, judged", "rows_vs_exhaustive_search"), ("(a) raw sweep", "rows_vs_sweep")):
        v = r[key]
        ok = "met" if v <= TARGET_VS_SWEEP else f"MISSED by {100 * (v - TARGET_VS_SWEEP):.1f} points"
        print(f"   search rows / {label}: {_pct(v)} (target <= 10%: {ok})")
    print(f"   passes: search / (b) {_pct(r['passes_vs_exhaustive_search'])}, search / (a) {_pct(r['passes_vs_sweep'])}; "
          f"screening rows alone / (a) {_pct(r['screen_rows_vs_sweep'])}")
    fl = o["floor"]
    print(f"   floor: the final set's own checks alone (no search: an oracle that knew the set) {fl['rows']} rows "
          f"({fl['passes']} passes) = {_pct(r['floor_vs_sweep'])} of (a)"
          + (" -- above 10%: no method that checks its answer like this meets the target here"
             if r["floor_vs_sweep"] > TARGET_VS_SWEEP else ""))
    for key, label in (("no_cf", "without CF (positions by attribution)"),
                       ("no_ranking", "without CF/gradient ranking (listed order)")):
        x = s[key]
        print(f"   {label}: {x['passes']} passes, {x['rows']} rows ({x['screen_rows']} screening, "
              f"{x['check_rows']} checks), {x['seconds']:.2f} s, {x['candidates_evaluated']} sites on their own; "
              f"with CF / it = {_pct(o['rows'] / x['rows'])} of the rows; "
              f"same set: {'yes' if s['same_set'][key] else 'NO: ' + ', '.join(x['set'])}")
    for what, key in (("all rows", "cf_cut_rows"), ("screening rows", "cf_cut_screen_rows")):
        v = r[key]
        ok = "met" if v >= TARGET_CF_CUT else f"MISSED by {100 * (TARGET_CF_CUT - v):.1f} points"
        print(f"   CF cuts the search ({what}) by {_pct(v)} (target >= 50%: {ok})")
    sp = rk["spearman_all"]
    print(f"   attribution vs exact single-site effect: Spearman {'n/a' if sp is None else f'{sp:.3f}'} over "
          f"{rk['n']} sites; chosen site ranks {rk['chosen_attribution_rank']} by attribution, "
          f"{rk['chosen_exact_rank']} by exact effect; top-10 overlap {rk['top10_overlap']}/10; "
          f"attribution ranks of the {len(rk['fixing_attribution_ranks'])} single sites that fix teacher-forced: "
          f"{rk['fixing_attribution_ranks']}")
    if s["cf_seconds"] is not None:
        print(f"   CF (prior) computed in {s['cf_seconds']:.2f} s")
    sys.stdout.flush()


def print_summary(out: dict) -> None:
    """One line per target over every scenario: met, or what was missed and by how much."""
    sc = out["scenarios"]
    if not sc:
        return
    for key, label in (("rows_vs_exhaustive_search", "search rows <= 10% of sweep + same checks (judged)"),
                       ("rows_vs_sweep", "search rows <= 10% of the raw sweep (printed, not like for like)")):
        miss = {n: s["ratios"][key] for n, s in sc.items() if s["ratios"][key] > TARGET_VS_SWEEP}
        print(f"TARGET {label}: " + ("met on every scenario" if not miss else
              f"MISSED on {len(miss)} of {len(sc)}: " + "; ".join(f"{n} {_pct(v)}" for n, v in miss.items())))
    for key, label in (("cf_cut_rows", "CF cuts the search >= 50% (all rows)"),
                       ("cf_cut_screen_rows", "CF cuts the screening >= 50% (screening rows)")):
        miss = {n: s["ratios"][key] for n, s in sc.items() if s["ratios"][key] < TARGET_CF_CUT}
        print(f"TARGET {label}: " + ("met on every scenario" if not miss else
              f"MISSED on {len(miss)} of {len(sc)}: " + "; ".join(f"{n} cut {_pct(v)}" for n, v in miss.items())))
    floor = {n: s["ours"]["n_benign_reference"] for n, s in sc.items()}
    print("FLOOR common to the search and (b): the chosen set is checked on every benign reference prompt (" +
          ", ".join(f"{n} {k}" for n, k in floor.items()) + " prompts; generation incidents also confirm each "
          "prompt's own output once, about as many rows again); those checks alone, without any search, are " +
          ", ".join(f"{n} {_pct(s['ratios']['floor_vs_sweep'])}" for n, s in sc.items()) + " of the raw sweep's rows "
          "(benchmarks/cca_scaling.py measures where the ratio falls below 10% as the candidate space grows)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--json", help="write every measurement to this JSON file")
    ap.add_argument("--no-cli", action="store_true", help="skip timing forensics cca on the demo in a fresh process")
    ap.add_argument("--workdir", help="record bundles here (reused when present) instead of a temporary folder")
    args = ap.parse_args(argv)
    names = [n for n in args.scenarios.split(",") if n]
    out = measure(names, cli=not args.no_cli, workdir=Path(args.workdir) if args.workdir else None)
    print_summary(out)
    for c in out.get("demo_cli", []):
        ok = "met" if c["wall_seconds"] <= 60 else "MISSED"
        print(f"== forensics cca on the demo incident, {c['threads']} thread(s): {c['wall_seconds']:.1f} s wall "
              f"(CCA itself {c['cca_seconds'] if c['cca_seconds'] is None else round(c['cca_seconds'], 1)} s), "
              f"exit {c['exit_code']}, set {', '.join(c['set'])}; target <= 60 s: {ok}")
    print(f"load average {out['load_average_start']:.2f} at start, {out['load_average_end']:.2f} at end "
          f"({out['machine']}; shared machine: wall times are noisy)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=float), encoding="utf-8")
        print(f"written {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
