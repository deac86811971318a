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
    assert report["ok"] and report["failed"] == []
    names = [c["name"] for c in report["claims"]]
    for n in ("schema", "bundle sha256", "replay", "weights sha256", "tokenizer hash", "fix: incident flipped",
              "fix: flip rate", "fix: sufficiency", "fix: side effects", "fix: significance"):
        assert n in names
    assert all(c["ok"] for c in report["claims"])


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
    assert len(failed) == 2, proc.stdout
    assert "bundle sha256" in failed[0] and "altered" in failed[0]
    assert "replay" in failed[1] and "2.mlp" in failed[1]
    assert any("[    ok] weights sha256" in ln for ln in lines)
    assert any("[    ok] fix: flip rate" in ln for ln in lines)
    assert lines[-1] == "NOT VERIFIED: bundle sha256, replay"


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
    for args, code, words in cases:
        got, out, err = run_main(capsys, *args)
        assert got == code, (args, got, err)
        assert_one_line(err, *words)
        assert out == ""
    assert not (tmp_path / "c.pdf").exists() and not (tmp_path / "c.json").exists()


def test_a_certificate_that_breaks_its_schema_fails_the_schema_claim(capsys, certified, demo_bundle, tmp_path):
    _, _, js = certified
    doc = json.loads(js.read_text(encoding="utf-8"))
    doc["cca"]["flip_rate"] = 1.7
    bad = tmp_path / "edited.json"
    bad.write_text(json.dumps(doc), encoding="utf-8")
    code, out, err = run_main(capsys, "verify-certificate", bad, demo_bundle)
    assert code == 1 and err == ""
    assert "[FAILED] schema" in out and "cca.flip_rate" in out and "NOT VERIFIED: schema" in out
