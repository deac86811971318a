"""RCA certificate data: a versioned JSON document that says what was shown about one incident and how sure we are.

The certificate (schema ``forensics.rca-certificate/1``, JSON Schema in ``resources/schemas/certificate-v1.json``,
specification in ``docs/certificate-format.md``) stands alone: it names the incident bundle by its uuid **and the
sha256 of the file**, the model by its weights sha256, the tokenizer by its identity hash, and carries the replay
verification, the Compression Forensics findings, the fix set with all its CCA evidence, the analyst's decisions,
the exact commands that reproduce it and a verdict sentence generated from the numbers.

:func:`verify_certificate` re-checks every claim against a bundle: that the verdict, the acceptance criteria,
the q-values, the rates and the p-value follow from the certificate's own numbers; the file hash, a bit-identical
replay, the weights and tokenizer hashes; a re-evaluation of the fix set (flip, failure metric, fraction of
activations touched, minimality, flip rate within the certified interval, side effects, sufficiency, significance);
and Compression Forensics re-run against the bundle's own benign prompts. Each claim is reported ok, failed or
unchecked (it cannot be checked here: the detail says why) with a detail line.

Qt-free: the PDF is rendered by ``workbench.pdf`` from the same dictionary.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import threading
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .errors import BundleError, CertificateError, ForensicsError
from .stats import json_safe

CERT_SCHEMA = "forensics.rca-certificate/1"
CCA_SCHEMA = "forensics.cca-result/1"
PROGRAM = "model-forensics-workbench"
SIGNIFICANCE = 0.05  # alpha used when the verdict calls a p-value significant (the CCA criteria carry their own)

Progress = Callable[[int, int, str], None]

_SITE_WORDS = {"resid_pre": "residual in", "attn": "attn", "mlp": "MLP", "resid_post": "residual out",
               "head": "head", "neuron": "neuron"}
_OP_VERBS = {"mean": "Mean-ablating", "zero": "Zero-ablating", "patch": "Patching (from the benign counterpart)",
             "scale": "Scaling", "set": "Overwriting"}


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------
def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def program_version() -> str:
    try:
        from importlib.metadata import version

        return version(PROGRAM)
    except Exception:  # noqa: BLE001 - not installed (source checkout)
        return "0.1.0"


def _as_dict(obj: Any, what: str) -> dict | None:
    if obj is None:
        return None
    # standard JSON: a "not measured" NaN in a result (e.g. one written by an older version) becomes null
    if isinstance(obj, Mapping):
        return json_safe(json.loads(json.dumps(dict(obj), default=_json_default)))
    if hasattr(obj, "to_dict"):
        return json_safe(json.loads(json.dumps(obj.to_dict(), default=_json_default)))
    raise CertificateError(f"{what} must be a result object or its to_dict() dictionary, got {type(obj).__name__}")


def _json_default(o: Any):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def _finite(x) -> float | None:
    if x is None:
        return None
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def position_ranges(positions: Sequence[int] | str, dash: str = "\u2013") -> str:
    """``[10, 11, 12, 14]`` -> ``"10–12, 14"``; ``"all"`` -> ``"all"``. ``dash="-"`` gives text the GUI's
    intervention editor parses back."""
    if isinstance(positions, str):
        return positions
    ps = sorted(set(int(p) for p in positions))
    out, i = [], 0
    while i < len(ps):
        j = i
        while j + 1 < len(ps) and ps[j + 1] == ps[j] + 1:
            j += 1
        out.append(str(ps[i]) if i == j else f"{ps[i]}{dash}{ps[j]}")
        i = j + 1
    return ", ".join(out)


def describe_element(e: Mapping) -> str:
    """One fix-set element in words: ``"attn L2 pos 10–14"`` (plus heads/neurons/dims and a scale factor)."""
    site = _SITE_WORDS.get(e.get("component", ""), str(e.get("component")))
    s = f"{site} L{e.get('layer')}"
    idx = e.get("indices") or []
    if idx:
        what = {"head": "heads", "neuron": "neurons"}.get(e.get("component"), "dims")
        s += f" {what} {position_ranges(idx)}"
    s += f" pos {position_ranges(e.get('positions', 'all'))}"
    if e.get("op") == "scale" and e.get("value") is not None:
        s += f" ×{float(e['value']):g}"
    return s


def _pct(x: float | None) -> str:
    if x is None:
        return "n/a"
    v = 100.0 * x
    if v == 0 or v == 100 or abs(v - round(v)) < 0.05:
        return f"{v:.0f}%"
    return f"{v:.1f}%"


def _pct_nm(v: float | None) -> str:
    """A rate for a verification line: ``not measured`` when there is none."""
    return "not measured" if v is None else _pct(v)


def format_p(p: float | None, n_controls: int = 0) -> str:
    """``p = 0.0049`` (with ``≤`` when no control reached the observed value, i.e. p = 1/(n+1))."""
    if p is None:
        return "p n/a"
    if n_controls and abs(p - 1.0 / (n_controls + 1)) < 1e-12:
        return f"p ≤ {p:.2g}"
    return f"p = {p:.2g}"


# ----------------------------------------------------------------------------------------------------------------
# Verdict
# ----------------------------------------------------------------------------------------------------------------
def set_was_checked(cca: Mapping) -> bool:
    """For a CCA result's JSON (``CCAResult.to_dict()``; ``CCAResult.checked`` for the object): was the fix set run
    on the incident?  A complete result always was; a partial one only when the cancel came after that check (its
    ``evidence`` then holds ``"incident"``).  Here, not in ``engine.cca``, so that reading a certificate needs no
    torch."""
    return not cca.get("partial") or "incident" in (cca.get("evidence") or {})


def verdict_sentence(doc: Mapping) -> str:
    """The certificate's one-sentence verdict, generated from its numbers (honest when a criterion failed)."""
    cca = doc["cca"]
    fix = cca.get("fix_set") or []
    n = len(fix)
    ops = {e.get("op") for e in fix}
    verb = _OP_VERBS.get(next(iter(ops)), "Intervening on") if len(ops) == 1 else "Intervening on"
    sites = "; ".join(describe_element(e) for e in fix[:4]) + (f"; and {n - 4} more" if n > 4 else "")
    what = f"{verb} {n} site{'s' if n != 1 else ''} ({sites})"
    spec = doc["incident"]["failure"]["spec"]
    if cca.get("partial"):
        prefix = "PARTIAL RESULT (the analysis was cancelled or ran out of budget): "
    else:
        prefix = ""
    if not set_was_checked(cca):
        return (f"{prefix}{what} was not checked on the incident before the analysis stopped (best search metric "
                f"{_fmt(cca.get('baseline_metric'))} -> {_fmt(cca.get('fixed_metric'))}, teacher-forced); "
                "no root cause is certified.")
    if not cca.get("flipped"):
        return (f"{prefix}{what} does NOT remove the failure ({spec}) on the incident itself "
                f"(metric {_fmt(cca.get('baseline_metric'))} -> {_fmt(cca.get('fixed_metric'))}); "
                "no root cause is certified.")
    parts = [f"{what} removes the failure ({spec}) on the incident"]
    nv = int(cca.get("n_variants") or 0)
    if nv:
        ci = cca.get("flip_rate_ci") or [None, None]
        parts.append(f"and in {_pct(_finite(cca.get('flip_rate')))} of {nv} held-out failing variants "
                     f"(95% CI {_pct(_finite(ci[0]))}–{_pct(_finite(ci[1]))})")
    else:
        parts.append("(no held-out failing variants were available)")
    nb = int(cca.get("n_benign") or 0)
    if nb:
        changed = _n_changed(cca)
        parts.append(f", changes {changed}/{nb} benign outputs")
    nc = int(cca.get("n_controls") or 0)
    if nc:
        held_out = ((cca.get("evidence") or {}).get("controls") or {}).get("held_out", True)
        parts.append(f", {format_p(_finite(cca.get('p_value')), nc)} against {nc} random control sets of the "
                     "same size" + ("" if held_out else " (tested on the incident itself, which the set was chosen "
                                    "on: not a held-out test)"))
    sentence = " ".join(parts[:2]) + "".join(parts[2:]) + "."
    sentence = sentence.replace(" ,", ",")
    failed = [(k, c) for k, c in (cca.get("criteria") or {}).items() if not c.get("ok")]
    crit = cca.get("criteria") or {}
    if failed:
        names = ", ".join(f"{k.replace('_', ' ')} ({c.get('target', '')})" for k, c in failed)
        sentence += f" NOT MET: {len(failed)} of {len(crit)} acceptance criteria: {names}."
    elif crit:
        sentence += f" All {len(crit)} acceptance criteria are met."
    thin = thin_evidence(cca)
    if thin:
        sentence += " Thin evidence: " + "; ".join(thin) + "."
    return prefix + sentence + _verdict_caveats(doc)


#: The acceptance criteria's targets for the flip rate and the side-effect rate (``engine.cca.TARGETS``; repeated
#: here so that reading a certificate needs no torch; tests/test_certificate.py checks that they agree).
FLIP_RATE_TARGET = 0.80
SIDE_EFFECT_TARGET = 0.05


