"""Mutation audit of the test suite: does a test fail when a number the product prints is computed wrongly?

Each mutant below changes one line of the engine or the GUI the way a plausible bug would (a reversed KL, a
two-sided test where a one-sided one is documented, a verifier that accepts any flip rate, controls that keep the
fix's positions, ...). The audit copies the tracked files of this checkout (uncommitted edits included) to a
temporary folder, applies one mutant at a time and runs the test files that cover that code with ``pytest -x``. A
mutant is KILLED when a test fails, SURVIVED when they all pass; PATTERN means the line it changes is no longer in
the source (update the mutant). Only the named test files run, so a SURVIVED mutant may still be caught elsewhere
in the suite: run the whole suite on it before concluding (``--full NAME``).

    .venv/bin/python scripts/mutation_audit.py               # every mutant (about 25 minutes on 2 cores)
    .venv/bin/python scripts/mutation_audit.py kl-reverse     # some of them, by name
    .venv/bin/python scripts/mutation_audit.py --full prune-off   # one mutant against the whole suite
    .venv/bin/python scripts/mutation_audit.py --list

Exit status: 0 when every mutant run was killed, 1 otherwise. docs/testing.md records the last audit.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STATS = ["tests/test_stats_audit.py", "tests/test_cca.py"]
CCA = ["tests/test_cca.py", "tests/test_cca_audit.py", "tests/test_cca_planted.py", "tests/test_stats_audit.py"]
CF = ["tests/test_cf.py", "tests/test_cf_audit.py"]
REPLAY = ["tests/test_scenario_replay.py", "tests/test_bundle.py", "tests/test_layout.py"]
IV = ["tests/test_interventions.py"]
CERT = ["tests/test_certificate.py", "tests/test_cli_certify.py"]
GUI = ["tests/gui/test_review_view.py", "tests/gui/test_editor.py"]
SAVE = ["tests/gui/test_saved_results.py", "tests/gui/test_export.py"]
RECORD = ["tests/gui/test_record.py"]
CLI = ["tests/test_cli.py"]
CHOOSER = ["tests/test_cca_chooser.py", *CCA]
BEAM = ["tests/test_cca_beam.py", *CCA]

BOUND = 'return (r["benign_reference_changed"], 1 if su is False else 0, r["component_rank"], r["metric"])'

#: (name, file, original text, mutated text, test files)
MUTANTS: list[tuple[str, str, str, str, list[str]]] = [
    # engine/stats.py
    ("wilson-centre", "engine/stats.py", "centre = (p + z * z / (2 * n)) / den", "centre = (p + z * z / n) / den",
     STATS),
    ("emp-p-plus1", "engine/stats.py", "return (1 + hits) / (1 + c.size)", "return hits / max(1, c.size)", STATS),
    ("emp-p-strict", "engine/stats.py", "int(np.sum(c >= observed)) if greater", "int(np.sum(c > observed)) if greater",
     STATS),
    ("bh-by", "engine/stats.py", 'method="bh"', 'method="by"', STATS),
    ("binom-2sided", "engine/stats.py", "alternative=alternative).pvalue", 'alternative="two-sided").pvalue', STATS),
    # engine/cca.py: the evidence
    ("one-minimal-any", "engine/cca.py", "all(e.drop_one_failing for e in elements)",
     "any(e.drop_one_failing for e in elements)", CCA),
    ("fraction-head", "engine/cca.py", "width = len(iv.indices) * handle.d_head", "width = len(iv.indices)", CCA),
    ("side-changed-failing", "engine/cca.py", '"changed": o[0]["output"] != o[1]["output"]',
     '"changed": o[0]["failing"] != o[1]["failing"]', CCA),
    ("kl-reverse", "engine/cca.py", "kl = float((lp0.exp() * (lp0 - lp1)).sum().clamp_min(0.0))",
     "kl = float((lp1.exp() * (lp1 - lp0)).sum().clamp_min(0.0))", CCA),
    ("suff-all", "engine/cca.py", 'recreated = [o for o in benign if o[1]["failing"]]', "recreated = list(benign)",
     CCA),
    ("flip-all", "engine/cca.py", 'flips = {i: not out[i][1]["failing"] for i in fail_idx}',
     "flips = {i: True for i in fail_idx}", CCA),
    ("fix-margin-0", "engine/cca.py", "FIX_MARGIN = 1.0 ", "FIX_MARGIN = 0.0 ", CCA),
    ("fdr-side-greater", "engine/cca.py", 'TARGETS["side_effect_rate"], "less")',
     'TARGETS["side_effect_rate"], "greater")', CCA),
    ("fdr-unadjusted", "engine/cca.py", "res.fdr = stats.bh_adjust(ps)", "res.fdr = dict(ps)", CCA),
    ("wilson-call", "engine/cca.py", "res.flip_rate_ci = stats.wilson_interval(k, n) if n else",
     "res.flip_rate_ci = (k / n, k / n) if n else", CCA),
    ("budget-passes", "engine/cca.py", "        self.passes += int(passes)\n", "        self.passes += 0\n", CCA),
    ("prune-off", "engine/cca.py", "            _prune(fix, inc.fixed, dropped)", "            pass", CCA),
    # engine/cca.py: which of the sets that fix is reported (_Chooser)
    ("chooser-rank-first", "engine/cca.py", BOUND,
     'return (r["component_rank"], r["benign_reference_changed"], 1 if su is False else 0, r["metric"])', CHOOSER),
    ("chooser-no-sufficiency", "engine/cca.py", BOUND,
     'return (r["benign_reference_changed"], 0, r["component_rank"], r["metric"])', CHOOSER),
    ("chooser-weakest-metric", "engine/cca.py", BOUND,
     'return (r["benign_reference_changed"], 1 if su is False else 0, r["component_rank"], -r["metric"])', CHOOSER),
    ("chooser-first-block", "engine/cca.py", 'and r["n_run"] >= self.n_ref\n',
     'and r["n_run"] >= min(self.n_ref, self.FIRST_BLOCK)\n', CHOOSER),
    # engine/cca.py: which sets the beam search tries (_Search.extend)
    ("beam-overlap", "engine/cca.py", "pool = [c for c in self.cands if not any(_overlaps(c, b) for b in base)]",
     "pool = list(self.cands)", BEAM),
    ("beam-rank-reversed", "engine/cca.py", 'np.argsort(score, kind="stable")[:self.top_m]',
     'np.argsort(-score, kind="stable")[:self.top_m]', BEAM),
    ("beam-keeps-fixing", "engine/cca.py", "(self.evaluated[_skey(s)] for s in ext) if t[1] > -self.inc.margin)",
     "(self.evaluated[_skey(s)] for s in ext))", BEAM),
    ("beam-keeps-weakest", "engine/cca.py",
     "for s in ext) if t[1] > -self.inc.margin),\n                      key=lambda t: t[1])",
     "for s in ext) if t[1] > -self.inc.margin),\n                      key=lambda t: -t[1])", BEAM),
    # engine/cca.py: a clean residual-stream fix's position screened for a narrower one
    ("resid-block-off", "engine/cca.py",
     'if best is not None and all(iv.component in ("resid_pre", "resid_post") for iv in best["set"]):',
     "if False:", CCA),
    # engine/cca.py: sublayer unions (sites that fix only all together)
    ("union-off", "engine/cca.py", "            srch.sublayer_unions(max_size)", "            pass", CCA),
    ("union-any-size", "engine/cca.py", "if 2 <= len(cur) <= max_size:", "if 2 <= len(cur):", CCA),
    # engine/cca.py: the random control sets
    ("ctrl-same-positions", "engine/cca.py", "pos = tuple(sorted(rng.sample(range(n_prompt), k)))",
     "pos = iv.positions if iv.positions == 'all' else tuple(iv.positions)", CCA),
    ("ctrl-same-layer", "engine/cca.py", "L = rng.randrange(n_layers)",
     "L = iv.layer if rng.random() < 0.5 else rng.randrange(n_layers)", CCA),
    ("ctrl-units", "engine/cca.py", "idx = tuple(sorted(rng.sample(range(n_units[iv.component]), len(idx))))",
     "idx = idx", CCA),
    # engine/cf.py
    ("conformal-k", "engine/cf.py", "k = math.ceil(round(quantile * (v.size + 1), 9))",
     "k = math.ceil(round(quantile * v.size, 9))", CF),
    ("cf-robust-q", "engine/cf.py", "max(float(np.quantile(v, 0.95)) - m, floor)",
     "max(float(np.quantile(v, 0.75)) - m, floor)", CF),
    ("cf-zscore", "engine/cf.py", "return ((np.asarray(x, dtype=np.float64) - center) / scale).astype(np.float32)",
     "return ((np.asarray(x, dtype=np.float64) - center)).astype(np.float32)", CF),
    # engine/replay.py, engine/recorder.py
    ("replay-logits-close", "engine/replay.py", "same = np.array_equal(got, b.logits)",
     "same = bool(np.allclose(got, b.logits, atol=1e-3))", REPLAY),
    ("replay-weights", "engine/replay.py", 'checks.append(Check("weights", sha == b.model_info["weights_sha256"],',
     'checks.append(Check("weights", True,', REPLAY),
    ("rec-threads", "engine/recorder.py", '"torch_num_threads": int(threads or torch.get_num_threads()),',
     '"torch_num_threads": 1,', REPLAY),
    # engine/interventions.py
    ("iv-scale", "engine/interventions.py", "new = view * iv.value", "new = view * abs(iv.value)", IV),
    ("iv-mean-zero", "engine/interventions.py", "new = m if idx is None else", "new = m * 0 if idx is None else", IV),
    # engine/certificate.py: verification
    ("cert-bundle-sha", "engine/certificate.py", 'claims.append(Claim("bundle sha256", sha == inc["bundle_sha256"],',
     'claims.append(Claim("bundle sha256", True,', CERT),
    ("cert-flip-ci", "engine/certificate.py",
     'ok = lo - 1e-9 <= fr <= hi + 1e-9 and new.n_variants == cca["n_variants"]', "ok = True", CERT),
    ("cert-side-tol", "engine/certificate.py", "ok = abs(now - then) <= 1.0 / n + 1e-9",
     "ok = abs(now - then) <= 0.5 + 1e-9", CERT),
    ("cert-fraction", "engine/certificate.py", "ok = _close(fa_now, fa_then, (1e-12, 1e-9))", "ok = True", CERT),
    ("cert-1min", "engine/certificate.py", 'if bool(new.one_minimal) != bool(cca.get("one_minimal")):', "if False:",
     CERT),
    ("cert-metric", "engine/certificate.py", "if not _close(now, then, METRIC_TOL)]", "if False]", CERT),
    # the command line and the GUI
    ("cli-replay-exit", "workbench/cli.py", "    return EXIT_OK if report.bit_identical else EXIT_DIFFERS",
     "    return EXIT_OK", CLI),
    ("review-all-rows", "workbench/views/review_view.py",
     "        ivs = [self.result.fix_set[r].intervention for r in rows]",
     "        ivs = [e.intervention for e in self.result.fix_set]", GUI),
    ("review-controls", "workbench/views/review_view.py",
     "bundle, session, n_controls = self.session.bundle, self.session, self.controls.value()",
     "bundle, session, n_controls = self.session.bundle, self.session, 200", GUI),
    ("editor-fixed", "workbench/views/editor.py",
     '        elif b.failing and not a.failing:\n            text, color = "FIXED',
     '        elif b.failing:\n            text, color = "FIXED', GUI),
    # saving results and the unsaved-results question; the record dialog's checks; the replay report
    ("unsaved-cancel", "workbench/app.py", '        return answer == "discard"', "        return True", SAVE),
    ("unsaved-any-export", "workbench/views/export.py", "and Path(path) == own.get(kind)):", "):", SAVE),
    ("record-twins", "workbench/views/record.py",
     'if len(read["variant_counterparts"]) != len(read["variants"]):', "if False:", RECORD),
    ("replay-verdict", "workbench/app.py",
     'verdict = "BIT-IDENTICAL" if report.bit_identical else "DIFFERS"', 'verdict = "BIT-IDENTICAL"',
     ["tests/gui/test_window.py"]),
]


def _copy_checkout(dst: Path) -> None:
    """The tracked and untracked-but-not-ignored files of this checkout (as they are on disk) into ``dst``."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


