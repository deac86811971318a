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


def test_results_computed_here_are_saved_beside_the_bundle_and_open_with_it(qtbot, saved, boxes, unsaved):
    """File ▸ Save results writes a result computed in the window (here set as the CF / CCA views do after a run)
    beside the bundle, in the JSON ``forensics cf/cca --out`` writes, and opening the bundle again shows it. Until it
    is saved the title is marked modified, and closing the bundle asks: Cancel keeps it open, Save writes the files,
    Discard drops the result and leaves the files as they were."""
    from engine.cca import SCHEMA as CCA_SCHEMA
    from engine.cf import CFResult

    bundle, cf, cca = saved
    cf_file, cca_file = bundle.with_name("incident.cf.json"), bundle.with_name("incident.cca.json")
    cf_file.unlink()
    cca_file.unlink()
    win = _window(qtbot)
    assert win.open_path(bundle)
    s = win.session
    assert s.cf is None and not win.isWindowModified() and not win.act_save_results.isEnabled()
    s.set_cf(cf)
    s.set_cca(cca)                                   # as the views do when a run ends
    assert s.unsaved_results() == ["cf", "cca"]
    assert win.isWindowModified() and win.act_save_results.isEnabled() and "[*]" in win.windowTitle()

    unsaved.answer = "cancel"                        # closing asks; Cancel keeps the bundle and its results
    win.close_bundle()
    assert s.bundle is not None and s.cca is cca
    assert len(unsaved.asked) == 1 and "incident.cf.json" in unsaved.asked[0] and "incident.cca.json" in unsaved.asked[0]
    assert not win.open_path(bundle)                 # opening a bundle closes this one: asked, and cancelled too
    assert len(unsaved.asked) == 2 and s.cca is cca

    win.act_save_results.trigger()
    assert not win.isWindowModified() and not win.act_save_results.isEnabled() and not s.unsaved_results()
    assert "Saved CF and CCA to incident.cf.json, incident.cca.json" in win.statusBar().currentMessage()
    on_disk_cf, on_disk_cca = json.loads(cf_file.read_text()), json.loads(cca_file.read_text())
    assert on_disk_cf["schema"] == CFResult.SCHEMA and on_disk_cca["schema"] == CCA_SCHEMA
    assert on_disk_cca == json.loads(json.dumps(cca.to_dict()))       # what `forensics cca --out` writes
    assert not list(bundle.parent.glob(".*.tmp"))                      # written through temporary names
    win.close_bundle()                               # nothing unsaved: no question
    assert s.bundle is None and len(unsaved.asked) == 2

    assert win.open_path(bundle)                     # the saved results come back with the bundle
    assert s.cca is not None and s.cca is not cca and not s.unsaved_results() and not win.isWindowModified()
    assert [e.intervention.describe() for e in s.cca.fix_set] == [e.intervention.describe() for e in cca.fix_set]
    assert s.cca.p_value == cca.p_value and s.cf.threshold == cf.threshold

    import dataclasses

    other = dataclasses.replace(s.cca, n_controls=7)      # a re-evaluated result, say: unsaved again
    s.set_cca(other)
    assert s.unsaved_results() == ["cca"] and win.isWindowModified()
    unsaved.answer = "discard"
    win.close_bundle()
    assert s.bundle is None and json.loads(cca_file.read_text()) == on_disk_cca     # the file is as it was
    assert win.open_path(bundle)
    s.set_cca(other)
    unsaved.answer = "save"
    win.close()                                      # closing the window asks too; Save writes, then it closes
    assert not win.isVisible() and json.loads(cca_file.read_text())["n_controls"] == 7
    assert len(unsaved.asked) == 4 and not boxes


def test_a_result_that_cannot_be_written_says_why_and_stays_unsaved(qtbot, saved, boxes, unsaved):
    bundle, cf, cca = saved
    cca_file = bundle.with_name("incident.cca.json")
    cca_file.unlink()
    cca_file.mkdir()                                 # a folder where the file would go: the rename fails
    win = _window(qtbot)
    assert win.open_path(bundle)
    win.session.set_cca(cca)
    assert not win.save_results()
    assert boxes and boxes[-1][0] == "Save results" and "cannot write" in boxes[-1][1] and \
        "incident.cca.json" in boxes[-1][1], boxes
    assert win.session.unsaved_results() == ["cca"] and win.isWindowModified()
    assert not list(bundle.parent.glob(".*.tmp"))    # the temporary file is gone
    unsaved.answer = "save"                          # Save fails: the window stays open
    win.close()
    assert win.isVisible() and win.session.bundle is not None
    unsaved.answer = "discard"
    win.close()
    assert not win.isVisible()
