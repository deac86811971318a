"""The Qt binding the project installs does not corrupt the interpreter.

PySide6 6.12.0 on CPython 3.11 dropped one reference to ``None`` on every call of a Qt method that returns nothing;
after a few thousand calls (one certificate render, a few minutes of GUI use) CPython aborts with
"Fatal Python error: none_dealloc". pyproject.toml pins a release without the bug; this test fails if a future
release brings it back.
"""

from __future__ import annotations

import sys

import pytest

pytest.importorskip("PySide6")

from PySide6.QtGui import QColor, QImage, QPainter, QPen  # noqa: E402


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="None is immortal from CPython 3.12")
def test_void_qt_calls_keep_none_alive(qapp):
    img = QImage(64, 64, QImage.Format.Format_RGB32)
    painter = QPainter(img)
    pen = QPen()
    before = sys.getrefcount(None)
    for _ in range(2000):
        pen.setWidthF(1.5)                 # void setters and painter calls: what the PDF and the plots do
        painter.setPen(QColor(10, 20, 30))
        painter.drawLine(0, 0, 10, 10)
    after = sys.getrefcount(None)
    painter.end()
    assert after >= before - 50, f"None lost {before - after} references in 6000 void Qt calls"
