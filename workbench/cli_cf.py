"""``forensics cf`` and ``forensics baseline``: Compression Forensics from the command line.

    forensics cf BUNDLE.h5 [--json] [--statistic bits|distance] [--baseline FILE] [--out RESULT.json]
    forensics baseline build BUNDLE.h5 --out BASELINE.h5 [--json]
    forensics baseline build --model DIR_OR_HUB_ID --benign-file FILE [--heldout-file FILE] --out BASELINE.h5
    forensics baseline info BASELINE.h5 [--json]

``forensics cf`` scores every recorded (layer, site) of the incident against a benign baseline: ``--baseline FILE``,
else a cached one that fits the bundle's model and benign prompts (beside the bundle as ``NAME.baseline.h5`` or in
the user cache), else one built from the bundle's benign reference runs and cached. ``--json`` prints the
``engine.cf.CFResult.to_dict()`` object. ``forensics baseline build`` writes the baseline database explicitly (from
a bundle's benign prompts, or from a model and a prompts file), so other incidents of the same model reuse it.

Exit status: 0 = done; 2 = bad usage or a missing file; 3 = bad input (a corrupt bundle or baseline, a baseline of
another model, no benign prompts). Errors are one line on stderr.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

EXIT_OK, EXIT_USAGE, EXIT_ERROR = 0, 2, 3


def register(sub) -> None:
    """Add ``cf`` and ``baseline`` to the ``forensics`` sub-command parser ``sub``."""
    from engine.cf import DEFAULT_STATISTIC, STATISTICS

    c = sub.add_parser("cf", help="Compression Forensics: per-layer anomaly scores against benign runs",
                       description="Score every recorded (layer, site) and token of the incident against benign "
                                   "reference runs; print per-layer scores, the calibrated threshold, the measured "
                                   "held-out false-positive rate and the ranked findings.")
    c.add_argument("bundle", help="incident bundle (.h5)")
    c.add_argument("--json", action="store_true", help="print the CF result as one JSON object")
    c.add_argument("--statistic", choices=STATISTICS, default=DEFAULT_STATISTIC,
                   help=f"per-token statistic (default {DEFAULT_STATISTIC}; see docs/cf.md)")
    c.add_argument("--baseline", help="a baseline file (forensics baseline build); default: cached or built")
    c.add_argument("--out", help="also write the result JSON to this file (for cca --cf / certify --cf)")
    c.add_argument("--top", type=int, default=10, help="findings to print (text output)")
    c.set_defaults(func=cmd_cf)

    b = sub.add_parser("baseline", help="CF baseline database: build | info",
                       description="Build or inspect the benign baseline CF scores incidents against.")
    bsub = b.add_subparsers(dest="baseline_action", required=True, parser_class=type(b))
    bb = bsub.add_parser("build", help="build a baseline from a bundle's benign prompts or a model + prompts file",
                         description="forensics baseline build BUNDLE.h5 --out FILE, or "
                                     "forensics baseline build --model DIR --benign-file FILE --out FILE")
    bb.add_argument("bundle", nargs="?", help="take the model and the benign prompts from this bundle")
    bb.add_argument("--model", help="local model directory or hub id (instead of a bundle)")
    bb.add_argument("--benign-file", help="benign reference prompts, one per line (with --model; >= 4)")
    bb.add_argument("--heldout-file", help="held-out benign prompts, one per line: the FPR is measured on them")
    bb.add_argument("--task", choices=("causal-lm", "classification"), help="with --model: the model's task")
    bb.add_argument("--out", required=True, help="baseline file to write (.h5)")
    bb.add_argument("--json", action="store_true", help="print a summary as one JSON object")
    bb.set_defaults(func=cmd_baseline_build)
    bi = bsub.add_parser("info", help="describe a baseline file")
    bi.add_argument("file", help="baseline file (.h5)")
    bi.add_argument("--json", action="store_true")
    bi.set_defaults(func=cmd_baseline_info)


def _pct(x) -> str:
    return "not measured" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1%}"


def _calibration_words(source: str, n: int) -> str:
    return (f"{n} held-out benign calibration runs" if source == "heldout" else
            f"{n} benign reference runs, leave-one-out")


def _run_fpr_words(fpr, n_tested: int, source: str, n_heldout: int) -> str:
    if fpr is None:
        why = ("the baseline holds no held-out prompts" if not n_heldout else
               "rebuild the baseline with `forensics baseline build` to measure it")
        return f"not measured ({why})"
    others = " others" if source == "heldout" else ""
    return f"{fpr:.1%} of {n_tested}{others} (target <= 5%{': MISSED' if fpr > 0.05 else ''})"


def _site_fpr_words(fpr, n_heldout: int, label: str = "held-out benign false-positive rate") -> str:
    """The site threshold's held-out false-positive rate as a clause of a sentence."""
    if fpr is None or (isinstance(fpr, float) and math.isnan(fpr)):
        why = ("no held-out benign prompts: give some with --heldout-file" if not n_heldout else
               "the baseline does not hold it; rebuild it with `forensics baseline build`")
        return f"{label} not measured ({why})"
    return f"{label} {fpr:.1%} of prompt x site cells (target <= 5%{': MISSED' if fpr > 0.05 else ''})"


