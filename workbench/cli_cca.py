"""``forensics cca``: search a causal minimal fix set for an incident and print the evidence.

    forensics cca BUNDLE.h5 [--json] [--out RESULT.json] [--beam W] [--max-size K] [--op mean|patch]
                  [--controls N] [--no-cf] [--cf CF.json] [--seed S] [--units] [--threads N]

Exit status: 0 = a fix set was found and every criterion of the issue holds; 1 = the search finished but the set
misses at least one criterion (or nothing fixes the incident) — the output says which and by how much; 2 = bad
usage or a missing file; 3 = bad input (a corrupt bundle, nothing to fix).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

EXIT_OK, EXIT_MISSED, EXIT_USAGE, EXIT_ERROR = 0, 1, 2, 3


def register(sub) -> None:
    c = sub.add_parser("cca", help="causal minimal fix set search (flip rate, side effects, minimality, p-value)",
                       description="Search the smallest set of activation interventions that makes the incident's "
                                   "failure go away, and measure its evidence. Exit 0 = every criterion holds, "
                                   "1 = a criterion is missed (printed), 2 = usage or a missing file, 3 = bad input "
                                   "(a corrupt bundle, nothing to fix).")
    c.add_argument("bundle", help="incident bundle (.h5)")
    c.add_argument("--json", action="store_true", help="print the result as one JSON object")
    c.add_argument("--out", help="write the result JSON to this file")
    c.add_argument("--beam", type=int, default=1, help="beam width (1 = greedy)")
    c.add_argument("--max-size", type=int, default=4, help="largest fix set searched")
    c.add_argument("--op", choices=("mean", "patch"), default="mean",
                   help="mean = benign mean ablation (default), patch = from the benign counterpart")
    c.add_argument("--controls", type=int, default=200, help="random control sets for the p-value (default 200; the p-value criterion needs >= 200)")
    c.add_argument("--seed", type=int, default=0, help="seed of the control sets")
    c.add_argument("--no-cf", action="store_true", help="rank without the CF prior")
    c.add_argument("--cf", help="a CF result JSON (forensics cf --json) to use as the prior")
    c.add_argument("--units", action="store_true",
                   help="refine attn / mlp elements to the fewest attention heads / MLP neurons that still fix")
    c.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads during CCA (default 1: measured fastest on a shared 2-core machine; "
                        "0 = torch's default)")
    c.set_defaults(func=cmd_cca)


def _load_cf(args, bundle, handle):
    """The CF prior: ``--cf FILE``, else ``engine.cf.run_cf`` when that module exists, unless ``--no-cf``."""
    from workbench.cli import CliError

    if args.no_cf:
        return None, "off (--no-cf)"
    try:
        import engine.cf as cfmod
    except ModuleNotFoundError as exc:
        if exc.name != "engine.cf":
            raise
        if args.cf:
            raise CliError("--cf needs the CF engine (engine/cf.py), which this version does not have") from None
        return None, "unavailable (engine.cf not installed)"
    if args.cf:
        p = Path(args.cf)
        if not p.is_file():
            raise CliError(f"CF result file not found: {args.cf}")
        try:
            cf = cfmod.CFResult.from_dict(json.loads(p.read_text(encoding="utf-8")))
        except (ValueError, KeyError, TypeError) as exc:
            raise CliError(f"CF result file {args.cf} is not a CF result: {exc}") from None
        sha = bundle.model_info.get("weights_sha256", "")
        if cf.weights_sha256 and sha and cf.weights_sha256 != sha:
            raise CliError(f"--cf {args.cf} was computed on another model (weights sha256 {cf.weights_sha256[:12]}… "
                           f"vs the bundle's {sha[:12]}…): run forensics cf on this bundle")
        if cf.bundle_uuid and cf.bundle_uuid != bundle.uuid:
            raise CliError(f"--cf {args.cf} is the CF result of another incident (bundle {cf.bundle_uuid}, not "
                           f"{bundle.uuid}): run forensics cf on this bundle")
        return cf, f"from {args.cf}"
    try:
        return cfmod.run_cf(bundle, handle), "computed (engine.cf.run_cf)"
    except cfmod.CFError as exc:  # e.g. too few benign reference runs for a baseline: search without the prior
        print(f"note: Compression Forensics is not available for this bundle ({exc}); CCA orders positions by the "
              "attribution estimate alone", file=sys.stderr)
        return None, f"unavailable ({exc})"


def write_result(out: Path, text: str) -> None:
    """Write ``text`` to ``out`` through a unique temporary file beside it (``.NAME.XXXXXXXX.tmp``, never a fixed
    name another file could already have) and a rename, with the permissions of any new file. On an OS error the
    temporary file is removed, ``out`` is left as it was, and the error names ``out`` (what the user asked for),
    never the temporary name."""
    from engine.atomic import write_text

    try:
        write_text(out, text)
    except OSError as exc:  # whatever failed (the temporary file, the rename), writing ``out`` did
        raise OSError(exc.errno, exc.strerror or str(exc), str(out)) from None


def _at_tokens(bundle, positions, limit: int = 4) -> str:
    """`` at ':'`` / `` at 'a', 'b', 'c', 'd' +3 more``: the tokens an element acts at (nothing for ``all``)."""
    from workbench.cli_cf import _token

    if positions == "all" or not getattr(bundle, "tokens", None):
        return ""
    ps = list(positions)
    return (" at " + ", ".join(_token(bundle, int(p)) for p in ps[:limit])
            + (f" +{len(ps) - limit} more" if len(ps) > limit else ""))


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def cmd_cca(args) -> int:
    from engine.bundle import open_bundle
    from engine.cca import not_measured, run_cca, torch_threads
    from engine.failure import search_metric_name
    from engine.replay import load_bundle_model
    from workbench.cli import CliError, _progress, check_output, require_bundle

    if args.beam < 1:
        raise CliError("--beam must be >= 1")
    if args.max_size < 1:
        raise CliError("--max-size must be >= 1")
    if args.controls < 0:
        raise CliError("--controls must be >= 0")
    if args.threads < 0:
        raise CliError("--threads must be >= 0")
    if args.cf and args.no_cf:
        raise CliError("--cf and --no-cf contradict each other: give one")
    require_bundle(args.bundle)
    if args.out:
        check_output(args.out, "--out", inputs=(args.bundle, args.cf))
    with open_bundle(args.bundle) as bundle:
        handle = load_bundle_model(bundle)
        with torch_threads(args.threads or None):
            cf, cf_note = _load_cf(args, bundle, handle)
        res = run_cca(bundle, handle, cf=cf, op=args.op, beam=args.beam, max_size=args.max_size,
                      n_controls=args.controls, seed=args.seed, refine_units=args.units,
                      threads=args.threads or None, progress=_progress(args.json))
    d = res.to_dict()
    d["ranking"]["cf"] = cf_note
    if args.out:
        write_result(Path(args.out), json.dumps(d, indent=1, allow_nan=False))
    ok = res.flipped and not res.failed_criteria()
    if args.json:
        print(json.dumps(d, allow_nan=False))
        return EXIT_OK if ok else EXIT_MISSED
    print(f"CCA on {args.bundle} [{bundle.failure_spec}]  op={res.op}, ranking: {d['ranking'].get('method')}, "
          f"CF prior: {cf_note}")
    if not res.fix_set:
        print("  no fix set found")
    else:
        verdict = ("fixes the incident: metric" if res.flipped else "does NOT fix the incident (best set found): metric"
                   if res.checked else "was not checked on the incident (the run stopped first): best search metric")
        print(f"  fix set ({res.set_size} intervention(s)) {verdict} {res.baseline_metric:.3f} -> "
              f"{res.fixed_metric:.3f} ({search_metric_name(bundle.failure.kind)}; > 0 = fails)")
        for e in res.fix_set:
            print(f"    {e.intervention.describe():32s} alone {e.single_metric:9.3f}   without it {e.drop_one_metric:9.3f}"
                  + (f" ({'necessary' if e.drop_one_failing else 'not necessary'})" if res.flipped else "")
                  + _at_tokens(bundle, e.intervention.positions))
        inc = res.evidence.get("incident", {})
        if "fixed_output" in inc:
            print(f"  output: {inc['baseline_output']!r} -> {inc['fixed_output']!r}")
    if d["flip_rate"] is None:
        print(f"  flip rate on held-out variants: {not_measured('flip_rate', res)}")
    else:
        ci = d["flip_rate_ci"] or [None, None]
        print(f"  flip rate on held-out variants: {_pct(d['flip_rate'])} of {res.n_variants} "
              f"(Wilson 95% {_pct(ci[0])}–{_pct(ci[1])})")
    if d["sufficiency_rate"] is None:
        print(f"  sufficiency (failing activations into benign counterparts): {not_measured('sufficiency_rate', res)}")
    else:
        print(f"  sufficiency (failing activations into benign counterparts): {_pct(d['sufficiency_rate'])} of "
              f"{res.n_sufficiency}")
    if d["side_effect_rate"] is None:
        print(f"  side effects on held-out benign prompts: {not_measured('side_effect_rate', res)}")
    else:
        print(f"  side effects on held-out benign prompts: {_pct(d['side_effect_rate'])} of {res.n_benign} change, "
              f"mean KL {res.side_effect_kl:.4g}")
    print(f"  minimality: {res.set_size} element(s), {_pct(d['fraction_of_activations'])} of recorded activation "
          f"values, 1-minimal: {'yes' if res.one_minimal else 'no' if res.checked else 'not checked'}")
    if d["p_value"] is None:
        print(f"  significance: {not_measured('p_value', res)}")
    else:
        on = ("" if (res.evidence.get("controls") or {}).get("held_out", True) else
              " (on the incident itself, which the set was chosen on: no held-out failing variants)")
        qs = (", ".join(f"{k} {v:.3g}" for k, v in res.fdr.items()) if res.fdr else
              "no claim to adjust (none is measured on held-out prompts)")
        print(f"  significance: p = {res.p_value:.4g} against {res.n_controls} random control sets{on}; BH q: {qs}")
    rk = d["ranking"]
    if "candidates_evaluated" in rk:
        sp = rk.get("spearman_vs_exact")
        gt = rk.get("group_tests")
        cleared = int(rk.get("candidates_resolved", rk["candidates_evaluated"])) - int(rk["candidates_evaluated"])
        print(f"  search: {rk['candidates_evaluated']} of {rk.get('n_candidates', '?')} candidate sites evaluated "
              f"exactly on their own" + (f", {cleared} more cleared by {gt} group tests" if gt else "") +
              f", in {len(rk.get('rounds', []))} round(s)" +
              (f" (order: {rk['order']})" if rk.get("order") else "") + "; attribution vs exact Spearman "
              f"{'n/a' if sp is None else f'{sp:.2f}'}")
    print(f"  budget: {res.forward_passes} forward passes ({res.rows} rows), {res.seconds:.1f} s; search alone "
          f"{rk.get('search_passes', '?')} passes ({rk.get('search_rows', '?')} rows), "
          f"{rk.get('search_seconds', float('nan')):.1f} s")
    failed = res.failed_criteria()
    if not failed:
        print("  PASS: every criterion holds")
    else:
        for k in failed:
            c = res.criteria[k]
            print(f"  MISSED {k}: target {c['target']}; {c['detail']}")
        for big in rk.get("beyond_max_size", []):
            print(f"  note: {len(big['set'])} sublayer sites fix the incident teacher-forced only all together "
                  f"({', '.join(big['set'])}), more than --max-size {big['max_size']}: search again with "
                  f"--max-size {len(big['set'])}")
    if args.out:
        print(f"  result written to {args.out}")
    return EXIT_OK if ok else EXIT_MISSED


if __name__ == "__main__":  # pragma: no cover
    from workbench.cli import main

    sys.exit(main(["cca", *sys.argv[1:]]))
