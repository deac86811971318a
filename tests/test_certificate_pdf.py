"""The certificate PDF as a reader gets it: page count and size (pdfinfo), the text a reader can find and copy
(pdftotext: the verdict, the weights hash, the flip rate, the reproduction commands, the incident id / generation
time / page number on every page), and text that stays inside the page's margins (pdftotext -bbox), for the demo
certificate and for a cancelled analysis with a 12-element set, long paths and a long analyst note.

The evidence comes from real forward passes on the demo bundle, shared with test_certificate.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from test_certificate import demo_cf, demo_evidence

pytest.importorskip("PySide6")
pytestmark = pytest.mark.skipif(not (shutil.which("pdftotext") and shutil.which("pdfinfo")),
                                reason="poppler-utils (pdftotext, pdfinfo) not installed")

from engine.certificate import (build_certificate, certificate_status, reproduction_commands,  # noqa: E402
                                write_certificate)
from workbench.pdf import BOTTOM, MARGIN_X, PAGE_COUNT, PAGE_H, PAGE_W, render_certificate_pdf  # noqa: E402


def pdftotext(pdf: Path, *args: str) -> str:
    return subprocess.run(["pdftotext", "-enc", "UTF-8", *args, str(pdf), "-"], capture_output=True, text=True,
                          check=True, timeout=60).stdout


def pdfinfo(pdf: Path) -> dict[str, str]:
    out = subprocess.run(["pdfinfo", str(pdf)], capture_output=True, text=True, check=True, timeout=60).stdout
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines())}


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def demo_pdf(demo_bundle, tmp_path_factory):
    """The demo certificate (real CCA evidence, CF, replay, an analyst's review) as PDF + JSON."""
    _, cca, rep = demo_evidence(demo_bundle)
    cf = demo_cf(demo_bundle)
    d = tmp_path_factory.mktemp("cert-pdf")
    pdf = d / "demo-certificate.pdf"
    commands = reproduction_commands(demo_bundle, pdf_path=pdf, result_path=d / "demo-certificate.cca.json",
                                     cf_path=d / "demo-certificate.cf.json", n_controls=cca.n_controls)
    doc = build_certificate(demo_bundle, cca=cca, cf=cf, replay_report=rep, commands=commands,
                            analyst={"name": "R. Viewer", "accepted": [0], "note": "checked the attention pattern"})
    render_certificate_pdf(doc, pdf)
    js = write_certificate(doc, pdf.with_suffix(".json"))
    return doc, pdf, js


def test_json_validates_against_the_published_schema(demo_pdf):
    import jsonschema

    doc, _, js = demo_pdf
    schema = json.loads((Path(__file__).resolve().parents[1] / "resources" / "schemas" /
                         "certificate-v1.json").read_text(encoding="utf-8"))
    on_disk = json.loads(js.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator(schema).validate(on_disk)
    assert on_disk == json.loads(json.dumps(doc))
    assert on_disk["cf"]["scores"] and on_disk["analyst"]["name"] == "R. Viewer"


def test_pdf_has_five_a4_pages(demo_pdf):
    info = pdfinfo(demo_pdf[1])
    assert int(info["Pages"]) == PAGE_COUNT == 5
    assert "A4" in info["Page size"]
    assert "RCA certificate" in info["Title"] and demo_pdf[0]["incident"]["bundle_uuid"] in info["Title"]


def test_pdf_text_carries_verdict_hashes_flip_rate_and_commands(demo_pdf):
    doc, pdf, _ = demo_pdf
    text = pdftotext(pdf)
    body = flat(text)
    cca = doc["cca"]
    assert flat(doc["verdict"]) in body
    assert doc["model"]["weights_sha256"] in text          # on one line: copyable
    assert doc["incident"]["bundle_sha256"] in text and doc["tokenizer"]["sha256"] in text
    # the flip rate as the summary tile and the criteria table print it, from the CCA numbers
    k, n = round(cca["flip_rate"] * cca["n_variants"]), cca["n_variants"]
    assert f"{k} of {n}" in body and flat(cca["criteria"]["flip_rate"]["detail"]) in body
    assert f"{100 * cca['flip_rate']:.0f}%" in body
    # the recorded failure metric says what it is (a log-probability near 0 read as "metric -3.58e-07")
    fail = doc["incident"]["failure"]
    assert f"probability of the failing text {fail['metric']:.3g} nats" in body   # "log-" may wrap at its hyphen
    for cmd in doc["commands"]:                             # wrapped at spaces only: whitespace-normalised equal
        assert flat(cmd) in body, cmd
    assert any(c.startswith("forensics verify-certificate ") for c in doc["commands"])
    status = certificate_status(doc)
    assert flat(status["headline"]) in body
    assert "R. Viewer" in body and "checked the attention pattern" in body
    # CF: the fix site's score as computed, on the CF page
    cf_score = next(s["score"] for s in doc["cf"]["scores"] if s["layer"] == 0 and s["site"] == "attn")
    assert f"CF score {cf_score:.3g}" in body
    # CF: the run-level (family-wise) verdict, as computed
    cf = doc["cf"]
    assert cf["run_anomalous"] is not None
    assert f"the run is {'anomalous' if cf['run_anomalous'] else 'not anomalous'}" in body
    assert f"run threshold {cf['run_threshold']:.4g}" in body and f"p = {cf['run_p_value']:.3g}" in body


def test_every_page_names_incident_time_and_page_number(demo_pdf):
    from workbench.pdf import _fmt_time

    doc, pdf, _ = demo_pdf
    for page in range(1, PAGE_COUNT + 1):
        text = flat(pdftotext(pdf, "-f", str(page), "-l", str(page)))
        assert doc["incident"]["bundle_uuid"] in text
        assert f"generated {_fmt_time(doc['created'])}" in text
        assert f"page {page} of {PAGE_COUNT}" in text
        assert doc["certificate_id"] in text


_WORD = re.compile(r'<word xMin="([\d.]+)" yMin="([\d.]+)" xMax="([\d.]+)" yMax="([\d.]+)">([^<]*)</word>')


def assert_text_inside_margins(pdf: Path) -> int:
    """Every word lies inside the page's text area (side margins, 1 pt tolerance; 10 pt top and bottom), and no body
    text runs into the band between the content area and the footer rule; returns the word count."""
    html = pdftotext(pdf, "-bbox")
    words = [(float(a), float(b), float(c), float(d), w) for a, b, c, d, w in _WORD.findall(html)]
    assert len(words) > 300
    outside = [w for w in words if w[0] < MARGIN_X - 1 or w[2] > PAGE_W - MARGIN_X + 1 or w[1] < 10
               or w[3] > PAGE_H - 10]
    assert not outside, f"text outside the margins: {outside[:8]}"
    into_footer = [w for w in words if BOTTOM + 1 < w[3] < BOTTOM + 14]
    assert not into_footer, f"body text runs into the footer: {into_footer[:8]}"
    return len(words)


def test_demo_text_stays_inside_the_margins(demo_pdf):
    assert_text_inside_margins(demo_pdf[1])


def test_cancelled_analysis_with_long_inputs_still_renders_readably(demo_bundle, tmp_path):
    """A cancelled re-evaluation of a 12-element set (real: cancelled before the first pass), no CF, long paths and a
    long analyst note: still five pages, NOT CERTIFIED on page 1, every command complete, nothing off the page."""
    from engine.bundle import open_bundle
    from engine.cca import evaluate_fix_set
    from engine.interventions import Intervention

    handle, _, rep = demo_evidence(demo_bundle)
    cancel = threading.Event()
    cancel.set()
    ivs = [Intervention(layer=L % 4, component=("attn", "mlp", "resid_pre")[L % 3], positions=(L, L + 1), op="mean")
           for L in range(12)]
    with open_bundle(demo_bundle) as b:
        partial = evaluate_fix_set(b, handle, ivs, n_controls=0, cancel=cancel)
    assert partial.partial and len(partial.fix_set) == 12
    deep = tmp_path / ("incident-archive-" + "x" * 70) / "2026" / "customer-escalations"
    long_bundle = deep / ("gpt2-prompt-injection-" + "0123456789abcdef" * 6 + ".h5")
    commands = reproduction_commands(long_bundle, pdf_path=deep / "cert.pdf", n_controls=200)
    note = ("The analyst looked at every element of this set by hand and rejected the fourth one because it touches "
            "the BOS position. ") * 6
    doc = build_certificate(demo_bundle, cca=partial, cf=None, replay_report=rep, commands=commands,
                            analyst={"name": "Quality Assurance Team", "rejected": [3], "note": note})
    pdf = tmp_path / "partial.pdf"
    render_certificate_pdf(doc, pdf)
    assert int(pdfinfo(pdf)["Pages"]) == PAGE_COUNT
    text = pdftotext(pdf)
    page1 = flat(pdftotext(pdf, "-f", "1", "-l", "1"))
    assert "NOT CERTIFIED" in page1 and "PARTIAL RESULT" in page1
    assert "The best set found (not checked on the incident)" in page1 and "The fix " not in page1
    assert "and 6 more elements" in page1
    squeezed = "".join(text.split())                          # a path longer than a line is cut, never lost
    for cmd in commands:
        assert "".join(cmd.split()) in squeezed, cmd
    assert "Compression Forensics was not run" in flat(text)
    assert_text_inside_margins(pdf)


def test_cf_with_too_few_benign_runs_gives_no_run_verdict_in_clean_sentences(demo_bundle, tmp_path):
    """CF calibrated on 6 benign prompts and no held-out ones (a user's own incident): the CF page and the summary
    tile give no run verdict and say why; the site threshold's false-positive rate reads as not measured, and why. A
    CF result written before the rule, with a verdict from 6 runs, reads the same way."""
    import jsonschema
    import scenarios
    from engine.bundle import open_bundle
    from engine.cf import build_baseline, format_score, run_cf

    handle, cca, rep = demo_evidence(demo_bundle)
    prompts = list(scenarios.get("gpt2-prompt-injection").benign_reference[:6])
    with open_bundle(demo_bundle) as b:
        res = run_cf(b, handle, baseline=build_baseline(handle, prompts, statistic="distance"), statistic="distance")
    assert res.run_anomalous is None and res.n_heldout == 0 and res.heldout_fpr is None
    new = res.to_dict()
    old = {k: v for k, v in new.items() if k not in ("run_no_verdict_reason", "run_min_calibration")}
    old.update(run_anomalous=True, run_threshold=5.24)         # as written before a verdict needed 19 runs
    schema = json.loads((Path(__file__).resolve().parents[1] / "resources" / "schemas" /
                         "certificate-v1.json").read_text(encoding="utf-8"))
    for name, cf in (("new", new), ("old", old)):
        commands = reproduction_commands(demo_bundle, pdf_path=tmp_path / f"{name}.pdf", n_controls=cca.n_controls)
        doc = build_certificate(demo_bundle, cca=cca, cf=cf, replay_report=rep, commands=commands)
        jsonschema.Draft202012Validator(schema).validate(json.loads(json.dumps(doc)))
        pdf = tmp_path / f"{name}.pdf"
        render_certificate_pdf(doc, pdf)
        body = flat(pdftotext(pdf))
        assert ("Taken as a whole (a family-wise test over every site), the run gets no verdict: 6 benign reference "
                "runs calibrate it; a 5% test needs at least 19 (give more benign prompts: at least 19 with "
                "--benign-file, or 38 held-out ones with --heldout-file); the run's max site score "
                f"{format_score(res.run_statistic)} exceeds") in body, name
        assert f"(p = {res.run_p_value:.3g})." in body, name
        assert (f"flagged above the threshold {res.threshold:.3g}, whose false-positive rate was not measured (the "
                "baseline holds no held-out benign prompts).") in body, name
        assert "no run verdict (6 benign runs; a 5% test needs 19)" in body, name
        assert "held-out FPR not measured" in body, name
        for wrong in ("run anomalous", "the run is anomalous", "is n/a", "flags not measured", "conformal 95th"):
            assert wrong not in body, (name, wrong)
    assert_text_inside_margins(pdf)


def test_thin_evidence_is_on_the_banner_and_in_the_verdict(demo_pdf, tmp_path):
    """Every criterion met on 2 held-out variants and 3 benign prompts: the banner says QUALIFIED with the thin
    evidence (the flip rate's Wilson 95% interval reaches down to 34.2%), and so does the verdict."""
    import copy

    from engine.certificate import verdict_sentence
    from engine.stats import wilson_interval

    doc = copy.deepcopy(demo_pdf[0])
    cca = doc["cca"]
    cca.update(n_variants=2, flip_rate=1.0, flip_rate_ci=list(wilson_interval(2, 2)), n_benign=3,
               side_effect_rate=0.0, side_effects=[{"prompt": f"benign {i}", "changed": False} for i in range(3)])
    cca["evidence"]["side_effects"]["n_changed"] = 0
    for c in cca["criteria"].values():
        c["ok"] = True
    doc["verdict"] = verdict_sentence(doc)
    status = certificate_status(doc)
    assert status["level"] == "qualified"
    pdf = render_certificate_pdf(doc, tmp_path / "thin.pdf")
    body = flat(pdftotext(pdf, "-f", "1", "-l", "1"))
    assert flat(status["headline"]) in body
    assert "FIX FOUND, QUALIFIED: thin evidence: the flip rate's 95% CI reaches down to 34.2% (< 80%) over 2" in body
    assert "Thin evidence: the flip rate's 95% CI reaches down to 34.2% (< 80%) over 2 held-out variants" in body
    assert flat(doc["verdict"]) in body
    assert_text_inside_margins(pdf)


def test_a_set_that_does_not_fix_is_not_headed_the_fix(demo_pdf, tmp_path):
    import copy

    first = flat(pdftotext(demo_pdf[1], "-f", "1", "-l", "1"))
    assert "The fix 1. " in first  # the demo's set fixes: the heading, then its first element
    doc = copy.deepcopy(demo_pdf[0])
    doc["cca"]["flipped"] = False
    body = flat(pdftotext(render_certificate_pdf(doc, tmp_path / "nofix.pdf"), "-f", "1", "-l", "1"))
    assert "The best set found (it is not a fix)" in body and "The fix 1. " not in body