def _threshold_words(threshold: float) -> str:
    """Where the site threshold comes from: the 97.5th percentile, or the floor of 2 when that percentile is lower."""
    from engine.cf import MIN_THRESHOLD, THRESHOLD_QUANTILE

    q = f"{THRESHOLD_QUANTILE * 100:g}th percentile of leave-one-out benign reference scores"
    return f"the floor: the {q} is lower" if threshold == MIN_THRESHOLD else q


def _top_site(res) -> str:
    finite = [s for s in res.scores if math.isfinite(s.score)]
    if not finite:
        return ""
    top = max(finite, key=lambda s: s.score)
    return f"L{top.layer} {top.site}"


def run_verdict_line(res) -> str:
    """The run-level (family-wise) verdict of a ``CFResult`` in one line."""
    from engine.cf import RUN_QUANTILE, format_score, run_no_verdict_text

    fpr = _run_fpr_words(res.heldout_run_fpr, res.n_run_heldout, res.run_calibration, res.n_heldout)
    if res.run_anomalous is None:
        reason = res.run_no_verdict_reason or ("partial" if res.partial else "")
        why = run_no_verdict_text(reason, n_calibration=res.n_run_reference, calibration=res.run_calibration,
                                  run_statistic=res.run_statistic, run_p_value=res.run_p_value,
                                  min_calibration=res.run_min_calibration, where=_top_site(res))
        if reason == "too_few_calibration_runs":  # no run threshold: no rate of it to measure
            return f"run verdict: none — {why}"
        return f"run verdict: none ({why}); held-out benign runs flagged: {fpr}"
    word, rel = ("ANOMALOUS", ">") if res.run_anomalous else ("not anomalous", "<=")
    return (f"run verdict: {word} — max site score {format_score(res.run_statistic)} ({_top_site(res)}) "
            f"{rel} run threshold {format_score(res.run_threshold)} (conformal {RUN_QUANTILE * 100:.0f}th percentile "
            f"of {_calibration_words(res.run_calibration, res.n_run_reference)}; p = {res.run_p_value:.3g}); "
            f"held-out benign runs flagged: {fpr}")


def _write_json(path: Path, obj: dict) -> None:
    from engine.atomic import write_text

    write_text(path, json.dumps(obj, indent=1))


def _token(bundle, p: int) -> str:
    toks = getattr(bundle, "tokens", None) or []
    return repr(toks[p]) if 0 <= p < len(toks) else "?"