def _run(work: Path, tests: list[str], timeout: int) -> tuple[int, str, float]:
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen", PYTHONDONTWRITEBYTECODE="1")
    env["PYTHONPATH"] = str(work) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests], cwd=work,
                       capture_output=True, text=True, timeout=timeout, env=env)
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    first = next((ln for ln in lines if ln.startswith("FAILED")), lines[-1] if lines else "")
    return r.returncode, first, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="mutants to run (default: all)")
    ap.add_argument("--full", action="store_true", help="run the whole test suite on each mutant, not its files")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per mutant (default 3600)")
    args = ap.parse_args(argv)
    known = {m[0] for m in MUTANTS}
    unknown = [n for n in args.names if n not in known]
    if unknown:
        print(f"error: unknown mutant(s): {', '.join(unknown)} (see --list)", file=sys.stderr)
        return 2
    chosen = [m for m in MUTANTS if not args.names or m[0] in args.names]
    if args.list:
        for name, path, *_ , tests in chosen:
            print(f"{name:22s} {path:32s} {' '.join(tests)}")
        return 0
    survived = 0
    with tempfile.TemporaryDirectory(prefix="mutation-audit-") as tmp:
        work = Path(tmp)
        _copy_checkout(work)
        for name, rel, old, new, tests in chosen:
            path = work / rel
            src = path.read_text(encoding="utf-8")
            if src.count(old) != 1:
                print(f"{name:22s} PATTERN   (found {src.count(old)} times in {rel}: update the mutant)", flush=True)
                survived += 1
                continue
            path.write_text(src.replace(old, new), encoding="utf-8")
            try:
                rc, first, secs = _run(work, [] if args.full else tests, args.timeout)
            except subprocess.TimeoutExpired:
                rc, first, secs = -1, "timed out", float(args.timeout)
            finally:
                path.write_text(src, encoding="utf-8")
            killed = rc not in (0, -1)
            survived += not killed
            print(f"{name:22s} {'KILLED  ' if killed else 'SURVIVED'}  {secs:5.0f} s  {first}", flush=True)
    return 0 if survived == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
