"""``forensics certify`` and ``forensics verify-certificate``: the RCA certificate from the command line.

    forensics certify BUNDLE.h5 --out CERT.pdf [--result RESULT.json] [--cf CF.json | --no-cf]
                      [--analyst ANALYST.json] [--name NAME] [--note TEXT]
                      [--controls N] [--seed S] [--beam W] [--max-size K] [--op mean|patch] [--json]
    forensics verify-certificate CERT.json BUNDLE.h5 [--controls N] [--json]

``certify`` replays the incident (bit-identical check), takes the CF result from ``--cf`` or runs
``engine.cf.run_cf``, takes the CCA result from ``--result`` (written by ``forensics cca --out``) or runs
``engine.cca.run_cca``, builds the certificate (``engine.certificate``), and writes ``CERT.pdf`` and ``CERT.json``
beside it. Results it had to compute are kept beside them as ``CERT.cf.json`` / ``CERT.cca.json`` so the
certificate can be re-rendered without re-running them.

Exit status of ``certify``: 0 = written, and it certifies a root cause (the set removes the failure, every
acceptance criterion holds, the replay is bit-identical, the analyst rejected nothing); 1 = written, but qualified
or not certified (the output says why); 2 = bad usage; 3 = bad input (missing or corrupt bundle or result).

``verify-certificate`` re-checks every claim against the bundle and prints each as ok/FAILED; exit 0 iff all hold,
1 when one fails, 2/3 as above.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

EXIT_OK, EXIT_NOT_CERTIFIED, EXIT_USAGE, EXIT_ERROR = 0, 1, 2, 3


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
    c.add_argument("--controls", type=int, default=200, help="random control sets when CCA runs here (>= 200)")
    c.add_argument("--seed", type=int, default=0, help="seed of the control sets when CCA runs here")
    c.add_argument("--beam", type=int, default=1, help="beam width when CCA runs here (1 = greedy)")
    c.add_argument("--max-size", type=int, default=4, help="largest fix set searched when CCA runs here")
    c.add_argument("--op", choices=("mean", "patch"), default="mean", help="intervention when CCA runs here")
    c.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    c.set_defaults(func=cmd_certify)

    v = sub.add_parser("verify-certificate", help="re-check a certificate's claims against a bundle",
                       description="Re-run the checks of an RCA certificate against a bundle: file hash, replay, "
                                   "weights and tokenizer hashes, the fix set re-evaluated. Prints each claim "
                                   "ok/FAILED; exit 0 iff every claim holds.")
    v.add_argument("certificate", help="certificate JSON (CERT.json)")
    v.add_argument("bundle", help="incident bundle (.h5) to check against")
    v.add_argument("--controls", type=int, help="random control sets for the significance re-check "
                                                "(default: as many as certified; 0 skips it)")
    v.add_argument("--json", action="store_true", help="print the report as one JSON object")
    v.set_defaults(func=cmd_verify)


# ----------------------------------------------------------------------------------------------------------------
def _read_json(path: str, what: str) -> dict:
    from workbench.cli import CliError

    p = Path(path)
    if not p.is_file():
        raise CliError(f"{what} file not found: {path}")
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CliError(f"{what} file {path} is not JSON: {str(exc)[:120]}") from None
    if not isinstance(d, dict):
        raise CliError(f"{what} file {path} must hold a JSON object, not {type(d).__name__}")
    return d


def _cf_dict(d: dict) -> dict:
    """A CF result as ``CFResult.to_dict()``; also accepts it wrapped under ``"result"`` or ``"cf"``."""
    for key in ("result", "cf"):
        if "scores" not in d and isinstance(d.get(key), dict):
            d = d[key]
    return d


def _write_json(d: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(d, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        print(text, file=sys.stderr, flush=True)


def cmd_certify(args) -> int:
    from engine.bundle import open_bundle
    from engine.certificate import build_certificate, certificate_status, reproduction_commands
    from engine.errors import CCAError, CFError
    from engine.replay import load_bundle_model, replay
    from workbench.cli import CliError, _progress

    out = Path(args.out)
    if out.suffix.lower() != ".pdf":
        raise CliError(f"--out must name a .pdf file (CERT.json is written beside it), got {args.out}")
    if not out.parent.is_dir():
        raise CliError(f"output folder does not exist: {out.parent}")
    if not Path(args.bundle).is_file():
        raise CliError(f"bundle not found: {args.bundle}")
    if args.cf and args.no_cf:
        raise CliError("--cf and --no-cf contradict each other")
    if args.controls < 0 or args.beam < 1 or args.max_size < 1:
        raise CliError("--controls must be >= 0, --beam and --max-size >= 1")
    json_out = out.with_suffix(".json")
    quiet = args.json
    # read every given file before any long computation, so a typo fails in a second, not after CCA
    cca_given = _read_json(args.result, "CCA result") if args.result else None
    cf_given = _cf_dict(_read_json(args.cf, "CF result")) if args.cf else None
    analyst = _read_json(args.analyst, "analyst record") if args.analyst else {}
    if args.name is not None:
        analyst["name"] = args.name
    if args.note is not None:
        analyst["note"] = args.note
    if cca_given is not None:
        from engine.cca import CCAResult
        from engine.certificate import file_sha256

        CCAResult.from_dict(cca_given)  # CCAError (one line) for a file that is not a CCA result
        sha = cca_given.get("bundle_sha256")
        if sha and sha != file_sha256(args.bundle):
            raise CliError(f"--result {args.result} was computed on another file than {args.bundle} "
                           f"(bundle sha256 {sha[:12]}…); run forensics cca on this bundle")
    computed, written = [], []
    progress = _progress(quiet)
    with open_bundle(args.bundle) as bundle:
        _say(quiet, f"loading the model of {Path(args.bundle).name} ...")
        handle = load_bundle_model(bundle)
        _say(quiet, "replaying the incident bit for bit ...")
        rep = replay(bundle, handle=handle)
        computed.append("replay")
        cf = None
        if cf_given is not None:
            from engine.cf import CFResult

            cf = CFResult.from_dict(cf_given)
        elif not args.no_cf:
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

            _say(quiet, f"running CCA (beam {args.beam}, max size {args.max_size}, {args.controls} controls) ...")
            try:
                res = run_cca(bundle, handle, cf=cf, op=args.op, beam=args.beam, max_size=args.max_size,
                              n_controls=args.controls, seed=args.seed, progress=progress)
            except CCAError as exc:
                raise CliError(f"CCA failed: {exc}") from None
            cca = res.to_dict()
            cca.setdefault("ranking", {})["cf"] = "computed (engine.cf.run_cf)" if cf is not None else "off"
            computed.append("cca")
        else:
            cca = cca_given
    stem = out.with_suffix("")
    result_path = Path(args.result) if args.result else stem.with_name(stem.name + ".cca.json")
    cf_path = Path(args.cf) if args.cf else stem.with_name(stem.name + ".cf.json")
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
    """PDF first (to a temporary name inside ``render_certificate_pdf``), then the JSON; both renamed into place.
    The JSON is validated before either is written, so an invalid certificate leaves no files behind."""
    from engine.certificate import certificate_json_text, write_certificate
    from workbench.cli import CliError

    certificate_json_text(doc)  # raises CertificateError (one line on stderr, exit 2) before anything is written
    # the command line never shows a window: draw with Qt's offscreen platform whatever the environment says
    os.environ["QT_QPA_PLATFORM"] = "offscreen"
    try:
        from workbench.pdf import render_certificate_pdf
    except ImportError as exc:
        raise CliError(f"the PDF needs Qt (PySide6), which cannot be loaded: {exc}") from None
    render_certificate_pdf(doc, pdf)
    write_certificate(doc, json_path)


def cmd_verify(args) -> int:
    from engine.certificate import read_certificate_json, verify_certificate
    from workbench.cli import CliError, _progress

    if args.controls is not None and args.controls < 0:
        raise CliError("--controls must be >= 0")
    doc = read_certificate_json(args.certificate)
    if not Path(args.bundle).is_file():
        raise CliError(f"bundle not found: {args.bundle}")
    report = verify_certificate(doc, args.bundle, n_controls=args.controls, progress=_progress(args.json))
    if args.json:
        print(json.dumps(report.to_dict()))
        return EXIT_OK if report.ok else EXIT_NOT_CERTIFIED
    failed = report.failed
    print(f"verify-certificate {args.certificate} against {args.bundle}: {len(report.claims)} claims, "
          f"{len(failed)} FAILED ({report.seconds:.1f} s)")
    width = max((len(c.name) for c in report.claims), default=0)
    for c in report.claims:
        print(f"  [{'ok' if c.ok else 'FAILED':>6}] {c.name:<{width}}  {c.detail}")
    if report.ok:
        print("VERIFIED: every claim of the certificate holds for this bundle")
    else:
        why = ", ".join(c.name for c in failed) or "the verification was cancelled"
        print(f"NOT VERIFIED: {why}")
    return EXIT_OK if report.ok else EXIT_NOT_CERTIFIED


if __name__ == "__main__":  # pragma: no cover
    from workbench.cli import main

    sys.exit(main(["certify", *sys.argv[1:]]))