def thin_evidence(cca: Mapping) -> list[str]:
    """Why the evidence behind a met criterion is too thin to certify: the acceptance criteria compare point
    estimates with their targets (by design), but with few prompts a 100% flip rate or a 0% side-effect rate says
    little. One phrase per rate whose criterion is met while its Wilson 95% interval reaches past the target: the
    flip rate's lower bound below ``FLIP_RATE_TARGET``, the side-effect rate's upper bound above
    ``SIDE_EFFECT_TARGET``. Empty when neither applies (or a rate was not measured: its criterion is then missed)."""
    from .stats import wilson_interval

    def pct(x: float, target: float) -> str:  # one decimal; more where that would print the target itself
        for digits in (1, 2, 3):
            if f"{100 * x:.{digits}f}" != f"{100 * target:.{digits}f}":
                break
        return f"{100 * x:.{digits}f}%"

    out = []
    fr, nv = _finite(cca.get("flip_rate")), int(cca.get("n_variants") or 0)
    lo = _finite((cca.get("flip_rate_ci") or [None])[0])
    if fr is not None and nv and lo is not None and fr >= FLIP_RATE_TARGET and lo < FLIP_RATE_TARGET:
        out.append(f"the flip rate's 95% CI reaches down to {pct(lo, FLIP_RATE_TARGET)} (< {_pct(FLIP_RATE_TARGET)}) "
                   f"over {nv} held-out variant{'s' if nv != 1 else ''}")
    se, nb = _finite(cca.get("side_effect_rate")), int(cca.get("n_benign") or 0)
    if se is not None and nb and se <= SIDE_EFFECT_TARGET:
        k = min(max(_n_changed(cca), 0), nb)
        hi = wilson_interval(k, nb)[1]
        if hi > SIDE_EFFECT_TARGET:
            out.append(f"the side-effect rate's 95% CI reaches up to {pct(hi, SIDE_EFFECT_TARGET)} "
                       f"(> {_pct(SIDE_EFFECT_TARGET)}) over {nb} held-out benign prompt{'s' if nb != 1 else ''} "
                       f"({k} changed)")
    return out


def _verdict_caveats(doc: Mapping) -> str:
    """What the verdict must add about the replay and the analyst's review (empty when there is nothing to add)."""
    out = ""
    rep = doc.get("replay") or {}
    if rep.get("verified") and not rep.get("bit_identical"):
        bad = [c.get("name", "?") for c in rep.get("checks", []) if not c.get("ok")]
        out += (" WARNING: the incident did NOT replay bit-identically" + (f" ({', '.join(bad[:4])})" if bad else "")
                + ", so the evidence may not describe the recorded run.")
    elif rep and not rep.get("verified"):
        out += " The replay of the incident was not verified for this certificate."
    an = doc.get("analyst") or {}
    rejected = [d for d in an.get("decisions", []) if d.get("decision") == "rejected"]
    n = len((doc.get("cca") or {}).get("fix_set") or [])
    if rejected:
        out += (f" The analyst REJECTED {len(rejected)} of {n} element{'s' if n != 1 else ''} of this set ("
                + "; ".join(d.get("site", f"#{d['element']}") for d in rejected) + ").")
    removed = an.get("removed") or []
    if removed:
        out += (f" The analyst removed {len(removed)} element{'s' if len(removed) != 1 else ''} ("
                + "; ".join(r.get("site", "?") for r in removed) + ") before this evidence was measured.")
    return out


def certificate_status(doc: Mapping) -> dict:
    """The certificate's standing in one word and one headline, from its numbers.

    Returns:
        ``{"level": "certified" | "qualified" | "not-certified", "headline": str, "reasons": [str, ...]}``:
        *certified* = the set removes the failure, every acceptance criterion holds, the evidence is not thin
        (:func:`thin_evidence`), the replay was verified bit-identical and the analyst rejected nothing;
        *qualified* = the set removes the failure but a criterion is missed, the evidence is thin (a met rate's
        Wilson 95% interval reaches past its target), the replay was not verified or the analyst rejected an
        element; *not-certified* = the set does not remove the failure, the result is partial, or the replay
        differs.
    """
    cca = doc["cca"]
    rep = doc.get("replay") or {}
    crit = cca.get("criteria") or {}
    missed = [k for k, c in crit.items() if not c.get("ok")]
    rejected = [d for d in (doc.get("analyst") or {}).get("decisions", []) if d.get("decision") == "rejected"]
    reasons: list[str] = []
    if cca.get("partial"):
        reasons.append("the analysis was cancelled or ran out of budget (partial result)")
    if not set_was_checked(cca):
        reasons.append("the fix set was not checked on the incident")
    elif not cca.get("flipped"):
        reasons.append("the fix set does not remove the failure on the incident")
    if rep.get("verified") and not rep.get("bit_identical"):
        reasons.append("the incident does not replay bit-identically")
    if reasons:
        return {"level": "not-certified", "headline": "NOT CERTIFIED: " + reasons[0], "reasons": reasons}
    if missed:
        reasons.append(f"{len(missed)} of {len(crit)} acceptance criteria not met: "
                       + ", ".join(k.replace("_", " ") for k in missed))
    if not rep.get("verified"):
        reasons.append("the replay was not verified")
    if rejected:
        reasons.append(f"the analyst rejected {len(rejected)} element(s) of the set")
    reasons.extend(f"thin evidence: {t}" for t in thin_evidence(cca))
    if reasons:
        return {"level": "qualified", "headline": "FIX FOUND, QUALIFIED: " + "; ".join(reasons), "reasons": reasons}
    head = "ROOT CAUSE CERTIFIED: the fix removes the failure"
    head += f", all {len(crit)} acceptance criteria met" if crit else ""
    head += ", replay bit-identical"
    return {"level": "certified", "headline": head, "reasons": []}


def _fmt(x) -> str:
    x = _finite(x)
    return "n/a" if x is None else f"{x:.3g}"


def _fmt6(x) -> str:
    x = _finite(x)
    return "n/a" if x is None else f"{x:.6g}"


def _n_changed(cca: Mapping) -> int:
    ev = (cca.get("evidence") or {}).get("side_effects") or {}
    if isinstance(ev.get("n_changed"), int):
        return int(ev["n_changed"])
    se = cca.get("side_effects") or []
    if se and all("changed" in s for s in se):
        return sum(1 for s in se if s.get("changed"))
    rate, nb = _finite(cca.get("side_effect_rate")), int(cca.get("n_benign") or 0)
    return int(round((rate or 0.0) * nb))


# ----------------------------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------------------------
def reproduction_commands(bundle_path: str | os.PathLike, *, pdf_path: str | os.PathLike | None = None,
                          result_path: str | os.PathLike | None = None, cf_path: str | os.PathLike | None = None,
                          n_controls: int | None = None, with_cf: bool = True) -> list[str]:
    """The shell commands that reproduce a certificate, with the real paths (``CERT.pdf`` etc. when unknown)."""
    b = _q(bundle_path)
    pdf = str(pdf_path) if pdf_path else "CERT.pdf"
    res = str(result_path) if result_path else str(Path(pdf).with_suffix("")) + ".cca.json"
    cmds = [f"forensics replay {b}"]
    if with_cf:
        cfp = str(cf_path) if cf_path else str(Path(pdf).with_suffix("")) + ".cf.json"
        cmds.append(f"forensics cf {b} --json > {_q(cfp)}")
    cmds.append(f"forensics cca {b} --out {_q(res)}" + (f" --controls {n_controls}" if n_controls else ""))
    cert = f"forensics certify {b} --out {_q(pdf)} --result {_q(res)}"
    if with_cf:
        cert += f" --cf {_q(cfp)}"
    cmds.append(cert)
    cmds.append(f"forensics verify-certificate {_q(Path(pdf).with_suffix('.json'))} {b}")
    return cmds


def _q(p) -> str:
    import shlex

    return shlex.quote(str(p))


_IV_KEYS = ("layer", "component", "positions", "op", "indices", "value", "values")


def _element_key(e: Mapping) -> tuple:
    """Identity of a fix-set element (its intervention part): layer, component, positions, op, indices, value."""
    pos = e.get("positions", "all")
    pos = "all" if pos == "all" else tuple(int(p) for p in (pos or ()))
    value = e.get("value")
    return (int(e.get("layer", -1)), str(e.get("component", "")), pos, str(e.get("op", "")),
            tuple(int(i) for i in (e.get("indices") or ())), None if value is None else float(value))


def _intervention_part(e: Mapping) -> dict:
    out = {k: e[k] for k in _IV_KEYS if k in e and e[k] is not None}
    if isinstance(out.get("positions"), tuple):
        out["positions"] = list(out["positions"])
    out.setdefault("positions", "all")
    return out


