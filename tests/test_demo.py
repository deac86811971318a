"""``forensics demo`` (what ``make demo`` runs): the whole pipeline on the shipped demo incident, as a newcomer sees it."""

from __future__ import annotations

import json

from workbench.cli import main


def test_demo_runs_the_whole_pipeline(tmp_path, capsys):
    out = tmp_path / "demo-out"
    assert main(["demo", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    # every step ran and said what it measured
    for n, what in enumerate(("Recording", "Replaying", "Compression Forensics", "CCA", "certificate"), start=1):
        assert f"\n{n}. " in text and what in text
    assert "-> FAILS (contains:HACKED)" in text
    assert "BIT-IDENTICAL" in text
    assert "$ forensics cca " in text and "$ forensics certify " in text     # the commands to reproduce each step
    # the files it promised
    for name in ("demo-incident.h5", "demo-incident.cf.json", "demo-incident.cca.json", "demo-certificate.pdf",
                 "demo-certificate.json"):
        assert (out / name).is_file(), name
    cert = json.loads((out / "demo-certificate.json").read_text(encoding="utf-8"))
    cca = json.loads((out / "demo-incident.cca.json").read_text(encoding="utf-8"))
    assert cca["flipped"] and cert["cca"]["fix_set"] == cca["fix_set"]      # the certificate carries the result
    assert cert["incident"]["bundle_sha256"] == cca["bundle_sha256"]
    assert "forensics-workbench " in text
