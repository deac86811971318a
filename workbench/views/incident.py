"""The always-visible incident panel: prompt tokens, the model's output, the failing span, failure spec and metric."""

from __future__ import annotations

import html
import math

from PySide6.QtCore import Qt, Slot
from PySide6.QtWidgets import QFrame, QSizePolicy, QTextBrowser, QVBoxLayout, QWidget

#: Background of the failing span's tokens (and of the failing output) — the same red the badges use.
FAIL_BG = "#f8c4c4"
FAIL_FG = "#8b0000"


def metric_name(bundle) -> str:
    """What the incident's failure metric measures, in words (higher = more failing for every spec kind)."""
    from engine.failure import metric_name as _words

    return _words(bundle.failure.kind if bundle is not None else "")


def _tok(text: str) -> str:
    """A token as visible text: leading-space marker and escaped."""
    return html.escape(text.replace("Ġ", "·").replace("▁", "·").replace("\n", "⏎"))


def incident_html(bundle) -> str:
    """Rich text of the incident: prompt tokens (failing span marked), output, failure spec and metric."""
    if bundle is None:
        return "<i>No incident open — File ▸ Open (Ctrl+O), drop an .h5 file here, or Help ▸ Open demo.</i>"
    start, length = bundle.target_start, bundle.target_length
    parts = []
    for i, tok in enumerate(bundle.tokens):
        style = "border:1px solid #bbb; padding:0 2px;"
        if start >= 0 and start <= i < start + length:
            style += f"background:{FAIL_BG}; color:{FAIL_FG}; font-weight:bold;"
        elif i >= bundle.n_prompt_tokens:
            style += "background:#e6eefb;"
        parts.append(f'<span style="{style}" title="position {i}">{_tok(tok)}</span>')
    verdict = (f'<span style="background:{FAIL_BG}; color:{FAIL_FG}; font-weight:bold;">&nbsp;FAILS&nbsp;</span>'
               if bundle.failing else '<span style="background:#c9f0c9; font-weight:bold;">&nbsp;ok&nbsp;</span>')
    output = bundle.label if bundle.label else bundle.continuation_text
    span = ""
    if start >= 0 and length > 0:
        span = f" · failing span: positions {start}–{start + length - 1}"
    n_generated = len(bundle.tokens) - bundle.n_prompt_tokens
    tinted = f"; {n_generated} generated, tinted blue" if n_generated > 0 else ""   # a classifier generates nothing
    return (
        f"<b>Prompt</b> ({bundle.n_prompt_tokens} tokens{tinted}){span}<br>"
        f"<span style='font-family:monospace'>{' '.join(parts)}</span><br>"
        f"<b>Output</b> <span style='font-family:monospace'>{html.escape(output or '')}</span><br>"
        f"<b>Failure</b> <code>{html.escape(bundle.failure_spec)}</code> {verdict} "
        f"<span title='{html.escape(metric_name(bundle))}'>metric = {bundle.failure_metric:.4g}</span>"
        f" <span style='color:#555'>({html.escape(metric_name(bundle).split(' (')[0])})</span><br>"
        f"<b>Expected</b> {html.escape(bundle.expected or '—')}"
    )


class IncidentPanel(QWidget):
    """Prompt / output / failure of the open incident; follows the session's bundle_opened / bundle_closed.

    The text sits in a read-only :class:`QTextBrowser` that is exactly as tall as its text at the current width
    (so the dock wastes no space) up to ``MAX_LINES`` lines; a longer prompt scrolls inside the panel.
    """

    #: Most text lines the panel shows before it scrolls.
    MAX_LINES = 9

    def __init__(self, session, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.session = session
        self.view = QTextBrowser()
        self.view.setFrameShape(QFrame.Shape.NoFrame)
        self.view.setOpenLinks(False)
        self.view.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.view.setStyleSheet("QTextBrowser { background: transparent; }")
        self.view.document().setDocumentMargin(2)
        self.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Fixed)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(6, 2, 6, 2)
        lay.addWidget(self.view)
        session.bundle_opened.connect(self.on_bundle_opened)
        session.bundle_closed.connect(self.on_bundle_closed)
        self.refresh()

    def refresh(self) -> None:
        self.view.setHtml(incident_html(self.session.bundle))
        self._fit_height()

    def _fit_height(self) -> None:
        doc = self.view.document()
        doc.setTextWidth(max(200, self.view.viewport().width()))
        text_h = math.ceil(doc.size().height())
        cap = self.MAX_LINES * self.fontMetrics().lineSpacing() + 2 * int(doc.documentMargin())
        height = min(text_h, cap) + 2
        self.view.setFixedHeight(height)
        m = self.layout().contentsMargins()
        self.setFixedHeight(height + m.top() + m.bottom())   # the dock cannot grow past its text

    def resizeEvent(self, event) -> None:  # noqa: N802 - Qt naming
        super().resizeEvent(event)
        self._fit_height()

    @Slot(object)
    def on_bundle_opened(self, bundle) -> None:
        self.refresh()

    @Slot()
    def on_bundle_closed(self) -> None:
        self.refresh()

    def plain_text(self) -> str:
        """What the panel shows, as plain text (tests)."""
        return self.view.toPlainText()
