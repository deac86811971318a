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
    for n in ("bundle sha256", "replay", "weights sha256", "tokenizer hash", "fix: incident flipped",
              "fix: flip rate", "fix: side effects"):
        assert n in names


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