def _analyst(analyst: Mapping | None, fix: list[dict], structure_only: bool = False) -> dict:
    """Normalise an analyst record into ``{"name", "note", "decisions": [...], "removed": [...]}``.

    Accepted forms (see ``docs/certificate-format.md``):

    * ``{"decisions": [{"element": i, "decision": "accepted"|"rejected", "note": ...}]}``;
    * ``{"accepted": [...], "rejected": [...], "notes": {i: text}}`` where each entry is an element index **or** an
      element dict (``FixElement.to_dict()``, what the GUI's review view stores in ``session.analyst``). An element
      dict is matched to the fix set by its intervention (layer, component, positions, op, indices, value); a
      *rejected* element that is not in the certified fix set (the analyst removed it and re-measured the rest) goes
      to ``removed``.
    """
    out: dict = {"name": "", "note": "", "decisions": [], "removed": []}
    if not analyst:
        return out
    if not isinstance(analyst, Mapping):
        raise CertificateError(f"analyst must be a JSON object, got {type(analyst).__name__}")
    out["name"] = str(analyst.get("name", "") or "")
    out["note"] = str(analyst.get("note", "") or "")
    index = {_element_key(e): i for i, e in enumerate(fix)}
    notes = analyst.get("notes") if isinstance(analyst.get("notes"), Mapping) else {}
    decisions: dict[int, dict] = {}
    removed: list[dict] = []

    def element_index(item, verdict: str) -> int | None:
        if isinstance(item, bool):
            raise CertificateError(f"analyst {verdict} entry must be an element index or an element, got {item!r}")
        if isinstance(item, int) or (isinstance(item, str) and item.strip().isdigit()):
            return int(item)
        if isinstance(item, Mapping):
            try:
                key = _element_key(item)
            except (TypeError, ValueError):
                raise CertificateError(f"analyst {verdict} element is malformed: {dict(item)!r}") from None
            return None if structure_only else index.get(key)
        raise CertificateError(f"analyst {verdict} entry must be an element index or an element, got {item!r}")

    for key in ("decisions", "accepted", "rejected"):
        if not isinstance(analyst.get(key) or [], (list, tuple)):
            raise CertificateError(f"analyst {key} must be a list, got {type(analyst[key]).__name__}")
    for d in analyst.get("decisions", []) or []:
        try:
            k = int(d["element"])
        except (KeyError, TypeError, ValueError):
            raise CertificateError(f"analyst decision {d!r} needs an integer 'element'") from None
        decisions[k] = {"element": k, "decision": str(d.get("decision", "")), "note": str(d.get("note", "") or "")}
    for verdict in ("accepted", "rejected"):
        for item in analyst.get(verdict, []) or []:
            k = element_index(item, verdict)
            if k is None and structure_only:   # an element object: matched to the fix set once it is known
                continue
            if k is None:
                if verdict == "accepted":
                    raise CertificateError("analyst accepted an element that is not in the certified fix set: "
                                           + describe_element(item))
                iv = _intervention_part(item)
                removed.append({"site": describe_element(iv), "intervention": iv,
                                "note": str(item.get("note", "") or "")})
                continue
            decisions[k] = {"element": k, "decision": verdict,
                            "note": str(notes.get(k, notes.get(str(k), "")) or "")}
    for k, d in sorted(decisions.items()):
        if d["decision"] not in ("accepted", "rejected"):
            raise CertificateError(f"analyst decision for element {k} must be 'accepted' or 'rejected', "
                                   f"got {d['decision']!r}")
        if structure_only:
            if k < 0:
                raise CertificateError(f"analyst decision names element {k}; elements are counted from 0")
            continue
        if not 0 <= k < len(fix):
            raise CertificateError(f"analyst decision names element {k}, but the fix set has {len(fix)}")
        d["site"] = describe_element(fix[k])
        out["decisions"].append(d)
    out["removed"] = removed
    return out


def check_results_fit(bundle, sha256: str, *, cca: Mapping | None = None, cf: Mapping | None = None,
                      cca_name: str = "cca", cf_name: str = "cf") -> None:
    """Refuse a CCA or CF result (``to_dict()`` form) that was not computed on this bundle: another bundle uuid or
    file sha256, another model's weights, or a CF result cancelled before its threshold was calibrated.

    ``bundle`` is the open bundle, ``sha256`` its file's hash; ``cca_name`` / ``cf_name`` name the results in the
    message (``forensics certify`` passes its options).

    Raises:
        CertificateError: naming the result and what does not fit.
    """
    name = Path(str(getattr(bundle, "path", "") or "bundle")).name
    if cca is not None:
        if cca.get("bundle_uuid") and cca["bundle_uuid"] != bundle.uuid:
            raise CertificateError(f"{cca_name}: result is for bundle {cca['bundle_uuid']}, not {bundle.uuid} "
                                   f"({name})")
        if cca.get("bundle_sha256") and cca["bundle_sha256"] != sha256:
            raise CertificateError(f"{cca_name}: result was computed on a different file (bundle sha256 "
                                   f"{cca['bundle_sha256'][:12]}… vs {sha256[:12]}… of {name})")
    if cf is not None:
        if cf.get("weights_sha256") and cf["weights_sha256"] != bundle.model_info["weights_sha256"]:
            raise CertificateError(f"{cf_name}: result was computed on another model (weights sha256 "
                                   f"{str(cf['weights_sha256'])[:12]}… vs "
                                   f"{bundle.model_info['weights_sha256'][:12]}… of {name})")
        if cf.get("bundle_uuid") and cf["bundle_uuid"] != bundle.uuid:
            raise CertificateError(f"{cf_name}: result is for bundle {cf['bundle_uuid']}, not {bundle.uuid} ({name})")
        if _finite(cf.get("threshold")) is None:
            raise CertificateError(f"{cf_name}: the CF result has no threshold (it was cancelled before "
                                   "calibration); run CF to completion")


def analyst_record(analyst: Mapping | None, fix_set: Sequence[Mapping] | None = None) -> dict:
    """The analyst's record normalised as the certificate stores it (see :func:`_analyst`). With ``fix_set=None``
    (the fix set is not known yet: CCA has still to run) only its form is checked: element indices are not matched.

    Raises:
        CertificateError: the record is malformed, or names an element the fix set does not have.
    """
    return _analyst(analyst, list(fix_set) if fix_set is not None else [], structure_only=fix_set is None)


def build_certificate(bundle_path: str | os.PathLike, *, cca: Any, cf: Any = None, replay_report: Any = None,
                      analyst: Mapping | None = None, commands: list[str] | None = None,
                      created: str | None = None) -> dict:
    """Assemble (and validate) a certificate for the incident in ``bundle_path``.

    Args:
        bundle_path: the incident bundle (.h5) the results were computed on; its sha256 is recorded.
        cca: ``engine.cca.CCAResult`` or its ``to_dict()``: the fix set and all its evidence.
        cf: ``engine.cf.CFResult`` or its ``to_dict()`` (optional).
        replay_report: ``engine.replay.ReplayReport`` or its ``to_dict()`` (optional; the certificate then says the
            replay was not verified).
        analyst: the GUI's ``session.analyst``: ``{"name", "note", "decisions": [{"element", "decision", "note"}]}``
            or ``{"accepted": [i, ...], "rejected": [j, ...], "notes": {i: text}}``.
        commands: reproduction commands; default :func:`reproduction_commands` with placeholder output names.
        created: ISO-8601 time stamp (default: now, UTC).

    Returns:
        The certificate as a JSON-ready dict (see ``docs/certificate-format.md``).

    Raises:
        CertificateError: a result is malformed, belongs to another bundle, or the document fails the schema.
    """
    from .bundle import open_bundle

    path = Path(bundle_path)
    if not path.is_file():
        raise CertificateError(f"bundle not found: {bundle_path}")
    cca_d = _as_dict(cca, "cca")
    cf_d = _as_dict(cf, "cf")
    rep_d = _as_dict(replay_report, "replay_report")
    if cca_d.get("schema") not in (None, CCA_SCHEMA):
        raise CertificateError(f"cca: schema {cca_d.get('schema')!r} is not {CCA_SCHEMA!r}")
    sha = file_sha256(path)
    try:
        b = open_bundle(path)
    except BundleError as exc:
        raise CertificateError(f"bundle {path.name} cannot be read: {exc}") from None
    with b:
        check_results_fit(b, sha, cca=cca_d, cf=cf_d)
        incident = {
            "bundle_file": path.name, "bundle_uuid": b.uuid, "bundle_sha256": sha, "bundle_bytes": path.stat().st_size,
            "bundle_created": b.created, "bundle_program": b.program, "scenario": b.scenario or "",
            "prompt": b.prompt, "output": b.continuation_text, "label": b.label or "", "mode": b.mode,
            "tokens": list(b.tokens), "n_prompt_tokens": int(b.n_prompt_tokens),
            "failure": {"spec": b.failure_spec, "failing": bool(b.failing), "metric": _finite(b.failure_metric),
                        "expected": b.expected},
        }
        mi = b.model_info
        model = {"source": mi["source"], "class_name": mi["class_name"], "family": mi["family"], "task": mi["task"],
                 "dtype": mi["dtype"], "n_layers": int(mi["n_layers"]), "d_model": int(mi["d_model"]),
                 "weights_sha256": mi["weights_sha256"], "weights_embedded": bool(b.has_embedded_weights),
                 "sites": list(b.sites)}
        tokenizer = {"class_name": b.tokenizer_class, "sha256": b.tokenizer_sha256}
        recorded_env = {k: v for k, v in b.environment.items() if not k.startswith("encoding-")}
    if rep_d is not None:
        replay = {"verified": True, "bit_identical": bool(rep_d.get("bit_identical")),
                  "checks": [{"name": c["name"], "ok": bool(c["ok"]), "detail": str(c.get("detail", ""))}
                             for c in rep_d.get("checks", [])],
                  "seconds": _finite(rep_d.get("seconds")), "model_loaded_from": str(rep_d.get("model_loaded_from", "")),
                  "threads": rep_d.get("threads")}
    else:
        replay = {"verified": False, "bit_identical": False, "checks": [], "seconds": None, "model_loaded_from": "",
                  "threads": None}
    fix = cca_d.get("fix_set") or []
    import numpy as np  # noqa: F401 - version below
    import torch

    try:
        import transformers

        tf_version = transformers.__version__
    except Exception:  # noqa: BLE001
        tf_version = ""
    doc = {
        "schema": CERT_SCHEMA,
        "certificate_id": str(uuidlib.uuid4()),
        "created": created or datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        "program": {"name": PROGRAM, "version": program_version()},
        "incident": incident,
        "model": model,
        "tokenizer": tokenizer,
        "environment": {"recorded": recorded_env,
                        "certified": {"python": platform.python_version(), "torch": torch.__version__,
                                      "transformers": tf_version, "platform": platform.platform(),
                                      "machine": platform.machine()}},
        "replay": replay,
        "cf": cf_d,
        "cca": cca_d,
        "analyst": _analyst(analyst, fix),
        "commands": list(commands) if commands is not None else reproduction_commands(
            path, n_controls=cca_d.get("n_controls"), with_cf=cf_d is not None),
        "verdict": "",
    }
    doc["verdict"] = verdict_sentence(doc)
    validate_certificate(doc)
    return doc


