"""``forensics certify`` and ``forensics verify-certificate`` as a user scripts them.

The main flow runs in fresh interpreters (``python -m workbench.cli``): exit codes, stdout and stderr are what a
shell sees. Bad input is checked in-process through ``workbench.cli.main`` (same code path, no interpreter start).
The CCA evidence is real (test_certificate.demo_evidence: 10 control sets, so the p-value criterion, which needs
200, is missed and the certificate is *qualified*: exit 1).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from engine.stats import wilson_interval
from test_certificate import demo_cf, demo_evidence

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "QT_QPA_PLATFORM": "offscreen"}


def forensics(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workbench.cli", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=600)


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, demo_bundle) -> Path:
    """``result.json`` (as ``forensics cca --out`` writes it) and ``cf.json`` (a CF result) for the demo bundle."""
    d = tmp_path_factory.mktemp("certify")
    _, cca, _ = demo_evidence(demo_bundle)
    (d / "result.json").write_text(json.dumps(cca.to_dict(), indent=1), encoding="utf-8")
    (d / "cf.json").write_text(json.dumps(demo_cf(demo_bundle).to_dict()), encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def cert_doc(demo_bundle):
    from engine.certificate import build_certificate

    _, cca, rep = demo_evidence(demo_bundle)
    return build_certificate(demo_bundle, cca=cca, replay_report=rep)


@pytest.fixture(scope="module")
def certified(inputs, demo_bundle):
    out = inputs / "out" / "cert.pdf"
    out.parent.mkdir()
    proc = forensics("certify", demo_bundle, "--out", out, "--result", inputs / "result.json", "--cf",
                     inputs / "cf.json", "--name", "CLI reviewer", "--note", "p-value needs more controls")
    return proc, out, out.with_suffix(".json")


def test_certify_writes_pdf_and_json_and_says_why_it_is_qualified(certified, inputs, demo_bundle):
    from engine.certificate import file_sha256, load_certificate

    proc, pdf, js = certified
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 1, (proc.stdout, proc.stderr)       # written, but a criterion is missed
    assert pdf.is_file() and js.is_file()
    assert sorted(p.name for p in pdf.parent.iterdir()) == ["cert.json", "cert.pdf"]  # nothing half-written left
    doc = load_certificate(js)
    assert doc["incident"]["bundle_sha256"] == file_sha256(demo_bundle)
    assert doc["analyst"]["name"] == "CLI reviewer" and doc["analyst"]["note"] == "p-value needs more controls"
    out = proc.stdout
    assert f"certificate written: {pdf} (5 pages) and {js}" in out
    assert doc["replay"]["bit_identical"], doc["replay"]["checks"]
    assert "FIX FOUND, QUALIFIED" in out and "p value" in out, out
    assert flat(doc["verdict"]) in flat(out)
    # the reproduction commands name the files this certificate was made from, with their real paths
    cmds = doc["commands"]
    assert f"forensics certify {demo_bundle} --out {pdf} --result {inputs / 'result.json'} --cf {inputs / 'cf.json'}" \
        in cmds
    assert f"forensics verify-certificate {js} {demo_bundle}" in cmds
    if shutil.which("pdftotext"):
        text = flat(subprocess.run(["pdftotext", "-enc", "UTF-8", str(pdf), "-"], capture_output=True, text=True,
                                   check=True).stdout)
        assert flat(doc["verdict"]) in text and doc["model"]["weights_sha256"] in text
        assert flat(f"forensics verify-certificate {js} {demo_bundle}") in text


def test_verify_certificate_holds_on_the_certified_bundle(certified, demo_bundle):
    _, _, js = certified
    proc = forensics("verify-certificate", js, demo_bundle, "--json")
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    report = json.loads(proc.stdout)
    assert report["ok"] and report["failed"] == [] and report["unchecked"] == []
    names = [c["name"] for c in report["claims"]]
    for n in ("schema", "verdict", "criteria", "fdr", "evidence counts", "p-value", "bundle sha256", "replay",
              "weights sha256", "tokenizer hash", "fix: incident flipped", "fix: metric", "fix: fraction touched",
              "fix: 1-minimal", "fix: flip rate", "fix: sufficiency", "fix: side effects", "fix: significance", "cf"):
        assert n in names
    assert all(c["ok"] and c["status"] == "ok" for c in report["claims"])
    cf = next(c for c in report["claims"] if c["name"] == "cf")   # CF re-run against the bundle's own baseline
    assert "re-run against baseline" in cf["detail"] and "as certified" in cf["detail"]


def test_verify_certificate_names_what_was_altered(certified, demo_bundle, tmp_path):
    _, _, js = certified
    altered = tmp_path / "altered.h5"
    shutil.copy(demo_bundle, altered)
    with h5py.File(altered, "r+") as f:                       # one recorded activation value nudged
        ds = f["activations/layer_002/mlp"]
        a = ds[()]
        a[3, 7] += np.float32(0.25)
        ds[...] = a
    proc = forensics("verify-certificate", js, altered, "--controls", "0")
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stdout.splitlines()
    failed = [ln for ln in lines if "[FAILED]" in ln]
    assert len(failed) == 2, proc.stdout                      # the certificate's own claims and the CF re-run hold
    assert "bundle sha256" in failed[0] and "altered" in failed[0]
    assert "replay" in failed[1] and "2.mlp" in failed[1]
    assert any("[    ok] weights sha256" in ln for ln in lines)
    assert any("[    ok] fix: flip rate" in ln for ln in lines)
    assert lines[-1] == "NOT VERIFIED: bundle sha256, replay"


def test_verify_certificate_fails_a_tampered_certificate(capsys, certified, demo_bundle, tmp_path):
    """Numbers changed in the certificate, each caught: the verdict text, the metric, the share of activations
    touched, an impossible p-value (1e-9 from 200 control sets: at least 1/201), the flip rate (with its interval),
    the side-effect rate, 1-minimality, a CF score and the CF run verdict."""
    _, _, js = certified
    doc = json.loads(js.read_text(encoding="utf-8"))
    cca = doc["cca"]
    doc["verdict"] = "Mean-ablating 1 site removes the failure everywhere. All 6 acceptance criteria are met."
    cca["baseline_metric"], cca["fixed_metric"] = 99.0, -99.0
    cca["fraction_of_activations"] = cca["fraction_of_activations"] / 4
    cca["n_controls"], cca["control_flip_rates"] = 200, (cca["control_flip_rates"] * 20)[:200]
    cca["p_value"] = 1e-9
    # rates that are whole counts and a matching interval, but not what the set does: 36 of 40 variants flipped
    # (all 40 do), 2 of 96 benign prompts changed (none do, and the tolerance is one prompt), not 1-minimal
    cca["flip_rate"], cca["flip_rate_ci"] = 36 / 40, list(wilson_interval(36, 40))
    cca["side_effect_rate"] = 2 / cca["n_benign"]
    cca["one_minimal"] = False
    site = next(s for s in doc["cf"]["scores"] if s["score"] is not None)
    site["score"] += 50.0
    doc["cf"]["run_anomalous"] = not doc["cf"]["run_anomalous"]
    bad = tmp_path / "tampered.json"
    bad.write_text(json.dumps(doc), encoding="utf-8")
    code, out, err = run_main(capsys, "verify-certificate", bad, demo_bundle, "--controls", "0")
    assert code == 1, out + err
    assert "Traceback" not in err
    failed = {ln.split("] ", 1)[1].split("  ")[0]: ln for ln in out.splitlines() if "[FAILED]" in ln}
    assert set(failed) == {"verdict", "criteria", "fdr", "p-value", "fix: metric", "fix: fraction touched", "cf",
                           "evidence counts", "fix: 1-minimal", "fix: flip rate", "fix: side effects"}, out
    assert "100% of 40 variants (certified 90% of 40, 95% CI 76.9%–96%)" in failed["fix: flip rate"]
    assert "0% (certified 2.1%; tolerance one prompt of 96)" in failed["fix: side effects"]
    assert "but the per-prompt rows show 0/96 changed" in failed["evidence counts"]
    assert "1-minimal yes (certified no)" in failed["fix: 1-minimal"]
    assert "not the sentence the certificate's numbers give" in failed["verdict"]
    assert "impossible" in failed["p-value"] and "1/201" in failed["p-value"]
    assert "baseline 17.5187 vs certified 99" in failed["fix: metric"]
    assert f"score {site['layer']}.{site['site']}" in failed["cf"] and "run verdict" in failed["cf"]
    assert any("[    ok] replay" in ln for ln in out.splitlines())  # the bundle itself is intact
    assert out.splitlines()[-1] == ("NOT VERIFIED: verdict, criteria, fdr, evidence counts, p-value, fix: metric, "
                                    "fix: fraction touched, fix: 1-minimal, fix: flip rate, fix: side effects, cf")


def test_a_claim_that_cannot_be_checked_is_not_a_failure(capsys, certified, demo_bundle, tmp_path):
    """A CF section computed against another baseline than the bundle's benign prompts give cannot be re-run here:
    the claim is unchecked, not FAILED, and the verdict is NOT FULLY VERIFIED (exit 4), not VERIFIED."""
    _, _, js = certified
    doc = json.loads(js.read_text(encoding="utf-8"))
    doc["cf"]["baseline_id"] = "0123456789abcdef"
    other = tmp_path / "other-baseline.json"
    other.write_text(json.dumps(doc), encoding="utf-8")
    code, out, err = run_main(capsys, "verify-certificate", other, demo_bundle, "--controls", "0")
    assert code == 4 and "Traceback" not in err, out + err
    lines = out.splitlines()
    assert "0 FAILED, 1 unchecked" in lines[0]
    cf = next(ln for ln in lines if "] cf " in ln)
    assert cf.startswith("  [unchecked] cf ") and "baseline 0123456789abcdef" in cf
    assert any(ln.startswith("  [       ok] verdict ") for ln in lines)
    assert lines[-1] == "NOT FULLY VERIFIED: every checked claim holds; not checked: cf"


def test_verify_refuses_too_few_controls_for_the_significance_claim(capsys, certified, demo_bundle):
    """The certificate's p-value comes from 10 control sets: 5 cannot reach p <= 0.05 at all (1/6), 50 cannot be
    compared with a p-value that could not reach it either; one line before any work, exit 2."""
    _, _, js = certified
    code, out, err = run_main(capsys, "verify-certificate", js, demo_bundle, "--controls", "5")
    assert code == 2 and out == ""
    assert_one_line(err, "--controls 5 cannot re-check", "1/6 = 0.17", "at least 19", "--controls 0 skips")
    code, out, err = run_main(capsys, "verify-certificate", js, demo_bundle, "--controls", "50")
    assert code == 2 and out == ""
    assert_one_line(err, "comes from 10 control sets", "the same 10")


def test_certify_runs_cf_and_cca_when_not_given(demo_bundle, tmp_path):
    from engine.certificate import load_certificate

    pdf = tmp_path / "fresh.pdf"
    proc = forensics("certify", demo_bundle, "--out", pdf, "--controls", "10", "--json")
    assert "Traceback" not in proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["computed"] == ["replay", "cf", "cca"]
    kept = [tmp_path / "fresh.cca.json", tmp_path / "fresh.cf.json"]
    assert summary["written"] == [str(pdf), str(pdf.with_suffix(".json"))] + [str(p) for p in kept]
    assert all(p.is_file() for p in kept)
    doc = load_certificate(pdf.with_suffix(".json"))
    assert summary["verdict"] == doc["verdict"] and summary["certificate_id"] == doc["certificate_id"]
    assert doc["replay"]["bit_identical"], doc["replay"]["checks"]
    assert doc["cca"]["n_controls"] == 10 and doc["cf"] is not None
    assert json.loads(kept[0].read_text(encoding="utf-8"))["fix_set"] == doc["cca"]["fix_set"]
    assert f"forensics cca {demo_bundle} --out {kept[0]} --controls 10" in doc["commands"]
    # 10 control sets cannot meet the p-value criterion (>= 200): the certificate is qualified, exit 1
    assert proc.returncode == 1 and summary["status"] == "qualified" and "p value" in summary["headline"]


# ---------------------------------------------------------------------------------------------- bad input
def run_main(capsys, *args) -> tuple[int, str, str]:
    from workbench.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line(err: str, *words: str) -> None:
    err = err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("error: "), err
    for w in words:
        assert w.lower() in err.lower(), err


def test_bad_input_is_one_line_and_non_zero(capsys, inputs, demo_bundle, tmp_path):
    res = inputs / "result.json"
    cases = [
        (("certify", tmp_path / "missing.h5", "--out", tmp_path / "c.pdf"), 2, ("bundle not found",)),
        (("certify", demo_bundle, "--out", tmp_path / "c.txt"), 2, (".pdf",)),
        (("certify", demo_bundle, "--out", tmp_path / "nope" / "c.pdf"), 2, ("folder does not exist",)),
        (("certify", demo_bundle), 2, ("--out",)),
        (("certify", demo_bundle, "--out", tmp_path / "c.pdf", "--result", tmp_path / "none.json"), 2,
         ("not found",)),
        (("certify", demo_bundle, "--out", tmp_path / "c.pdf", "--result", inputs / "cf.json"), 3,
         ("not a CCA result",)),
        (("certify", demo_bundle, "--out", tmp_path / "c.pdf", "--result", res, "--cf", res, "--no-cf"), 2,
         ("contradict",)),
        (("verify-certificate", tmp_path / "none.json", demo_bundle), 3, ("certificate not found",)),
        (("verify-certificate", res, tmp_path / "missing.h5"), 2, ("bundle not found",)),
    ]
    notjson = tmp_path / "broken.json"
    notjson.write_text("{ not json", encoding="utf-8")
    cases += [(("certify", demo_bundle, "--out", tmp_path / "c.pdf", "--result", notjson), 2, ("not JSON",)),
              (("verify-certificate", notjson, demo_bundle), 3, ("not a JSON certificate",))]
    other = json.loads(res.read_text(encoding="utf-8"))
    other["bundle_sha256"] = "0" * 64
    (tmp_path / "other.json").write_text(json.dumps(other), encoding="utf-8")
    cases.append((("certify", demo_bundle, "--out", tmp_path / "c.pdf", "--result", tmp_path / "other.json"), 2,
                  ("computed on another file",)))
    # the bundle is opened first: a file that is not HDF5 is named as such, not as a mismatch with --result
    junk = tmp_path / "junk.h5"
    junk.write_bytes(os.urandom(4096))
    cases.append((("certify", junk, "--out", tmp_path / "c.pdf", "--result", res), 3,
                  ("junk.h5 is not a readable HDF5 file",)))
    # the options of a CCA run here, with a given result
    cases.append((("certify", demo_bundle, "--out", tmp_path / "c.pdf", "--result", res, "--op", "patch", "--beam",
                   "3"), 2, ("--beam, --op only apply when certify runs CCA itself", "drop --result")))
    # --cf and --analyst are checked before the model is loaded (one line on stderr: no progress before it)
    cf_other = json.loads((inputs / "cf.json").read_text(encoding="utf-8"))
    cf_other["weights_sha256"] = "1" * 64
    (tmp_path / "cf-other.json").write_text(json.dumps(cf_other), encoding="utf-8")
    (tmp_path / "cf-broken.json").write_text(json.dumps({"scores": 3}), encoding="utf-8")
    (tmp_path / "analyst.json").write_text(json.dumps({"name": "x", "accepted": [5]}), encoding="utf-8")
    cases += [(("certify", demo_bundle, "--out", tmp_path / "c.pdf", "--result", res, "--cf",
                tmp_path / "cf-other.json"), 3, ("--cf", "cf-other.json", "another model")),
              (("certify", demo_bundle, "--out", tmp_path / "c.pdf", "--result", res, "--cf",
                tmp_path / "cf-broken.json"), 3, ("--cf", "malformed CF result")),
              (("certify", demo_bundle, "--out", tmp_path / "c.pdf", "--result", res, "--analyst",
                tmp_path / "analyst.json"), 3, ("--analyst", "element 5, but the fix set has 1"))]
    # outputs: a directory where the JSON goes, a certificate JSON over its own --result
    (tmp_path / "d" / "z.json").mkdir(parents=True)
    cases += [(("certify", demo_bundle, "--out", tmp_path / "d" / "z.pdf", "--result", res, "--cf",
                inputs / "cf.json"), 2, (f"the certificate JSON {tmp_path / 'd' / 'z.json'} is a directory",)),
              (("certify", demo_bundle, "--out", tmp_path / "result.pdf", "--result", tmp_path / "result.json"), 2,
               ("would overwrite --result",))]
    shutil.copy(res, tmp_path / "result.json")
    for args, code, words in cases:
        got, out, err = run_main(capsys, *args)
        assert got == code, (args, got, err)
        assert_one_line(err, *words)
        assert ".tmp" not in err
        assert out == ""
    assert not (tmp_path / "c.pdf").exists() and not (tmp_path / "c.json").exists()
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["z.json"] and (tmp_path / "d" / "z.json").is_dir()
    assert "computed on another file" not in run_main(capsys, "certify", junk, "--out", tmp_path / "c.pdf",
                                                      "--result", res)[2]


def test_pdf_and_json_are_renamed_together_or_not_at_all(cert_doc, tmp_path):
    """A failure after the PDF was drawn (the JSON's rename, then the PDF's) leaves neither file, no temporary file,
    and an error that names the user's path."""
    pytest.importorskip("PySide6")
    from workbench.cli import CliError
    from workbench.cli_certify import _render

    pdf, js = tmp_path / "a.pdf", tmp_path / "a.json"
    js.mkdir()                                      # the JSON cannot be renamed into place
    with pytest.raises(CliError, match=f"cannot write {js}"):
        _render(cert_doc, pdf, js)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
    pdf2, js2 = tmp_path / "b.pdf", tmp_path / "b.json"
    pdf2.mkdir()                                    # the PDF cannot be renamed: the JSON renamed before it goes again
    with pytest.raises(CliError, match=f"cannot write {pdf2}"):
        _render(cert_doc, pdf2, js2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.pdf"]
    _render(cert_doc, tmp_path / "c.pdf", tmp_path / "c.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.pdf", "c.json", "c.pdf"]


def test_a_certificate_that_breaks_its_schema_fails_the_schema_claim(capsys, certified, demo_bundle, tmp_path):
    _, _, js = certified
    doc = json.loads(js.read_text(encoding="utf-8"))
    doc["cca"]["flip_rate"] = 1.7
    bad = tmp_path / "edited.json"
    bad.write_text(json.dumps(doc), encoding="utf-8")
    code, out, err = run_main(capsys, "verify-certificate", bad, demo_bundle)
    assert code == 1 and err == ""
    assert "[FAILED] schema" in out and "cca.flip_rate" in out and "NOT VERIFIED: schema" in out
