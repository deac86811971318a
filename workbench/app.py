"""``forensics-workbench``: the desktop application.

This first version opens a bundle (File ▸ Open, or a path on the command line) and shows the incident: prompt,
output, failure spec, model identity, and the recorded layers and sites with their shapes. The analysis views
(heatmaps, CF, CCA, intervention editing) grow here as the engine pieces land.
"""

from __future__ import annotations

import sys
from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import (QApplication, QFileDialog, QLabel, QMainWindow, QMessageBox, QSplitter,
                               QTreeWidget, QTreeWidgetItem, QVBoxLayout, QWidget)

from engine.bundle import open_bundle
from engine.errors import ForensicsError


class MainWindow(QMainWindow):
    def __init__(self) -> None:
        super().__init__()
        self.setWindowTitle("Model Forensics Workbench")
        self.resize(1000, 640)
        self.bundle = None
        self.summary = QLabel("Open an incident bundle (File ▸ Open, Ctrl+O).")
        self.summary.setWordWrap(True)
        self.summary.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.summary.setAlignment(Qt.AlignTop | Qt.AlignLeft)
        self.tree = QTreeWidget()
        self.tree.setHeaderLabels(["Layer / site", "Shape", "Module"])
        splitter = QSplitter()
        splitter.addWidget(self.tree)
        right = QWidget()
        lay = QVBoxLayout(right)
        lay.addWidget(self.summary)
        splitter.addWidget(right)
        splitter.setSizes([420, 580])
        self.setCentralWidget(splitter)
        menu = self.menuBar().addMenu("&File")
        act = QAction("&Open…", self)
        act.setShortcut(QKeySequence.Open)
        act.triggered.connect(self.choose_file)
        menu.addAction(act)
        quit_act = QAction("&Quit", self)
        quit_act.setShortcut(QKeySequence.Quit)
        quit_act.triggered.connect(self.close)
        menu.addAction(quit_act)
        self.statusBar().showMessage("Ready")

    def choose_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open incident bundle", "", "Incident bundles (*.h5 *.hdf5)")
        if path:
            self.open_path(path)

    def open_path(self, path: str | Path) -> bool:
        try:
            bundle = open_bundle(path)
        except ForensicsError as exc:
            QMessageBox.critical(self, "Cannot open bundle", str(exc))
            self.statusBar().showMessage(f"Could not open {path}")
            return False
        if self.bundle is not None:
            self.bundle.close()
        self.bundle = bundle
        b = bundle
        self.setWindowTitle(f"{Path(path).name} — Model Forensics Workbench")
        verdict = "FAILS" if b.failing else "does not fail"
        self.summary.setText(
            f"<b>Prompt</b><br>{_esc(b.prompt)}<br><br><b>Output</b><br>{_esc(b.continuation_text)}<br><br>"
            f"<b>Failure</b> {_esc(b.failure_spec)}: the recorded run {verdict} (metric {b.failure_metric:.4g})<br>"
            f"<b>Model</b> {_esc(b.model_info['class_name'])} ({_esc(b.model_info['family'])}), "
            f"{b.n_layers} layers × {b.model_info['d_model']} wide; weights sha256 "
            f"{b.model_info['weights_sha256'][:16]}…<br><b>Bundle</b> {b.uuid}, created {b.created}")
        self.tree.clear()
        for i in range(b.n_layers):
            layer = QTreeWidgetItem([f"layer {i}", "", ""])
            for site in b.sites:
                ds = b.activation_dataset(i, site)
                layer.addChild(QTreeWidgetItem([site, " × ".join(map(str, ds.shape)), ""]))
            self.tree.addTopLevelItem(layer)
        self.statusBar().showMessage(f"Opened {path}")
        return True

    def closeEvent(self, event) -> None:
        if self.bundle is not None:
            self.bundle.close()
            self.bundle = None
        super().closeEvent(event)


def _esc(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    app = QApplication.instance() or QApplication(argv)
    win = MainWindow()
    win.show()
    if len(argv) > 1:
        win.open_path(argv[1])
    return app.exec()


if __name__ == "__main__":
    sys.exit(main())
