"""The RCA certificate as a PDF, drawn with Qt (QPdfWriter + QPainter + QTextDocument; no browser, no screen).

:func:`render_certificate_pdf` takes the certificate dictionary of :mod:`engine.certificate` (schema
``forensics.rca-certificate/1``) and writes an A4 PDF of :data:`PAGE_COUNT` pages:

1. **Summary** for a manager: the standing (certified / qualified / not certified), the verdict sentence, the failure,
   the fix, the key numbers as tiles, the acceptance criteria, the analyst's review.
2. **Compression Forensics**: the per-layer anomaly bars with the threshold, the per-token score map, the findings
   and where the fix set's sites rank.
3. **The fix set**: the table (drop-one and single effects, necessity, analyst decision), a layer × position
   picture of the set, the search trace.
4. **Evidence**: outcome rates with their intervals, side effects per held-out benign prompt, the control
   distribution against the observed flip rate, the FDR-adjusted claims.
5. **Reproduce and verify**: the exact commands, every hash, the replay checks, the environment.

Every page carries the incident id, the generation time, the certificate id and "page i of N". Charts are drawn
with QPainter in page coordinates (points); text is laid out with QTextDocument, wraps at word boundaries and, for
long hashes and paths, anywhere. The renderer needs a ``QGuiApplication`` (one is created, offscreen, when none
exists) and must run on that application's thread; the file is written to a temporary name and renamed.
"""

from __future__ import annotations

import html
import math
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Callable, Mapping, Sequence

from engine.certificate import certificate_status, describe_element, format_p, position_ranges, set_was_checked
from engine.errors import CertificateError

PAGE_COUNT = 5
DPI = 300
PAGE_W, PAGE_H = 595.276, 841.89          # A4 in points
MARGIN_X = 42.0
TOP, BOTTOM = 50.0, 800.0                  # content band (header above, footer below)
CONTENT_W = PAGE_W - 2 * MARGIN_X

SANS = ["DejaVu Sans", "Liberation Sans", "Arial", "Helvetica"]
MONO = ["DejaVu Sans Mono", "Liberation Mono", "Courier New", "Courier"]

NAVY = "#1f3a5f"
INK = "#1d1d1f"
GREY = "#5f6368"
LIGHT = "#eef1f5"
RULE = "#c9ced6"
GREEN = "#1e7b34"
RED = "#b42318"
AMBER = "#a15c07"
SITE_COLOURS = {"resid_pre": "#56B4E9", "attn": "#E69F00", "mlp": "#009E73", "resid_post": "#CC79A7"}
SITE_NAMES = {"resid_pre": "residual in", "attn": "attention out", "mlp": "MLP out", "resid_post": "residual out",
              "head": "attention head", "neuron": "MLP neuron"}
LEVEL_COLOURS = {"certified": GREEN, "qualified": AMBER, "not-certified": RED}

_APP = None
_NONE_GUARDED = False


# ----------------------------------------------------------------------------------------------------------------
# Qt plumbing
# ----------------------------------------------------------------------------------------------------------------
def guard_none_refcount() -> bool:
    """Work around a PySide6 bug that drops a reference to ``None`` on every call of a ``void`` Qt method.

    Seen with PySide6 6.12.0 on CPython 3.11 (``QPen.setWidthF``, ``QPainter.drawRect``, ``QObject.setObjectName``
    ... each lower ``sys.getrefcount(None)`` by one; the wheel seems to assume CPython >= 3.12, where ``None`` is
    immortal). One certificate costs ~4,500 such calls; once ``None``'s count reaches zero the interpreter aborts
    with "Fatal Python error: none_dealloc". When the leak is detected this raises ``None``'s reference count by
    2**40, which makes it immortal in practice (what CPython 3.12 does by design). No-op on CPython >= 3.12 and
    when the installed PySide6 does not leak. Returns True when the guard was applied (now or before).
    """
    global _NONE_GUARDED
    if _NONE_GUARDED or sys.version_info >= (3, 12) or sys.implementation.name != "cpython":
        return _NONE_GUARDED
    from PySide6.QtGui import QPen

    pen = QPen()
    before = sys.getrefcount(None)
    for _ in range(8):
        pen.setWidthF(1.0)
    if sys.getrefcount(None) < before:
        import ctypes

        ctypes.c_ssize_t.from_address(id(None)).value += 1 << 40  # ob_refcnt is the first field of every object
        _NONE_GUARDED = True
    return _NONE_GUARDED


def ensure_qt_app():
    """The running Qt application; creates an offscreen ``QApplication`` when there is none.

    A ``QApplication`` (not just a ``QGuiApplication``, which would do for painting): the process may go on to
    create widgets (the GUI, pytest-qt's ``qapp``), and Qt aborts when a widget is made under a QGuiApplication.
    """
    global _APP
    from PySide6.QtCore import QCoreApplication

    app = QCoreApplication.instance()
    if app is None:
        if not os.environ.get("QT_QPA_PLATFORM"):
            os.environ["QT_QPA_PLATFORM"] = "offscreen"   # we draw into a PDF; no window is ever shown
        from PySide6.QtWidgets import QApplication

        _APP = app = QApplication(["forensics-pdf"])
    else:
        from PySide6.QtGui import QGuiApplication

        if not isinstance(app, QGuiApplication):
            raise RuntimeError("a QCoreApplication is running: the PDF needs a QGuiApplication (fonts, painting)")
    guard_none_refcount()
    return app


def _check_thread(app) -> None:
    from PySide6.QtCore import QThread

    if QThread.currentThread() is not app.thread():
        raise RuntimeError("render_certificate_pdf must run on the Qt application's (GUI) thread")


def _fmt_time(iso: str) -> str:
    """``2026-01-03T09:14:50+00:00`` -> ``2026-01-03 09:14 UTC`` (the text as given when it does not parse)."""
    try:
        t = datetime.fromisoformat(str(iso).replace("Z", "+00:00"))
    except ValueError:
        return str(iso)
    off = t.utcoffset()
    zone = "UTC" if off is not None and off.total_seconds() == 0 else (t.strftime("%z") if off is not None else "")
    return (t.strftime("%Y-%m-%d %H:%M:%S") + (" " + zone if zone else "")).strip()


def _finite(x) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _pct(x, digits: int = 1) -> str:
    x = _finite(x)
    if x is None:
        return "n/a"
    v = 100 * x
    if abs(v - round(v)) < 0.05 or digits == 0:
        return f"{v:.0f}%"
    return f"{v:.{digits}f}%"


def _num(x, fmt: str = ".3g") -> str:
    x = _finite(x)
    return "n/a" if x is None else format(x, fmt)


def _esc(s) -> str:
    return html.escape(str(s), quote=False)


def _token(tok: str, limit: int = 14) -> str:
    t = str(tok).replace("\n", "\u21b5").replace("\t", "\u21e5")
    if t.startswith("\u0120"):                      # GPT-2 byte-level space marker
        t = "\u2423" + t[1:]
    return t if len(t) <= limit else t[: limit - 1] + "\u2026"


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=10 * mag)
    start = math.ceil(lo / step - 1e-9) * step
    out, v = [], start
    while v <= hi + step * 1e-6:
        out.append(round(v, 12))
        v += step
    return out


