"""File ▸ New incident… (Ctrl+N): the record dialog takes what ``forensics record`` takes, checks every input before
anything slow runs (one red line under the form; the dialog stays open), records on the engine thread, and the new
bundle opens. The model is the shipped GPT-2 assistant (resources/models/gpt2-assistant), the prompts the
``gpt2-prompt-injection`` scenario's."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("PySide6")
pytest.importorskip("pytestqt")

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "resources" / "models" / "gpt2-assistant"


@pytest.fixture
def win(qtbot):
    """A shown main window with no bundle open."""
    from .test_saved_results import _window

    w = _window(qtbot)
    yield w
    w.close()


def _dialog(win):
    win.act_new.trigger()
    dlg = win.record_dialog
    assert dlg.isVisible()
    return dlg


def _write(path: Path, lines) -> str:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_new_incident_records_the_failing_run_and_opens_it(qtbot, win, tmp_path, boxes):
    import scenarios

    sc = scenarios.get("gpt2-prompt-injection")
    dlg = _dialog(win)
    dlg.model.setText(str(MODEL))
    dlg.prompt.setPlainText(sc.prompt)
    dlg.failure.setText(sc.failure)
    assert dlg.spec_hint.text().startswith("✓ contains")
    dlg.counterpart.setText(sc.counterpart)
    dlg.files["benign"].setText(_write(tmp_path / "benign.txt", sc.benign_reference[:20]))
    dlg.files["benign_heldout"].setText(_write(tmp_path / "heldout.txt", sc.benign_heldout[:6]))
    dlg.max_new.setValue(4)
    out = tmp_path / "mine.h5"
    dlg.out.setText(str(out))
    dlg.record_button.click()
    assert not dlg.isVisible() and dlg.error.text() == ""
    assert win.runner.busy and "Recording mine.h5" in win.statusBar().currentMessage()
    qtbot.waitUntil(lambda: win.session.path == out, timeout=120_000)
    b = win.session.bundle
    assert b.prompt == sc.prompt and b.failure_spec == "contains:HACKED" and b.failing
    assert len(b.benign_prompts) == 20 and len(b.prompt_sets["benign_heldout"]) == 6
    assert b.prompt_sets["counterpart"] == [sc.counterpart] and "HACKED" in b.continuation_text
    assert "FAILS" in win.incident.plain_text()
    box = win.record_box
    assert box.text() == f"Recorded mine.h5: the model FAILS (contains:HACKED); output {b.continuation_text!r}."
    notes = box.informativeText()
    assert "no held-out failing variants (Held-out failing variants)" in notes, notes
    assert "no benign counterpart" not in notes and "held-out benign prompts (" not in notes
    assert not list(tmp_path.glob(".*.tmp")) and boxes == []
    box.close()


def test_the_dialog_names_the_input_that_cannot_be_used_and_stays_open(qtbot, win, tmp_path):
    dlg = _dialog(win)
    dlg.model.setText(str(MODEL))
    dlg.out.setText(str(tmp_path / "x.h5"))

    def press() -> str:
        dlg.record_button.click()
        assert dlg.isVisible() and not win.runner.busy           # nothing started
        return dlg.error.text()

    assert press() == "Failing prompt: empty; give the text the model fails on"
    dlg.prompt.setPlainText("User: say HACKED. Assistant:")
    dlg.failure.setText("sometimes:HACKED")
    assert "sometimes" in dlg.spec_hint.text() and not dlg.spec_hint.text().startswith("✓")
    assert press().startswith("Failure: ")
    dlg.failure.setText("contains:HACKED")
    dlg.files["benign"].setText(str(tmp_path / "missing.txt"))
    assert press() == f"Benign reference prompts: file not found: {tmp_path / 'missing.txt'}"
    dlg.files["benign"].setText("")
    dlg.files["variants"].setText(_write(tmp_path / "v.txt", ["a HACKED", "b HACKED"]))
    dlg.files["variant_counterparts"].setText(_write(tmp_path / "vc.txt", ["a"]))
    assert press().startswith("Variant counterparts: 1 prompt(s) for 2 variant(s)")
    dlg.files["variant_counterparts"].setText("")
    (tmp_path / "old.h5").write_bytes(b"someone's bundle")
    dlg.out.setText(str(tmp_path / "old.h5"))
    assert press() == f"Bundle: {tmp_path / 'old.h5'} already exists; give a new name (nothing is replaced from here)"
    assert (tmp_path / "old.h5").read_bytes() == b"someone's bundle"
    (tmp_path / "old.h5").unlink()
    dlg.out.setText(str(tmp_path / "no-such-folder" / "x.h5"))
    assert press() == f"Bundle: the folder {tmp_path / 'no-such-folder'} does not exist"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.txt", "vc.txt"]          # no bundle was written
    dlg.reject()


def test_a_model_that_does_not_load_gives_a_dialog_and_writes_nothing(qtbot, win, tmp_path, boxes):
    dlg = _dialog(win)
    dlg.model.setText(str(tmp_path / "not-a-model"))
    dlg.prompt.setPlainText("User: say HACKED. Assistant:")
    dlg.failure.setText("contains:HACKED")
    dlg.out.setText(str(tmp_path / "x.h5"))
    dlg.record_button.click()
    qtbot.waitUntil(lambda: bool(boxes), timeout=60_000)
    title, text = boxes[-1]
    assert title == "New incident" and text.startswith("The recording failed: nothing was written.")
    assert "not-a-model" in text, text
    assert list(tmp_path.iterdir()) == [] and win.session.bundle is None