# ----------------------------------------------------------------------------------------------------------------
# Schema
# ----------------------------------------------------------------------------------------------------------------
_SCHEMA_CACHE: dict | None = None


def certificate_schema() -> dict:
    """The JSON Schema (draft 2020-12) of certificate schema version 1."""
    global _SCHEMA_CACHE
    if _SCHEMA_CACHE is None:
        try:
            from importlib.resources import files

            text = (files("resources") / "schemas" / "certificate-v1.json").read_text(encoding="utf-8")
        except (ModuleNotFoundError, FileNotFoundError):
            text = (Path(__file__).resolve().parents[1] / "resources" / "schemas" / "certificate-v1.json").read_text(
                encoding="utf-8")
        _SCHEMA_CACHE = json.loads(text)
    return _SCHEMA_CACHE


def validate_certificate(doc: Any) -> None:
    """Validate a certificate against its JSON Schema and its internal consistency.

    Raises:
        CertificateError: naming the first problem as a JSON path, e.g. ``cca.flip_rate: 'high' is not of type
            'number'``.
    """
    import jsonschema

    if not isinstance(doc, Mapping):
        raise CertificateError(f"a certificate must be a JSON object, got {type(doc).__name__}")
    if doc.get("schema") != CERT_SCHEMA:
        raise CertificateError(f"schema: {doc.get('schema')!r} is not {CERT_SCHEMA!r} (this program reads version 1)")
    validator = jsonschema.Draft202012Validator(certificate_schema())
    errors = sorted(validator.iter_errors(doc), key=lambda e: (list(e.absolute_path), e.message))
    if errors:
        e = min(errors, key=lambda e: len(list(e.absolute_path)) == 0)
        where = ".".join(str(p) for p in e.absolute_path) or "(root)"
        msg = e.message if len(e.message) < 200 else e.message[:197] + "..."
        raise CertificateError(f"{where}: {msg}")
    cca = doc["cca"]
    ci = cca["flip_rate_ci"]
    fr = cca.get("flip_rate")
    if fr is not None and (ci is None or None in ci):  # null: not measured (no variants); a rate has an interval
        raise CertificateError(f"cca.flip_rate_ci: {ci!r}, but cca.flip_rate is measured ({fr}): a flip rate needs "
                               "its Wilson interval")
    if fr is not None and not (ci[0] - 1e-9 <= fr <= ci[1] + 1e-9):
        raise CertificateError(f"cca.flip_rate: {fr} lies outside its interval {ci}")
    if cca.get("set_size") is not None and cca["set_size"] != len(cca["fix_set"]):
        raise CertificateError(f"cca.set_size: {cca['set_size']} but fix_set has {len(cca['fix_set'])} elements")
    if cca.get("bundle_sha256") and cca["bundle_sha256"] != doc["incident"]["bundle_sha256"]:
        raise CertificateError("cca.bundle_sha256: differs from incident.bundle_sha256")
    if cca.get("bundle_uuid") and cca["bundle_uuid"] != doc["incident"]["bundle_uuid"]:
        raise CertificateError("cca.bundle_uuid: differs from incident.bundle_uuid")


def read_certificate_json(path: str | os.PathLike) -> dict:
    """Read a certificate JSON file without validating it (:func:`verify_certificate` reports a schema failure as
    a failed claim).

    Raises:
        CertificateError: the file is missing, not UTF-8 JSON, or not a JSON object.
    """
    p = Path(path)
    if not p.is_file():
        raise CertificateError(f"certificate not found: {path}")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CertificateError(f"{p.name} is not a JSON certificate: {str(exc)[:120]}") from None
    if not isinstance(doc, dict):
        raise CertificateError(f"{p.name} is not a certificate: a JSON object is expected, got {type(doc).__name__}")
    return doc


def load_certificate(path: str | os.PathLike) -> dict:
    """Read and validate a certificate JSON file."""
    doc = read_certificate_json(path)
    validate_certificate(doc)
    return doc


def certificate_json_text(doc: Mapping) -> str:
    """The certificate's JSON text, validated; :class:`CertificateError` when it is not a valid certificate or not
    standard JSON (a NaN anywhere). ``forensics certify`` calls it before it draws the PDF, so a bad document writes
    neither file."""
    validate_certificate(doc)
    try:
        return json.dumps(doc, indent=1, ensure_ascii=False, allow_nan=False) + "\n"
    except ValueError as exc:
        raise CertificateError(f"the certificate is not standard JSON: {exc}") from None


def write_certificate(doc: Mapping, path: str | os.PathLike) -> Path:
    """Validate and write the certificate JSON (temporary file + rename)."""
    from .atomic import write_text

    return write_text(path, certificate_json_text(doc))


# ----------------------------------------------------------------------------------------------------------------
# Verification
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Claim:
    """One statement of a certificate as a verifier found it: ``checked`` and ``ok`` (it holds), ``checked`` and
    not ``ok`` (FAILED: the certificate says something false), or not ``checked`` (it could not be checked here,
    ``detail`` says why; ``ok`` is then False: it was not shown to hold)."""

    name: str
    ok: bool
    detail: str = ""
    checked: bool = True

    @property
    def status(self) -> str:
        return "unchecked" if not self.checked else "ok" if self.ok else "failed"


def _unchecked(name: str, detail: str) -> Claim:
    return Claim(name, False, detail, checked=False)


@dataclass
class VerifyReport:
    """What :func:`verify_certificate` found: one :class:`Claim` per statement.

    ``ok``: verified: every claim was checked and holds (and the run was not cancelled). ``holds``: no checked
    claim failed (some may be unchecked). ``failed`` / ``unchecked``: the claims that are false / not checkable."""

    certificate_id: str
    bundle: str
    claims: list[Claim] = field(default_factory=list)
    seconds: float = 0.0
    partial: bool = False

    @property
    def holds(self) -> bool:
        return bool(self.claims) and not self.partial and not self.failed

    @property
    def ok(self) -> bool:
        return self.holds and not self.unchecked

    @property
    def failed(self) -> list[Claim]:
        return [c for c in self.claims if c.checked and not c.ok]

    @property
    def unchecked(self) -> list[Claim]:
        return [c for c in self.claims if not c.checked]

    def to_dict(self) -> dict:
        return {"certificate_id": self.certificate_id, "bundle": self.bundle, "ok": self.ok, "holds": self.holds,
                "claims": [{"name": c.name, "ok": c.ok, "status": c.status, "detail": c.detail}
                           for c in self.claims],
                "failed": [c.name for c in self.failed], "unchecked": [c.name for c in self.unchecked],
                "seconds": self.seconds, "partial": self.partial}


def _short(h: str) -> str:
    return (h or "")[:12] + "…"


#: Tolerances of the re-measured numbers (docs/certificate-format.md §5). Forward passes in float32 agree bit for bit
#: on one machine; another CPU, library version or thread count may round differently.
METRIC_TOL = (1e-3, 1e-3)     # failure metric (a logit margin): |now - certified| <= 0.001 + 0.1% of |certified|
CF_SCORE_TOL = (1e-2, 1e-3)   # CF scores, statistics, thresholds: |now - certified| <= 0.01 + 0.1% of |certified|


