"""Regenerate the example RCA certificate of the demo incident (run: ``python scripts/certificate_example.py``).

Writes ``docs/certificate-example.pdf``, ``docs/certificate-example.json`` and ``docs/certificate-example/page-N.png``
(``pdftoppm -png -r 80``), from real computations on the demo incident:

1. the bundle ``demo-out/demo-incident.h5`` (what ``forensics demo`` / ``make demo`` records; recorded here when it
   is missing or with ``--rebuild``);
2. the replay (bit-identical check), Compression Forensics (``engine.cf.run_cf``) and CCA (``engine.cca.run_cca``
   with the CLI's defaults: greedy, max size 4, 200 control sets); the CF and CCA results are kept beside the bundle
   (``demo-out/demo-incident.cf.json`` / ``.cca.json``) and reused while the bundle's sha256 is unchanged (``--rerun``
   computes them again);
3. the certificate, with the reproduction commands naming exactly those files.

No needless churn: when the evidence is the same as in the committed ``docs/certificate-example.json`` (same bundle
hash, same CF and CCA results, same replay outcome), the committed certificate (its id, generation time and replay
timing, all real values from the run that made it) is kept and only re-rendered; the PDF and PNGs are replaced
only when their content changed (PDF time stamps aside).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

BUNDLE = Path("demo-out/demo-incident.h5")
PDF = Path("docs/certificate-example.pdf")
PNG_DIR = Path("docs/certificate-example")
DPI = 80
# parts of the certificate that change from run to run without the evidence changing
VOLATILE = {("certificate_id",), ("created",), ("replay", "seconds"), ("replay", "threads"), ("cca", "seconds"),
            ("cca", "evidence", "seconds_by_stage"), ("cca", "ranking", "search_seconds"), ("cf", "seconds"),
            ("environment", "certified"), ("program",)}


def _log(msg: str) -> None:
    print(msg, flush=True)


def _strip(d, path=()):
    if isinstance(d, dict):
        return {k: _strip(v, path + (k,)) for k, v in d.items() if path + (k,) not in VOLATILE}
    if isinstance(d, list):
        return [_strip(v, path) for v in d]
    return d


def _same_evidence(a: dict, b: dict) -> bool:
    return json.dumps(_strip(a), sort_keys=True) == json.dumps(_strip(b), sort_keys=True)


def _pdf_key(data: bytes) -> bytes:
    """PDF bytes without the time stamps QPdfWriter writes (it offers no way to set them)."""
    data = re.sub(rb"\(D:\d{14}[^)]*\)", b"(D:)", data)
    return re.sub(rb'="\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[^"]*"', b'=""', data)


def _replace_if_changed(new: Path, old: Path, key=lambda b: b) -> bool:
    if old.is_file() and key(old.read_bytes()) == key(new.read_bytes()):
        new.unlink()
        return False
    old.parent.mkdir(parents=True, exist_ok=True)
    os.replace(new, old)
    return True


def _results(bundle_path: Path, rerun: bool, controls: int):
    """CF and CCA results for the bundle: cached beside it (keyed by the bundle's sha256) or computed now."""
    from engine.bundle import open_bundle
    from engine.cca import CCAResult, run_cca
    from engine.certificate import file_sha256
    from engine.cf import CFResult, run_cf
    from engine.replay import load_bundle_model, replay

    sha = file_sha256(bundle_path)
    cf_path = bundle_path.with_suffix(".cf.json")
    cca_path = bundle_path.with_suffix(".cca.json")
    with open_bundle(bundle_path) as b:
        handle = load_bundle_model(b)
        _log(f"replaying {bundle_path} ...")
        rep = replay(b, handle=handle)
        _log(f"  {'BIT-IDENTICAL' if rep.bit_identical else 'DIFFERS'} ({rep.seconds:.2f} s)")
        cached = None
        if not rerun and cf_path.is_file() and cca_path.is_file():
            cca_d = json.loads(cca_path.read_text(encoding="utf-8"))
            cf_d = json.loads(cf_path.read_text(encoding="utf-8"))
            if cca_d.get("bundle_sha256") == sha and cf_d.get("bundle_uuid") == b.uuid \
                    and cca_d.get("n_controls") == controls:
                cached = (CFResult.from_dict(cf_d), CCAResult.from_dict(cca_d))
                _log(f"reusing {cf_path} and {cca_path} (computed on this bundle; --rerun to compute again)")
        if cached is None:
            _log("running Compression Forensics ...")
            cf = run_cf(b, handle)
            _log(f"running CCA ({controls} control sets; about a minute on 2 cores) ...")
            cca = run_cca(b, handle, cf=cf, n_controls=controls)
            for obj, path in ((cf, cf_path), (cca, cca_path)):
                d = obj.to_dict()
                if obj is cca:
                    d.setdefault("ranking", {})["cf"] = "computed (engine.cf.run_cf)"
                path.write_text(json.dumps(d, indent=1) + "\n", encoding="utf-8")
            cached = (CFResult.from_dict(json.loads(cf_path.read_text(encoding="utf-8"))),
                      CCAResult.from_dict(json.loads(cca_path.read_text(encoding="utf-8"))))
    return rep, cached[0], cached[1], cf_path, cca_path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=BUNDLE, help=f"the demo bundle (default {BUNDLE})")
    ap.add_argument("--rebuild", action="store_true", help="record the demo incident again")
    ap.add_argument("--rerun", action="store_true", help="compute CF and CCA again even when cached")
    ap.add_argument("--controls", type=int, default=200, help="random control sets for CCA (default 200)")
    ap.add_argument("--dpi", type=int, default=DPI, help=f"PNG resolution (default {DPI})")
    args = ap.parse_args(argv)
    os.chdir(ROOT)                      # every path in the certificate's commands is relative to the repo root
    if shutil.which("pdftoppm") is None:
        _log("error: pdftoppm (poppler-utils) is needed for the PNGs")
        return 2

    import scenarios
    from engine.certificate import build_certificate, reproduction_commands, write_certificate
    from workbench.cli import build_scenario_bundle
    from workbench.pdf import PAGE_COUNT, render_certificate_pdf

    bundle = args.bundle
    if args.rebuild or not bundle.is_file():
        bundle.parent.mkdir(parents=True, exist_ok=True)
        _log(f"recording the demo incident into {bundle} ...")
        build_scenario_bundle(scenarios.get("gpt2-prompt-injection"), bundle)
    rep, cf, cca, cf_path, cca_path = _results(bundle, args.rerun, args.controls)
    commands = reproduction_commands(bundle, pdf_path=PDF, result_path=cca_path, cf_path=cf_path,
                                     n_controls=cca.n_controls or None)
    doc = build_certificate(bundle, cca=cca, cf=cf, replay_report=rep, commands=commands)
    js = PDF.with_suffix(".json")
    if js.is_file():
        old = json.loads(js.read_text(encoding="utf-8"))
        if _same_evidence(old, doc):
            _log(f"evidence unchanged: keeping certificate {old['certificate_id']} generated {old['created']}")
            doc = old
    write_certificate(doc, js)
    _log(f"wrote {js}")

    with tempfile.TemporaryDirectory(prefix="cert-example-") as tmp:
        tmp = Path(tmp)
        pdf_new = tmp / "certificate-example.pdf"
        render_certificate_pdf(doc, pdf_new)
        changed = _replace_if_changed(pdf_new, PDF, _pdf_key)
        _log(f"{'wrote' if changed else 'unchanged:'} {PDF}")
        subprocess.run(["pdftoppm", "-png", "-r", str(args.dpi), str(PDF), str(tmp / "page")], check=True)
        pages = sorted(tmp.glob("page-*.png"), key=lambda p: int(p.stem.split("-")[-1]))
        if len(pages) != PAGE_COUNT:
            _log(f"error: the PDF has {len(pages)} pages, expected {PAGE_COUNT}")
            return 1
        PNG_DIR.mkdir(parents=True, exist_ok=True)
        keep = set()
        for p in pages:
            target = PNG_DIR / f"page-{int(p.stem.split('-')[-1])}.png"
            keep.add(target.name)
            _log(f"{'wrote' if _replace_if_changed(p, target) else 'unchanged:'} {target}")
        for stale in PNG_DIR.glob("*.png"):
            if stale.name not in keep:
                stale.unlink()
    _log(f"verdict: {doc['verdict']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
