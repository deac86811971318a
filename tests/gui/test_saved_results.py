"""Results saved by the CLI come back into the workbench: ``forensics demo`` writes NAME.cf.json / NAME.cca.json
beside the bundle, and opening the bundle shows them; File ▸ Load saved result… (or a drop) attaches a result or a
certificate's; a file of another incident is refused with a dialog. File ▸ Bundle properties shows ``forensics
info``'s summary. The results are real (test_certificate.demo_evidence / demo_cf)."""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("PySide6")
pytest.importorskip("pytestqt")

from test_certificate import demo_cf, demo_evidence  # noqa: E402


@pytest.fixture
def saved(demo_bundle, tmp_path):
    """The demo incident copied to tmp/incident.h5 with its CF and CCA results saved beside it, as the CLI names
    them."""
    bundle = tmp_path / "incident.h5"
    shutil.copyfile(demo_bundle, bundle)
    cf, cca = demo_cf(demo_bundle), demo_evidence(demo_bundle)[1]
    (tmp_path / "incident.cf.json").write_text(json.dumps(cf.to_dict()), encoding="utf-8")
    (tmp_path / "incident.cca.json").write_text(json.dumps(cca.to_dict()), encoding="utf-8")
    return bundle, cf, cca


def _window(qtbot):
    from workbench.app import MainWindow

    win = MainWindow()
    qtbot.addWidget(win)
    win.resize(1400, 900)
    win.show()
    qtbot.waitExposed(win)
    return win


def test_opening_a_bundle_shows_the_results_saved_beside_it(qtbot, saved, boxes):
    bundle, cf, cca = saved
    win = _window(qtbot)
    assert win.open_path(bundle)
    s = win.session
    assert s.cf is not None and s.cca is not None
    assert [f.layer for f in s.cf.findings] == [f.layer for f in cf.findings]
    assert [e.intervention.describe() for e in s.cca.fix_set] == [e.intervention.describe() for e in cca.fix_set]
    msg = win.statusBar().currentMessage()
    assert "Loaded saved CF from incident.cf.json" in msg and "CCA from incident.cca.json" in msg, msg
    assert not boxes
    win.close()


def test_a_saved_result_of_another_incident_is_not_attached(qtbot, saved, boxes):
    bundle, _, _ = saved
    other = json.loads(bundle.with_name("incident.cca.json").read_text())
    other["bundle_uuid"] = "00000000-0000-0000-0000-000000000000"
    bundle.with_name("incident.cca.json").write_text(json.dumps(other))
    win = _window(qtbot)
    assert win.open_path(bundle)
    assert win.session.cf is not None and win.session.cca is None      # the CF result still belongs
    assert "not loaded: incident.cca.json" in win.statusBar().currentMessage()
    # asked for explicitly: a dialog that names the problem, and nothing changes
    assert not win.load_result(bundle.with_name("incident.cca.json"))
    assert boxes and boxes[-1][0] == "Cannot load result" and "another incident" in boxes[-1][1]
    junk = bundle.with_name("notes.json")
    junk.write_text('{"hello": 1}')
    assert not win.load_result(junk)
    assert "is not a CF result, CCA result or certificate" in boxes[-1][1]
    assert win.session.cca is None
    win.close()


def test_a_certificate_brings_its_cca_result(qtbot, saved, demo_bundle, tmp_path, boxes):
    from engine.certificate import build_certificate, reproduction_commands, write_certificate

    bundle, cf, cca = saved
    for q in (bundle.with_name("incident.cf.json"), bundle.with_name("incident.cca.json")):
        q.unlink()
    rep = demo_evidence(demo_bundle)[2]
    doc = build_certificate(bundle, cca=cca, cf=cf, replay_report=rep,
                            commands=reproduction_commands(bundle, pdf_path=tmp_path / "cert.pdf"))
    cert = write_certificate(doc, tmp_path / "someone-elses-cert.json")
    win = _window(qtbot)
    assert win.open_path(bundle)
    assert win.session.cca is None
    assert win.load_result(cert)
    assert win.session.cca is not None and win.session.cca.flipped == cca.flipped
    assert win.session.cf is not None and win.session.cf.threshold == cf.threshold
    assert "Loaded CF and CCA results from someone-elses-cert.json" in win.statusBar().currentMessage()
    win.close()


def test_bundle_properties_show_what_the_bundle_holds(qtbot, saved, boxes):
    bundle, _, _ = saved
    win = _window(qtbot)
    assert not win.act_properties.isEnabled()
    assert win.open_path(bundle)
    assert win.act_properties.isEnabled()
    win.show_properties()
    text = win.properties_box.informativeText()
    b = win.session.bundle
    assert repr(b.prompt) in text and b.model_info["weights_sha256"][:16] in text
    assert f"{b.n_layers} layers" in text and "beside it: incident.cca.json, incident.cf.json" in text
    win.properties_box.close()
    win.close()