def _tick_label(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000 or abs(v) < 0.01:
        return f"{v:.0e}".replace("e+0", "e").replace("e-0", "e-")
    return f"{v:g}"


# ----------------------------------------------------------------------------------------------------------------
# The canvas: page coordinates in points, drawn on a 300-dpi QPdfWriter
# ----------------------------------------------------------------------------------------------------------------
class _Canvas:
    def __init__(self, writer, painter) -> None:
        from PySide6.QtCore import QPointF, QRectF
        from PySide6.QtGui import QColor, QFont, QFontMetricsF, QPen

        self.writer = writer
        self.p = painter
        self.k = writer.resolution() / 72.0
        self._QRectF, self._QPointF, self._QColor, self._QFont, self._QPen = QRectF, QPointF, QColor, QFont, QPen
        self._QFontMetricsF = QFontMetricsF
        self._fonts: dict = {}

    # ---- basics
    def R(self, x, y, w, h):
        k = self.k
        return self._QRectF(x * k, y * k, w * k, h * k)

    def P(self, x, y):
        return self._QPointF(x * self.k, y * self.k)

    def font(self, size: float, bold: bool = False, mono: bool = False, italic: bool = False):
        key = (size, bold, mono, italic)
        f = self._fonts.get(key)
        if f is None:
            f = self._QFont()
            f.setFamilies(MONO if mono else SANS)
            f.setStyleHint(self._QFont.StyleHint.Monospace if mono else self._QFont.StyleHint.SansSerif)
            f.setPointSizeF(size)
            f.setBold(bold)
            f.setItalic(italic)
            f.setHintingPreference(self._QFont.HintingPreference.PreferNoHinting)
            # no "fi"/"fl" ligatures: text copied or extracted from the PDF must read "fix", "flipped", "certificate"
            for tag in ("liga", "clig", "dlig"):
                f.setFeature(self._QFont.Tag(tag), 0)
            self._fonts[key] = f
        return f

    def text_width(self, s: str, size: float, bold: bool = False, mono: bool = False) -> float:
        return self._QFontMetricsF(self.font(size, bold, mono), self.writer).horizontalAdvance(s) / self.k

    def pen(self, colour=INK, width: float = 0.6, dash: bool = False):
        from PySide6.QtCore import Qt

        pen = self._QPen(self._QColor(colour))
        pen.setWidthF(width * self.k)
        pen.setCapStyle(Qt.PenCapStyle.FlatCap)
        if dash:
            pen.setStyle(Qt.PenStyle.DashLine)
        return pen

    def rect(self, x, y, w, h, fill=None, stroke=None, width: float = 0.6, radius: float = 0.0) -> None:
        from PySide6.QtCore import Qt
        from PySide6.QtGui import QBrush

        p = self.p
        p.setPen(self.pen(stroke, width) if stroke else Qt.PenStyle.NoPen)
        p.setBrush(QBrush(self._QColor(fill)) if fill else Qt.BrushStyle.NoBrush)
        if radius:
            p.drawRoundedRect(self.R(x, y, w, h), radius * self.k, radius * self.k)
        else:
            p.drawRect(self.R(x, y, w, h))

    def line(self, x1, y1, x2, y2, colour=INK, width: float = 0.6, dash: bool = False) -> None:
        self.p.setPen(self.pen(colour, width, dash))
        self.p.drawLine(self.P(x1, y1), self.P(x2, y2))

    def label(self, x, y, w, h, s: str, size: float = 8, bold: bool = False, colour=INK, align: str = "left",
              mono: bool = False, min_size: float = 5.0, rotate: float = 0.0) -> float:
        """One line of text in the box ``(x, y, w, h)``, shrunk (down to ``min_size``) and then elided to fit.

        Returns the font size used."""
        from PySide6.QtCore import Qt

        size_used = size
        while size_used > min_size and self.text_width(s, size_used, bold, mono) > w:
            size_used = max(min_size, size_used - 0.25)
        text = s
        if self.text_width(text, size_used, bold, mono) > w:
            fm = self._QFontMetricsF(self.font(size_used, bold, mono), self.writer)
            text = fm.elidedText(s, Qt.TextElideMode.ElideRight, w * self.k)
        flags = {"left": Qt.AlignmentFlag.AlignLeft, "right": Qt.AlignmentFlag.AlignRight,
                 "center": Qt.AlignmentFlag.AlignHCenter}[align] | Qt.AlignmentFlag.AlignVCenter
        p = self.p
        p.setFont(self.font(size_used, bold, mono))
        p.setPen(self._QColor(colour))
        if rotate:
            p.save()
            p.translate(self.P(x, y))
            p.rotate(rotate)
            p.drawText(self.R(0, 0, w, h), int(flags), text)
            p.restore()
        else:
            p.drawText(self.R(x, y, w, h), int(flags), text)
        return size_used

    def _document(self, content: str, w: float, size: float, mono: bool, html_text: bool, align: str):
        from PySide6.QtCore import Qt
        from PySide6.QtGui import QTextDocument, QTextOption

        doc = QTextDocument()
        doc.documentLayout().setPaintDevice(self.writer)
        doc.setDocumentMargin(0)
        doc.setDefaultFont(self.font(size, mono=mono))
        opt = QTextOption()
        opt.setWrapMode(QTextOption.WrapMode.WrapAtWordBoundaryOrAnywhere)
        opt.setAlignment({"left": Qt.AlignmentFlag.AlignLeft, "right": Qt.AlignmentFlag.AlignRight,
                          "center": Qt.AlignmentFlag.AlignHCenter,
                          "justify": Qt.AlignmentFlag.AlignJustify}[align])
        opt.setUseDesignMetrics(True)
        doc.setDefaultTextOption(opt)
        doc.setDefaultStyleSheet("p { margin: 0; } b { font-weight: bold; } .g { color: %s; } .r { color: %s; } "
                                 ".ok { color: %s; } .m { font-family: 'DejaVu Sans Mono', monospace; }"
                                 % (GREY, RED, GREEN))
        if html_text:
            doc.setHtml(content)
        else:
            doc.setPlainText(content)
        doc.setTextWidth(w * self.k)
        return doc

    def para(self, x, y, w, content: str, size: float = 9, colour=INK, mono: bool = False, html_text: bool = True,
             align: str = "left", draw: bool = True) -> float:
        """Wrapped text (HTML subset or plain) of width ``w`` at ``(x, y)``; returns its height in points."""
        from PySide6.QtGui import QAbstractTextDocumentLayout, QPalette

        doc = self._document(content, w, size, mono, html_text, align)
        h = doc.size().height() / self.k
        if draw:
            ctx = QAbstractTextDocumentLayout.PaintContext()
            ctx.palette.setColor(QPalette.ColorRole.Text, self._QColor(colour))
            self.p.save()
            self.p.translate(self.P(x, y))
            doc.documentLayout().draw(self.p, ctx)
            self.p.restore()
        return h

    def fit_para(self, x, y, w, h, content: str, size: float, min_size: float = 5.5, **kw) -> float:
        """Like :meth:`para`, with the largest size (<= ``size``) whose text fits in height ``h``; returns it."""
        s = size
        while s > min_size and self.para(x, y, w, content, s, draw=False, **kw) > h:
            s -= 0.25
        self.para(x, y, w, content, s, **kw)
        return s


# ----------------------------------------------------------------------------------------------------------------
# Reusable page pieces
# ----------------------------------------------------------------------------------------------------------------
def _heading(c: _Canvas, y: float, text: str, size: float = 12.5) -> float:
    c.label(MARGIN_X, y, CONTENT_W, size * 1.5, text, size, bold=True, colour=NAVY)
    y += size * 1.5 + 1
    c.line(MARGIN_X, y, MARGIN_X + CONTENT_W, y, RULE, 0.7)
    return y + 6


def _subheading(c: _Canvas, y: float, text: str) -> float:
    c.label(MARGIN_X, y, CONTENT_W, 13, text, 9.5, bold=True, colour=NAVY)
    return y + 15


def _table(c: _Canvas, x: float, y: float, widths: Sequence[float], header: Sequence[str] | None,
           rows: Sequence[Sequence[str]], size: float = 7.5, mono_cols: Sequence[int] = (), pad: float = 3.0,
           colours: Callable[[int, int], str | None] | None = None, max_y: float = BOTTOM,
           zebra: bool = True) -> tuple[float, int]:
    """A table of wrapped cells (HTML allowed in cells). Returns ``(y after, rows drawn)``; stops before ``max_y``."""
    total = sum(widths)
    if header:
        hh = max(c.para(0, 0, w - 2 * pad, f"<b>{_esc(t)}</b>", size, draw=False) for w, t in zip(widths, header))
        hh += 2 * pad
        c.rect(x, y, total, hh, fill=NAVY)
        cx = x
        for w, t in zip(widths, header):
            c.para(cx + pad, y + pad, w - 2 * pad, f"<b>{_esc(t)}</b>", size, colour="#ffffff")
            cx += w
        y += hh
    drawn = 0
    for r, row in enumerate(rows):
        hs = [c.para(0, 0, w - 2 * pad, str(cell), size, mono=(i in mono_cols), draw=False)
              for i, (w, cell) in enumerate(zip(widths, row))]
        rh = max(hs) + 2 * pad
        if y + rh > max_y:
            break
        if zebra and r % 2 == 1:
            c.rect(x, y, total, rh, fill="#f6f7f9")
        cx = x
        for i, (w, cell) in enumerate(zip(widths, row)):
            colour = (colours(r, i) if colours else None) or INK
            c.para(cx + pad, y + pad, w - 2 * pad, str(cell), size, colour=colour, mono=(i in mono_cols))
            cx += w
        y += rh
        c.line(x, y, x + total, y, RULE, 0.4)
        drawn += 1
    return y, drawn


def _kv(c: _Canvas, y: float, rows: Sequence[tuple[str, str]], label_w: float = 92, size: float = 8.5,
        x: float = MARGIN_X, w: float = CONTENT_W, mono_keys: Sequence[str] = ()) -> float:
    for key, value in rows:
        c.para(x, y, label_w - 6, f"<b>{_esc(key)}</b>", size, colour=GREY)
        h = c.para(x + label_w, y, w - label_w, value, size, mono=key in mono_keys)
        y += max(h, size * 1.3) + 3.5
    return y


def _no_data(c: _Canvas, x, y, w, h, text: str) -> None:
    c.rect(x, y, w, h, fill="#fafafa", stroke=RULE, width=0.6)
    c.para(x + 10, y + h / 2 - 8, w - 20, f"<i>{_esc(text)}</i>", 9, colour=GREY, align="center")


class _Axes:
    """A plot frame with ticks, grid and axis titles; maps data to page coordinates."""

    def __init__(self, c: _Canvas, x, y, w, h, xlim, ylim, *, xlabel: str = "", ylabel: str = "",
                 yticks=None, xticks=None, ylog: bool = False, xtick_labels: Callable | None = None,
                 left: float = 40, bottom: float = 26, title: str = "") -> None:
        self.c = c
        self.top = y + (14 if title else 4)
        self.x0, self.x1 = x + left, x + w - 6
        self.y1 = y + h - bottom
        self.xlim, self.ylim, self.ylog = xlim, ylim, ylog
        if title:
            c.label(x, y, w, 12, title, 8.5, bold=True, colour=INK)
        c.rect(self.x0, self.top, self.x1 - self.x0, self.y1 - self.top, fill="#ffffff")
        lo, hi = ylim
        ticks = yticks if yticks is not None else _nice_ticks(lo, hi, 5)
        for t in ticks:
            yy = self.Y(t)
            if self.top - 0.5 <= yy <= self.y1 + 0.5:
                c.line(self.x0, yy, self.x1, yy, "#e3e6ea", 0.45)
                c.line(self.x0 - 3, yy, self.x0, yy, GREY, 0.6)
                lab = (f"1e{int(round(t))}" if ylog else _tick_label(t))
                c.label(x, yy - 5, left - 6, 10, lab, 6.8, colour=GREY, align="right")
        if xticks is not None:
            for t in xticks:
                xx = self.X(t)
                c.line(xx, self.y1, xx, self.y1 + 3, GREY, 0.6)
                lab = xtick_labels(t) if xtick_labels else _tick_label(t)
                c.label(xx - 20, self.y1 + 4, 40, 9, lab, 6.8, colour=GREY, align="center")
        c.line(self.x0, self.top, self.x0, self.y1, INK, 0.7)
        c.line(self.x0, self.y1, self.x1, self.y1, INK, 0.7)
        if xlabel:
            c.label(self.x0, y + h - 11, self.x1 - self.x0, 10, xlabel, 7.2, colour=INK, align="center")
        if ylabel:
            span = self.y1 - self.top
            c.label(x + 1, self.y1, span, 10, ylabel, 7.2, colour=INK, align="center", rotate=-90)

    def X(self, v: float) -> float:
        lo, hi = self.xlim
        return self.x0 + (v - lo) / (hi - lo) * (self.x1 - self.x0)

    def Y(self, v: float) -> float:
        lo, hi = self.ylim
        return self.y1 - (v - lo) / (hi - lo) * (self.y1 - self.top)


def _legend(c: _Canvas, x: float, y: float, items: Sequence[tuple[str, str]], size: float = 7.0,
            line_items: Sequence[tuple[str, str, bool]] = ()) -> float:
    """A one-row legend: ``items`` = (colour, text) swatches, ``line_items`` = (colour, text, dashed). Returns x end."""
    for colour, text in items:
        c.rect(x, y + 1.5, 8, 7, fill=colour)
        tw = c.text_width(text, size)
        c.label(x + 11, y, tw + 2, 10, text, size, colour=INK)
        x += 11 + tw + 12
    for colour, text, dashed in line_items:
        c.line(x, y + 5, x + 14, y + 5, colour, 1.2, dash=dashed)
        tw = c.text_width(text, size)
        c.label(x + 17, y, tw + 2, 10, text, size, colour=INK)
        x += 17 + tw + 12
    return x


def _heat_colour(v: float, vmax: float) -> str:
    """White -> orange -> dark red for ``v`` in [0, vmax]."""
    t = 0.0 if vmax <= 0 else max(0.0, min(1.0, v / vmax))
    stops = [(0.0, (255, 255, 255)), (0.35, (253, 208, 162)), (0.7, (241, 105, 19)), (1.0, (127, 39, 4))]
    for (t0, c0), (t1, c1) in zip(stops, stops[1:]):
        if t <= t1:
            f = (t - t0) / (t1 - t0)
            rgb = [round(a + f * (b - a)) for a, b in zip(c0, c1)]
            return "#%02x%02x%02x" % tuple(rgb)
    return "#7f2704"


# ----------------------------------------------------------------------------------------------------------------
# Words for the numbers
# ----------------------------------------------------------------------------------------------------------------
_OP_WORDS = {"mean": "Mean-ablate", "zero": "Zero", "patch": "Patch (from the benign counterpart)", "scale": "Scale",
             "set": "Overwrite"}


def _positions_words(e: Mapping, tokens: Sequence[str]) -> str:
    pos = e.get("positions", "all")
    if pos == "all":
        return "at every token"
    ps = sorted(int(p) for p in pos)
    toks = ", ".join(f"\u201c{_token(tokens[p])}\u201d" for p in ps[:4] if p < len(tokens))
    more = f" and {len(ps) - 4} more" if len(ps) > 4 else ""
    return f"at token{'s' if len(ps) > 1 else ''} {position_ranges(ps)} ({toks}{more})"


def element_words(e: Mapping, tokens: Sequence[str]) -> str:
    """``Mean-ablate the attention output of layer 0 at token 15 (“:”)`` (plain text)."""
    comp = SITE_NAMES.get(e.get("component"), str(e.get("component")))
    verb = _OP_WORDS.get(e.get("op"), str(e.get("op")))
    s = f"{verb} the {comp} of layer {e.get('layer')}"
    if e.get("indices"):
        s += f" ({'heads' if e.get('component') == 'head' else 'units'} {position_ranges(e['indices'])})"
    s += " " + _positions_words(e, tokens)
    if e.get("op") == "scale" and e.get("value") is not None:
        s += f" by \u00d7{float(e['value']):g}"
    if e.get("op") == "set" and e.get("value") is not None:
        s += f" to {float(e['value']):g}"
    return s


def _failure_words(spec: str) -> str:
    kind, _, arg = str(spec).partition(":")
    return {"contains": f"the model\u2019s continuation contains \u201c{arg}\u201d",
            "label": f"the classifier predicts the label \u201c{arg}\u201d",
            "token": f"the next token is \u201c{arg}\u201d",
            "wordlist": f"the continuation contains a word of the list \u201c{arg}\u201d"}.get(kind, str(spec))


def _metric_words(spec: str) -> str:
    kind = str(spec).partition(":")[0]
    return {"contains": "log-probability of the failing span (nats; lower = less likely)",
            "wordlist": "log-probability of the failing words (nats; lower = less likely)",
            "label": "logit margin of the failing label (> 0 = predicted)",
            "token": "logit margin of the failing token (> 0 = predicted)"}.get(kind, "failure metric")


def _failure_metric_words(spec: str, value) -> str:
    """The recorded failure metric with what it is ("metric -3.58e-07" said nothing of a log-probability near 0)."""
    kind = str(spec).partition(":")[0]
    if kind in ("contains", "wordlist"):
        return f"log-probability of the failing text {_num(value)} nats"
    return f"logit margin of the failing outcome {_num(value)}"


def _cca_metric_words(cca: Mapping, spec: str, short: bool = False) -> str:
    """What the CCA metric is: the result's own definition (``ranking.metric``) when it carries one, else the
    failure spec's metric (the recorded log-probability / logit margin that CCA results of schema 1 use)."""
    own = (cca.get("ranking") or {}).get("metric")
    if own:
        return "the CCA search metric, defined on page 3" if short else str(own)
    return _metric_words(spec)


def _cf_rank(cf: Mapping | None, layer: int, site: str) -> tuple[int, int, float | None] | None:
    if not cf:
        return None
    scores = [s for s in cf.get("scores", [])]
    order = sorted(scores, key=lambda s: -(s["score"] if _finite(s.get("score")) is not None else -1e300))
    for i, s in enumerate(order):
        if int(s["layer"]) == int(layer) and s["site"] == site:
            return i + 1, len(order), _finite(s.get("score"))
    return None


# ----------------------------------------------------------------------------------------------------------------
# Pages
# ----------------------------------------------------------------------------------------------------------------
def _frame(c: _Canvas, doc: Mapping, page: int, n_pages: int, title: str) -> None:
    inc = doc["incident"]
    c.label(MARGIN_X, 18, CONTENT_W * 0.62, 11, f"RCA CERTIFICATE  \u00b7  incident {inc['bundle_uuid']}", 7.2,
            bold=True, colour=NAVY)
    c.label(MARGIN_X + CONTENT_W * 0.55, 18, CONTENT_W * 0.45, 11, f"generated {_fmt_time(doc['created'])}", 7.2,
            colour=GREY, align="right")
    c.line(MARGIN_X, 31, MARGIN_X + CONTENT_W, 31, NAVY, 0.8)
    c.line(MARGIN_X, BOTTOM + 14, MARGIN_X + CONTENT_W, BOTTOM + 14, RULE, 0.6)
    c.label(MARGIN_X, BOTTOM + 18, CONTENT_W * 0.75, 10,
            f"certificate {doc['certificate_id']}  \u00b7  {doc['schema']}  \u00b7  {title}", 6.6, colour=GREY)
    c.label(MARGIN_X + CONTENT_W * 0.7, BOTTOM + 18, CONTENT_W * 0.3, 10, f"page {page} of {n_pages}", 7.2,
            bold=True, colour=INK, align="right")


def _page_summary(c: _Canvas, doc: Mapping) -> None:
    inc, mdl, cca = doc["incident"], doc["model"], doc["cca"]
    tokens = inc["tokens"]
    status = certificate_status(doc)
    y = TOP
    c.label(MARGIN_X, y, CONTENT_W, 26, "Root-cause analysis certificate", 20, bold=True, colour=NAVY)
    y += 28
    sub = (f"{_esc(inc.get('scenario') or inc['bundle_file'])} \u00b7 model {_esc(mdl['source'] or mdl['class_name'])}"
           f" ({_esc(mdl['class_name'])}, {mdl['n_layers']} layers, d<sub>model</sub> {mdl['d_model']}) \u00b7 "
           f"bundle {_esc(inc['bundle_file'])}")
    y += c.para(MARGIN_X, y, CONTENT_W, sub, 8.5, colour=GREY) + 8

    # standing
    colour = LEVEL_COLOURS[status["level"]]
    text = f"<b>{_esc(status['headline'])}</b>"
    h = c.para(0, 0, CONTENT_W - 20, text, 10.5, draw=False) + 12
    c.rect(MARGIN_X, y, CONTENT_W, h, fill=colour, radius=3)
    c.para(MARGIN_X + 10, y + 6, CONTENT_W - 20, text, 10.5, colour="#ffffff")
    y += h + 8

    # verdict
    vh = c.para(0, 0, CONTENT_W - 26, _esc(doc["verdict"]), 11, draw=False)
    box = vh + 30
    c.rect(MARGIN_X, y, CONTENT_W, box, fill=LIGHT)
    c.rect(MARGIN_X, y, 4, box, fill=colour)
    c.label(MARGIN_X + 14, y + 5, 200, 10, "VERDICT", 7.2, bold=True, colour=GREY)
    c.para(MARGIN_X + 14, y + 19, CONTENT_W - 26, _esc(doc["verdict"]), 11, colour=INK)
    y += box + 12

    # the failure
    y = _heading(c, y, "The failure")
    fail = inc["failure"]
    n_prompt = int(inc["n_prompt_tokens"])
    output_note = ("<span class='r'><b>fails</b></span>" if fail["failing"] else
                   "<span class='ok'>does not fail</span>")
    rows = [("Prompt", f"\u201c{_esc(inc['prompt'])}\u201d <span class='g'>({n_prompt} tokens)</span>"),
            ("Output", f"\u201c<b>{_esc(inc['output'] or inc.get('label', ''))}</b>\u201d \u2014 {output_note}: "
                       f"{_esc(_failure_words(fail['spec']))} "
                       f"<span class='g'>(spec <span class='m'>{_esc(fail['spec'])}</span>; "
                       f"{_esc(_failure_metric_words(fail['spec'], fail.get('metric')))})</span>"),
            ("Expected", _esc(fail.get("expected") or "not recorded")),
            ("Model", f"{_esc(mdl['source'] or '(embedded)')} \u00b7 {_esc(mdl['class_name'])} \u00b7 "
                      f"{mdl['n_layers']} layers \u00d7 d<sub>model</sub> {mdl['d_model']} \u00b7 {_esc(mdl['dtype'])}"
                      f" \u00b7 weights {'embedded in the bundle' if mdl['weights_embedded'] else 'not embedded'}")]
    y = _kv(c, y, rows) + 4

    # the fix
    # a set that does not fix (or was never checked) is not called "the fix"
    y = _heading(c, y, "The fix" if cca.get("flipped") else "The best set found (it is not a fix)"
                 if set_was_checked(cca) else "The best set found (not checked on the incident)")
    fix = cca["fix_set"]
    lines = []
    for i, e in enumerate(fix[:6]):
        lines.append(f"<b>{i + 1}.</b> {_esc(element_words(e, tokens))} "
                     f"<span class='g'>[{_esc(describe_element(e))}]</span>")
    if len(fix) > 6:
        lines.append(f"<span class='g'>\u2026 and {len(fix) - 6} more elements (page 3)</span>")
    y += c.para(MARGIN_X, y, CONTENT_W, "<br>".join(lines), 9) + 5
    ev_inc = (cca.get("evidence") or {}).get("incident") or {}
    after = []
    if "fixed_output" in ev_inc:
        after.append(f"With the fix the model says \u201c<b>{_esc(ev_inc['fixed_output'])}</b>\u201d instead of "
                     f"\u201c{_esc(ev_inc.get('baseline_output', inc['output']))}\u201d.")
    after.append(f"Failure metric {_num(cca.get('baseline_metric'))} \u2192 {_num(cca.get('fixed_metric'))} "
                 f"<span class='g'>({_esc(_cca_metric_words(cca, fail['spec'], short=True))})</span>.")
    y += c.para(MARGIN_X, y, CONTENT_W, " ".join(after), 9) + 10

    # key numbers
    y = _heading(c, y, "Key numbers")
    y = _tiles(c, y, _key_tiles(doc)) + 8

    # criteria
    y = _heading(c, y, "Acceptance criteria")
    crit = cca.get("criteria") or {}
    rows, oks = [], []
    for k, v in crit.items():
        ok = bool(v.get("ok"))
        oks.append(ok)
        rows.append([_esc(k.replace("_", " ")), _esc(v.get("target", "")), _esc(v.get("detail", "")),
                     "<b>\u2713 met</b>" if ok else "<b>\u2717 NOT met</b>"])
    if rows:
        y, drawn = _table(c, MARGIN_X, y, [84, 168, 207, 52], ["criterion", "target", "measured", "result"], rows,
                          size=7.1, colours=lambda r, i: (GREEN if oks[r] else RED) if i == 3 else None,
                          max_y=BOTTOM - 14, pad=2.6)
        if drawn < len(rows):
            y += c.para(MARGIN_X, y + 1, CONTENT_W, f"<i>\u2026 {len(rows) - drawn} more criteria in the JSON.</i>",
                        7, colour=GREY)
        y += 8
    else:
        y += c.para(MARGIN_X, y, CONTENT_W, "<i>The CCA result carries no acceptance criteria.</i>", 8.5,
                    colour=GREY) + 8

    # analyst
    an = doc.get("analyst") or {}
    parts = []
    if an.get("name"):
        parts.append(f"<b>Analyst:</b> {_esc(an['name'])}.")
    decs = an.get("decisions") or []
    if decs:
        acc = [d for d in decs if d["decision"] == "accepted"]
        rej = [d for d in decs if d["decision"] == "rejected"]
        parts.append(f"<b>Review:</b> {len(acc)} element(s) accepted, {len(rej)} rejected"
                     + (" (" + "; ".join(_esc(d.get("site", "")) for d in rej) + ")" if rej else "") + ".")
    if an.get("removed"):
        parts.append("<b>Removed before measuring:</b> " + "; ".join(_esc(r["site"]) for r in an["removed"]) + ".")
    if not parts and not an.get("note"):
        parts.append("<span class='g'>No analyst review was recorded: the evidence above is the automatic "
                     "analysis.</span>")
    avail = max(BOTTOM - y, 12)
    text = " ".join(parts)
    for limit in (400, 240, 120, 0):  # a long note is cut (never the review) so the block stays readable (>= 6.5 pt)
        note = (an.get("note") or "").strip()
        if not note:
            break
        if len(note) > limit:
            note = note[:max(limit - 1, 0)].rstrip() + "\u2026" if limit else ""
        cut = "" if note == an["note"].strip() else " <span class='g'>(the whole note is in the certificate JSON, " \
            "analyst.note)</span>"
        text = " ".join(parts + ([f"<b>Note:</b> \u201c{_esc(note)}\u201d{cut}"] if note else
                                 [f"<b>Note:</b>{cut}"]))
        if c.para(MARGIN_X, y, CONTENT_W, text, 6.5, draw=False) <= avail:
            break
    c.fit_para(MARGIN_X, y, CONTENT_W, avail, text, 8.5)


def _key_tiles(doc: Mapping) -> list[tuple[str, str, str, str | None]]:
    cca, rep, cf = doc["cca"], doc["replay"], doc.get("cf")
    ci = cca.get("flip_rate_ci") or [None, None]
    nv = int(cca.get("n_variants") or 0)
    fr = _finite(cca.get("flip_rate"))
    ev = cca.get("evidence") or {}
    se = _finite(cca.get("side_effect_rate"))
    nb = int(cca.get("n_benign") or 0)
    n_changed = (ev.get("side_effects") or {}).get("n_changed")
    if n_changed is None and se is not None:
        n_changed = round(se * nb)
    suf = _finite(cca.get("sufficiency_rate"))
    ns = int(cca.get("n_sufficiency") or 0)
    p = _finite(cca.get("p_value"))
    nc = int(cca.get("n_controls") or 0)
    crit = cca.get("criteria") or {}

    def ok(key):
        c = crit.get(key)
        return None if c is None else bool(c.get("ok"))

    tiles = [
        (_pct(fr, 0) if fr is not None else "n/a", "flip rate: variants fixed",
         (f"{round(fr * nv)} of {nv} \u00b7 95% CI {_pct(ci[0], 0)}\u2013{_pct(ci[1], 0)}" if fr is not None and nv
          else "not measured (no held-out variants)"),
         ok("flip_rate")),
        (_pct(se) if se is not None else "n/a", "side effects: benign changed",
         (f"{n_changed} of {nb} \u00b7 mean KL {_num(cca.get('side_effect_kl'), '.2g')} nats" if se is not None and nb
          else "not measured"), ok("side_effect_rate")),
        (_pct(suf, 0) if suf is not None else "n/a", "sufficiency",
         (f"failure recreated in {round(suf * ns)} of {ns} benign twins" if suf is not None and ns
          else "not measured"), None),
        (format_p(p, nc).replace("p ", "p\u202f") if p is not None else "n/a", "significance",
         f"vs {nc} random control sets of the same size" if nc else "not measured (no control sets)",
         ok("p_value")),
        (f"{len(cca['fix_set'])} site{'s' if len(cca['fix_set']) != 1 else ''}",
         "minimality",
         f"{_pct(cca.get('fraction_of_activations'))} of recorded activations; "
         + ("1\u2011minimal" if cca.get("one_minimal") else
            "NOT 1\u2011minimal" if set_was_checked(cca) else "1\u2011minimality not checked"), ok("one_minimal")),
        ("bit-identical" if rep.get("bit_identical") else ("DIFFERS" if rep.get("verified") else "not verified"),
         "replay",
         (f"{len(rep.get('checks', []))} checks \u00b7 {_num(rep.get('seconds'), '.2f')} s" if rep.get("verified")
          else "run forensics replay"), (bool(rep.get("bit_identical")) if rep.get("verified") else None)),
    ]
    if cf:
        flagged = sum(1 for s in cf.get("scores", []) if s.get("flagged"))
        run, reason = _cf_run_verdict(cf)
        fpr = ("not measured" if _finite(cf.get("heldout_fpr")) is None else _pct(cf.get("heldout_fpr")))
        if run is not None:
            run_words = (f" \u00b7 run {'anomalous' if run else 'not anomalous'} "
                         f"(p {_num(cf.get('run_p_value'), '.3g')})")
        elif reason == "too_few_calibration_runs":
            run_words = (f" \u00b7 no run verdict ({int(cf.get('n_run_reference') or 0)} benign runs; a 5% test "
                         f"needs {_run_min_calibration(cf)})")
        else:
            run_words = ""
        tiles.append((f"{flagged} of {len(cf.get('scores', []))}", "sites flagged by CF",
                      f"threshold {_num(cf.get('threshold'))} \u00b7 held-out FPR {fpr}" + run_words, None))
    else:
        tiles.append(("not run", "Compression Forensics", "no CF result in this certificate", None))
    tiles.append((f"{int(cca.get('forward_passes') or 0):,}", "forward passes",
                  f"{int(cca.get('rows') or 0):,} rows \u00b7 {_num(cca.get('seconds'), '.1f')} s", None))
    return tiles


def _tiles(c: _Canvas, y: float, tiles, cols: int = 4, h: float = 54.0) -> float:
    gap = 7.0
    w = (CONTENT_W - gap * (cols - 1)) / cols
    for i, (big, label, detail, ok) in enumerate(tiles):
        r, col = divmod(i, cols)
        x, yy = MARGIN_X + col * (w + gap), y + r * (h + gap)
        accent = GREY if ok is None else (GREEN if ok else RED)
        c.rect(x, yy, w, h, fill="#f7f8fa", stroke=RULE, width=0.5, radius=2)
        c.rect(x, yy, 3, h, fill=accent)
        c.label(x + 9, yy + 4, w - 14, 20, big, 15, bold=True, colour=accent if ok is not None else NAVY,
                min_size=8)
        c.label(x + 9, yy + 25, w - 14, 10, label, 7.4, bold=True, colour=INK, min_size=5.5)
        c.fit_para(x + 9, yy + 36, w - 14, h - 38, _esc(detail), 6.8, min_size=5.2, colour=GREY)
    rows = math.ceil(len(tiles) / cols)
    return y + rows * h + (rows - 1) * gap


def _nan_if_none(x: float | None) -> float:
    return float("nan") if x is None else x


def _run_min_calibration(cf: Mapping) -> int:
    from engine.cf import MIN_RUN_CALIBRATION

    return int(cf.get("run_min_calibration") or MIN_RUN_CALIBRATION)


def _cf_run_verdict(cf: Mapping) -> tuple[bool | None, str]:
    """``(run_anomalous, run_no_verdict_reason)`` of a CF result dict. A verdict calibrated on fewer runs than a 5 %
    test needs (a CF result written before that rule) is no verdict: its smallest p-value was above 5 %."""
    run = cf.get("run_anomalous")
    reason = str(cf.get("run_no_verdict_reason") or "")
    if run is not None and int(cf.get("n_run_reference") or 0) < _run_min_calibration(cf):
        return None, "too_few_calibration_runs"
    if run is None and not reason:
        reason = "partial" if cf.get("partial") else ""
    return (None if run is None else bool(run)), reason


def _run_verdict_sentence(cf: Mapping) -> str:
    """The CF run-level (family-wise) verdict in one sentence; empty for a result without one (a partial run, or a
    result that predates the run verdict)."""
    from engine.cf import run_no_verdict_text

    run, reason = _cf_run_verdict(cf)
    if run is None:
        if reason != "too_few_calibration_runs":
            return ""
        why = run_no_verdict_text(reason, n_calibration=int(cf.get("n_run_reference") or 0),
                                  calibration=str(cf.get("run_calibration") or ""),
                                  run_statistic=_nan_if_none(_finite(cf.get("run_statistic"))),
                                  run_p_value=_nan_if_none(_finite(cf.get("run_p_value"))),
                                  min_calibration=_run_min_calibration(cf))
        return (" Taken as a whole (a family-wise test over every site), the run gets <b>no verdict</b>: "
                f"{_esc(why)}.")
    n_ref = int(cf.get("n_run_reference") or 0)
    calib = "held-out benign calibration runs" if cf.get("run_calibration") == "heldout" else "benign reference runs"
    fpr = cf.get("heldout_run_fpr")
    if fpr is not None:
        measured = f"flags <b>{_pct(fpr)}</b> of {int(cf.get('n_run_heldout') or 0)} other held-out benign runs"
    elif not int(cf.get("n_heldout") or 0):
        measured = "was not tested on held-out benign runs (the baseline holds no held-out benign prompts)"
    else:
        measured = "was not tested on held-out benign runs (the baseline does not hold their run statistics)"
    return (f" Taken as a whole (a family-wise test over every site), the run is <b>"
            f"{'anomalous' if run else 'not anomalous'}</b>: its largest site score "
            f"{_num(cf.get('run_statistic'), '.4g')} {'exceeds' if run else 'does not exceed'} the run threshold "
            f"{_num(cf.get('run_threshold'), '.4g')}, the "
            f"conformal 95th percentile of {n_ref} {calib} (p = {_num(cf.get('run_p_value'), '.3g')}); that threshold "
            f"{measured}.")


def _site_fpr_clause(cf: Mapping) -> str:
    """The end of the CF page's sentence about the site threshold: its measured held-out false-positive rate."""
    n = int(cf.get("n_heldout") or 0)
    if _finite(cf.get("heldout_fpr")) is not None:
        return (f"whose false-positive rate measured on {n or 'the'} held-out benign prompts is "
                f"<b>{_pct(cf.get('heldout_fpr'))}</b>.")
    why = ("the baseline holds no held-out benign prompts" if not n else
           "the baseline does not hold it")
    return f"whose false-positive rate was not measured ({why})."


def _page_cf(c: _Canvas, doc: Mapping) -> None:
    cf, inc, cca = doc.get("cf"), doc["incident"], doc["cca"]
    y = _heading(c, TOP, "Compression Forensics: where the computation looks anomalous")
    if not cf:
        _no_data(c, MARGIN_X, y + 10, CONTENT_W, 80, "Compression Forensics was not run for this certificate "
                 "(forensics cf BUNDLE --json > CF.json, then certify with --cf CF.json).")
        return
    scores = cf.get("scores") or []
    thr = _finite(cf.get("threshold"))
    stat = cf.get("statistic", "bits")
    intro = (f"Every recorded (layer, site) of the incident is scored against the benign reference runs "
             f"(statistic <b>{_esc(stat)}</b>"
             + (f", compressor {_esc(cf['compressor'])}" if cf.get("compressor") else "")
             + f"; {int(cf.get('n_baseline_prompts') or 0) or 'the'} benign reference prompts). The score is a robust "
             f"z of the site's most anomalous prompt token; a site is <b>flagged</b> above the threshold "
             f"<b>{_num(thr)}</b>, " + _site_fpr_clause(cf)
             + _run_verdict_sentence(cf)
             + (" <b>PARTIAL</b>: CF was cancelled before every site was scored." if cf.get("partial") else ""))
    y += c.para(MARGIN_X, y, CONTENT_W, intro, 8.5) + 8

    sites = [s for s in ("resid_pre", "attn", "mlp", "resid_post") if any(x["site"] == s for x in scores)]
    sites += sorted({x["site"] for x in scores} - set(sites))
    layers = sorted({int(x["layer"]) for x in scores})
    vals = [_finite(x.get("score")) for x in scores]
    finite_vals = [v for v in vals if v is not None] + ([thr] if thr is not None else []) + [0.0]
    lo, hi = min(finite_vals), max(finite_vals)
    span = (hi - lo) or 1.0
    lo, hi = lo - 0.08 * span, hi + 0.12 * span
    fix_sites = {(int(e["layer"]), e["component"]) for e in cca["fix_set"]}
    chart_h = 215.0
    _legend(c, MARGIN_X + 40, y, [(SITE_COLOURS.get(s, GREY), SITE_NAMES.get(s, s)) for s in sites],
            line_items=[(RED, f"threshold {_num(thr)}", True)])
    c.label(MARGIN_X + CONTENT_W - 150, y, 150, 10, "\u25bc = site of the fix set", 7, colour=NAVY, align="right")
    y += 13
    n_l = max(len(layers), 1)
    ax = _Axes(c, MARGIN_X, y, CONTENT_W, chart_h, (-0.5, n_l - 0.5), (lo, hi), xlabel="layer (block index)",
               ylabel=f"anomaly score (robust z, {stat})", xticks=list(range(n_l)),
               xtick_labels=lambda t: f"L{layers[int(t)]}" if 0 <= int(t) < len(layers) else "")
    group = 0.8 / max(len(sites), 1)
    zero = ax.Y(0.0)
    c.line(ax.x0, zero, ax.x1, zero, GREY, 0.5)
    for x in scores:
        v = _finite(x.get("score"))
        if v is None or int(x["layer"]) not in layers:
            continue
        li, si = layers.index(int(x["layer"])), sites.index(x["site"])
        bx = ax.X(li - 0.4 + si * group)
        bw = (ax.X(group) - ax.X(0)) * 0.9
        top, bot = sorted((ax.Y(v), zero))
        c.rect(bx, top, bw, max(bot - top, 0.3), fill=SITE_COLOURS.get(x["site"], GREY),
               stroke=INK if x.get("flagged") else None, width=1.0)
        if (int(x["layer"]), x["site"]) in fix_sites:
            my = ax.Y(max(v, 0.0)) - 9
            c.label(bx - 4, my, bw + 8, 8, "\u25bc", 8, colour=NAVY, align="center")
    if thr is not None:
        c.line(ax.x0, ax.Y(thr), ax.x1, ax.Y(thr), RED, 1.0, dash=True)
    y += chart_h + 10

    # per-token map
    y = _subheading(c, y, "Per-token anomaly scores (rows: layer \u00b7 site; columns: token positions)")
    tokens = inc["tokens"]
    rows = [x for x in sorted(scores, key=lambda s: (int(s["layer"]), sites.index(s["site"])))
            if x.get("position_scores")]
    n_pos = max((len(x["position_scores"]) for x in rows), default=0)
    if not rows or n_pos == 0:
        _no_data(c, MARGIN_X, y, CONTENT_W, 60, "This CF result carries no per-token scores.")
        y += 70
    else:
        label_w, legend_w = 78.0, 40.0
        cell_w = (CONTENT_W - label_w - legend_w) / n_pos
        cell_h = min(9.5, 190.0 / len(rows))
        vmax = max([v for x in rows for v in (_finite(u) for u in x["position_scores"]) if v is not None] + [1e-9])
        x0 = MARGIN_X + label_w
        for r, x in enumerate(rows):
            yy = y + r * cell_h
            c.label(MARGIN_X, yy, label_w - 4, cell_h, f"L{x['layer']} {SITE_NAMES.get(x['site'], x['site'])}",
                    min(6.8, cell_h * 0.78), colour=INK, align="right", min_size=4.5)
            for j, u in enumerate(x["position_scores"]):
                v = _finite(u)
                c.rect(x0 + j * cell_w, yy, cell_w, cell_h, fill=_heat_colour(v or 0.0, vmax) if v is not None
                       else "#dddddd")
        grid_h = len(rows) * cell_h
        c.rect(x0, y, n_pos * cell_w, grid_h, stroke=RULE, width=0.5)
        for e in cca["fix_set"]:
            if (int(e["layer"]), e["component"]) not in {(int(x["layer"]), x["site"]) for x in rows}:
                continue
            r = next(i for i, x in enumerate(rows)
                     if int(x["layer"]) == int(e["layer"]) and x["site"] == e["component"])
            ps = range(n_pos) if e["positions"] == "all" else e["positions"]
            for pcol in ps:
                if pcol < n_pos:
                    c.rect(x0 + pcol * cell_w, y + r * cell_h, cell_w, cell_h, stroke=NAVY, width=1.3)
        n_prompt = int(inc["n_prompt_tokens"])
        if n_prompt < n_pos:
            xb = x0 + n_prompt * cell_w
            c.line(xb, y - 4, xb, y + grid_h + 2, NAVY, 0.9, dash=True)
            c.label(xb + 2, y - 9, 60, 8, "output \u2192", 6, colour=NAVY)
        # token labels, rotated
        tok_size = min(6.4, cell_w * 0.75)
        label_len = 0.0
        for j in range(n_pos):
            tok = _token(tokens[j], 12) if j < len(tokens) else str(j)
            cx = x0 + j * cell_w + cell_w / 2
            c.label(cx - 3.5, y + grid_h + 3, 48, 7, f"{j} {tok}", tok_size, colour=INK, rotate=90, min_size=4.0)
            label_len = max(label_len, min(48.0, c.text_width(f"{j} {tok}", tok_size)))
        # colour bar
        bx = MARGIN_X + CONTENT_W - legend_w + 6           # bar 8 pt wide, its labels in the 24 pt to its right
        steps = 40
        for i in range(steps):
            c.rect(bx, y + grid_h - (i + 1) * grid_h / steps, 8, grid_h / steps + 0.2,
                   fill=_heat_colour((i + 0.5) / steps * vmax, vmax))
        c.rect(bx, y, 8, grid_h, stroke=RULE, width=0.5)
        right = MARGIN_X + CONTENT_W - (bx + 10)
        c.label(bx + 10, y - 2, right, 8, _tick_label(float(f"{vmax:.3g}")), 6, colour=GREY, min_size=4)
        c.label(bx + 10, y + grid_h - 6, right, 8, "0", 6, colour=GREY)
        c.label(bx - 6, y + grid_h + 3, legend_w, 8, "token |z|", 6, colour=GREY, align="center", min_size=4)
        y += grid_h + 3 + label_len + 5
        c.label(MARGIN_X, y, CONTENT_W, 9, "Outlined cells: the positions the fix set intervenes on. Token labels "
                "are \u201cposition token\u201d; the dashed line separates the prompt from the output.", 6.8,
                colour=GREY)
        y += 16

    # scores by layer and site
    y = _subheading(c, y, "Scores by layer and site (robust z; empirical p against the benign reference prompts)")
    by = {(int(x["layer"]), x["site"]): x for x in scores}
    rows_s, flags = [], []
    for L in layers:
        row, fl = [f"<b>L{L}</b>"], [False]
        for st in sites:
            x = by.get((L, st))
            if x is None:
                row.append("\u2014")
                fl.append(False)
                continue
            mark = " \u25bc" if (L, st) in fix_sites else ""
            txt = f"{_num(x.get('score'), '.2f')}  <span class='g'>p {_num(x.get('p_value'), '.2g')}</span>{mark}"
            row.append(f"<b>{txt} FLAGGED</b>" if x.get("flagged") else txt)
            fl.append(bool(x.get("flagged")))
        rows_s.append(row)
        flags.append(fl)
    col_w = (CONTENT_W - 40) / max(len(sites), 1)
    y, _ = _table(c, MARGIN_X, y, [40] + [col_w] * len(sites), ["layer"] + [SITE_NAMES.get(st, st) for st in sites],
                  rows_s, size=7.2, colours=lambda r, i: RED if flags[r][i] else None, max_y=BOTTOM - 40)
    y += 10

    # findings + where the fix ranks
    y = _subheading(c, y, "Findings")
    findings = cf.get("findings") or []
    if findings:
        rows_t = [[f"L{f['layer']} {_esc(SITE_NAMES.get(f['site'], f['site']))}",
                   _esc(position_ranges(f.get("positions") or [])), _num(f.get("score")), _num(f.get("p_value"))]
                  for f in findings[:8]]
        y, _ = _table(c, MARGIN_X, y, [170, 170, 85, 86], ["site", "positions", "score", "p (vs benign)"], rows_t,
                      size=7.4, max_y=BOTTOM - 30)
        y += 4
    lines = []
    if not findings:
        lines.append(f"No (layer, site) scored above the threshold {_num(thr)}: CF alone does not single out a site "
                     f"for this incident.")
    for e in cca["fix_set"][:6]:
        rk = _cf_rank(cf, int(e["layer"]), e["component"])
        if rk:
            lines.append(f"Fix-set site {_esc(describe_element(e))}: CF score {_num(rk[2])}, rank {rk[0]} of {rk[1]}.")
    c.fit_para(MARGIN_X, y, CONTENT_W, max(BOTTOM - y, 12), " ".join(lines), 8.5)


def _page_fix(c: _Canvas, doc: Mapping) -> None:
    inc, cca, mdl = doc["incident"], doc["cca"], doc["model"]
    tokens = inc["tokens"]
    fix = cca["fix_set"]
    y = _heading(c, TOP, "The fix set: what is changed, and what each part does")
    spec = inc["failure"]["spec"]
    replacement = ("benign mean activation" if cca.get("op", "mean") == "mean" else
                   "activation of the benign counterpart")
    intro = (f"The set is applied in one replay of the incident. Failure metric: "
             f"{_esc(_cca_metric_words(cca, spec))}. Without intervention it is <b>{_num(cca.get('baseline_metric'))}</b>; "
             f"with the whole set <b>{_num(cca.get('fixed_metric'))}</b>. \u201cAlone\u201d applies one element by "
             f"itself, \u201cwithout it\u201d applies the others; an element is <b>necessary</b> when the incident "
             f"fails again without it. Operation: {_esc(cca.get('op', fix[0].get('op', '')))} ({replacement}). "
             f"Ranking: {_esc((cca.get('ranking') or {}).get('method', 'n/a'))}.")
    y += c.para(MARGIN_X, y, CONTENT_W, intro, 8.5) + 8
    decisions = {d["element"]: d for d in (doc.get("analyst") or {}).get("decisions", [])}
    rows, colour_rows = [], []
    for i, e in enumerate(fix):
        d = decisions.get(i)
        dec = "\u2014" if d is None else ("<b>accepted</b>" if d["decision"] == "accepted" else "<b>REJECTED</b>")
        if d is not None and d.get("note"):
            dec += f"<br><span class='g'>{_esc(d['note'])}</span>"
        pos = e["positions"]
        toks = "all" if pos == "all" else ", ".join(f"{p} \u201c{_esc(_token(tokens[p], 10))}\u201d" for p in pos[:6]
                                                   if p < len(tokens)) + (" \u2026" if len(pos) > 6 else "")
        nec = e.get("drop_one_failing")
        rows.append([str(i + 1), f"L{e['layer']} {_esc(SITE_NAMES.get(e['component'], e['component']))}"
                     + (f" [{_esc(position_ranges(e['indices']))}]" if e.get("indices") else ""), toks,
                     _esc(e["op"] + (f" \u00d7{float(e['value']):g}" if e.get("value") is not None else "")),
                     _num(e.get("single_metric")), _num(e.get("drop_one_metric")),
                     "yes" if nec else ("no" if nec is not None else "n/a"), dec])
        colour_rows.append((nec, d["decision"] if d else None))

    def colours(r, col):
        nec, dec = colour_rows[r]
        if col == 6:
            return GREEN if nec else RED
        if col == 7 and dec:
            return GREEN if dec == "accepted" else RED
        return None

    y, drawn = _table(c, MARGIN_X, y, [18, 86, 140, 48, 52, 56, 50, 61],
                      ["#", "site", "positions (tokens)", "op", "alone", "without it", "necessary", "analyst"],
                      rows, size=7.4, colours=colours, max_y=TOP + 250)
    if drawn < len(rows):
        y += c.para(MARGIN_X, y + 2, CONTENT_W, f"<i>\u2026 {len(rows) - drawn} more elements are listed in the "
                    "certificate JSON.</i>", 7.5, colour=GREY) + 2
    removed = (doc.get("analyst") or {}).get("removed") or []
    if removed:
        y += 4 + c.para(MARGIN_X, y + 4, CONTENT_W, "<b>Removed by the analyst before the evidence was measured:</b> "
                        + "; ".join(_esc(r["site"]) + (f" ({_esc(r['note'])})" if r.get("note") else "")
                                    for r in removed), 8, colour=INK)
    y += 12

    # layer x position picture
    y = _subheading(c, y, "Where the set acts: layer \u00d7 token position")
    n_layers = int(mdl["n_layers"])
    comps = [s for s in ("resid_pre", "attn", "mlp", "resid_post") if s in mdl.get("sites", [])] or \
        ["resid_pre", "attn", "mlp", "resid_post"]
    extra = sorted({e["component"] for e in fix} - set(comps))
    comps += extra
    n_prompt = int(inc["n_prompt_tokens"])
    rows_n = n_layers * len(comps)
    label_w = 96.0
    cell_w = (CONTENT_W - label_w) / max(n_prompt, 1)
    cell_h = max(4.0, min(12.0, 210.0 / rows_n))
    x0 = MARGIN_X + label_w
    marks: dict[tuple[int, int], list[int]] = {}
    for i, e in enumerate(fix):
        r = int(e["layer"]) * len(comps) + comps.index(e["component"])
        ps = range(n_prompt) if e["positions"] == "all" else [p for p in e["positions"] if p < n_prompt]
        for p in ps:
            marks.setdefault((r, p), []).append(i + 1)
    for L in range(n_layers):
        gy = y + L * len(comps) * cell_h
        c.rect(MARGIN_X, gy + 0.6, 26, len(comps) * cell_h - 1.2, fill=LIGHT if L % 2 else "#e2e7ef")
        c.label(MARGIN_X, gy, 26, len(comps) * cell_h, f"L{L}", min(8.5, len(comps) * cell_h * 0.6), bold=True,
                colour=NAVY, align="center", min_size=4.0)
        for j, comp in enumerate(comps):
            r = L * len(comps) + j
            yy = y + r * cell_h
            c.label(MARGIN_X + 28, yy, label_w - 33, cell_h, SITE_NAMES.get(comp, comp), min(7.0, cell_h * 0.8),
                    colour=INK, align="right", min_size=4.0)
            for p in range(n_prompt):
                m = marks.get((r, p))
                c.rect(x0 + p * cell_w, yy, cell_w, cell_h, fill=NAVY if m else ("#f3f5f8" if L % 2 else "#ffffff"),
                       stroke="#dde1e6", width=0.3)
                if m:
                    c.label(x0 + p * cell_w, yy, cell_w, cell_h, ",".join(map(str, m)), min(7.0, cell_h * 0.8),
                            bold=True, colour="#ffffff", align="center", min_size=3.5)
        c.line(x0, y + (L + 1) * len(comps) * cell_h, x0 + n_prompt * cell_w, y + (L + 1) * len(comps) * cell_h,
               GREY, 0.6)
    grid_h = rows_n * cell_h
    c.rect(x0, y, n_prompt * cell_w, grid_h, stroke=GREY, width=0.6)
    tok_size = min(6.4, cell_w * 0.75)
    label_len = 0.0
    for p in range(n_prompt):
        tok = _token(tokens[p], 12) if p < len(tokens) else str(p)
        c.label(x0 + p * cell_w + cell_w / 2 - 3.5, y + grid_h + 3, 50, 7, f"{p} {tok}", tok_size,
                colour=INK, rotate=90, min_size=4.0)
        label_len = max(label_len, min(50.0, c.text_width(f"{p} {tok}", tok_size)))
    y += grid_h + 3 + label_len + 5
    c.label(MARGIN_X, y, CONTENT_W, 9, "Filled cells carry the element number(s) of the table above; columns "
            "are the prompt's tokens (\u201cposition token\u201d).", 6.8, colour=GREY)
    y += 20

    # search trace
    trace = [t for t in (cca.get("trace") or []) if _finite(t.get("best_metric")) is not None]
    y = _subheading(c, y, "How the set was found: best failure metric during the search")
    avail = BOTTOM - y - 4
    if len(trace) < 2 or avail < 60:
        method = (cca.get("ranking") or {}).get("method", "")
        msg = ("The set was given, not searched for (" + method + "): its evidence was measured directly."
               if method == "given set" else "No search trace was recorded for this result.")
        _no_data(c, MARGIN_X, y, CONTENT_W, min(50, max(avail, 30)), msg)
        return
    n = len(trace)
    ys = [float(t["best_metric"]) for t in trace]
    ylo, yhi = min(ys), max(ys)
    pad = (yhi - ylo) * 0.15 or 1.0
    ch = min(avail, 165.0)
    every = max(1, math.ceil(n / 12))
    ax = _Axes(c, MARGIN_X, y, CONTENT_W, ch, (-0.5, n - 0.5), (ylo - pad, yhi + pad), xlabel="",
               ylabel="best failure metric", bottom=30)
    step_w = (ax.x1 - ax.x0) / n
    for i, t in enumerate(trace):
        if i % every and i != n - 1:
            continue
        cx = ax.X(i)
        c.line(cx, ax.y1, cx, ax.y1 + 3, GREY, 0.6)
        c.label(cx - step_w * every / 2, ax.y1 + 4, step_w * every, 9, str(t.get("stage", "")), 7, bold=True,
                colour=INK, align="center", min_size=4.5)
        c.label(cx - step_w * every / 2, ax.y1 + 13, step_w * every, 9,
                f"size {t.get('set_size', '?')} \u00b7 {t.get('passes', '?')} passes", 6.4, colour=GREY,
                align="center", min_size=4.0)
    from PySide6.QtCore import Qt
    from PySide6.QtGui import QPainterPath

    path = QPainterPath()
    for i, b in enumerate(ys):
        pt = c.P(ax.X(i), ax.Y(b))
        path.moveTo(pt) if i == 0 else path.lineTo(pt)
    c.p.setPen(c.pen(NAVY, 1.2))
    c.p.setBrush(Qt.BrushStyle.NoBrush)
    c.p.drawPath(path)
    for i, b in enumerate(ys):
        c.rect(ax.X(i) - 2, ax.Y(b) - 2, 4, 4, fill=NAVY)
        if i % every == 0 or i == n - 1:
            low_half = ax.Y(b) > (ax.top + ax.y1) / 2
            above = ax.Y(b) + 4 if low_half or ax.Y(b) - 12 < ax.top else ax.Y(b) - 12
            c.label(ax.X(i) - step_w / 2, above, step_w, 9, _num(b, ".3g"), 6.6, colour=NAVY, align="center",
                    min_size=4.0)
    y += ch + 4
    c.label(MARGIN_X, y, CONTENT_W, 9, "Each step: the stage of the search, the size of the best set and the forward "
            "passes spent so far (\u201cdone\u201d includes the evidence).", 6.8, colour=GREY)


def _output_cell(text) -> str:
    """A model output in a table cell; an empty or blank one says so instead of leaving the cell empty."""
    t = "" if text is None else str(text)
    return _esc(t) if t.strip() else "<span class='g'><i>(empty output)</i></span>"


def _page_evidence(c: _Canvas, doc: Mapping) -> None:
    cca = doc["cca"]
    y = _heading(c, TOP, "Evidence: variants, sufficiency, side effects, controls")

    # outcome rates with intervals
    y = _subheading(c, y, "Outcome rates (bars) with 95% Wilson intervals (whiskers) where measured")
    ci = cca.get("flip_rate_ci") or [None, None]
    ev = cca.get("evidence") or {}
    nb = int(cca.get("n_benign") or 0)
    n_changed = (ev.get("side_effects") or {}).get("n_changed")
    rates = [("flip rate: held-out failing variants fixed", _finite(cca.get("flip_rate")), ci,
              int(cca.get("n_variants") or 0), ">= 80%", 0.80, True),
             ("sufficiency: failure recreated in benign twins", _finite(cca.get("sufficiency_rate")), None,
              int(cca.get("n_sufficiency") or 0), "", None, True),
             ("side effects: benign outputs changed", _finite(cca.get("side_effect_rate")), None, nb, "<= 5%", 0.05,
              False),
             ("control sets: mean flip rate", _finite((ev.get("controls") or {}).get("control_flip_rate_mean")), None,
              int(cca.get("n_controls") or 0), "", None, False)]
    label_w, bar_w = 190.0, CONTENT_W - 190.0 - 90.0
    bx = MARGIN_X + label_w
    for t in (0, 0.25, 0.5, 0.75, 1.0):
        c.line(bx + t * bar_w, y, bx + t * bar_w, y + len(rates) * 18, "#e3e6ea", 0.45)
        c.label(bx + t * bar_w - 15, y + len(rates) * 18 + 1, 30, 8, f"{int(t * 100)}%", 6.5, colour=GREY,
                align="center")
    for i, (name, v, interval, n, target, tv, higher) in enumerate(rates):
        yy = y + i * 18
        c.label(MARGIN_X, yy + 2, label_w - 8, 12, name, 7.6, colour=INK, align="right")
        c.rect(bx, yy + 3, bar_w, 11, fill="#f1f3f5")
        if v is not None:
            good = None if tv is None else (v >= tv if higher else v <= tv)
            colour = NAVY if good is None else (GREEN if good else RED)
            c.rect(bx, yy + 3, max(v * bar_w, 0.8), 11, fill=colour)
            if interval and None not in interval:
                lo, hi = (_finite(interval[0]), _finite(interval[1]))
                if lo is not None and hi is not None:
                    c.line(bx + lo * bar_w, yy + 8.5, bx + hi * bar_w, yy + 8.5, INK, 0.9)
                    for q in (lo, hi):
                        c.line(bx + q * bar_w, yy + 5, bx + q * bar_w, yy + 12, INK, 0.9)
            if tv is not None:
                c.line(bx + tv * bar_w, yy + 1, bx + tv * bar_w, yy + 16, RED, 0.9, dash=True)
        k = "" if v is None or not n else (f" (mean of {n})" if i == 3 else f" ({round(v * n)}/{n})")
        c.label(bx + bar_w + 6, yy + 2, 84, 12, (_pct(v) if v is not None else "not measured") + k, 7.6,
                bold=True, colour=INK)
    y += len(rates) * 18 + 14
    c.label(MARGIN_X + label_w, y - 2, bar_w + 80, 9, "dashed red: the acceptance target", 6.6, colour=GREY)
    y += 12

    # side effects per prompt
    se = list(cca.get("side_effects") or [])
    y = _subheading(c, y, f"Side effects on {len(se)} held-out benign prompts: KL(baseline \u2016 with the fix) at "
                          "the decision position")
    if not se:
        _no_data(c, MARGIN_X, y, CONTENT_W, 50, "No held-out benign prompts were evaluated.")
        y += 60
    else:
        kls = [(_finite(s.get("kl")), bool(s.get("changed"))) for s in se]
        pos = [k for k, _ in kls if k is not None and k > 0]
        lo = math.floor(math.log10(min(pos))) if pos else -8
        hi = math.ceil(math.log10(max(pos))) if pos else 0
        if hi <= lo:
            hi = lo + 1
        order = sorted(range(len(kls)), key=lambda i: -(kls[i][0] or 0.0))
        ch = 150.0
        ax = _Axes(c, MARGIN_X, y, CONTENT_W, ch, (0, len(kls)), (lo, hi), ylog=True,
                   yticks=list(range(lo, hi + 1, max(1, math.ceil((hi - lo) / 7)))), xlabel=f"held-out benign prompt, sorted by KL (n = {len(kls)})",
                   ylabel="KL (nats, log)", xticks=[0, len(kls)])
        bw = (ax.x1 - ax.x0) / len(kls)
        for j, i in enumerate(order):
            k, changed = kls[i]
            if k is None:
                continue
            v = math.log10(k) if k > 0 else lo
            top = ax.Y(min(max(v, lo), hi))
            c.rect(ax.x0 + j * bw + bw * 0.1, top, bw * 0.8, max(ax.y1 - top, 0.3), fill=RED if changed else "#7a8ca3")
        _legend(c, ax.x1 - 215, ax.top + 3, [("#7a8ca3", "output unchanged"), (RED, "output changed")])
        y += ch + 8
        changed = [s for s in se if s.get("changed")]
        if changed:
            rows = [[_esc(s.get("prompt", "")), _output_cell(s.get("baseline", s.get("expected", ""))),
                     _output_cell(s.get("got", "")), _num(s.get("kl"), ".2g")] for s in changed[:6]]
            y, _ = _table(c, MARGIN_X, y, [175, 140, 140, 56],
                          ["changed prompt", "output before", "output with the fix", "KL"], rows, size=7,
                          max_y=y + 120)
            if len(changed) > 6:
                y += c.para(MARGIN_X, y + 2, CONTENT_W, f"<i>\u2026 and {len(changed) - 6} more changed prompts "
                            "(certificate JSON).</i>", 7.2, colour=GREY) + 2
            y += 6
        else:
            y += c.para(MARGIN_X, y, CONTENT_W, f"<b>None of the {len(se)} held-out benign outputs changed</b> under "
                        f"the fix (mean KL {_num(cca.get('side_effect_kl'), '.2g')} nats).", 8.2) + 8

    # controls
    ctrl = list(cca.get("control_flip_rates") or [])
    cev = ev.get("controls") or {}
    nc = int(cca.get("n_controls") or 0)
    y = _subheading(c, y, f"Significance: the fix set against {nc} random control sets of the same size")
    avail_h = BOTTOM - y - 70
    if not ctrl:
        _no_data(c, MARGIN_X, y, CONTENT_W, 50, "No random control sets were evaluated (significance not measured).")
        y += 60
    else:
        n_prompts = int(cev.get("n_prompts") or 0)
        bins = n_prompts + 1 if n_prompts else 20
        counts = [0] * bins
        for r in ctrl:
            b = round(r * n_prompts) if n_prompts else min(int(r * bins), bins - 1)
            counts[max(0, min(bins - 1, b))] += 1
        observed = _finite(cev.get("observed_flip_rate"))
        if observed is None:
            observed = 1.0 if cca.get("flipped") else 0.0
        ch = max(110.0, min(150.0, avail_h))
        cmax = max(counts) or 1
        ax = _Axes(c, MARGIN_X, y, CONTENT_W, ch, (-0.5 / bins, 1 + 0.5 / bins), (0, cmax * 1.15),
                   xlabel=(f"flip rate of a control set on the failing variants it ran (of {n_prompts})"
                           if cev.get("prompts_run") else f"flip rate of a set over {n_prompts} failing prompts"),
                   ylabel="control sets", xticks=[0, 0.25, 0.5, 0.75, 1.0], xtick_labels=lambda t: f"{t:.0%}",
                   yticks=_nice_ticks(0, cmax * 1.15, 4))
        width = (ax.X(1.0 / (bins - 1) if n_prompts else 1.0 / bins) - ax.X(0)) * 0.86
        xo = ax.X(observed)
        c.line(xo, ax.top, xo, ax.y1, RED, 1.6)
        for b, n in enumerate(counts):
            if not n:
                continue
            centre = b / n_prompts if n_prompts else (b + 0.5) / bins
            c.rect(ax.X(centre) - width / 2, ax.Y(n), width, ax.y1 - ax.Y(n), fill="#7a8ca3")
            tw = c.text_width(str(n), 6.4) + 3
            lx = min(max(ax.X(centre) - tw / 2, ax.x0 + 1), ax.x1 - tw - 1)
            c.rect(lx, ax.Y(n) - 10, tw, 8.5, fill="#ffffff")
            c.label(lx, ax.Y(n) - 10, tw, 8.5, str(n), 6.4, colour=INK, align="center")
        p = _finite(cca.get("p_value"))
        tag = f"fix set: {_pct(observed)}  ({format_p(p, nc)})"
        tw = c.text_width(tag, 7.2, bold=True) + 6
        tx = xo - tw - 3 if xo + tw > ax.x1 else xo + 3
        c.rect(tx, ax.top + 3, tw, 11, fill="#ffffff")
        c.label(tx + 3, ax.top + 3, tw, 11, tag, 7.2, bold=True, colour=RED)
        y += ch + 6
        extreme = cev.get("n_at_least_as_extreme")
        y += c.para(MARGIN_X, y, CONTENT_W, f"{extreme if extreme is not None else '?'} of {nc} control sets reached "
                    f"the fix set's flip rate; empirical p = (1 + that count) / (1 + {nc}) = <b>{_num(p, '.2g')}</b>. "
                    f"Controls: {_esc(cev.get('statistic', 'random sets of the same size and components'))}"
                    f"{'; seed ' + str(cev['seed']) if 'seed' in cev else ''}."
                    f"{' Stopping rule: ' + _esc(cev['stopping']) + '.' if cev.get('stopping') else ''}",
                    7.6, colour=INK) + 8

    # FDR
    fdr = cca.get("fdr") or {}
    raw = ev.get("claim_p_values") or {}
    if fdr and y < BOTTOM - 40:
        y = _subheading(c, y, "Claims with Benjamini\u2013Hochberg adjustment")
        rows = [[_esc(k.replace("_", " ")), _num(raw.get(k), ".3g"), _num(v, ".3g"),
                 "<b>\u2713</b>" if (_finite(v) is not None and v <= 0.05) else "\u2717"] for k, v in fdr.items()]
        qs = [_finite(v) for v in fdr.values()]
        _table(c, MARGIN_X, y, [251, 90, 90, 80], ["claim", "p", "BH q", "q \u2264 0.05"], rows, size=7.4,
               colours=lambda r, i: (GREEN if qs[r] is not None and qs[r] <= 0.05 else RED) if i == 3 else None,
               max_y=BOTTOM)


def _wrap_command(c: _Canvas, cmd: str, width: float, size: float) -> list[str]:
    """Break a shell command into lines at spaces (continuation lines indented); a word longer than a line is cut."""
    indent = "    "
    lines: list[str] = []
    cur = ""
    for word in cmd.split(" "):
        trial = word if not cur else cur + " " + word
        if c.text_width(trial, size, mono=True) <= width:
            cur = trial
            continue
        if cur:
            lines.append(cur)
        cur = indent + word
        while c.text_width(cur, size, mono=True) > width and len(cur) > len(indent) + 1:
            cut = len(cur)
            while cut > len(indent) + 1 and c.text_width(cur[:cut], size, mono=True) > width:
                cut -= 1
            lines.append(cur[:cut])
            cur = indent + cur[cut:]
    if cur:
        lines.append(cur)
    return lines


def _page_reproduce(c: _Canvas, doc: Mapping) -> None:
    inc, mdl, tok, rep, cf = doc["incident"], doc["model"], doc["tokenizer"], doc["replay"], doc.get("cf")
    y = _heading(c, TOP, "Reproduce and verify")
    y += c.para(MARGIN_X, y, CONTENT_W,
                "Anyone holding the bundle file (its sha256 is below) can re-run every step. The last command "
                "re-checks this certificate's claims against a bundle and prints each one as ok or FAILED: the file "
                "hash, a bit-identical replay, the weights and tokenizer hashes, and the fix set re-evaluated "
                "(incident flip, flip rate within the certified interval, sufficiency and side effects within one "
                "prompt, the same significance conclusion).", 8.5) + 8
    for i, cmd in enumerate(doc["commands"]):
        lines = _wrap_command(c, cmd, CONTENT_W - 34, 7.8)
        h = len(lines) * 10.5
        c.rect(MARGIN_X, y, CONTENT_W, h + 7, fill="#f3f4f6", stroke=RULE, width=0.5, radius=2)
        c.label(MARGIN_X + 5, y + 3.5, 18, 10.5, f"{i + 1}.", 7.8, bold=True, colour=NAVY)
        for j, line in enumerate(lines):
            c.label(MARGIN_X + 26, y + 3.5 + j * 10.5, CONTENT_W - 34, 10.5, line, 7.8, mono=True, min_size=7.8)
        y += h + 11
    y += 4
    y = _subheading(c, y, "Identities and hashes")
    rows = [("certificate id", doc["certificate_id"]),
            ("bundle file", f"{inc['bundle_file']} ({inc['bundle_bytes']:,} bytes)"),
            ("bundle sha256", inc["bundle_sha256"]),
            ("bundle uuid", inc["bundle_uuid"]),
            ("bundle recorded", f"{_fmt_time(inc.get('bundle_created', ''))} by {inc.get('bundle_program', '')}"),
            ("weights sha256", mdl["weights_sha256"]),
            ("tokenizer sha256", f"{tok['sha256']}"),
            ("model", f"{mdl['source'] or '(embedded)'} \u00b7 {mdl['class_name']} \u00b7 tokenizer "
                      f"{tok.get('class_name', '')}"),
            ("CF baseline", (cf or {}).get("baseline_id") or "\u2014"),
            ("program", f"{doc['program']['name']} {doc['program']['version']}")]
    rows_t = [[f"<b>{_esc(k)}</b>", _esc(v)] for k, v in rows]
    y, _ = _table(c, MARGIN_X, y, [104, CONTENT_W - 104], None, rows_t, size=7.6, mono_cols=(1,), zebra=True)
    y += 12

    # what follows gets the room that is left: a table that does not fit says how many rows the JSON holds
    if y + 40 > BOTTOM:
        c.para(MARGIN_X, y, CONTENT_W, "<i>The replay checks and the environment are in the certificate JSON "
               "(replay, environment).</i>", 7.5, colour=GREY)
        return
    y = _subheading(c, y, "Replay verification" + ("" if rep.get("verified") else ": NOT VERIFIED"))
    if rep.get("verified"):
        rows_r = [[_esc(ch["name"]), "<b>ok</b>" if ch["ok"] else "<b>FAILED</b>", _esc(ch.get("detail", ""))]
                  for ch in rep.get("checks", [])]
        oks = [ch["ok"] for ch in rep.get("checks", [])]
        y, drawn = _table(c, MARGIN_X, y, [110, 45, CONTENT_W - 155], ["check", "result", "detail"], rows_r,
                          size=7.2, colours=lambda r, i: (GREEN if oks[r] else RED) if i == 1 else None,
                          max_y=BOTTOM - 12)
        note = (f"Replay took {_num(rep.get('seconds'), '.2f')} s on {rep.get('threads') or '?'} thread(s); model "
                f"loaded from {_esc(rep.get('model_loaded_from', ''))}.")
        if drawn < len(rows_r):
            note = f"<i>\u2026 {len(rows_r) - drawn} more checks in the certificate JSON (replay.checks).</i> " + note
        y += c.para(MARGIN_X, y + 3, CONTENT_W, note, 7.2, colour=GREY) + 12
    else:
        y += c.para(MARGIN_X, y, CONTENT_W, "The replay was not run for this certificate: run <span class='m'>"
                    f"forensics replay {_esc(inc['bundle_file'])}</span>.", 8, colour=RED) + 10

    env_r = (doc.get("environment") or {}).get("recorded") or {}
    env_c = (doc.get("environment") or {}).get("certified") or {}
    keys = [k for k in ("python", "torch", "transformers", "platform", "machine", "device") if k in env_r or k in env_c]
    keys += [k for k in env_r if k not in keys and not isinstance(env_r[k], (dict, list))][:6]
    if y + 40 > BOTTOM:
        c.para(MARGIN_X, min(y, BOTTOM - 10), CONTENT_W, "<i>The environment (recorded and certified) is in the "
               "certificate JSON (environment).</i>", 7.2, colour=GREY)
        return
    y = _subheading(c, y, "Environment (recorded \u2192 certified)")
    rows_e = [[_esc(k), _esc(env_r.get(k, "\u2014")), _esc(env_c.get(k, "\u2014"))] for k in keys]
    y, drawn = _table(c, MARGIN_X, y, [104, (CONTENT_W - 104) / 2, (CONTENT_W - 104) / 2],
                      ["", "recorded", "certified"], rows_e, size=7.0, max_y=BOTTOM - 10)
    if drawn < len(rows_e):
        c.para(MARGIN_X, y + 1, CONTENT_W, f"<i>\u2026 {len(rows_e) - drawn} more rows in the certificate JSON "
               "(environment).</i>", 7, colour=GREY)


PAGES: list[tuple[str, Callable]] = [("summary", _page_summary), ("compression forensics", _page_cf),
                                     ("fix set", _page_fix), ("evidence", _page_evidence),
                                     ("reproduce and verify", _page_reproduce)]
assert len(PAGES) == PAGE_COUNT


# ----------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------
def render_certificate_pdf(doc: Mapping, path: str | os.PathLike) -> Path:
    """Write the certificate ``doc`` as an A4 PDF of :data:`PAGE_COUNT` pages at ``path`` (temp file + rename).

    Args:
        doc: a certificate from :func:`engine.certificate.build_certificate` (validated here).
        path: the PDF to write; its folder must exist.

    Returns:
        The path written.

    Raises:
        CertificateError: the certificate is invalid or the PDF cannot be written.
        RuntimeError: called off the Qt application's thread.
    """
    from engine.atomic import publish, temp_beside
    from engine.certificate import validate_certificate

    validate_certificate(doc)
    app = ensure_qt_app()
    _check_thread(app)
    from PySide6.QtCore import QMarginsF
    from PySide6.QtGui import QPageLayout, QPageSize, QPainter, QPdfWriter

    out = Path(path)
    if not out.parent.is_dir():
        raise CertificateError(f"cannot write the PDF: folder {out.parent} does not exist")
    tmp = temp_beside(out)
    try:
        writer = QPdfWriter(str(tmp))
        writer.setResolution(DPI)
        writer.setPageSize(QPageSize(QPageSize.PageSizeId.A4))
        writer.setPageMargins(QMarginsF(0, 0, 0, 0), QPageLayout.Unit.Point)
        inc = doc["incident"]
        writer.setTitle(f"RCA certificate: {inc.get('scenario') or inc['bundle_file']} ({inc['bundle_uuid']})")
        writer.setCreator(f"{doc['program']['name']} {doc['program']['version']}")
        if hasattr(writer, "setDocumentId"):   # Qt >= 6.8: the PDF's id is derived from the certificate's
            import uuid

            from PySide6.QtCore import QUuid

            writer.setDocumentId(QUuid(str(uuid.uuid5(uuid.NAMESPACE_URL, "forensics-certificate:"
                                                      + str(doc["certificate_id"])))))
        painter = QPainter()
        if not painter.begin(writer):
            raise CertificateError(f"cannot write the PDF {out} (Qt could not open it for painting)")
        try:
            painter.setRenderHint(QPainter.RenderHint.Antialiasing, True)
            painter.setRenderHint(QPainter.RenderHint.TextAntialiasing, True)
            canvas = _Canvas(writer, painter)
            for i, (title, draw) in enumerate(PAGES):
                if i:
                    writer.newPage()
                _frame(canvas, doc, i + 1, PAGE_COUNT, title)
                draw(canvas, doc)
        finally:
            ok = painter.end()
        del painter, writer
        if not ok or tmp.stat().st_size == 0:
            raise CertificateError(f"cannot write the PDF {out} (Qt reported a write failure)")
        publish(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m workbench.pdf CERTIFICATE.json OUT.pdf``: draw a certificate JSON as the PDF (offscreen).

    What the GUI's export runs in a child process, so drawing (0.3-2 s) never freezes the window: Qt's painting
    must run on a process's GUI thread, and a second thread of the GUI process deadlocked in QTextDocument (a
    PySide6 lock-order inversion with the GIL).  Exit 0 when written; 1 with one ``error: ...`` line on stderr."""
    import json

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print("usage: python -m workbench.pdf CERTIFICATE.json OUT.pdf", file=sys.stderr)
        return 2
    os.environ["QT_QPA_PLATFORM"] = "offscreen"
    try:
        doc = json.loads(Path(args[0]).read_text(encoding="utf-8"))
        render_certificate_pdf(doc, args[1])
    except (CertificateError, OSError, ValueError) as exc:
        print(f"error: {exc}".splitlines()[0], file=sys.stderr)
        return 1
    return 0


__all__ = ["PAGE_COUNT", "element_words", "ensure_qt_app", "guard_none_refcount", "main", "render_certificate_pdf"]


if __name__ == "__main__":
    sys.exit(main())
