"""The always-visible incident panel: prompt tokens, the model's output, the failing span, failure spec and metric."""

from __future__ import annotations

import html

from PySide6.QtCore import Qt, Slot
from PySide6.QtWidgets import QFrame, QLabel, QScrollArea, QSizePolicy, QVBoxLayout, QWidget

#: Background of the failing span's tokens (and of the failing output) — the same red the badges use.
FAIL_BG = "#f8c4c4"
FAIL_FG = "#8b0000"


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
    return (
        f"<b>Prompt</b> ({bundle.n_prompt_tokens} tokens; generated tokens tinted blue){span}<br>"
        f"<span style='font-family:monospace'>{' '.join(parts)}</span><br>"
        f"<b>Output</b> <span style='font-family:monospace'>{html.escape(output or '')}</span><br>"
        f"<b>Failure</b> <code>{html.escape(bundle.failure_spec)}</code> {verdict} "
        f"metric = {bundle.failure_metric:.4g} (expected: {html.escape(bundle.expected or '—')})"
    )


class IncidentPanel(QWidget):
    """Prompt / output / failure of the open incident; follows the session's bundle_opened / bundle_closed."""

    def __init__(self, session, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.session = session
        self.label = QLabel()
        self.label.setTextFormat(Qt.TextFormat.RichText)
        self.label.setWordWrap(True)
        self.label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.label.setAlignment(Qt.AlignmentFlag.AlignTop | Qt.AlignmentFlag.AlignLeft)
        self.label.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Minimum)
        # a long prompt (hundreds of tokens) scrolls inside the panel instead of pushing the views off the window
        self.scroll = QScrollArea()
        self.scroll.setWidget(self.label)
        self.scroll.setWidgetResizable(True)
        self.scroll.setFrameShape(QFrame.Shape.NoFrame)
        self.scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.scroll.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Maximum)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(6, 4, 6, 4)
        lay.addWidget(self.scroll)
        session.bundle_opened.connect(self.on_bundle_opened)
        session.bundle_closed.connect(self.on_bundle_closed)
        self.refresh()

    #: Most text lines the panel shows before it scrolls.
    MAX_LINES = 9

    def refresh(self) -> None:
        self.label.setText(incident_html(self.session.bundle))
        self.scroll.setMaximumHeight(self.MAX_LINES * self.fontMetrics().lineSpacing() + 8)

    @Slot(object)
    def on_bundle_opened(self, bundle) -> None:
        self.refresh()

    @Slot()
    def on_bundle_closed(self) -> None:
        self.refresh()

    def plain_text(self) -> str:
        """What the panel shows, as plain text (tests)."""
        from PySide6.QtGui import QTextDocument

        doc = QTextDocument()
        doc.setHtml(self.label.text())
        return doc.toPlainText()
