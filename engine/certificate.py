"""RCA certificate data: a versioned JSON document that says what was shown about one incident and how sure we are.

The certificate (schema ``forensics.rca-certificate/1``, JSON Schema in ``resources/schemas/certificate-v1.json``,
specification in ``docs/certificate-format.md``) stands alone: it names the incident bundle by its uuid **and the
sha256 of the file**, the model by its weights sha256, the tokenizer by its identity hash, and carries the replay
verification, the Compression Forensics findings, the fix set with all its CCA evidence, the analyst's decisions,
the exact commands that reproduce it and a verdict sentence generated from the numbers.

:func:`verify_certificate` re-checks every claim against a bundle: the file hash, a bit-identical replay, the
weights and tokenizer hashes, and a re-evaluation of the fix set (flip, flip rate within the certified interval,
side effects, sufficiency, significance). Each claim is reported ok/failed with a detail line.

Qt-free: the PDF is rendered by ``workbench.pdf`` from the same dictionary.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import tempfile
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
    return prefix + sentence + _verdict_caveats(doc)


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
        *certified* = the set removes the failure, every acceptance criterion holds, the replay was verified
        bit-identical and the analyst rejected nothing; *qualified* = the set removes the failure but a criterion
        is missed, the replay was not verified or the analyst rejected an element; *not-certified* = the set does
        not remove the failure, the result is partial, or the replay differs.
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
    if reasons:
        return {"level": "qualified", "headline": "FIX FOUND, QUALIFIED: " + "; ".join(reasons), "reasons": reasons}
    head = "ROOT CAUSE CERTIFIED: the fix removes the failure"
    head += f", all {len(crit)} acceptance criteria met" if crit else ""
    head += ", replay bit-identical"
    return {"level": "certified", "headline": head, "reasons": []}


def _fmt(x) -> str:
    x = _finite(x)
    return "n/a" if x is None else f"{x:.3g}"


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


def _analyst(analyst: Mapping | None, fix: list[dict]) -> dict:
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
                return index.get(_element_key(item))
            except (TypeError, ValueError):
                raise CertificateError(f"analyst {verdict} element is malformed: {dict(item)!r}") from None
        raise CertificateError(f"analyst {verdict} entry must be an element index or an element, got {item!r}")

    for d in analyst.get("decisions", []) or []:
        try:
            k = int(d["element"])
        except (KeyError, TypeError, ValueError):
            raise CertificateError(f"analyst decision {d!r} needs an integer 'element'") from None
        decisions[k] = {"element": k, "decision": str(d.get("decision", "")), "note": str(d.get("note", "") or "")}
    for verdict in ("accepted", "rejected"):
        for item in analyst.get(verdict, []) or []:
            k = element_index(item, verdict)
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
        if not 0 <= k < len(fix):
            raise CertificateError(f"analyst decision names element {k}, but the fix set has {len(fix)}")
        d["site"] = describe_element(fix[k])
        out["decisions"].append(d)
    out["removed"] = removed
    return out


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
        if cca_d.get("bundle_uuid") and cca_d["bundle_uuid"] != b.uuid:
            raise CertificateError(f"cca: result is for bundle {cca_d['bundle_uuid']}, not {b.uuid} ({path.name})")
        if cca_d.get("bundle_sha256") and cca_d["bundle_sha256"] != sha:
            raise CertificateError(f"cca: result was computed on a different file (bundle sha256 "
                                   f"{cca_d['bundle_sha256'][:12]}… vs {sha[:12]}… of {path.name})")
        if cf_d and cf_d.get("weights_sha256") and cf_d["weights_sha256"] != b.model_info["weights_sha256"]:
            raise CertificateError("cf: result was computed on another model (weights sha256 differs)")
        if cf_d and cf_d.get("bundle_uuid") and cf_d["bundle_uuid"] != b.uuid:
            raise CertificateError(f"cf: result is for bundle {cf_d['bundle_uuid']}, not {b.uuid} ({path.name})")
        if cf_d is not None and _finite(cf_d.get("threshold")) is None:
            raise CertificateError("cf: the CF result has no threshold (it was cancelled before calibration); "
                                   "run CF to completion")
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
    if fr is not None and None not in ci and not (ci[0] - 1e-9 <= fr <= ci[1] + 1e-9):
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
    p = Path(path)
    text = certificate_json_text(doc)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=str(p.parent or "."))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        mask = os.umask(0)           # mkstemp makes the file owner-only; the certificate gets 0666 & ~umask
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


# ----------------------------------------------------------------------------------------------------------------
# Verification
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Claim:
    name: str
    ok: bool
    detail: str = ""


@dataclass
class VerifyReport:
    """What :func:`verify_certificate` found: one :class:`Claim` per checked statement."""

    certificate_id: str
    bundle: str
    claims: list[Claim] = field(default_factory=list)
    seconds: float = 0.0
    partial: bool = False

    @property
    def ok(self) -> bool:
        return bool(self.claims) and not self.partial and all(c.ok for c in self.claims)

    @property
    def failed(self) -> list[Claim]:
        return [c for c in self.claims if not c.ok]

    def to_dict(self) -> dict:
        return {"certificate_id": self.certificate_id, "bundle": self.bundle, "ok": self.ok,
                "claims": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in self.claims],
                "failed": [c.name for c in self.failed], "seconds": self.seconds, "partial": self.partial}


def _short(h: str) -> str:
    return (h or "")[:12] + "…"


def verify_certificate(cert: Mapping | str | os.PathLike, bundle_path: str | os.PathLike, *,
                       n_controls: int | None = None, progress: Progress | None = None,
                       cancel: threading.Event | None = None) -> VerifyReport:
    """Re-check every claim of a certificate against a bundle.

    Claims: ``schema``; ``bundle sha256`` (the file is byte-for-byte the certified one); ``bundle`` (it opens and
    validates); ``bundle uuid``; ``incident`` (prompt, output, failure spec as certified); ``replay`` (bit-identical,
    naming what differs); ``weights sha256``; ``tokenizer hash``; and the fix set re-evaluated with
    ``engine.cca.evaluate_fix_set`` (``fix: incident flipped``, ``fix: flip rate`` within the certified 95%
    interval, ``fix: sufficiency``, ``fix: side effects``, ``fix: significance``).

    Args:
        cert: the certificate dict or a path to its JSON.
        bundle_path: the bundle to check against.
        n_controls: random control sets for the significance re-check (default: as many as certified).
        progress: ``progress(done, total, what)``.
        cancel: set to stop; the report is then ``partial`` (and not ok).
    """
    from .bundle import open_bundle
    from .replay import load_bundle_model, replay

    t0 = time.perf_counter()
    total = 5

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
    step(5, "verified" if report.ok else "verification failed")
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
        claims.append(Claim("fix: flip rate", False, "engine.cca is not available: held-out variants not "
                            "re-evaluated"))
        return
    nc = int(n_controls if n_controls is not None else cca.get("n_controls") or 0)
    seed = int(((cca.get("evidence") or {}).get("controls") or {}).get("seed", 0) or 0)
    sub = (lambda k, n, what: progress(3, 5, f"fix set: {what}")) if progress else None
    new = evaluate_fix_set(b, handle, ivs, n_controls=nc, seed=seed, progress=sub, cancel=cancel)
    if new.partial:
        report.partial = True
        claims.append(Claim("fix: re-evaluation", False, "cancelled before the evidence was complete"))
        return
    claims.append(Claim("fix: incident flipped", bool(new.flipped) == bool(cca["flipped"]),
                        f"flipped={bool(new.flipped)} (certified {bool(cca['flipped'])}); metric "
                        f"{_fmt(new.baseline_metric)} -> {_fmt(new.fixed_metric)}"))
    lo, hi = cca["flip_rate_ci"]
    fr = _finite(new.flip_rate)
    if fr is None or lo is None or hi is None:
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
        if then is None or now is None:
            ok, detail = (then is None) == (now is None), f"{_pct_nm(now)} (certified {_pct_nm(then)})"
        else:
            ok = abs(now - then) <= 1.0 / n + 1e-9  # within one prompt of the certified rate
            detail = f"{_pct(now)} (certified {_pct(then)}; tolerance one prompt of {n})"
        claims.append(Claim(name, ok, detail))
    if nc:
        p_then, p_now = _finite(cca.get("p_value")), _finite(new.p_value)
        sig_then = p_then is not None and p_then <= SIGNIFICANCE
        sig_now = p_now is not None and p_now <= SIGNIFICANCE
        claims.append(Claim("fix: significance", sig_then == sig_now,
                            f"{format_p(p_now, nc)} from {nc} controls (certified {format_p(p_then, cca['n_controls'])}"
                            f" from {cca['n_controls']}; same conclusion at alpha {SIGNIFICANCE})"))


__all__ = ["CERT_SCHEMA", "Claim", "VerifyReport", "build_certificate", "certificate_schema", "certificate_status",
           "describe_element", "file_sha256", "load_certificate", "read_certificate_json", "reproduction_commands",
           "validate_certificate", "verdict_sentence", "verify_certificate", "write_certificate"]
