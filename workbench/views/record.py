"""File ▸ New incident… (Ctrl+N): record a failing run of a model into a new bundle, as ``forensics record`` does.

The dialog asks for what ``forensics record`` takes: the model (a local directory, a hub id, or a registered source
such as ``scenario:bert-sentiment-bypass``; remote code only when ticked), the failing prompt, the failure spec
(checked as it is typed), the expected behaviour, the benign counterpart, the prompt-set files (one prompt per line)
and the bundle to write.  Record checks every input on the GUI thread (a missing file, an empty prompt, an output
folder that cannot be written: one line in red under the form, the dialog stays open); the recording itself runs on
the engine thread (:func:`record_job`: ``engine.models.load_model`` → ``engine.recorder.record_incident`` →
``engine.bundle.write_bundle``, which writes to a temporary name and renames), with progress in the status bar and
Esc to cancel.  The main window then opens the new bundle and says what the analyses will not be able to measure on
it (the notes ``forensics record`` prints).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from PySide6.QtCore import Qt, Signal, Slot
from PySide6.QtWidgets import (QCheckBox, QComboBox, QDialog, QDialogButtonBox, QFileDialog, QFormLayout, QHBoxLayout,
                               QLabel, QLineEdit, QPlainTextEdit, QPushButton, QSpinBox, QVBoxLayout, QWidget)

from engine.errors import ForensicsError

JOB = "record"

#: the prompt-set files: (key, field label, what it is for)
SET_FILES = (
    ("benign", "Benign reference prompts", "mean-ablation and CF's baseline (CF needs at least 4, its run-level "
                                           "verdict at least 19)"),
    ("benign_heldout", "Held-out benign prompts", "side effects of a fix set; CF's false-positive rate"),
    ("variants", "Held-out failing variants", "a fix set's flip rate and its p-value against random controls"),
    ("variant_counterparts", "Variant counterparts", "line i: variant i without the attack (sufficiency on every "
                                                     "pair)"),
)
#: how the record notes name the input that supplies each prompt set (workbench.cli._record_notes)
NOTE_NAMES = {"variants": "Held-out failing variants", "benign_heldout": "Held-out benign prompts",
              "counterpart": "Benign counterpart", "benign": "Benign reference prompts"}


class RecordRequestError(ForensicsError):
    """An input of the record dialog that cannot be used (one line, shown under the form)."""


@dataclass
class RecordRequest:
    """What the record dialog asks for (the options of ``forensics record``)."""

    model: str
    prompt: str
    failure: str
    out: str
    expected: str = ""
    counterpart: str = ""
    files: dict[str, str] = field(default_factory=dict)     # SET_FILES key -> path ("" = none)
    max_new_tokens: int = 8
    embed_weights: str = "auto"                              # auto | yes | no
    trust_remote_code: bool = False


@dataclass
class RecordPlan:
    """A checked request: the parsed failure spec, the prompt sets read from their files, the output path."""

    request: RecordRequest
    spec: object
    out: Path
    benign: list[str]
    sets: dict[str, list[str]]


def _lines(path: str, label: str) -> list[str]:
    """The prompts of a prompt-set file, one per line (read as ``forensics record`` reads them)."""
    from workbench.cli import CliError, _read_lines

    p = str(Path(path).expanduser())
    try:
        return _read_lines(p if p != "-" else "./-")         # "-" is a file here, not standard input
    except CliError as exc:
        raise RecordRequestError(f"{label}: {exc}") from None


def check_request(req: RecordRequest) -> RecordPlan:
    """Check every input before anything slow runs (GUI thread: reads only the prompt files).

    Raises:
        RecordRequestError: the first input that cannot be used, in one line.
    """
    from engine.errors import FailureSpecError
    from engine.failure import FailureSpec

    if not req.model.strip():
        raise RecordRequestError("Model: give a local model directory or a hub id")
    if not req.prompt.strip():
        raise RecordRequestError("Failing prompt: empty; give the text the model fails on")
    try:
        spec = FailureSpec.parse(req.failure.strip())
    except FailureSpecError as exc:
        raise RecordRequestError(f"Failure: {str(exc).splitlines()[0]}") from None
    if not req.out.strip():
        raise RecordRequestError("Bundle: choose where to write the new bundle (.h5)")
    out = Path(req.out.strip()).expanduser()
    if out.suffix.lower() not in (".h5", ".hdf5"):
        out = out.with_name(out.name + ".h5")
    if out.is_dir():
        raise RecordRequestError(f"Bundle: {out} is a folder; give a file name")
    if out.exists():
        raise RecordRequestError(f"Bundle: {out} already exists; give a new name (nothing is replaced from here)")
    if not out.parent.is_dir():
        raise RecordRequestError(f"Bundle: the folder {out.parent} does not exist")
    if not os.access(out.parent, os.W_OK):
        raise RecordRequestError(f"Bundle: the folder {out.parent} is not writable")
    labels = {k: label for k, label, _ in SET_FILES}
    read = {k: _lines(p, labels[k]) if p.strip() else [] for k, p in req.files.items() if k in labels}
    sets: dict[str, list[str]] = {}
    if req.counterpart.strip():
        sets["counterpart"] = [req.counterpart.strip()]
    for k in ("variants", "benign_heldout"):
        if read.get(k):
            sets[k] = read[k]
    if read.get("variant_counterparts"):
        if not read.get("variants"):
            raise RecordRequestError("Variant counterparts need held-out failing variants (line i is the benign "
                                     "twin of variant i)")
        if len(read["variant_counterparts"]) != len(read["variants"]):
            raise RecordRequestError(f"Variant counterparts: {len(read['variant_counterparts'])} prompt(s) for "
                                     f"{len(read['variants'])} variant(s); give one benign twin per variant, in order")
        sets["variant_counterparts"] = read["variant_counterparts"]
    return RecordPlan(req, spec, out, read.get("benign", []), sets)


def record_job(plan: RecordPlan):
    """The engine-thread job that records ``plan`` (``fn(emit, cancel)`` for :class:`workbench.worker.EngineRunner`).

    Returns ``None`` when cancelled (nothing is written), else ``{"path", "failing", "spec", "output", "notes"}``."""
    req = plan.request

    def job(emit, cancel):
        from engine.bundle import write_bundle
        from engine.models import load_model
        from engine.recorder import RecordingCancelled, record_incident
        from workbench.cli import _record_notes

        emit({"done": 0, "total": 1, "what": f"loading the model {req.model}"})
        handle = load_model(req.model.strip(), trust_remote_code=req.trust_remote_code)
        if cancel.is_set():
            return None
        try:
            inc = record_incident(handle, req.prompt, plan.spec, benign_prompts=plan.benign, expected=req.expected,
                                  prompt_sets=plan.sets, max_new_tokens=req.max_new_tokens,
                                  embed_weights={"auto": "auto", "yes": True, "no": False}[req.embed_weights],
                                  progress=lambda d, t, what: emit({"done": d, "total": t, "what": what}),
                                  cancel=cancel)
        except RecordingCancelled:
            return None
        if cancel.is_set():
            return None
        emit({"done": 1, "total": 1, "what": f"writing {plan.out.name}"})
        write_bundle(plan.out, inc)
        notes = _record_notes(plan.sets, len(inc.benign.prompts) if inc.benign else 0, NOTE_NAMES)
        return {"path": str(plan.out), "failing": bool(inc.failure.failing), "spec": str(inc.failure.spec),
                "output": inc.run.continuation_text, "notes": notes}

    return job


def _new_name(path: Path) -> Path:
    """``path``, or ``NAME-2.h5``, ``NAME-3.h5``, … : the first that does not exist."""
    candidate, k = path, 1
    while candidate.exists():
        k += 1
        candidate = path.with_name(f"{path.stem}-{k}{path.suffix}")
    return candidate


class _FileField(QWidget):
    """A line edit with a Browse… button (an existing file, a folder, or a file to write)."""

    def __init__(self, mode: str, caption: str, filter: str = "", parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.mode, self.caption, self.filter = mode, caption, filter
        self.edit = QLineEdit()
        self.button = QPushButton("Browse…")
        self.button.clicked.connect(self.browse)
        lay = QHBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.edit, 1)
        lay.addWidget(self.button)

    def text(self) -> str:
        return self.edit.text()

    def setText(self, text: str) -> None:  # noqa: N802 - Qt naming
        self.edit.setText(text)

    @Slot()
    def browse(self) -> None:
        start = self.edit.text() or str(Path.cwd())
        if self.mode == "dir":
            path = QFileDialog.getExistingDirectory(self, self.caption, start)
        elif self.mode == "save":
            path, _ = QFileDialog.getSaveFileName(self, self.caption, start, self.filter)
        else:
            path, _ = QFileDialog.getOpenFileName(self, self.caption, start, self.filter)
        if path:
            self.edit.setText(path)


class RecordDialog(QDialog):
    """File ▸ New incident…: the inputs of ``forensics record``; emits :attr:`planned` with a checked
    :class:`RecordPlan` when Record is pressed and every input is usable."""

    planned = Signal(object)

    def __init__(self, parent: QWidget | None = None, start_dir: str | os.PathLike | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("New incident: record a failing run")
        self.setObjectName("record-dialog")
        self.plan: RecordPlan | None = None
        start = Path(start_dir) if start_dir else Path.cwd()
        form = QFormLayout()
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.ExpandingFieldsGrow)
        self.model = _FileField("dir", "Model directory")
        self.model.edit.setPlaceholderText("local model directory (config.json + *.safetensors) or a hub id")
        form.addRow("Model", self.model)
        self.remote = QCheckBox("allow code shipped with the model to run (trust_remote_code)")
        form.addRow("", self.remote)
        self.prompt = QPlainTextEdit()
        self.prompt.setPlaceholderText("the prompt the model fails on")
        self.prompt.setTabChangesFocus(True)
        self.prompt.setFixedHeight(64)
        form.addRow("Failing prompt", self.prompt)
        self.failure = QLineEdit()
        self.failure.setPlaceholderText("contains:TEXT | token:TEXT | label:NAME | wordlist:NAME")
        self.failure.textChanged.connect(self._check_spec)
        form.addRow("Failure", self.failure)
        self.spec_hint = QLabel("")      # one line: a wrapped label would not grow the form after it is laid out
        form.addRow("", self.spec_hint)
        self.expected = QLineEdit()
        self.expected.setPlaceholderText("optional: the correct behaviour, in words (shown in the certificate)")
        form.addRow("Expected", self.expected)
        self.counterpart = QLineEdit()
        self.counterpart.setPlaceholderText("optional: the same prompt without the attack (patching donor, "
                                            "sufficiency)")
        form.addRow("Benign counterpart", self.counterpart)
        self.files: dict[str, _FileField] = {}
        for key, label, why in SET_FILES:
            f = _FileField("open", label, "Text files (*.txt);;All files (*)")
            f.edit.setPlaceholderText(f"optional, one prompt per line: {why}")
            f.edit.setToolTip(f"{label}: a text file, one prompt per line; {why}")
            self.files[key] = f
            form.addRow(label, f)
        opts = QHBoxLayout()
        self.max_new = QSpinBox()
        self.max_new.setRange(1, 512)
        self.max_new.setValue(8)
        self.max_new.setToolTip("greedy continuation length for contains: / wordlist: failures")
        self.embed = QComboBox()
        self.embed.addItems(["auto", "yes", "no"])
        self.embed.setToolTip("embed the weights in the bundle (auto: when they are at most 64 MiB), so it replays "
                              "without the model directory")
        opts.addWidget(QLabel("Max new tokens"))
        opts.addWidget(self.max_new)
        opts.addSpacing(16)
        opts.addWidget(QLabel("Embed weights"))
        opts.addWidget(self.embed)
        opts.addStretch(1)
        form.addRow("", self._wrap(opts))
        self.out = _FileField("save", "Write the bundle", "Incident bundles (*.h5 *.hdf5)")
        self.out.setText(str(_new_name(start / "incident.h5")))
        form.addRow("Bundle", self.out)
        self.error = QLabel("")
        self.error.setObjectName("record-error")
        self.error.setWordWrap(True)
        self.error.setStyleSheet("color: #b00020;")
        self.error.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Cancel)
        self.record_button = buttons.addButton("Record", QDialogButtonBox.ButtonRole.AcceptRole)
        self.record_button.setDefault(True)
        buttons.accepted.connect(self.try_record)
        buttons.rejected.connect(self.reject)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(self.error)
        lay.addWidget(buttons)
        self.resize(760, self.sizeHint().height())

    @staticmethod
    def _wrap(layout) -> QWidget:
        w = QWidget()
        layout.setContentsMargins(0, 0, 0, 0)
        w.setLayout(layout)
        return w

    def request(self) -> RecordRequest:
        return RecordRequest(model=self.model.text(), prompt=self.prompt.toPlainText(), failure=self.failure.text(),
                             out=self.out.text(), expected=self.expected.text().strip(),
                             counterpart=self.counterpart.text(),
                             files={k: f.text() for k, f in self.files.items()},
                             max_new_tokens=self.max_new.value(), embed_weights=self.embed.currentText(),
                             trust_remote_code=self.remote.isChecked())

    @Slot(str)
    def _check_spec(self, text: str) -> None:
        from engine.errors import FailureSpecError
        from engine.failure import FailureSpec

        if not text.strip():
            self.spec_hint.setText("")
            return
        try:
            spec = FailureSpec.parse(text.strip())
        except FailureSpecError as exc:
            self.spec_hint.setStyleSheet("color: #b00020;")
            self.spec_hint.setText(str(exc).splitlines()[0])
        else:
            self.spec_hint.setStyleSheet("color: #1b5e20;")
            self.spec_hint.setText(f"✓ {spec.kind}: judged on the "
                                   f"{'generated continuation' if spec.kind in ('contains', 'wordlist') else 'next token' if spec.kind == 'token' else 'predicted label'}")

    @Slot()
    def try_record(self) -> None:
        """Record: check every input; a problem is one line under the form and the dialog stays open."""
        try:
            plan = check_request(self.request())
        except RecordRequestError as exc:
            self.error.setText(str(exc))
            return
        self.error.setText("")
        self.plan = plan
        self.planned.emit(plan)
        self.accept()
