"""``forensics certify`` and ``forensics verify-certificate``: the RCA certificate from the command line.

    forensics certify BUNDLE.h5 --out CERT.pdf [--result RESULT.json] [--cf CF.json | --no-cf]
                      [--analyst ANALYST.json] [--name NAME] [--note TEXT]
                      [--controls N] [--seed S] [--beam W] [--max-size K] [--op mean|patch] [--json]
    forensics verify-certificate CERT.json BUNDLE.h5 [--controls N] [--json]

``certify`` checks its inputs and outputs first (the bundle opens; the given results and analyst record parse and
belong to this bundle; CERT.pdf, CERT.json and any result it will keep can be written), then replays the incident
(bit-identical check), takes the CF result from ``--cf`` or runs ``engine.cf.run_cf``, takes the CCA result from
``--result`` (written by ``forensics cca --out``) or runs ``engine.cca.run_cca`` (``--controls``, ``--seed``,
``--beam``, ``--max-size`` and ``--op`` are its options and are refused with ``--result``), builds the certificate
(``engine.certificate``), and writes ``CERT.pdf`` and ``CERT.json`` beside it: both to temporary names, renamed
only when both are written. Results it had to compute are kept beside them as ``CERT.cf.json`` / ``CERT.cca.json``
so the certificate can be re-rendered without re-running them.

Exit status of ``certify``: 0 = written, and it certifies a root cause (the set removes the failure, every
acceptance criterion holds, the evidence is not thin, the replay is bit-identical, the analyst rejected nothing);
1 = written, but qualified or not certified (the output says why); 2 = bad usage; 3 = bad input (missing or corrupt
bundle or result).

``verify-certificate`` re-checks every claim against the bundle and prints each as ok, FAILED or unchecked (it
cannot be checked here; the line says why); exit 0 iff every claim was checked and holds, 1 when one fails, 4 when
none fails but some could not be checked (not fully verified), 2/3 as above. ``--controls N`` with a number that
cannot re-check the certified significance (see ``engine.certificate.significance_uncheckable``) is refused.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

EXIT_OK, EXIT_NOT_CERTIFIED, EXIT_USAGE, EXIT_ERROR, EXIT_INCOMPLETE = 0, 1, 2, 3, 4
CCA_DEFAULTS = {"controls": 200, "seed": 0, "beam": 1, "max_size": 4, "op": "mean"}  # when certify runs CCA itself


def register(sub) -> None:
    c = sub.add_parser("certify", help="RCA certificate: PDF + JSON (runs replay, CF and CCA when not given)",
                       description="Build the RCA certificate of an incident: CERT.pdf and CERT.json beside it. "
                                   "Exit 0 = a root cause is certified, 1 = written but qualified or not certified, "
                                   "2 = usage, 3 = bad input.")
    c.add_argument("bundle", help="incident bundle (.h5)")
    c.add_argument("--out", required=True, help="the PDF to write (CERT.pdf); CERT.json is written beside it")
    c.add_argument("--result", help="CCA result JSON (forensics cca --out RESULT.json) instead of running CCA")
    c.add_argument("--cf", help="CF result JSON (forensics cf --json) instead of running CF")
    c.add_argument("--no-cf", action="store_true", help="certify without Compression Forensics")
    c.add_argument("--analyst", help="analyst record JSON: {name, note, accepted: [...], rejected: [...]} "
                                     "(elements as indices into the fix set or as element objects)")
    c.add_argument("--name", help="analyst name (overrides the record's)")
    c.add_argument("--note", help="analyst note (overrides the record's)")
    c.add_argument("--controls", type=int, help="random control sets when CCA runs here (default 200; the "
                                                "p-value criterion needs >= 200)")
    c.add_argument("--seed", type=int, help="seed of the control sets when CCA runs here (default 0)")
    c.add_argument("--beam", type=int, help="beam width when CCA runs here (default 1 = greedy)")
    c.add_argument("--max-size", type=int, help="largest fix set searched when CCA runs here (default 4)")
    c.add_argument("--op", choices=("mean", "patch"), help="intervention when CCA runs here (default mean)")
    c.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    c.set_defaults(func=cmd_certify)

    v = sub.add_parser("verify-certificate", help="re-check a certificate's claims against a bundle",
                       description="Re-run the checks of an RCA certificate against a bundle: its verdict, criteria "
                                   "and numbers against each other, file hash, replay, weights and tokenizer hashes, "
                                   "the fix set re-evaluated, Compression Forensics re-run. Prints each claim "
                                   "ok/FAILED/unchecked; exit 0 iff every claim was checked and holds, 1 when one "
                                   "fails, 4 when some could not be checked.")
    v.add_argument("certificate", help="certificate JSON (CERT.json)")
    v.add_argument("bundle", help="incident bundle (.h5) to check against")
    v.add_argument("--controls", type=int, help="random control sets for the significance re-check "
                                                "(default: as many as certified, the same seeded sets; 0 skips it)")
    v.add_argument("--json", action="store_true", help="print the report as one JSON object")
    v.set_defaults(func=cmd_verify)


# ----------------------------------------------------------------------------------------------------------------
def _read_json(path: str, what: str) -> dict:
    from workbench.cli import CliError

    p = Path(path)
    if p.is_dir():
        raise CliError(f"{what} file {path} is a directory")
    if not p.is_file():
        raise CliError(f"{what} file not found: {path}")
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CliError(f"{what} file {path} is not JSON: {str(exc)[:120]}") from None
    except OSError as exc:
        raise CliError(f"{what} file {path} cannot be read: {exc.strerror or exc}") from None
    if not isinstance(d, dict):
        raise CliError(f"{what} file {path} must hold a JSON object, not {type(d).__name__}")
    return d


def _cf_dict(d: dict) -> dict:
    """A CF result as ``CFResult.to_dict()``; also accepts it wrapped under ``"result"`` or ``"cf"``."""
    for key in ("result", "cf"):
        if "scores" not in d and isinstance(d.get(key), dict):
            d = d[key]
    return d


def _check_writable(path: Path, label: str) -> None:
    """``path`` can be written by a rename from a temporary file beside it: not a directory, its folder exists and
    is writable. One line naming the user's path (``label`` says which file it is) otherwise."""
    from workbench.cli import CliError

    if path.is_dir():
        raise CliError(f"{label} {path} is a directory; choose another --out")
    folder = path.parent
    if not folder.is_dir():
        raise CliError(f"{label} {path}: folder {folder} does not exist" if not folder.exists() else
                       f"{label} {path}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CliError(f"{label} {path}: folder {folder} is not writable")
    if path.exists() and not path.is_file():
        raise CliError(f"{label} {path} exists and is not a regular file; choose another --out")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def _write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file beside it and a rename (permissions as a new file)."""
    from engine.atomic import write_text
    from workbench.cli import CliError

    try:
        write_text(path, text)
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror or exc}") from None


def _write_json(d: dict, path: Path) -> None:
    _write_text(path, json.dumps(d, indent=1) + "\n")


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        print(text, file=sys.stderr, flush=True)


def _cca_options(args) -> dict:
    """The CCA options as given (``None`` = not given), refused with ``--result``; their values otherwise."""
    from workbench.cli import CliError

    given = [f"--{k.replace('_', '-')}" for k in CCA_DEFAULTS if getattr(args, k) is not None]
    if args.result and given:
        raise CliError(f"{', '.join(given)} only appl{'ies' if len(given) == 1 else 'y'} when certify runs CCA "
                       f"itself; drop {'it' if len(given) == 1 else 'them'} or drop --result")
    opts = {k: (v if (v := getattr(args, k)) is not None else d) for k, d in CCA_DEFAULTS.items()}
    if opts["controls"] < 0 or opts["beam"] < 1 or opts["max_size"] < 1:
        raise CliError("--controls must be >= 0, --beam and --max-size >= 1")
    return opts


def cmd_certify(args) -> int:
    from engine.bundle import open_bundle
    from engine.certificate import (analyst_record, build_certificate, certificate_status, check_results_fit,
                                    file_sha256, reproduction_commands)
    from engine.errors import CCAError, CertificateError, CFError
    from engine.replay import load_bundle_model, replay
    from workbench.cli import CliError, _progress, require_bundle

    out = Path(args.out)
    if out.suffix.lower() != ".pdf":
        raise CliError(f"--out must name a .pdf file (CERT.json is written beside it), got {args.out}")
    if not out.parent.is_dir():
        raise CliError(f"output folder does not exist: {out.parent}")
    require_bundle(args.bundle)
    if args.cf and args.no_cf:
        raise CliError("--cf and --no-cf contradict each other")
    opts = _cca_options(args)
    json_out = out.with_suffix(".json")
    stem = out.with_suffix("")
    result_path = Path(args.result) if args.result else stem.with_name(stem.name + ".cca.json")
    cf_path = Path(args.cf) if args.cf else stem.with_name(stem.name + ".cf.json")
    # every file this run writes, checked before any work: a directory or a read-only folder fails now, not after CCA
    writes = [(out, "--out: the PDF"), (json_out, f"--out {args.out}: the certificate JSON")]
    if not args.result:
        writes.append((result_path, f"--out {args.out}: the CCA result (kept beside the certificate)"))
    if not args.cf and not args.no_cf:
        writes.append((cf_path, f"--out {args.out}: the CF result (kept beside the certificate)"))
    for path, label in writes:
        _check_writable(path, label)
    inputs = [(Path(args.bundle), "the bundle")] + [(Path(p), f"--{k}") for k, p in
                                                    (("result", args.result), ("cf", args.cf),
                                                     ("analyst", args.analyst)) if p]
    for path, label in writes:
        for src, name in inputs:
            if _same_file(path, src):
                raise CliError(f"{label} {path} would overwrite {name} {src}; choose another --out")
    quiet = args.json
    computed, written = [], []
    progress = _progress(quiet)
    # the bundle first: a file that is not an incident bundle is named as such, not as a mismatch with --result
    try:
        opened = open_bundle(args.bundle)
    except OSError as exc:
        raise CliError(f"bundle {args.bundle} cannot be read: {exc.strerror or exc}") from None
    with opened as bundle:
        sha = file_sha256(args.bundle)
        # read and check every given file before any long computation, so a typo fails in a second, not after CCA
        cca_given = _read_json(args.result, "CCA result") if args.result else None
        cf_given = _cf_dict(_read_json(args.cf, "CF result")) if args.cf else None
        analyst = _read_json(args.analyst, "analyst record") if args.analyst else {}
        if args.name is not None:
            analyst["name"] = args.name
        if args.note is not None:
            analyst["note"] = args.note
        if cca_given is not None:
            from engine.cca import CCAResult

            CCAResult.from_dict(cca_given)  # CCAError (one line) for a file that is not a CCA result
            if cca_given.get("bundle_sha256") and cca_given["bundle_sha256"] != sha:
                raise CliError(f"--result {args.result} was computed on another file than {args.bundle} "
                               f"(bundle sha256 {cca_given['bundle_sha256'][:12]}…); run forensics cca on this "
                               "bundle")
        cf = None
        if cf_given is not None:
            from engine.cf import CFResult

            try:
                cf = CFResult.from_dict(cf_given)
            except CFError as exc:
                raise CFError(f"--cf {args.cf}: {exc}") from None
        check_results_fit(bundle, sha, cca=cca_given, cf=cf_given, cca_name=f"--result {args.result}",
                          cf_name=f"--cf {args.cf}")
        try:  # the record's form now; its elements against the fix set now when it is given, after CCA otherwise
            analyst_record(analyst, cca_given["fix_set"] if cca_given is not None else None)
        except CertificateError as exc:
            raise CertificateError(f"--analyst {args.analyst}: {exc}" if args.analyst else str(exc)) from None

        _say(quiet, f"loading the model of {Path(args.bundle).name} ...")
        handle = load_bundle_model(bundle)
        _say(quiet, "replaying the incident bit for bit ...")
        rep = replay(bundle, handle=handle)
        computed.append("replay")
        if cf_given is None and not args.no_cf:
            from engine.cf import run_cf

            _say(quiet, "running Compression Forensics ...")
            try:
                cf = run_cf(bundle, handle, progress=progress)
            except CFError as exc:  # e.g. no benign reference runs: certify without CF, and say so
                _say(quiet, f"note: Compression Forensics not available for this bundle ({exc}); certifying "
                            "without it")
            else:
                computed.append("cf")
        if cca_given is None:
            from engine.cca import run_cca

            _say(quiet, f"running CCA (beam {opts['beam']}, max size {opts['max_size']}, {opts['controls']} "
                        "controls) ...")
            try:
                res = run_cca(bundle, handle, cf=cf, op=opts["op"], beam=opts["beam"], max_size=opts["max_size"],
                              n_controls=opts["controls"], seed=opts["seed"], progress=progress)
            except CCAError as exc:
                raise CliError(f"CCA failed: {exc}") from None
            cca = res.to_dict()
            cca.setdefault("ranking", {})["cf"] = "computed (engine.cf.run_cf)" if cf is not None else "off"
            computed.append("cca")
        else:
            cca = cca_given
    if "cca" in computed:
        _write_json(cca, result_path)
        written.append(str(result_path))
    if "cf" in computed:
        _write_json(cf.to_dict(), cf_path)
        written.append(str(cf_path))
    commands = reproduction_commands(args.bundle, pdf_path=args.out, result_path=result_path,
                                     cf_path=cf_path if cf is not None else None,
                                     n_controls=cca.get("n_controls") or None, with_cf=cf is not None)
    doc = build_certificate(args.bundle, cca=cca, cf=cf, replay_report=rep, analyst=analyst, commands=commands)
    _render(doc, out, json_out)
    written = [str(out), str(json_out)] + written
    status = certificate_status(doc)
    summary = {"pdf": str(out), "json": str(json_out), "written": written, "computed": computed,
               "certificate_id": doc["certificate_id"], "status": status["level"], "headline": status["headline"],
               "verdict": doc["verdict"], "bundle_sha256": doc["incident"]["bundle_sha256"]}
    if args.json:
        print(json.dumps(summary))
    else:
        from workbench.pdf import PAGE_COUNT

        print(f"certificate written: {out} ({PAGE_COUNT} pages) and {json_out}")
        if len(written) > 2:
            print(f"  also kept: {', '.join(written[2:])}")
        print(f"  {status['headline']}")
        print(f"  verdict: {doc['verdict']}")
        print(f"  check it: forensics verify-certificate {json_out} {args.bundle}")
    return EXIT_OK if status["level"] == "certified" else EXIT_NOT_CERTIFIED


def _render(doc: dict, pdf: Path, json_path: Path) -> None:
    """The PDF and the JSON, each to a temporary name beside its final one; both are renamed into place only when
    both were written (and the first renamed is removed again if the second rename fails), so the PDF is never left
    without its JSON. The JSON is validated before either is written, so an invalid certificate leaves no files
    behind. Errors name the user's paths, never a temporary one."""
    from engine.atomic import discard, publish, temp_beside
    from engine.certificate import certificate_json_text
    from engine.errors import CertificateError
    from workbench.cli import CliError

    text = certificate_json_text(doc)  # raises CertificateError (one line on stderr, exit 3) before anything is written
    # the command line never shows a window: draw with Qt's offscreen platform whatever the environment says
    os.environ["QT_QPA_PLATFORM"] = "offscreen"
    try:
        from workbench.pdf import render_certificate_pdf
    except ImportError as exc:
        raise CliError(f"the PDF needs Qt (PySide6), which cannot be loaded: {exc}") from None
    tmps: list[Path] = []
    try:
        try:
            for final in (pdf, json_path):
                tmps.append(temp_beside(final))
        except OSError as exc:
            raise CliError(f"cannot write {pdf if len(tmps) == 0 else json_path}: {exc.strerror or exc}") from None
        tmp_pdf, tmp_json = tmps
        try:
            render_certificate_pdf(doc, tmp_pdf)
        except CertificateError as exc:
            raise CertificateError(str(exc).replace(str(tmp_pdf), str(pdf))) from None
        except OSError as exc:
            raise CliError(f"cannot write {pdf}: {exc.strerror or exc}") from None
        try:
            tmp_json.write_text(text, encoding="utf-8")
            publish(tmp_json, json_path)
        except OSError as exc:
            raise CliError(f"cannot write {json_path}: {exc.strerror or exc}") from None
        try:
            publish(tmp_pdf, pdf)
        except OSError as exc:
            json_path.unlink(missing_ok=True)  # no certificate JSON without its PDF either
            raise CliError(f"cannot write {pdf}: {exc.strerror or exc}") from None
    finally:
        discard(tmps)


def cmd_verify(args) -> int:
    from engine.certificate import read_certificate_json, significance_uncheckable, verify_certificate
    from workbench.cli import CliError, _progress, require_bundle

    if args.controls is not None and args.controls < 0:
        raise CliError("--controls must be >= 0")
    doc = read_certificate_json(args.certificate)
    require_bundle(args.bundle)
    n_cert = (doc.get("cca") or {}).get("n_controls") if isinstance(doc.get("cca"), dict) else None
    if args.controls is not None and isinstance(n_cert, int) and not isinstance(n_cert, bool):
        why = significance_uncheckable(args.controls, n_cert)
        if why:
            raise CliError(f"--controls {args.controls} cannot re-check the certificate's significance: {why}; "
                           "--controls 0 skips that claim")
    report = verify_certificate(doc, args.bundle, n_controls=args.controls, progress=_progress(args.json))
    code = EXIT_OK if report.ok else EXIT_NOT_CERTIFIED if not report.holds else EXIT_INCOMPLETE
    if args.json:
        print(json.dumps(report.to_dict()))
        return code
    failed, unchecked = report.failed, report.unchecked
    print(f"verify-certificate {args.certificate} against {args.bundle}: {len(report.claims)} claims, "
          f"{len(failed)} FAILED" + (f", {len(unchecked)} unchecked" if unchecked else "")
          + f" ({report.seconds:.1f} s)")
    labels = {"ok": "ok", "failed": "FAILED", "unchecked": "unchecked"}
    lw = max([6] + [len(labels[c.status]) for c in report.claims])
    width = max((len(c.name) for c in report.claims), default=0)
    for c in report.claims:
        print(f"  [{labels[c.status]:>{lw}}] {c.name:<{width}}  {c.detail}")
    if report.ok:
        print("VERIFIED: every claim of the certificate holds for this bundle")
    elif report.holds:
        print("NOT FULLY VERIFIED: every checked claim holds; not checked: " + ", ".join(c.name for c in unchecked))
    else:
        why = ", ".join(c.name for c in failed) or "the verification was cancelled"
        print(f"NOT VERIFIED: {why}")
    return code


if __name__ == "__main__":  # pragma: no cover
    from workbench.cli import main

    sys.exit(main(["certify", *sys.argv[1:]]))