def _close(now, then, tol: tuple[float, float]) -> bool:
    now, then = _finite(now), _finite(then)
    if now is None or then is None:
        return now is None and then is None
    return abs(now - then) <= tol[0] + tol[1] * abs(then)


def min_controls_for_significance(alpha: float = SIGNIFICANCE) -> int:
    """The fewest random control sets whose smallest empirical p-value ``1 / (n + 1)`` reaches ``alpha``
    (19 at 0.05)."""
    return max(1, math.ceil(1.0 / alpha - 1.0 - 1e-9))


def significance_uncheckable(n_controls: int, n_certified: int) -> str | None:
    """Why the significance claim of a certificate whose p-value came from ``n_certified`` control sets cannot be
    re-checked with ``n_controls`` of them (``None``: it can).

    With the certified number of controls the same seeded control sets are drawn again and the p-value itself is
    compared. With another number only the conclusion at ``SIGNIFICANCE`` can be compared, and that needs both
    numbers to be able to reach it: with n controls the smallest p-value is ``1 / (n + 1)``."""
    n, nc = int(n_controls), int(n_certified or 0)
    if n <= 0 or n == nc:
        return None
    need = min_controls_for_significance()
    if 1.0 / (n + 1) > SIGNIFICANCE:
        return (f"the smallest p-value from {n} control sets is 1/{n + 1} = {1.0 / (n + 1):.2g} > {SIGNIFICANCE}, "
                f"so it cannot show the certified conclusion either way; need at least {need} control sets, or the "
                f"certificate's {nc} to reproduce its p-value")
    if nc and 1.0 / (nc + 1) > SIGNIFICANCE:
        return (f"the certified p-value comes from {nc} control sets, too few to reach p ≤ {SIGNIFICANCE}; "
                f"re-check it with the same {nc} control sets")
    return None


def document_claims(doc: Mapping) -> list[Claim]:
    """The claims a certificate makes about itself, checked without the bundle (``doc`` must pass
    :func:`validate_certificate`): ``verdict`` (the sentence its numbers give, and the standing, should it store
    one), ``criteria`` (the acceptance criteria its numbers give: ok, value, target and detail), ``fdr`` (the
    q-values its numbers give), ``evidence counts`` (its rates are whole counts, the flip rate's interval is their
    Wilson interval) and ``p-value`` (one that its control sets can give: ``(1 + k) / (1 + n)``)."""
    out = [_verdict_claim(doc)]
    cca = doc["cca"]
    try:
        from .cca import CCAResult, _criteria, _fdr
    except ModuleNotFoundError as exc:  # the CCA module is not installed
        if exc.name != "engine.cca":
            raise
        out.append(_unchecked("criteria", "engine.cca is not available: the criteria were not re-derived"))
    else:
        try:
            res = CCAResult.from_dict(cca)
        except ForensicsError as exc:
            out.append(Claim("criteria", False, f"the CCA section cannot be read: {exc}"[:400]))
        else:
            out.append(_criteria_claim(cca, _criteria(res)))
            if cca.get("fdr"):
                _fdr(res)
                out.append(_fdr_claim(cca, res.fdr))
    out.append(_counts_claim(cca))
    out.append(_p_value_claim(cca))
    return out


def _verdict_claim(doc: Mapping) -> Claim:
    want = verdict_sentence(doc)
    diffs = []
    got = doc["verdict"]
    if got != want:
        i = next((k for k, (x, y) in enumerate(zip(got, want)) if x != y), min(len(got), len(want)))
        start = max(0, i - 40)

        def cut(t: str) -> str:
            return ("…" if start else "") + t[start:i + 80] + ("…" if len(t) > i + 80 else "")

        diffs.append(f"the certified verdict is not the sentence the certificate's numbers give (they differ from "
                     f"character {i}): certified {cut(got)!r}, generated {cut(want)!r}")
    st = certificate_status(doc)
    stored = doc.get("status")  # not part of the format; a writer that adds it must not overstate
    if isinstance(stored, Mapping):
        stored_level, stored_head = stored.get("level"), stored.get("headline")
    else:
        stored_level, stored_head = stored, doc.get("headline")
    if stored_level is not None and stored_level != st["level"]:
        diffs.append(f"status {stored_level!r}, but the numbers give {st['level']!r}")
    if stored_head is not None and stored_head != st["headline"]:
        diffs.append(f"headline {str(stored_head)[:120]!r}, but the numbers give {st['headline'][:160]!r}")
    if diffs:
        return Claim("verdict", False, "; ".join(diffs))
    return Claim("verdict", True, "the sentence generated from the certificate's numbers (standing: "
                 f"{st['level']})")


