"""RCA certificate: JSON built from real CCA evidence on the demo bundle, schema validation, verification against an
intact and an altered bundle, the PDF (text via pdftotext, page count) and the CLI."""

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


@pytest.fixture(scope="session")
def demo_handle(demo_bundle):
    from engine.bundle import open_bundle
    from engine.replay import load_bundle_model

    with open_bundle(demo_bundle) as b:
        return load_bundle_model(b)


@pytest.fixture(scope="session")
def cca_result(demo_bundle, demo_handle):
    """All the CCA evidence for a one-element fix set (mean-ablate the attention output at the last prompt token)."""
    from engine.bundle import open_bundle
    from engine.cca import evaluate_fix_set
    from engine.interventions import Intervention

    with open_bundle(demo_bundle) as b:
        return evaluate_fix_set(b, demo_handle, [Intervention.from_dict(d) for d in FIX], n_controls=N_CONTROLS)


@pytest.fixture(scope="session")
def replay_report(demo_bundle, demo_handle):
    from engine.replay import replay

    return replay(demo_bundle, handle=demo_handle)


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
