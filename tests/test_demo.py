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


def test_a_demo_run_that_stops_early_leaves_no_certificate_of_an_older_bundle(tmp_path, capsys, monkeypatch):
    """A demo run stopped after recording left the previous run's certificate and results beside the new bundle:
    verify-certificate then said the bundle was altered. They are removed before the bundle is recorded again."""
    import workbench.cli as cli

    out = tmp_path / "demo-out"
    out.mkdir()
    old = [out / n for n in ("demo-incident.cf.json", "demo-incident.cca.json", "demo-certificate.pdf",
                             "demo-certificate.json")]
    for f in old:
        f.write_text("from an older run\n", encoding="utf-8")
    keep = out / "notes.txt"
    keep.write_text("mine\n", encoding="utf-8")

    def stopped(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cli, "build_scenario_bundle", stopped)
    assert main(["demo", "--out", str(out)]) != 0
    assert not any(f.exists() for f in old) and keep.read_text(encoding="utf-8") == "mine\n"
    assert "removed the previous run's demo-incident.cf.json, demo-incident.cca.json" in capsys.readouterr().out