def _same_value(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return a == b
    return _close(a, b, (1e-12, 1e-9))


def _criteria_claim(cca: Mapping, want: Mapping) -> Claim:
    got = cca.get("criteria") or {}
    diffs = []
    for k in sorted(set(want) - set(got)):
        diffs.append(f"{k} is missing")
    for k in sorted(set(got) - set(want)):
        diffs.append(f"{k} is not a criterion")
    for k in [k for k in want if k in got]:
        g, w = got[k] or {}, want[k]
        if bool(g.get("ok")) != bool(w["ok"]):
            diffs.append(f"{k}: ok={bool(g.get('ok'))}, but its value gives ok={bool(w['ok'])}")
        elif not _same_value(g.get("value"), w["value"]):
            diffs.append(f"{k}: value {g.get('value')!r}, but the certificate's numbers give {w['value']!r}")
        elif g.get("target") != w["target"] or g.get("detail") != w["detail"]:
            diffs.append(f"{k}: {g.get('detail')!r} is not what the numbers give ({w['detail']!r})")
    if diffs:
        return Claim("criteria", False, "the acceptance criteria do not follow from the certificate's numbers: "
                     + "; ".join(diffs)[:500])
    met = sum(1 for c in want.values() if c["ok"])
    return Claim("criteria", True, f"{met} of {len(want)} met, as the certificate's numbers give")


def _fdr_claim(cca: Mapping, want: Mapping) -> Claim:
    got = cca.get("fdr") or {}
    bad = [k for k in set(got) | set(want) if k not in got or k not in want
           or not _close(got[k], want[k], (1e-12, 1e-6))]
    if bad:
        return Claim("fdr", False, "the q-values do not follow from the certificate's numbers: " + "; ".join(
            f"{k} {_fmt(got.get(k))} vs {_fmt(want.get(k))}" for k in sorted(bad))[:400])
    return Claim("fdr", True, f"{len(want)} Benjamini–Hochberg q-values, as the certificate's numbers give")


def _whole(rate, n: int) -> int | None:
    """``rate * n`` when it is a whole number (the count a rate of n trials was measured from), else None."""
    k = rate * n
    return int(round(k)) if abs(k - round(k)) <= 1e-6 and 0 <= round(k) <= n else None


def _counts_claim(cca: Mapping) -> Claim:
    from .stats import wilson_interval

    diffs, said = [], []
    partial = bool(cca.get("partial"))
    fr, nv = _finite(cca.get("flip_rate")), int(cca.get("n_variants") or 0)
    if fr is None:
        if nv and not partial:
            diffs.append(f"no flip rate although {nv} variants were evaluated")
    elif not nv:
        diffs.append(f"flip rate {_pct(fr)} from no variants")
    else:
        k = _whole(fr, nv)
        if k is None:
            diffs.append(f"flip rate {fr!r} is not a whole number of {nv} variants")
        else:
            ci = cca.get("flip_rate_ci") or [None, None]
            lo, hi = wilson_interval(k, nv)
            if not (_close(ci[0], lo, (1e-9, 0)) and _close(ci[1], hi, (1e-9, 0))):
                diffs.append(f"flip rate interval {_pct(_finite(ci[0]))}–{_pct(_finite(ci[1]))} is not the "
                             f"Wilson 95% interval of {k}/{nv} ({_pct(lo)}–{_pct(hi)})")
            said.append(f"flip rate {k}/{nv} with its Wilson interval")
    se, nb = _finite(cca.get("side_effect_rate")), int(cca.get("n_benign") or 0)
    if se is None:
        if nb and not partial:
            diffs.append(f"no side-effect rate although {nb} benign prompts were evaluated")
    elif not nb:
        diffs.append(f"side-effect rate {_pct(se)} from no benign prompts")
    else:
        k = _whole(se, nb)
        if k is None:
            diffs.append(f"side-effect rate {se!r} is not a whole number of {nb} benign prompts")
        else:
            rows = cca.get("side_effects") or []
            ev = (cca.get("evidence") or {}).get("side_effects") or {}
            if rows and all("changed" in r for r in rows) and (len(rows) != nb or sum(bool(r["changed"])
                                                                                   for r in rows) != k):
                diffs.append(f"side-effect rate {k}/{nb}, but the per-prompt rows show "
                             f"{sum(bool(r['changed']) for r in rows)}/{len(rows)} changed")
            if isinstance(ev.get("n_changed"), int) and ev["n_changed"] != k:
                diffs.append(f"side-effect rate {k}/{nb}, but evidence.side_effects.n_changed is {ev['n_changed']}")
            said.append(f"side effects {k}/{nb}")
    su, ns = _finite(cca.get("sufficiency_rate")), int(cca.get("n_sufficiency") or 0)
    if su is not None and ns:
        k = _whole(su, ns)
        if k is None:
            diffs.append(f"sufficiency rate {su!r} is not a whole number of {ns} counterparts")
        else:
            said.append(f"sufficiency {k}/{ns}")
    if diffs:
        return Claim("evidence counts", False, "; ".join(diffs)[:500])
    return Claim("evidence counts", True, (", ".join(said) or "no rates measured") + ": whole counts")


def _p_value_claim(cca: Mapping) -> Claim:
    n = int(cca.get("n_controls") or 0)
    p = _finite(cca.get("p_value"))
    rates = cca.get("control_flip_rates") or []
    if not n:
        if p is not None:
            return Claim("p-value", False, f"p = {p:.3g} without any random control set")
        return Claim("p-value", True, "no random control sets, no p-value")
    if len(rates) != n:
        return Claim("p-value", False, f"{n} control sets certified, but {len(rates)} control flip rates listed")
    if p is None:
        if cca.get("partial"):
            return Claim("p-value", True, f"not measured (the analysis stopped before its {n} control sets)")
        return Claim("p-value", False, f"no p-value although {n} control sets were run")
    floor = 1.0 / (n + 1)
    if p < floor - 1e-12:
        return Claim("p-value", False, f"impossible: an empirical p-value from {n} control sets is at least "
                     f"1/{n + 1} = {floor:.4g}, the certificate says p = {p:.3g}")
    hits = p * (n + 1) - 1
    if abs(hits - round(hits)) > 1e-6 or round(hits) > n:
        return Claim("p-value", False, f"impossible: p = {p:.6g} is not (1 + k)/(1 + {n}) for a whole number k of "
                     f"control sets")
    hits = int(round(hits))
    said = ((cca.get("evidence") or {}).get("controls") or {}).get("n_at_least_as_extreme")
    if isinstance(said, int) and said != hits:
        return Claim("p-value", False, f"p = {p:.4g} means {hits} of {n} control sets at least as extreme, the "
                     f"evidence says {said}")
    return Claim("p-value", True, f"p = (1 + {hits})/(1 + {n}) = {p:.4g}: attainable with {n} control sets")


def verify_certificate(cert: Mapping | str | os.PathLike, bundle_path: str | os.PathLike, *,
                       n_controls: int | None = None, check_cf: bool = True, progress: Progress | None = None,
                       cancel: threading.Event | None = None) -> VerifyReport:
    """Re-check every claim of a certificate against a bundle.

    Claims (docs/certificate-format.md §5): ``schema``; about the document itself: ``verdict`` (the sentence its
    numbers give), ``criteria`` (the acceptance criteria its numbers give), ``fdr``, ``evidence counts`` (rates are
    whole counts, the flip rate's interval is their Wilson interval), ``p-value`` (attainable with its control
    sets); ``bundle sha256`` (the file is byte for byte the certified one); ``bundle`` (it opens and validates);
    ``bundle uuid``; ``incident`` (prompt, output, failure spec as certified); ``weights sha256``; ``tokenizer
    hash``; ``replay`` (bit-identical, naming what differs); the fix set re-evaluated with
    ``engine.cca.evaluate_fix_set`` (``fix: incident flipped``, ``fix: metric``, ``fix: fraction touched``, ``fix:
    1-minimal``, ``fix: flip rate`` within the certified 95% interval, ``fix: sufficiency``, ``fix: side effects``,
    ``fix: significance``); and ``cf``: Compression Forensics re-run against a baseline built from the bundle's
    benign prompts and compared number by number.

    A claim that cannot be checked here is reported *unchecked* with the reason (``Claim.checked`` False), never as
    failed: ``report.ok`` (verified) needs every claim checked and holding, ``report.holds`` only that none failed.

    Args:
        cert: the certificate dict or a path to its JSON.
        bundle_path: the bundle to check against.
        n_controls: random control sets for the significance re-check (default: as many as certified, which
            reproduces the same seeded control sets; 0 skips it; a number that cannot reach the certified
            conclusion makes the claim unchecked, see :func:`significance_uncheckable`).
        check_cf: re-run Compression Forensics (False: the ``cf`` claim is unchecked).
        progress: ``progress(done, total, what)``.
        cancel: set to stop; the report is then ``partial`` (and not ok).
    """
    from .bundle import open_bundle
    from .replay import load_bundle_model, replay

    t0 = time.perf_counter()
    total = 6

    def step(k: int, what: str) -> None:
        if progress:
            progress(k, total, what)

    doc = dict(cert) if isinstance(cert, Mapping) else read_certificate_json(cert)
    path = Path(bundle_path)
    if not path.is_file():
        raise CertificateError(f"bundle not found: {bundle_path}")
    report = VerifyReport(certificate_id=str(doc.get("certificate_id", "")), bundle=str(path))
    claims = report.claims
    try:
        validate_certificate(doc)
        claims.append(Claim("schema", True, f"valid {CERT_SCHEMA}"))
    except CertificateError as exc:
        claims.append(Claim("schema", False, str(exc)))
        report.seconds = time.perf_counter() - t0
        return report
    claims.extend(document_claims(doc))
    inc, mdl = doc["incident"], doc["model"]
    step(0, "hashing the bundle file")
    sha = file_sha256(path)
    claims.append(Claim("bundle sha256", sha == inc["bundle_sha256"],
                        "file matches the certified sha256" if sha == inc["bundle_sha256"] else
                        f"the bundle file was altered: sha256 {_short(sha)} vs certified {_short(inc['bundle_sha256'])}"))
    try:
        b = open_bundle(path)
    except BundleError as exc:
        claims.append(Claim("bundle", False, f"bundle does not open: {exc}"))
        report.seconds = time.perf_counter() - t0
        return report
    with b:
        claims.append(Claim("bundle", True, "opens and validates"))
        claims.append(Claim("bundle uuid", b.uuid == inc["bundle_uuid"],
                            b.uuid if b.uuid == inc["bundle_uuid"] else
                            f"bundle uuid {b.uuid} vs certified {inc['bundle_uuid']}"))
        diffs = []
        for name, now, then in (("prompt", b.prompt, inc["prompt"]), ("output", b.continuation_text, inc["output"]),
                                ("failure spec", b.failure_spec, inc["failure"]["spec"]),
                                ("failing", bool(b.failing), inc["failure"]["failing"]),
                                ("expected behaviour", b.expected, inc["failure"]["expected"])):
            if now != then:
                diffs.append(f"{name} {now!r} vs certified {then!r}")
        if inc["failure"].get("metric") is not None and _finite(b.failure_metric) != inc["failure"]["metric"]:
            diffs.append(f"failure metric {b.failure_metric!r} vs certified {inc['failure']['metric']!r}")
        if list(b.tokens) != list(inc.get("tokens", b.tokens)):
            diffs.append("input tokens differ")
        claims.append(Claim("incident", not diffs, "prompt, output and failure as certified" if not diffs else
                            "; ".join(diffs)[:400]))
        rec_w = b.model_info["weights_sha256"]
        if rec_w != mdl["weights_sha256"]:
            claims.append(Claim("weights sha256", False, f"bundle records weights {_short(rec_w)}, certificate "
                                f"{_short(mdl['weights_sha256'])}"))
        step(1, "loading the model")
        try:
            handle = load_bundle_model(b)
        except ForensicsError as exc:
            claims.append(Claim("model", False, f"model cannot be loaded: {exc}"))
            report.seconds = time.perf_counter() - t0
            return report
        if cancel is not None and cancel.is_set():
            report.partial = True
            return report
        wsha = handle.weights_sha256()
        if rec_w == mdl["weights_sha256"]:
            claims.append(Claim("weights sha256", wsha == mdl["weights_sha256"],
                                f"{_short(wsha)} matches" if wsha == mdl["weights_sha256"] else
                                f"loaded weights hash to {_short(wsha)}, certified {_short(mdl['weights_sha256'])}"))
        from .models import tokenizer_sha256

        tsha = tokenizer_sha256(handle.tokenizer)
        tok = doc["tokenizer"]["sha256"]
        claims.append(Claim("tokenizer hash", tsha == tok, f"{_short(tsha)} matches" if tsha == tok else
                            f"tokenizer hashes to {_short(tsha)}, certified {_short(tok)}"))
        step(2, "replaying the incident bit for bit")
        try:
            rep = replay(b, handle=handle)
        except ForensicsError as exc:  # a bundle damaged where replay reads it: the claim fails, the rest goes on
            claims.append(Claim("replay", False, f"replay failed: {exc}"[:600]))
        else:
            claims.append(Claim("replay", rep.bit_identical, "bit-identical (" + ", ".join(c.name for c in rep.checks)
                                + ")" if rep.bit_identical else
                                "; ".join(f"{c.name}: {c.detail}" for c in rep.failed)[:600]))
        if cancel is not None and cancel.is_set():
            report.partial = True
            return report
        step(3, "re-evaluating the fix set")
        try:
            _verify_fix(doc, b, handle, claims, n_controls=n_controls, progress=progress, cancel=cancel,
                        report=report)
        except ForensicsError as exc:
            claims.append(Claim("fix: re-evaluation", False, f"the fix set could not be re-evaluated: {exc}"[:600]))
        if report.partial:
            report.seconds = time.perf_counter() - t0
            return report
        if doc.get("cf") is not None:
            step(4, "re-running Compression Forensics")
            if not check_cf:
                claims.append(_unchecked("cf", "not re-checked (asked not to): the CF section is as its writer "
                                         "reported it"))
            else:
                try:
                    _verify_cf(doc["cf"], b, handle, claims, cancel=cancel, report=report)
                except ForensicsError as exc:
                    claims.append(Claim("cf", False, f"Compression Forensics could not be re-run: {exc}"[:600]))
    step(6, "verified" if report.ok else "verification failed" if report.failed else "not fully verified")
    report.seconds = time.perf_counter() - t0
    return report


def _verify_fix(doc, b, handle, claims: list[Claim], *, n_controls, progress, cancel, report) -> None:
    from .interventions import Intervention

    cca = doc["cca"]
    keys = ("layer", "component", "positions", "op", "indices", "value", "values")
    ivs = []
    for e in cca["fix_set"]:
        d = {k: e[k] for k in keys if k in e and e[k] is not None}
        if isinstance(d.get("positions"), list):
            d["positions"] = tuple(d["positions"])
        ivs.append(Intervention.from_dict(d))
    try:
        from .cca import evaluate_fix_set
    except ModuleNotFoundError as exc:  # the CCA module is not installed: the incident flip only
        if exc.name != "engine.cca":
            raise
        evaluate_fix_set = None
    if evaluate_fix_set is None:
        from .interventions import InterventionSet, evaluate

        res = evaluate(b, handle, [InterventionSet(name="baseline"), InterventionSet(tuple(ivs), name="fix")])
        base, fixed = res.results
        flipped = base.failing and not fixed.failing
        claims.append(Claim("fix: incident flipped", flipped == bool(cca["flipped"]),
                            f"flipped={flipped} (certified {cca['flipped']}); output {fixed.continuation!r}"))
        claims.append(_unchecked("fix: flip rate", "engine.cca is not available: held-out variants, side effects "
                                 "and significance not re-evaluated"))
        return
    nc_cert = int(cca.get("n_controls") or 0)
    nc = int(n_controls if n_controls is not None else nc_cert)
    why_not = significance_uncheckable(nc, nc_cert) if nc else None
    seed = int(((cca.get("evidence") or {}).get("controls") or {}).get("seed", 0) or 0)
    sub = (lambda k, n, what: progress(3, 6, f"fix set: {what}")) if progress else None
    new = evaluate_fix_set(b, handle, ivs, n_controls=0 if why_not else nc, seed=seed, progress=sub, cancel=cancel)
    if new.partial:
        report.partial = True
        claims.append(Claim("fix: re-evaluation", False, "cancelled before the evidence was complete"))
        return
    checked = set_was_checked(cca)
    partial = bool(cca.get("partial"))
    # a partial result claims nothing about what it did not measure: such a number is not compared
    stopped = "not claimed: the analysis stopped before the certificate measured it"
    if checked:
        claims.append(Claim("fix: incident flipped", bool(new.flipped) == bool(cca["flipped"]),
                            f"flipped={bool(new.flipped)} (certified {bool(cca['flipped'])}); metric "
                            f"{_fmt(new.baseline_metric)} -> {_fmt(new.fixed_metric)}"))
    else:
        claims.append(Claim("fix: incident flipped", True, f"not claimed: the set was not checked on the incident "
                            f"before the analysis stopped (re-measured flipped={bool(new.flipped)})"))
    # the failure metric without and with the set (a cancelled search's fixed metric is its teacher-forced best)
    pairs = [("baseline", new.baseline_metric, cca.get("baseline_metric"))]
    if checked:
        pairs.append(("fixed", new.fixed_metric, cca.get("fixed_metric")))
    if partial:
        pairs = [(what, now, then) for what, now, then in pairs if _finite(then) is not None]
    bad = [f"{what} {_fmt6(now)} vs certified {_fmt6(then)}" for what, now, then in pairs
           if not _close(now, then, METRIC_TOL)]
    if not pairs:
        claims.append(Claim("fix: metric", True, f"{stopped} (re-measured {_fmt6(new.baseline_metric)} -> "
                            f"{_fmt6(new.fixed_metric)})"))
    else:
        said = " -> ".join(_fmt6(now) for _, now, _ in pairs)
        claims.append(Claim("fix: metric", not bad, ("; ".join(bad) if bad else f"{said} as certified")
                            + f" (tolerance {METRIC_TOL[0]:g} + {METRIC_TOL[1]:.1%} of the certified value)"))
    fa_now, fa_then = _finite(new.fraction_of_activations), _finite(cca.get("fraction_of_activations"))
    ok = _close(fa_now, fa_then, (1e-12, 1e-9))
    claims.append(Claim("fix: fraction touched", ok, f"{_pct_nm(fa_now)} of the recorded activation values "
                        f"(certified {_pct_nm(fa_then)})" + ("" if ok or fa_now is None or fa_then is None else
                                                           f": {fa_now!r} vs {fa_then!r}")))
    if checked:
        diffs = []
        if bool(new.one_minimal) != bool(cca.get("one_minimal")):
            diffs.append(f"1-minimal {'yes' if new.one_minimal else 'no'} (certified "
                         f"{'yes' if cca.get('one_minimal') else 'no'})")
        for i, (e_new, e_then) in enumerate(zip(new.fix_set, cca["fix_set"])):
            if "drop_one_failing" in e_then and bool(e_then["drop_one_failing"]) != bool(e_new.drop_one_failing):
                diffs.append(f"element {i} ({describe_element(e_then)}) "
                             f"{'is' if e_new.drop_one_failing else 'is not'} necessary, certified "
                             f"{'necessary' if e_then['drop_one_failing'] else 'not necessary'}")
        claims.append(Claim("fix: 1-minimal", not diffs, "; ".join(diffs)[:400] if diffs else
                            f"1-minimal: {'yes' if new.one_minimal else 'no'}, as certified"))
    lo, hi = cca.get("flip_rate_ci") or [None, None]  # null: no variants, nothing measured
    fr = _finite(new.flip_rate)
    if partial and _finite(cca.get("flip_rate")) is None:
        ok, detail = True, f"{stopped} (re-measured {_pct_nm(fr)} of {new.n_variants} variants)"
    elif fr is None or lo is None or hi is None:
        ok = (fr is None) == (cca.get("flip_rate") is None)
        detail = f"flip rate {_pct_nm(fr)} (certified {_pct_nm(_finite(cca.get('flip_rate')))})"
    else:
        ok = lo - 1e-9 <= fr <= hi + 1e-9 and new.n_variants == cca["n_variants"]
        detail = (f"{_pct(fr)} of {new.n_variants} variants (certified {_pct(cca['flip_rate'])} of "
                  f"{cca['n_variants']}, 95% CI {_pct(lo)}–{_pct(hi)})")
    claims.append(Claim("fix: flip rate", ok, detail))
    for name, key, n_key in (("fix: sufficiency", "sufficiency_rate", "n_sufficiency"),
                             ("fix: side effects", "side_effect_rate", "n_benign")):
        then, now = _finite(cca.get(key)), _finite(getattr(new, key))
        n = max(int(cca.get(n_key) or getattr(new, n_key, 0) or 0), 1)
        if partial and then is None:
            ok, detail = True, f"{stopped} (re-measured {_pct_nm(now)})"
        elif then is None or now is None:
            ok, detail = (then is None) == (now is None), f"{_pct_nm(now)} (certified {_pct_nm(then)})"
        else:
            ok = abs(now - then) <= 1.0 / n + 1e-9  # within one prompt of the certified rate
            detail = f"{_pct(now)} (certified {_pct(then)}; tolerance one prompt of {n})"
        claims.append(Claim(name, ok, detail))
    if not nc:
        return
    p_then, p_now = _finite(cca.get("p_value")), _finite(new.p_value)
    then_text = f"certified {format_p(p_then, nc_cert)} from {nc_cert}"
    if why_not:
        claims.append(_unchecked("fix: significance", f"cannot check with {nc} control sets ({then_text}): "
                                 + why_not))
    elif p_then is None:
        claims.append(_unchecked("fix: significance", f"the certificate gives no p-value; re-measured "
                                 f"{format_p(p_now, nc)} from {nc} control sets"))
    elif nc == nc_cert:
        hits_then = p_then * (nc + 1) - 1          # an impossible certified p-value (the p-value claim) fails here too
        ok = (p_now is not None and abs(hits_then - round(hits_then)) <= 1e-6 and 0 <= round(hits_then) <= nc
              and abs(p_now - p_then) <= 1.0 / (nc + 1) + 1e-12)
        claims.append(Claim("fix: significance", ok, f"{format_p(p_now, nc)} from {nc} controls ({then_text}; the "
                            f"same seeded control sets, tolerance one control set)"))
    else:
        sig_then = p_then <= SIGNIFICANCE
        sig_now = p_now is not None and p_now <= SIGNIFICANCE
        claims.append(Claim("fix: significance", sig_then == sig_now,
                            f"{format_p(p_now, nc)} from {nc} controls ({then_text}; "
                            + ("same conclusion" if sig_then == sig_now else "NOT the same conclusion")
                            + f" at alpha {SIGNIFICANCE})"))


def _verify_cf(cf: Mapping, b, handle, claims: list[Claim], *, cancel, report) -> None:
    """Re-run CF against a baseline built afresh from the bundle's benign prompts (a cached baseline file is not
    trusted) and compare the certified CF section number by number (tolerance :data:`CF_SCORE_TOL` on scores and
    thresholds, one count on the rates and empirical p-values)."""
    from .cca import torch_threads
    from .cf import STATISTICS, build_baseline, bundle_prompts, run_cf
    from .errors import BaselineError

    prompts, heldout = bundle_prompts(b)
    cert_id = str(cf.get("baseline_id") or "")
    if not prompts:
        claims.append(_unchecked("cf", f"the bundle has no benign reference prompts, so CF (baseline "
                                 f"{cert_id or '?'}) cannot be re-run from it"))
        return
    statistic = str(cf.get("statistic") or "")
    compressor = str(cf.get("compressor") or "zlib")
    try:
        with torch_threads(1):
            base = build_baseline(handle, prompts, statistic=STATISTICS, heldout=heldout, compressor=compressor,
                                  cancel=cancel)
    except BaselineError:
        if cancel is not None and cancel.is_set():
            report.partial = True
            claims.append(Claim("cf", False, "cancelled before Compression Forensics was re-run"))
            return
        raise
    if cert_id != base.baseline_id:
        claims.append(_unchecked("cf", f"computed against baseline {cert_id or '(unnamed)'}, not the one the "
                                 f"bundle's benign prompts give ({base.baseline_id}): the CF section cannot be "
                                 "re-run from this bundle"))
        return
    new = run_cf(b, handle, baseline=base, statistic=statistic, compressor=compressor).to_dict()
    diffs = _cf_differences(cf, new)
    if diffs:
        claims.append(Claim("cf", False, f"re-run against baseline {base.baseline_id}: " + "; ".join(diffs[:6])
                            + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")))
        return
    n_flag = sum(1 for s in new["scores"] if s["flagged"])
    verdict = {True: "anomalous", False: "not anomalous", None: "no verdict"}[cf.get("run_anomalous")]
    claims.append(Claim("cf", True, f"re-run against baseline {base.baseline_id}: {len(cf['scores'])} site scores "
                        f"({n_flag} flagged at threshold {_fmt(new['threshold'])}), {len(cf['findings'])} "
                        f"finding{'s' if len(cf['findings']) != 1 else ''}, "
                        f"run {verdict}, as certified (tolerance {CF_SCORE_TOL[0]:g} + {CF_SCORE_TOL[1]:.1%} on "
                        "scores, one count on rates)"))


def _cf_differences(cf: Mapping, new: Mapping) -> list[str]:
    """What differs between a certified CF section and the re-run's ``CFResult.to_dict()``."""
    out: list[str] = []
    tol = CF_SCORE_TOL

    def num(name, then, now, t=tol):
        if not _close(now, then, t):
            out.append(f"{name} {_fmt(then)} certified, {_fmt(now)} re-measured")

    def count_tol(n) -> tuple[float, float]:
        return (1.0 / max(int(n or 0), 1) + 1e-9, 0.0)

    for k in ("statistic", "compressor", "weights_sha256", "bundle_uuid", "n_baseline_prompts", "n_heldout"):
        if k in cf and cf[k] != new.get(k):
            out.append(f"{k} {cf[k]!r} certified, {new.get(k)!r} re-measured")
    num("threshold", cf.get("threshold"), new["threshold"])
    thr = _finite(new["threshold"])
    n_ref = int(new.get("n_baseline_prompts") or 0)
    now_scores = {(s["layer"], s["site"]): s for s in new["scores"]}
    seen = set()
    for s in cf.get("scores") or []:
        key = (s.get("layer"), s.get("site"))
        name = f"score {key[0]}.{key[1]}"
        if key not in now_scores or key in seen:
            out.append(f"{name}: no such recorded site" if key not in now_scores else f"{name} listed twice")
            continue
        seen.add(key)
        n = now_scores[key]
        num(name, s.get("score"), n["score"])
        for k in ("statistic", "aggregate"):
            if k in s:
                num(f"{name} {k}", s.get(k), n.get(k))
        if "p_value" in s:
            num(f"{name} p-value", s.get("p_value"), n.get("p_value"), count_tol(n_ref + 1))
        near = thr is not None and _finite(n["score"]) is not None and abs(n["score"] - thr) <= tol[0] + tol[1] * thr
        if bool(s.get("flagged")) != bool(n["flagged"]) and not near:
            out.append(f"{name} flagged={bool(s.get('flagged'))} certified, {bool(n['flagged'])} re-measured")
        if "position_scores" in s:
            ps, pn = list(s.get("position_scores") or []), list(n.get("position_scores") or [])
            if len(ps) != len(pn) or any(not _close(x, y, tol) for x, y in zip(pn, ps)):
                out.append(f"{name} position scores differ")
    if not cf.get("partial") and len(seen) != len(now_scores):
        out.append(f"{len(seen)} site scores certified, {len(now_scores)} recorded sites scored")
    then_f = [(f.get("layer"), f.get("site"), tuple(f.get("positions") or ())) for f in cf.get("findings") or []]
    now_f = [(f["layer"], f["site"], tuple(f["positions"])) for f in new["findings"]]
    if not cf.get("partial") and then_f != now_f:
        out.append("findings " + (", ".join(f"{ly}.{st}" for ly, st, _ in then_f[:4]) or "none") + " certified, "
                   + (", ".join(f"{ly}.{st}" for ly, st, _ in now_f[:4]) or "none") + " re-measured")
    else:
        for f, g in zip(cf.get("findings") or [], new["findings"]):
            num(f"finding {f.get('layer')}.{f.get('site')} score", f.get("score"), g["score"])
    if "position_anomaly" in cf:
        pa, pn = list(cf.get("position_anomaly") or []), list(new.get("position_anomaly") or [])
        if len(pa) != len(pn) or any(not _close(x, y, tol) for x, y in zip(pn, pa)):
            out.append("position anomaly differs")
    if cf.get("partial"):
        return out
    if "heldout_fpr" in cf:
        n_cells = int(new.get("n_heldout") or 0) * max(len(now_scores), 1)
        num("held-out false-positive rate", cf.get("heldout_fpr"), new.get("heldout_fpr"), count_tol(n_cells))
    if "run_statistic" in cf:
        num("run statistic", cf.get("run_statistic"), new.get("run_statistic"))
        num("run threshold", cf.get("run_threshold"), new.get("run_threshold"))
        num("run p-value", cf.get("run_p_value"), new.get("run_p_value"),
            count_tol(int(new.get("n_run_reference") or 0) + 1))
        num("held-out run false-positive rate", cf.get("heldout_run_fpr"), new.get("heldout_run_fpr"),
            count_tol(new.get("n_run_heldout")))
        for k in ("n_run_reference", "run_calibration", "n_run_heldout"):
            if k in cf and cf[k] != new.get(k):
                out.append(f"{k} {cf[k]!r} certified, {new.get(k)!r} re-measured")
    if "run_anomalous" in cf:
        then_v, now_v = cf.get("run_anomalous"), new.get("run_anomalous")
        if then_v is not None and int(cf.get("n_run_reference") or 0) < int(cf.get("run_min_calibration") or 19):
            then_v = None  # a reader treats such a verdict as none (§2.5)
        rt, rth = _finite(new.get("run_statistic")), _finite(new.get("run_threshold"))
        near = rt is not None and rth is not None and abs(rt - rth) <= tol[0] + tol[1] * abs(rth)
        if then_v != now_v and not near:
            word = {True: "anomalous", False: "not anomalous", None: "no verdict"}
            out.append(f"run verdict {word[then_v]} certified, {word[now_v]} re-measured")
    return out


__all__ = ["CERT_SCHEMA", "Claim", "VerifyReport", "analyst_record", "build_certificate", "certificate_schema",
           "certificate_status", "check_results_fit", "describe_element", "document_claims", "file_sha256",
           "load_certificate", "min_controls_for_significance", "read_certificate_json", "reproduction_commands",
           "significance_uncheckable", "thin_evidence", "validate_certificate", "verdict_sentence",
           "verify_certificate", "write_certificate"]