# ----- forensics cf ---------------------------------------------------------------------------------------------
def cmd_cf(args) -> int:
    from engine.bundle import open_bundle
    from engine.cf import load_baseline, run_cf
    from workbench.cli import CliError, _progress, check_output, require_bundle

    if args.top < 0:
        raise CliError("--top must be >= 0")
    require_bundle(args.bundle)
    if args.baseline and not Path(args.baseline).is_file():
        raise CliError(f"baseline file not found: {args.baseline}")
    if args.out:
        check_output(args.out, "--out", inputs=(args.bundle, args.baseline))
    t0 = time.perf_counter()
    with open_bundle(args.bundle) as bundle:
        baseline, source = None, "cached or built from the bundle's benign runs"
        if args.baseline:
            baseline = load_baseline(args.baseline, weights_sha256=bundle.model_info["weights_sha256"])
            source = f"from {args.baseline}"
        res = run_cf(bundle, baseline=baseline, statistic=args.statistic, progress=_progress(args.json))
        d = res.to_dict()
        if args.out:
            _write_json(Path(args.out), d)
        if args.json:
            print(json.dumps(d))
            return EXIT_OK
        _print_cf(args, bundle, res, source, time.perf_counter() - t0)
    return EXIT_OK


def _print_cf(args, bundle, res, source: str, seconds: float) -> None:
    sites = [s for s in ("resid_pre", "attn", "mlp", "resid_post") if any(x.site == s for x in res.scores)]
    sites += sorted({x.site for x in res.scores} - set(sites))
    print(f"CF on {args.bundle} [{bundle.failure_spec}]  statistic={res.statistic}, compressor={res.compressor}")
    print(f"  baseline {res.baseline_id} ({source}): {res.n_baseline_prompts} benign reference prompts, "
          f"{res.n_heldout} held-out")
    print(f"  threshold {res.threshold:.3g} ({_threshold_words(res.threshold)}); "
          f"{_site_fpr_words(res.heldout_fpr, res.n_heldout)}")
    print(f"  {run_verdict_line(res)}")
    print("  per-layer anomaly score (robust z against the benign prompts; * = above the threshold):")
    print("    layer " + "".join(f"{s:>14s}" for s in sites))
    for layer in sorted({x.layer for x in res.scores}):
        cells = []
        for s in sites:
            sc = res.score_of(layer, s)
            cells.append(f"{'':>14s}" if sc is None else f"{sc.score:13.2f}{'*' if sc.flagged else ' '}")
        print(f"    {layer:5d} " + "".join(cells))
    if not res.findings:
        print("  findings: none above the threshold")
    else:
        print(f"  findings ({len(res.findings)} flagged site(s), most anomalous first):")
        for i, f in enumerate(res.findings[:args.top], 1):
            pos = ", ".join(f"{p} {_token(bundle, p)}" for p in f.positions)
            print(f"    {i:2d}. L{f.layer} {f.site:10s} score {f.score:9.2f}  p = {f.p_value:.3g}  positions {pos}")
        if len(res.findings) > args.top:
            print(f"    ... {len(res.findings) - args.top} more (--top N, or --json)")
    pa = [(v, p) for p, v in enumerate(res.position_anomaly[:res.n_prompt_tokens or None]) if math.isfinite(v)]
    if pa:
        top = sorted(pa, key=lambda t: -t[0])[:5]
        print("  most anomalous prompt positions (median token score over sites): "
              + ", ".join(f"{p} {_token(bundle, p)} {v:.2f}" for v, p in top))
    print(f"  {len(res.scores)} sites scored in {seconds:.1f} s" + ("  (PARTIAL)" if res.partial else ""))
    if args.out:
        print(f"  result written to {args.out}")


