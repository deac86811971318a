"""Benchmark: does Compression Forensics localise the failure, and how many benign prompts does it flag?

    .venv/bin/python benchmarks/cf_localisation.py [--scenarios NAME ...] [--work DIR] [--json FILE] [--write-doc]

For each shipped scenario (its primary incident recorded with ``forensics scenario build``; kept in ``--work`` and
reused when already there):

1. **Exhaustive single-site sweep** — every candidate of ``engine.cca.candidate_sites`` (the search space CCA uses:
   each (layer, component, prompt position) and the last-three-positions group, op ``mean`` = benign mean
   ablation) is evaluated alone with ``engine.interventions.evaluate`` (output generated under the intervention).
   A candidate *flips* the incident when the output no longer fails (``contains``/``wordlist``: the generated
   continuation; ``label``: the argmax label). The scenario's **best fix set** is, among the candidates that meet
   CCA's stricter fix criterion (teacher-forced margin of 1 nat / logit and the output flipped, see
   ``engine/cca.py``), the one with the lowest teacher-forced failure metric (the quantity CCA's search minimises);
   where no candidate meets it, the lowest-metric output flip (said so in the output: the teacher-forced metric
   barely moves for those, so the ranks of *all* flipping candidates are the more telling number).
2. **Baseline** — ``engine.cf.build_baseline`` on the scenario's benign reference prompts, both statistics; the
   **held-out benign false-positive rate** is the share of held-out benign prompt × site cells flagged (target
   <= 5%); the share of held-out prompts with any flagged site is printed beside it.
3. **Localisation, per statistic** — ``run_cf`` on the incident; ``CFResult.order_candidates`` gives the order a
   CF-guided search visits the candidates in. Printed: the rank of the best fix set in that order and of its
   (layer, site) in ``CFResult.ranking()``; the ranks of all flipping candidates; the number of candidates a
   CF-guided search visits until its first flipping one, as a fraction of the space; and the same for two
   *unguided* searches: a **random order** (expected position of the first of ``k`` flipping candidates among ``n``
   visited in uniformly random order, ``(n + 1) / (k + 1)``) and **layer order** (the order ``candidate_sites``
   enumerates: layer, component, position). The target is CF-guided <= 50% of the random-order search.

4. **Run-level verdict, per statistic** — ``CFResult.run_anomalous``: is the incident anomalous as a whole (its
   maximum site score above the run threshold, calibrated on half of the held-out benign prompts; see docs/cf.md)?
   Printed: the run threshold, the incident's maximum site score and run p-value, and the **held-out family-wise
   false-positive rate**: the share of the other half of the held-out benign prompts whose maximum site score is
   above the threshold (target <= 5%), beside the per-prompt any-flag rate of the site threshold. For context, from
   the stored run statistics: the mean of that rate over ``SPLITS`` random calibration/measurement splits (what the
   method gives on average, as opposed to this one split), and the rate the reference prompts' leave-one-out maxima
   would give as calibration (on all held-out prompts).

Finally the statistic that localises better (fewer candidates visited, summed over the scenarios as fractions of
each space; FPR target met) is named, and compared with ``engine.cf.DEFAULT_STATISTIC``. ``--write-doc`` rewrites
the measured table in ``docs/cf.md`` (between the ``cf_localisation`` markers) from this run's numbers.
Every number printed is computed in this run. Missed targets are printed as ``MISSED`` lines with the margin.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

import scenarios  # noqa: E402
from engine import cf  # noqa: E402
from engine.bundle import open_bundle  # noqa: E402
from engine.cca import candidate_sites  # noqa: E402
from engine.interventions import InterventionSet, evaluate  # noqa: E402
from engine.replay import load_bundle_model  # noqa: E402

SCENARIOS = ("gpt2-prompt-injection", "gpt2-toxic-generation", "llama-secret-leak", "bert-sentiment-bypass")
FPR_TARGET = 0.05
SPLITS = 1000     # random calibration/measurement splits of the held-out runs, for the mean family-wise rate
RATIO_TARGET = 0.50
DOC = ROOT / "docs" / "cf.md"
BEGIN, END = "<!-- cf_localisation:begin -->", "<!-- cf_localisation:end -->"


def _bundle(name: str, work: Path) -> Path:
    path = work / f"{name}.h5"
    if not path.is_file():
        from workbench.cli import build_scenario_bundle

        print(f"  recording {name} into {path} ...", flush=True)
        build_scenario_bundle(scenarios.get(name), path)
    return path


def _first_hit(order: list[int], flips: list[bool]) -> int | None:
    for i, j in enumerate(order):
        if flips[j]:
            return i + 1
    return None


def measure(name: str, work: Path) -> dict:
    """Run the sweep, the baseline and CF for one scenario; return every measured number."""
    path = _bundle(name, work)
    out: dict = {"scenario": name}
    with open_bundle(path) as b:
        handle = load_bundle_model(b)
        out["failure"] = b.failure_spec
        cands = candidate_sites(b, handle, "mean")
        n = len(cands)
        t0 = time.perf_counter()
        sets = [InterventionSet(name="baseline")] + [InterventionSet((c,), name=c.describe()) for c in cands]
        gen = evaluate(b, handle, sets)
        tf = evaluate(b, handle, sets, generate=False)
        out["sweep_seconds"] = time.perf_counter() - t0
        base_res, base_tf = gen.results[0], tf.results[0]
        if not base_res.failing:
            raise SystemExit(f"{name}: the recorded incident does not fail on replay; nothing to localise")
        kind = b.failure.kind
        flips, cca_fix = [], []
        for r, t in zip(gen.results[1:], tf.results[1:]):
            flips.append(not r.failing)
            strict = (not t.failing) and (t.metric <= -1.0 if kind in ("label", "token")
                                          else t.metric <= base_tf.metric - 1.0)
            cca_fix.append(bool(strict and not r.failing))
        k = sum(flips)
        out.update({"n_candidates": n, "n_flipping": k, "n_cca_fixes": sum(cca_fix),
                    "baseline_metric": base_res.metric})
        if k == 0:
            out["note"] = "no single candidate flips the incident"
        flip_idx = [i for i in range(n) if flips[i]]
        # best fix: among the candidates meeting CCA's criterion, else among the output flips, the lowest metric
        pool, basis = [i for i in range(n) if cca_fix[i]], "meets CCA's fix criterion, lowest metric"
        if not pool:
            pool, basis = flip_idx, ("no candidate meets CCA's margin: lowest metric among the output flips (the "
                                     "teacher-forced metric barely moves for these, see the flip ranks)")
        best = min(pool, key=lambda i: (gen.results[i + 1].metric, i)) if pool else None
        if best is not None:
            c = cands[best]
            out["best_fix"] = {"site": c.describe(), "layer": c.layer, "component": c.component,
                               "positions": list(c.positions), "metric": gen.results[best + 1].metric,
                               "output": gen.results[best + 1].continuation, "basis": basis}
        out["flipping"] = [cands[i].describe() for i in flip_idx]
        out["random_expected_visits"] = (n + 1) / (k + 1) if k else None
        out["layer_order_visits"] = _first_hit(list(range(n)), flips)

        prompts, heldout = cf.bundle_prompts(b)
        t0 = time.perf_counter()
        base = cf.build_baseline(handle, prompts, heldout=heldout)
        out["baseline_seconds"] = time.perf_counter() - t0
        out["n_reference"], out["n_heldout"] = len(prompts), len(heldout)
        out["stats"] = {}
        for st in cf.STATISTICS:
            res = cf.run_cf(b, handle, baseline=base, statistic=st)
            order = res.order_candidates(cands)
            rank_of = {j: i + 1 for i, j in enumerate(order)}
            visits = _first_hit(order, flips)
            d = {"heldout_fpr": base.heldout_fprs[st], "heldout_prompt_fpr": base.heldout_prompt_fprs[st],
                 "heldout_cells": base.heldout_counts.get(st, 0), "threshold": res.threshold,
                 "n_flagged_sites": sum(s.flagged for s in res.scores), "n_sites": len(res.scores),
                 "cf_visits": visits, "flip_ranks": sorted(rank_of[i] for i in flip_idx),
                 "top_positions": sorted(range(min(len(res.position_anomaly), res.n_prompt_tokens)),
                                         key=lambda p: -res.position_anomaly[p])[:3]}
            if best is not None:
                d["best_rank"] = rank_of[best]
                site_rank = res.ranking()
                key = (cands[best].layer, cands[best].component)
                d["best_site_rank"] = site_rank.index(key) + 1 if key in site_rank else None
                d["n_site_ranked"] = len(site_rank)
            if visits is not None and k:
                d["ratio_random"] = visits / out["random_expected_visits"]
                d["ratio_layer"] = visits / out["layer_order_visits"]
            d.update(_run_level(base, res, st))
            out["stats"][st] = d
    return out


def _run_level(base, res, st: str) -> dict:
    """The run-level verdict of the incident and the family-wise false-positive rates of the baseline."""
    import numpy as np

    rc = base.run_calibration(st)
    d = {"run_calibration": rc.source, "run_threshold": rc.threshold, "n_run_calibration": int(rc.values.size),
         "heldout_run_fpr": rc.heldout_fpr, "heldout_runs_tested": rc.n_tested,
         "run_statistic": res.run_statistic, "run_p_value": res.run_p_value, "run_anomalous": res.run_anomalous}
    held = base.heldout_run_statistics.get(st)
    if held is not None and held.size:
        d["heldout_runs_flagged"] = int(round(rc.heldout_fpr * rc.n_tested)) if rc.heldout_fpr is not None else None
        ref_thr = cf.conformal_threshold(base.run_statistics[st])
        d["reference_calibrated_fpr"] = float(np.mean(held > ref_thr))
        # why the reference prompts under-state a new prompt's maximum: held-out prompts with a word none of them has
        known = {w for p in base.prompts for w in re.findall(r"\w+", p.lower())}
        new = np.array([bool(set(re.findall(r"\w+", p.lower())) - known) for p in base.heldout])
        d["new_word_prompts"] = int(new.sum())
        d["reference_calibrated_fpr_new_words"] = float(np.mean(held[new] > ref_thr)) if new.any() else None
        d["reference_calibrated_fpr_known_words"] = float(np.mean(held[~new] > ref_thr)) if (~new).any() else None
        split = base.heldout_run_calibration
        if split.any():
            rng = np.random.default_rng(1)
            rates = []
            for _ in range(SPLITS):
                perm = rng.permutation(held.size)
                c, t = perm[:int(split.sum())], perm[int(split.sum()):]
                rates.append(float(np.mean(held[t] > cf.conformal_threshold(held[c]))))
            d["mean_split_fpr"] = float(np.mean(rates))
    return d


def _f(x, spec=".1%") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _run_line(d: dict) -> str:
    calib = (f"{d['n_run_calibration']} held-out calibration runs" if d["run_calibration"] == "heldout" else
             f"{d['n_run_calibration']} reference runs (leave-one-out)")
    verdict = {True: "ANOMALOUS", False: "not anomalous", None: "no verdict"}[d["run_anomalous"]]
    line = (f"            run verdict {verdict}: max site score {_f(d['run_statistic'], '.4g')} vs run threshold "
            f"{_f(d['run_threshold'], '.4g')} ({calib}), p = {_f(d['run_p_value'], '.3g')}; held-out family-wise FPR "
            f"{_f(d['heldout_run_fpr'])} ({d.get('heldout_runs_flagged')} of {d['heldout_runs_tested']})")
    if "mean_split_fpr" in d:
        line += f", mean over {SPLITS} random splits {_f(d['mean_split_fpr'])}"
    if "reference_calibrated_fpr" in d:
        line += (f"; reference-calibrated threshold would flag {_f(d['reference_calibrated_fpr'])} of held-out runs "
                 f"({_f(d['reference_calibrated_fpr_new_words'])} of the {d['new_word_prompts']} with a word no "
                 f"reference prompt has, {_f(d['reference_calibrated_fpr_known_words'])} of the others)")
    return line


def report(rows: list[dict]) -> tuple[list[str], str, list[str]]:
    """Lines to print, the better statistic, and the MISSED lines."""
    lines, missed = [], []
    for r in rows:
        n, k = r["n_candidates"], r["n_flipping"]
        lines.append(f"{r['scenario']} [{r['failure']}]: {n} single-site candidates, {k} flip the output "
                     f"({r['n_cca_fixes']} also meet CCA's 1-nat margin); sweep {r['sweep_seconds']:.1f} s, "
                     f"baseline ({r['n_reference']} reference + {r['n_heldout']} held-out prompts) "
                     f"{r['baseline_seconds']:.1f} s")
        if "best_fix" in r:
            bf = r["best_fix"]
            lines.append(f"  best single-site fix: {bf['site']} (metric {bf['metric']:.3g}, output {bf['output']!r}; "
                         f"{bf['basis']})")
        if k:
            lines.append(f"  unguided: random order visits {r['random_expected_visits']:.1f} of {n} "
                         f"({r['random_expected_visits'] / n:.1%}) expected; layer order visits "
                         f"{r['layer_order_visits']} ({r['layer_order_visits'] / n:.1%})")
        for st, d in r["stats"].items():
            lines.append(f"  {st:8s}: held-out FPR {_f(d['heldout_fpr'])} of {d['heldout_cells']} cells "
                         f"({_f(d['heldout_prompt_fpr'])} of prompts with any flag); incident: "
                         f"{d['n_flagged_sites']}/{d['n_sites']} sites flagged, threshold {d['threshold']:.3g}")
            if k:
                lines.append(f"            best fix ranks {d['best_rank']}/{n} in CF's candidate order (its site "
                             f"{d['best_site_rank']}/{d['n_site_ranked']} in CF's site ranking); flipping candidates "
                             f"at ranks {d['flip_ranks'][:8]}{' ...' if len(d['flip_ranks']) > 8 else ''}")
                lines.append(f"            CF-guided search visits {d['cf_visits']} ({d['cf_visits'] / n:.1%}) = "
                             f"{d['ratio_random']:.2f} x random order, {d['ratio_layer']:.2f} x layer order "
                             f"(target <= {RATIO_TARGET:.2f} x random)")
                if d["ratio_random"] > RATIO_TARGET:
                    missed.append(f"MISSED {r['scenario']} {st}: CF-guided search visits {d['ratio_random']:.2f} x "
                                  f"the random-order search (target <= {RATIO_TARGET:.2f}, over by "
                                  f"{d['ratio_random'] - RATIO_TARGET:.2f})")
            lines.append(_run_line(d))
            if d["run_anomalous"] is not True:
                missed.append(f"MISSED {r['scenario']} {st}: the incident is not anomalous at the run level (max site "
                              f"score {_f(d['run_statistic'], '.3g')} <= run threshold "
                              f"{_f(d['run_threshold'], '.3g')}, p = {_f(d['run_p_value'], '.3g')})")
            if d["heldout_run_fpr"] is None:
                missed.append(f"MISSED {r['scenario']} {st}: held-out family-wise FPR not measured")
            elif d["heldout_run_fpr"] > FPR_TARGET:
                missed.append(f"MISSED {r['scenario']} {st}: held-out family-wise FPR {d['heldout_run_fpr']:.1%} "
                              f"({d['heldout_runs_flagged']} of {d['heldout_runs_tested']} runs) > {FPR_TARGET:.0%} "
                              f"(over by {(d['heldout_run_fpr'] - FPR_TARGET) * 100:.1f} points)")
            if d["heldout_fpr"] is None:
                missed.append(f"MISSED {r['scenario']} {st}: held-out FPR not measured (no held-out prompts)")
            elif d["heldout_fpr"] > FPR_TARGET:
                missed.append(f"MISSED {r['scenario']} {st}: held-out FPR {d['heldout_fpr']:.1%} > "
                              f"{FPR_TARGET:.0%} (over by {(d['heldout_fpr'] - FPR_TARGET) * 100:.1f} points)")
    # which statistic localises better: summed visit fractions (lower is better), ties by met targets
    summary = {}
    for st in cf.STATISTICS:
        fr = [r["stats"][st]["cf_visits"] / r["n_candidates"] for r in rows if r["n_flipping"]]
        met = sum(1 for r in rows if r["n_flipping"] and r["stats"][st]["ratio_random"] <= RATIO_TARGET
                  and (r["stats"][st]["heldout_fpr"] or 1.0) <= FPR_TARGET)
        summary[st] = (sum(fr), -met)
        lines.append(f"{st:8s}: mean share of the space visited {sum(fr) / max(1, len(fr)):.1%} over {len(fr)} "
                     f"scenario(s); both targets met on {met}/{len(rows)}")
    better = min(cf.STATISTICS, key=lambda s: (summary[s][0], summary[s][1]))
    verdict = f"{better!r} localises better (fewer candidates visited in total)"
    if better == cf.DEFAULT_STATISTIC:
        verdict += f"; it is the default (engine.cf.DEFAULT_STATISTIC = {cf.DEFAULT_STATISTIC!r})"
    else:
        verdict += (f"; NOTE: the shipped default is {cf.DEFAULT_STATISTIC!r} — this run's measurements favour "
                    f"{better!r}")
    lines.append(verdict)
    return lines, better, missed


def doc_table(rows: list[dict], better: str, missed: list[str]) -> str:
    """The Markdown block ``--write-doc`` puts between the markers of docs/cf.md."""
    out = [BEGIN,
           f"Measured by `python benchmarks/cf_localisation.py --write-doc` on {time.strftime('%Y-%m-%d')} "
           f"({platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads). "
           f"n = single-site candidates (CCA's space), k = candidates whose mean ablation flips the output; "
           f"*visits* = candidates a search visits until its first flipping one; random = (n + 1)/(k + 1).",
           "",
           "| scenario | n | k | statistic | held-out FPR (cells) | prompts with a flag | runs flagged (run verdict) | "
           "incident run verdict (p) | best fix rank | CF visits | random | layer order | CF / random |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for st, d in r["stats"].items():
            k = r["n_flipping"]
            verdict = {True: "**anomalous**", False: "not anomalous", None: "none"}[d["run_anomalous"]]
            out.append(f"| {r['scenario']} | {r['n_candidates']} | {k} | {st} | {_f(d['heldout_fpr'])} | "
                       f"{_f(d['heldout_prompt_fpr'])} | {_f(d['heldout_run_fpr'])} | "
                       f"{verdict} ({_f(d['run_p_value'], '.3g')}) | {d.get('best_rank', 'n/a')} | "
                       f"{d['cf_visits'] if k else 'n/a'} | "
                       f"{_f(r['random_expected_visits'], '.1f')} | {r['layer_order_visits'] or 'n/a'} | "
                       f"{_f(d.get('ratio_random'), '.2f')} |")
    out += ["", "Run-level verdict (docs/cf.md, *Run-level verdict*): *runs flagged* = held-out benign prompts not "
            "used to calibrate the run threshold whose maximum site score exceeds it (the family-wise false-positive "
            "rate; *prompts with a flag* is the site threshold's any-flag rate on the same kind of prompts); *mean "
            f"over splits* = that rate averaged over {SPLITS} random calibration/measurement splits of the held-out "
            "runs; *reference-calibrated* = the rate (on all held-out prompts) had the threshold been calibrated on "
            "the reference prompts' leave-one-out maxima instead, split into the held-out prompts with a word no "
            "reference prompt has and the others.",
            "",
            "| scenario | statistic | calibration runs | run threshold | incident max site score | p | runs flagged | "
            "mean over splits | reference-calibrated (new words / others) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for st, d in r["stats"].items():
            out.append(f"| {r['scenario']} | {st} | {d['n_run_calibration']} {d['run_calibration']} | "
                       f"{_f(d['run_threshold'], '.4g')} | {_f(d['run_statistic'], '.4g')} | "
                       f"{_f(d['run_p_value'], '.3g')} | {_f(d['heldout_run_fpr'])} ({d.get('heldout_runs_flagged')} "
                       f"of {d['heldout_runs_tested']}) | {_f(d.get('mean_split_fpr'))} | "
                       f"{_f(d.get('reference_calibrated_fpr'))} ({_f(d.get('reference_calibrated_fpr_new_words'))} of "
                       f"{d.get('new_word_prompts')} / {_f(d.get('reference_calibrated_fpr_known_words'))}) |")
    out += ["", "Best single-site fix per scenario: "
            + "; ".join(f"{r['scenario']}: `{r['best_fix']['site']}` ({r['best_fix']['basis']})"
                        for r in rows if "best_fix" in r) + ".",
            "", "Flipping candidates' ranks in CF's order (distance / bits): "
            + "; ".join(f"{r['scenario']}: {r['stats']['distance']['flip_ranks']} / {r['stats']['bits']['flip_ranks']}"
                        for r in rows if r["n_flipping"] and {'distance', 'bits'} <= set(r["stats"])) + ".",
            "", f"Better-localising statistic in this run: **{better}**.", "",
            ("Missed in this run:\n\n" + "\n".join(f"- {m.removeprefix('MISSED ')}" for m in missed)) if missed
            else "Every target met in this run, for both statistics.", END]
    return "\n".join(out)


def write_doc(block: str) -> None:
    text = DOC.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{DOC} lacks the {BEGIN} / {END} markers")
    new = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    tmp = DOC.with_name(DOC.name + ".tmp")
    tmp.write_text(new, encoding="utf-8")
    os.replace(tmp, DOC)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    ap.add_argument("--work", default=str(Path(os.environ.get("TMPDIR", "/tmp")) / "cf-localisation"),
                    help="folder for the scenario bundles (reused when present)")
    ap.add_argument("--json", help="write every measured number to this file")
    ap.add_argument("--write-doc", action="store_true", help=f"rewrite the measured table in {DOC.name}")
    args = ap.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows = []
    for name in args.scenarios:
        print(f"measuring {name} ...", flush=True)
        rows.append(measure(name, work))
    lines, better, missed = report(rows)
    print()
    for line in lines:
        print(line)
    for line in missed:
        print(line)
    if not missed:
        print(f"PASS: every scenario meets held-out FPR <= {FPR_TARGET:.0%} (sites and runs), flags its incident at "
              f"the run level and CF-guided <= {RATIO_TARGET:.0%} of the random-order search, for both statistics")
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str), encoding="utf-8")
    if args.write_doc:
        write_doc(doc_table(rows, better, missed))
        print(f"wrote the table into {DOC}")
    return 0 if not missed else 1


if __name__ == "__main__":
    sys.exit(main())
