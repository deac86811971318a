"""RCA certificate data: JSON built from real CCA evidence on the demo bundle, schema validation, the analyst's
decisions as the GUI records them, verification against an intact and an altered bundle.

The PDF is tested in ``test_certificate_pdf.py``, the CLI in ``test_cli_certify.py``, the GUI export in
``gui/test_export.py``; they share the evidence computed here (:func:`demo_evidence`)."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest

from engine.certificate import (CERT_SCHEMA, build_certificate, load_certificate, validate_certificate,
                                verify_certificate, write_certificate)
from engine.errors import CertificateError

N_CONTROLS = 10
FIX = ({"layer": 0, "component": "attn", "positions": [15], "op": "mean"},)


_MEMO: dict = {}


def demo_evidence(demo_bundle) -> tuple:
    """``(handle, cca_result, replay_report)`` for the demo bundle, computed once per test session and shared by
    the certificate test modules (``test_certificate_pdf``, ``test_cli_certify``, ``gui/test_export``), which
    import this function: a fixture imported into another module would be computed again there.

    ``cca_result`` is all the CCA evidence for a one-element fix set (mean-ablate the attention output at the last
    prompt token) with ``N_CONTROLS`` random control sets.
    """
    key = ("evidence", str(demo_bundle))
    if key not in _MEMO:
        from engine.bundle import open_bundle
        from engine.cca import evaluate_fix_set
        from engine.interventions import Intervention
        from engine.replay import load_bundle_model, replay

        with open_bundle(demo_bundle) as b:
            handle = load_bundle_model(b)
            res = evaluate_fix_set(b, handle, [Intervention.from_dict(d) for d in FIX], n_controls=N_CONTROLS)
            rep = replay(b, handle=handle)
        _MEMO[key] = (handle, res, rep)
    return _MEMO[key]


def demo_cf(demo_bundle):
    """``engine.cf.run_cf`` on the demo bundle (once per session)."""
    key = ("cf", str(demo_bundle))
    if key not in _MEMO:
        from engine.bundle import open_bundle
        from engine.cf import run_cf

        handle = demo_evidence(demo_bundle)[0]
        with open_bundle(demo_bundle) as b:
            _MEMO[key] = run_cf(b, handle)
    return _MEMO[key]


@pytest.fixture(scope="session")
def demo_handle(demo_bundle):
    return demo_evidence(demo_bundle)[0]


@pytest.fixture(scope="session")
def cca_result(demo_bundle):
    return demo_evidence(demo_bundle)[1]


@pytest.fixture(scope="session")
def replay_report(demo_bundle):
    return demo_evidence(demo_bundle)[2]


@pytest.fixture(scope="session")
def cert(demo_bundle, cca_result, replay_report):
    return build_certificate(demo_bundle, cca=cca_result, replay_report=replay_report,
                             analyst={"name": "test", "accepted": [0], "notes": {0: "necessary"}})


def test_certificate_carries_the_incident_and_the_evidence(cert, demo_bundle, cca_result):
    from engine.certificate import file_sha256

    assert cert["schema"] == CERT_SCHEMA
    assert cert["incident"]["bundle_sha256"] == file_sha256(demo_bundle)
    assert cert["incident"]["output"] == "HACKED" and cert["incident"]["failure"]["spec"] == "contains:HACKED"
    assert len(cert["model"]["weights_sha256"]) == 64 and len(cert["tokenizer"]["sha256"]) == 64
    assert cert["replay"]["verified"] and cert["replay"]["bit_identical"]
    assert cert["cca"]["flip_rate"] == cca_result.flip_rate and cert["cca"]["n_controls"] == N_CONTROLS
    assert cert["analyst"]["decisions"] == [{"element": 0, "decision": "accepted", "note": "necessary",
                                             "site": "attn L0 pos 15"}]
    v = cert["verdict"]
    assert v.startswith("Mean-ablating 1 site (attn L0 pos 15) removes the failure (contains:HACKED)")
    assert f"of {cca_result.n_variants} held-out failing variants" in v
    # only 10 controls: the p-value criterion (>= 200 controls, p < 0.01) cannot hold, and the verdict says so
    assert not cca_result.criteria["p_value"]["ok"] and "NOT MET" in v and "p value" in v
    assert any(c.startswith("forensics cca ") and "--controls 10" in c for c in cert["commands"])


def test_json_validates_and_a_broken_one_is_rejected_naming_the_field(cert, tmp_path):
    validate_certificate(cert)
    p = write_certificate(cert, tmp_path / "c.json")
    assert load_certificate(p) == json.loads(json.dumps(cert))
    cases = [
        (lambda d: d["cca"].__setitem__("flip_rate", "high"), "cca.flip_rate"),
        (lambda d: d["model"].pop("weights_sha256"), "model"),
        (lambda d: d["incident"].__setitem__("bundle_sha256", "abc"), "incident.bundle_sha256"),
        (lambda d: d["cca"]["fix_set"][0].__setitem__("component", "liver"), "cca.fix_set.0.component"),
        (lambda d: d["cca"].__setitem__("flip_rate_ci", [0.0, 0.01]), "cca.flip_rate"),
        (lambda d: d.__setitem__("schema", "forensics.rca-certificate/9"), "schema"),
    ]
    for breaks, field in cases:
        bad = copy.deepcopy(cert)
        breaks(bad)
        with pytest.raises(CertificateError) as exc:
            validate_certificate(bad)
        assert str(exc.value).startswith(field), (field, str(exc.value))
    missing = copy.deepcopy(cert)
    del missing["model"]["weights_sha256"]
    with pytest.raises(CertificateError, match="weights_sha256"):
        validate_certificate(missing)


def test_certificate_of_another_bundle_is_refused(demo_bundle, cca_result, tmp_path):
    d = cca_result.to_dict()
    d["bundle_sha256"] = "0" * 64
    with pytest.raises(CertificateError, match="bundle sha256"):
        build_certificate(demo_bundle, cca=d)


def test_verification_holds_on_the_certified_bundle(cert, demo_bundle):
    rep = verify_certificate(cert, demo_bundle)
    assert rep.ok, [(c.name, c.detail) for c in rep.failed]
    names = [c.name for c in rep.claims]
    for n in ("verdict", "criteria", "evidence counts", "p-value", "bundle sha256", "replay", "weights sha256",
              "tokenizer hash", "fix: incident flipped", "fix: metric", "fix: fraction touched", "fix: 1-minimal",
              "fix: flip rate", "fix: side effects", "fix: significance"):
        assert n in names
    assert "cf" not in names and rep.unchecked == []  # a certificate without CF makes no CF claim
    sig = next(c for c in rep.claims if c.name == "fix: significance")
    assert "the same seeded control sets" in sig.detail  # as many controls as certified: the p-value itself


def _altered_copy(src: Path, dst: Path, edit) -> Path:
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        edit(f)
    return dst


def test_altered_activation_fails_verification_naming_it(cert, demo_bundle, tmp_path):
    def edit(f):
        ds = f["activations/layer_002/mlp"]
        a = ds[()]
        a[3, 7] += np.float32(0.25)
        ds[...] = a

    bad = _altered_copy(demo_bundle, tmp_path / "altered.h5", edit)
    rep = verify_certificate(cert, bad, n_controls=0)
    failed = {c.name: c.detail for c in rep.failed}
    assert not rep.ok
    assert "bundle sha256" in failed and "altered" in failed["bundle sha256"]
    assert "replay" in failed and "2.mlp" in failed["replay"]


def test_altered_attribute_fails_verification_naming_it(cert, demo_bundle, tmp_path):
    def edit(f):
        f["failure"].attrs["expected"] = "something else entirely"

    bad = _altered_copy(demo_bundle, tmp_path / "altered-attr.h5", edit)
    rep = verify_certificate(cert, bad, n_controls=0)
    failed = {c.name: c.detail for c in rep.failed}
    assert set(failed) == {"bundle sha256", "incident"}, failed
    assert "expected behaviour" in failed["incident"]


def test_analyst_record_as_the_review_view_stores_it(demo_bundle, cca_result, replay_report):
    """The review view stores element dicts (``FixElement.to_dict()``), not indices; an element the analyst rejected
    and re-evaluated without is no longer in the set and is recorded as removed, and the verdict says so."""
    from engine.certificate import certificate_status

    kept = cca_result.fix_set[0].to_dict()
    dropped = {"layer": 3, "component": "mlp", "positions": [2], "op": "mean", "indices": [], "value": None,
               "drop_one_metric": None, "drop_one_failing": False, "single_metric": -0.1}
    doc = build_certificate(demo_bundle, cca=cca_result, replay_report=replay_report,
                            analyst={"accepted": [kept], "rejected": [dropped], "note": "L3 mlp does nothing"})
    an = doc["analyst"]
    assert an["decisions"] == [{"element": 0, "decision": "accepted", "note": "", "site": "attn L0 pos 15"}]
    assert [r["site"] for r in an["removed"]] == ["MLP L3 pos 2"] and an["note"] == "L3 mlp does nothing"
    assert an["removed"][0]["intervention"]["component"] == "mlp"
    assert "The analyst removed 1 element (MLP L3 pos 2) before this evidence was measured." in doc["verdict"]
    validate_certificate(doc)

    rejected = build_certificate(demo_bundle, cca=cca_result, replay_report=replay_report,
                                 analyst={"accepted": [], "rejected": [kept]})
    assert "The analyst REJECTED 1 of 1 element of this set (attn L0 pos 15)." in rejected["verdict"]
    st = certificate_status(rejected)
    assert st["level"] == "qualified" and any("analyst rejected 1" in r for r in st["reasons"])
    # 10 controls: the p-value criterion (>= 200 controls) is missed, so even the plain certificate is qualified
    plain = certificate_status(doc)
    assert plain["level"] == "qualified" and "p value" in plain["headline"]
    with pytest.raises(CertificateError, match="not in the certified fix set"):
        build_certificate(demo_bundle, cca=cca_result, analyst={"accepted": [dropped]})


def test_certificate_without_replay_says_so(demo_bundle, cca_result):
    from engine.certificate import certificate_status

    doc = build_certificate(demo_bundle, cca=cca_result)
    assert not doc["replay"]["verified"]
    assert doc["verdict"].endswith("The replay of the incident was not verified for this certificate.")
    assert "the replay was not verified" in certificate_status(doc)["reasons"]


# ---------------------------------------------------------------------------------------------- thin evidence
def _all_met(cert: dict, n_variants: int, n_benign: int, changed: int = 0) -> dict:
    """The demo certificate with every acceptance criterion met and the flip rate (all ``n_variants`` flipped) and
    side effects (``changed`` of ``n_benign``) of the given counts, its verdict regenerated."""
    from engine.certificate import verdict_sentence
    from engine.stats import wilson_interval

    d = copy.deepcopy(cert)
    cca = d["cca"]
    cca.update(n_variants=n_variants, flip_rate=1.0, flip_rate_ci=list(wilson_interval(n_variants, n_variants)),
               n_benign=n_benign, side_effect_rate=changed / n_benign,
               side_effects=[{"prompt": f"benign {i}", "changed": i < changed} for i in range(n_benign)])
    cca.setdefault("evidence", {}).setdefault("side_effects", {})["n_changed"] = changed
    for c in cca["criteria"].values():
        c["ok"] = True
    d["verdict"] = verdict_sentence(d)
    return d


def test_targets_repeated_in_the_certificate_module_are_the_cca_criteria():
    from engine.cca import TARGETS
    from engine.certificate import FLIP_RATE_TARGET, SIDE_EFFECT_TARGET

    assert (FLIP_RATE_TARGET, SIDE_EFFECT_TARGET) == (TARGETS["flip_rate"], TARGETS["side_effect_rate"])


def test_thin_evidence_qualifies_a_certificate_that_meets_every_criterion(cert):
    """2 held-out variants all flipped (Wilson 95% 34.2%–100%) and 0 of 3 benign prompts changed (upper bound 56.1%)
    meet the point-estimate criteria, but the certificate is qualified and its verdict says why; with 40 variants and
    96 benign prompts (the demo's counts) the same numbers certify."""
    from engine.certificate import certificate_status

    thin = _all_met(cert, 2, 3)
    st = certificate_status(thin)
    assert st["level"] == "qualified", st
    assert st["reasons"] == [
        "thin evidence: the flip rate's 95% CI reaches down to 34.2% (< 80%) over 2 held-out variants",
        "thin evidence: the side-effect rate's 95% CI reaches up to 56.1% (> 5%) over 3 held-out benign prompts "
        "(0 changed)"]
    assert st["headline"].startswith("FIX FOUND, QUALIFIED: thin evidence: the flip rate's 95% CI reaches down")
    assert "All 6 acceptance criteria are met. Thin evidence: the flip rate's 95% CI reaches down to 34.2%" \
        in thin["verdict"]
    validate_certificate(thin)
    plenty = _all_met(cert, 40, 96)
    assert certificate_status(plenty)["level"] == "certified"
    assert "Thin evidence" not in plenty["verdict"]
    # only the side effects thin: 0 of 60 changed reaches up to 6.0%
    st = certificate_status(_all_met(cert, 40, 60))
    assert st["level"] == "qualified" and st["reasons"] == [
        "thin evidence: the side-effect rate's 95% CI reaches up to 6.0% (> 5%) over 60 held-out benign prompts "
        "(0 changed)"]


def test_thin_evidence_on_the_shipped_scenarios_numbers():
    """docs/cca.md's measured counts per scenario: only bert-sentiment-bypass (54 of 60 variants, Wilson 95%
    79.9%–95.3%) has a flip-rate interval reaching below 80%, so its certificate is qualified, not certified."""
    from engine.certificate import thin_evidence
    from engine.stats import wilson_interval

    measured = {"gpt2-prompt-injection": (40, 40, 0, 96), "gpt2-toxic-generation": (40, 40, 0, 96),
                "llama-secret-leak": (33, 33, 0, 145), "bert-sentiment-bypass": (54, 60, 0, 160)}
    thin = {}
    for name, (k, n, changed, nb) in measured.items():
        thin[name] = thin_evidence({"flip_rate": k / n, "flip_rate_ci": list(wilson_interval(k, n)), "n_variants": n,
                                    "side_effect_rate": changed / nb, "n_benign": nb,
                                    "evidence": {"side_effects": {"n_changed": changed}}})
    assert thin == {"gpt2-prompt-injection": [], "gpt2-toxic-generation": [], "llama-secret-leak": [],
                    "bert-sentiment-bypass": ["the flip rate's 95% CI reaches down to 79.9% (< 80%) over 60 held-out "
                                              "variants"]}


# ---------------------------------------------------------------------------------------------- tampering
def _claims(doc: dict) -> dict:
    from engine.certificate import document_claims

    validate_certificate(doc)                       # every tampered copy is still schema-valid
    return {c.name: c for c in document_claims(doc)}


def test_the_document_claims_hold_on_the_built_certificate(cert):
    claims = _claims(cert)
    assert set(claims) == {"verdict", "criteria", "fdr", "evidence counts", "p-value"}
    assert all(c.ok and c.checked for c in claims.values()), [(c.name, c.detail) for c in claims.values()]


def test_a_replaced_verdict_fails_the_verdict_claim(cert):
    bad = copy.deepcopy(cert)
    bad["verdict"] = "Mean-ablating 1 site fixes the failure everywhere; all acceptance criteria are met."
    claims = _claims(bad)
    assert not claims["verdict"].ok and "not the sentence the certificate's numbers give" in claims["verdict"].detail
    assert all(c.ok for n, c in claims.items() if n != "verdict")
    stored = copy.deepcopy(cert)                    # a standing stored beside the verdict must be the computed one
    stored["status"] = {"level": "certified", "headline": "ROOT CAUSE CERTIFIED"}
    assert not _claims(stored)["verdict"].ok and "'qualified'" in _claims(stored)["verdict"].detail


def test_criteria_that_do_not_follow_from_the_numbers_fail_even_with_a_matching_verdict(cert):
    from engine.certificate import verdict_sentence

    bad = copy.deepcopy(cert)
    bad["cca"]["criteria"]["p_value"]["ok"] = True   # 10 controls cannot meet "p < 0.01 with >= 200 controls"
    bad["verdict"] = verdict_sentence(bad)            # ... and a verdict written to match: "All 6 ... are met."
    claims = _claims(bad)
    assert claims["verdict"].ok and "All 6 acceptance criteria are met." in bad["verdict"]
    assert not claims["criteria"].ok and "p_value: ok=True, but its value gives ok=False" in claims["criteria"].detail
    dropped = copy.deepcopy(cert)                     # the missed criterion removed altogether
    del dropped["cca"]["criteria"]["p_value"]
    dropped["verdict"] = verdict_sentence(dropped)
    assert not _claims(dropped)["criteria"].ok and "p_value is missing" in _claims(dropped)["criteria"].detail


def test_an_impossible_p_value_fails(cert):
    bad = copy.deepcopy(cert)
    cca = bad["cca"]
    cca["n_controls"] = 200
    cca["control_flip_rates"] = (cca["control_flip_rates"] * 20)[:200]
    cca["p_value"] = 1e-9
    claims = _claims(bad)
    assert not claims["p-value"].ok
    assert claims["p-value"].detail == ("impossible: an empirical p-value from 200 control sets is at least 1/201 = "
                                        "0.004975, the certificate says p = 1e-09")
    between = copy.deepcopy(cert)                     # 0.5 is not (1 + k) / 11 for any whole k
    between["cca"]["p_value"] = 0.5
    assert not _claims(between)["p-value"].ok and "whole number" in _claims(between)["p-value"].detail


def test_an_interval_or_rate_that_is_not_its_count_fails(cert):
    bad = copy.deepcopy(cert)
    bad["cca"]["flip_rate_ci"] = [0.99, 1.0]
    assert not _claims(bad)["evidence counts"].ok and "not the Wilson 95% interval" in \
        _claims(bad)["evidence counts"].detail
    odd = copy.deepcopy(cert)
    odd["cca"]["side_effect_rate"] = 0.013
    assert not _claims(odd)["evidence counts"].ok and "not a whole number" in _claims(odd)["evidence counts"].detail


def test_significance_with_too_few_controls_cannot_be_checked(cert, demo_bundle):
    """5 control sets give p >= 1/6: they can neither confirm nor contradict the certified p-value, so the claim is
    unchecked (not FAILED) and the report is not verified, though nothing in it is false."""
    from engine.certificate import significance_uncheckable

    assert significance_uncheckable(10, 10) is None and significance_uncheckable(0, 200) is None
    assert significance_uncheckable(19, 200) is None and "at least 19" in significance_uncheckable(18, 200)
    assert "comes from 10 control sets" in significance_uncheckable(50, 10)
    rep = verify_certificate(cert, demo_bundle, n_controls=5)
    sig = next(c for c in rep.claims if c.name == "fix: significance")
    assert not sig.checked and sig.status == "unchecked" and "1/6 = 0.17" in sig.detail and "at least 19" in sig.detail
    assert rep.failed == [] and rep.holds and not rep.ok
    assert rep.to_dict()["unchecked"] == ["fix: significance"]


def test_analyst_record_is_checked_before_the_fix_set_is_known():
    from engine.certificate import analyst_record

    ok = analyst_record({"name": "a", "accepted": [0, {"layer": 1, "component": "mlp", "positions": [3],
                                                       "op": "mean"}]})
    assert ok["name"] == "a"
    for bad, words in (({"accepted": "0"}, "must be a list"), ({"rejected": [True]}, "element index"),
                       ({"decisions": [{"element": -1, "decision": "accepted"}]}, "counted from 0"),
                       ({"decisions": [{"element": 0, "decision": "maybe"}]}, "'accepted' or 'rejected'")):
        with pytest.raises(CertificateError, match=words):
            analyst_record(bad)
    with pytest.raises(CertificateError, match="the fix set has 1"):
        analyst_record({"accepted": [3]}, [dict(FIX[0])])


def test_a_partial_certificate_is_not_failed_for_what_it_did_not_measure(demo_bundle, demo_handle):
    """Cancelled before the set was checked: the certificate claims no flip, flip rate or side effects, so their
    re-measured values contradict nothing (``not claimed``), while what it does say (the fraction of activations,
    the replay, the verdict) is still checked."""
    import threading

    from engine.bundle import open_bundle
    from engine.cca import evaluate_fix_set
    from engine.interventions import Intervention

    cancel = threading.Event()
    cancel.set()
    with open_bundle(demo_bundle) as b:
        partial = evaluate_fix_set(b, demo_handle, [Intervention.from_dict(d) for d in FIX], n_controls=0,
                                   cancel=cancel)
    doc = build_certificate(demo_bundle, cca=partial)
    rep = verify_certificate(doc, demo_bundle)
    claims = {c.name: c for c in rep.claims}
    assert rep.failed == [], [(c.name, c.detail) for c in rep.failed]
    for n in ("fix: incident flipped", "fix: metric", "fix: flip rate", "fix: side effects"):
        assert claims[n].detail.startswith("not claimed"), claims[n]
    assert claims["fix: fraction touched"].ok and "not claimed" not in claims["fix: fraction touched"].detail
    bad = copy.deepcopy(doc)
    bad["cca"]["fraction_of_activations"] = 0.5
    bad["verdict"] = bad["verdict"].replace("PARTIAL RESULT", "FINAL RESULT")
    failed = {c.name for c in verify_certificate(bad, demo_bundle).failed}
    assert failed == {"verdict", "criteria", "fix: fraction touched"}, failed