# ----- forensics baseline ---------------------------------------------------------------------------------------
def _summary_lines(summary: dict) -> list[str]:
    from engine.cf import MIN_RUN_CALIBRATION, format_score, run_no_verdict_text

    out = [f"  model weights sha256 {summary['weights_sha256'][:16]}…, {summary['n_layers']} layers x "
           f"{len(summary['sites'])} sites, d_model {summary['d_model']}",
           f"  {summary['n_prompts']} benign reference prompts, {summary['n_heldout']} held-out; compressor "
           f"{summary['compressor']}, {summary['levels']} levels per robust sd"]
    for st in summary["statistics"]:
        if summary["heldout_fprs"].get(st) is None:
            site_fpr = _site_fpr_words(None, summary["n_heldout"], "held-out false-positive rate")
        else:
            site_fpr = (f"held-out false-positive rate {_pct(summary['heldout_fprs'][st])} of "
                        f"{summary['heldout_cells'].get(st, 0)} prompt x site cells "
                        f"({_pct(summary['heldout_prompt_fprs'].get(st))} of prompts with any flag)")
        out.append(f"  {st:8s}: threshold {summary['thresholds'][st]:.3g}; {site_fpr}")
        src = summary["run_calibration"][st]
        need = int(summary.get("run_min_calibration") or MIN_RUN_CALIBRATION)
        if summary["n_run_calibration"][st] < need:
            why = run_no_verdict_text("too_few_calibration_runs", n_calibration=summary["n_run_calibration"][st],
                                      calibration=src, min_calibration=need)
            out.append(f"  {'':8s}  run verdict: none — {why}")
            continue
        fpr = _run_fpr_words(summary["heldout_run_fprs"][st], summary["heldout_runs_tested"][st], src,
                             summary["n_heldout"])
        out.append(f"  {'':8s}  run verdict: threshold {format_score(summary['run_thresholds'][st])} (conformal 95th "
                   f"percentile of {_calibration_words(src, summary['n_run_calibration'][st])}); held-out benign runs "
                   f"flagged: {fpr}")
    return out


def cmd_baseline_build(args) -> int:
    from engine.cf import build_baseline, bundle_prompts, save_baseline
    from workbench.cli import CliError, _progress, _read_lines, check_output, require_bundle

    out = check_output(args.out, "--out", inputs=(args.bundle, args.benign_file, args.heldout_file))
    if bool(args.bundle) == bool(args.model):
        raise CliError("give either a BUNDLE or --model (with --benign-file), not both and not neither")
    t0 = time.perf_counter()
    if args.bundle:
        from engine.bundle import open_bundle
        from engine.replay import load_bundle_model

        if args.benign_file or args.heldout_file or args.task:
            raise CliError("--benign-file, --heldout-file and --task go with --model; a bundle brings its own")
        require_bundle(args.bundle)
        with open_bundle(args.bundle) as bundle:
            prompts, heldout = bundle_prompts(bundle)
            if not prompts:
                raise CliError(f"{args.bundle} holds no benign reference prompts; use --model with --benign-file")
            handle = load_bundle_model(bundle)
            source = str(args.bundle)
    else:
        from engine.models import load_model

        if not args.benign_file:
            raise CliError("--model needs --benign-file (benign reference prompts, one per line)")
        prompts = _read_lines(args.benign_file)
        heldout = _read_lines(args.heldout_file)
        handle = load_model(args.model, task=args.task)
        source = str(args.model)
    base = build_baseline(handle, prompts, heldout=heldout, progress=_progress(args.json))
    save_baseline(base, out)
    summary = base.summary()
    summary.update({"path": str(out), "bytes": out.stat().st_size, "source": source,
                    "seconds": round(time.perf_counter() - t0, 3)})
    if args.json:
        print(json.dumps(summary))
        return EXIT_OK
    print(f"built CF baseline {out} ({summary['bytes'] / 1e6:.1f} MB, {summary['seconds']:.1f} s) from {source}")
    for line in _summary_lines(summary):
        print(line)
    return EXIT_OK


def cmd_baseline_info(args) -> int:
    from engine.cf import load_baseline
    from workbench.cli import CliError

    if not Path(args.file).is_file():
        raise CliError(f"baseline file not found: {args.file}")
    summary = load_baseline(args.file).summary()
    summary.update({"path": str(args.file), "bytes": Path(args.file).stat().st_size})
    if args.json:
        print(json.dumps(summary))
        return EXIT_OK
    print(f"CF baseline {args.file} ({summary['bytes'] / 1e6:.2f} MB; {summary['format']} "
          f"v{summary['schema_version']}, id {summary['baseline_id']}, built {summary['created']} by "
          f"{summary['program']})")
    for line in _summary_lines(summary):
        print(line)
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    from workbench.cli import main

    sys.exit(main(["cf", *sys.argv[1:]]))
