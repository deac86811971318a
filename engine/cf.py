"""Compression Forensics (CF): calibrated per-layer × site anomaly scores of an incident's activations.

For every recorded site ``(layer, site)`` and every token position the incident's activation vector ``x`` (``[d_model]``)
is turned into a per-token statistic:

* ``"bits"`` — compressibility. ``x`` is standardised with per-dimension scales calibrated on the benign reference
  runs (``z = (x - median) / robust_scale``), quantised to ``LEVELS`` steps per unit (int8, clipped), and fed row by
  row into one zlib stream with a sync flush after each row: the bytes a row adds are what it costs *given the
  previous positions* (zlib's 32 KiB window). Bits per value = ``8 * bytes / d_model``. A constant (repeated)
  activation costs almost nothing; a wild one costs more than benign tokens do.
* ``"distance"`` — RMS of ``z`` over dimensions (a diagonal Mahalanobis distance from the benign per-dim centre).

Each token statistic is compared with the benign per-token distribution of the same site (position 0 has its own,
since the first token is special in most models): token score ``s_t = |robust z|`` for ``bits`` (both directions are
anomalous: too compressible or too incompressible) and ``s_t = robust z`` for ``distance`` (only far is anomalous).
A (layer, site) is summarised by the maximum token score over the prompt positions; that aggregate is scored
against the same aggregate of every benign reference prompt: ``score = (A - median) / (1.4826 MAD)`` and the
empirical ``p = (1 + #benign >= A) / (1 + n)``. The threshold on ``score`` is the 97.5th percentile of the
leave-one-out scores of the benign reference cells; the false-positive rate it gives is then *measured* on held-out
benign prompts (``heldout_fpr``), never tuned on them.

Robust z: ``(x - median) / (1.4826 * MAD)`` with the MAD floored at ``1e-3`` of the median's magnitude (and an
absolute ``1e-6``) so a degenerate benign distribution cannot divide by zero.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import math
import os
import threading
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from .errors import BaselineError, CFError

STATISTICS = ("bits", "distance")
DEFAULT_STATISTIC = "bits"
COMPRESSORS = ("zlib", "lzma")
DEFAULT_COMPRESSOR = "zlib"
LEVELS = 4                    # quantisation steps per unit of robust scale (step = 0.25 robust sd)
THRESHOLD_QUANTILE = 0.975    # of the leave-one-out benign reference cell scores
MIN_THRESHOLD = 2.0           # never flag below a robust z of 2
FORMAT_NAME = "forensics.cf-baseline"
SCHEMA_VERSION = 1
SITES = ("resid_pre", "attn", "mlp", "resid_post")

Progress = Callable[[int, int, str], None]
SiteKey = tuple[int, str]


# ----- result types -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerScore:
    """One ``(layer, site)`` of the incident.

    Attributes:
        statistic: raw statistic of the incident — mean over prompt positions of the per-token statistic (bits per
            value for ``bits``, RMS standardised distance for ``distance``).
        score: anomaly score (robust z of the max token score against the benign reference prompts); larger =
            more anomalous.
        p_value: empirical p-value against the benign reference prompts.
        flagged: ``score > threshold``.
        position_scores: per token position score ``s_t`` (len = incident positions, continuation included).
        aggregate: the max token score over prompt positions that ``score`` was computed from.
    """

    layer: int
    site: str
    statistic: float
    score: float
    p_value: float
    flagged: bool
    position_scores: tuple[float, ...]
    aggregate: float = float("nan")


@dataclass(frozen=True)
class Finding:
    """A ranked anomalous ``(layer, site, positions)``."""

    layer: int
    site: str
    positions: tuple[int, ...]
    score: float
    p_value: float


def _num(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _unnum(x) -> float:
    return float("nan") if x is None else float(x)


@dataclass
class CFResult:
    """Everything CF found for one incident (JSON-ready with :meth:`to_dict`)."""

    statistic: str
    threshold: float
    scores: list[LayerScore]
    findings: list[Finding]
    heldout_fpr: float | None
    baseline_id: str
    weights_sha256: str
    seconds: float
    partial: bool = False
    n_baseline_prompts: int = 0
    n_heldout: int = 0
    compressor: str = DEFAULT_COMPRESSOR
    bundle_uuid: str = ""

    SCHEMA = "forensics.cf-result/1"

    def to_dict(self) -> dict:
        return {
            "schema": self.SCHEMA, "statistic": self.statistic, "threshold": _num(self.threshold),
            "compressor": self.compressor,
            "scores": [{"layer": s.layer, "site": s.site, "statistic": _num(s.statistic), "score": _num(s.score),
                        "p_value": _num(s.p_value), "flagged": bool(s.flagged), "aggregate": _num(s.aggregate),
                        "position_scores": [_num(v) for v in s.position_scores]} for s in self.scores],
            "findings": [{"layer": f.layer, "site": f.site, "positions": list(f.positions), "score": _num(f.score),
                          "p_value": _num(f.p_value)} for f in self.findings],
            "heldout_fpr": _num(self.heldout_fpr) if self.heldout_fpr is not None else None,
            "n_baseline_prompts": self.n_baseline_prompts, "n_heldout": self.n_heldout,
            "baseline_id": self.baseline_id, "weights_sha256": self.weights_sha256, "bundle_uuid": self.bundle_uuid,
            "seconds": self.seconds, "partial": self.partial,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "CFResult":
        try:
            scores = [LayerScore(int(s["layer"]), str(s["site"]), _unnum(s["statistic"]), _unnum(s["score"]),
                                 _unnum(s["p_value"]), bool(s["flagged"]),
                                 tuple(_unnum(v) for v in s["position_scores"]), _unnum(s.get("aggregate")))
                      for s in d["scores"]]
            findings = [Finding(int(f["layer"]), str(f["site"]), tuple(int(p) for p in f["positions"]),
                                _unnum(f["score"]), _unnum(f["p_value"])) for f in d["findings"]]
            return cls(statistic=str(d["statistic"]), threshold=_unnum(d["threshold"]), scores=scores,
                       findings=findings, heldout_fpr=None if d.get("heldout_fpr") is None else float(d["heldout_fpr"]),
                       baseline_id=str(d.get("baseline_id", "")), weights_sha256=str(d.get("weights_sha256", "")),
                       seconds=float(d.get("seconds", 0.0)), partial=bool(d.get("partial", False)),
                       n_baseline_prompts=int(d.get("n_baseline_prompts", 0)), n_heldout=int(d.get("n_heldout", 0)),
                       compressor=str(d.get("compressor", DEFAULT_COMPRESSOR)),
                       bundle_uuid=str(d.get("bundle_uuid", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise CFError(f"malformed CF result: {exc}") from None

    def score_of(self, layer: int, site: str) -> LayerScore | None:
        for s in self.scores:
            if s.layer == layer and s.site == site:
                return s
        return None

    def ranking(self) -> list[SiteKey]:
        """Every scored ``(layer, site)``, most anomalous first (ties broken by layer order)."""
        order = sorted(range(len(self.scores)),
                       key=lambda i: (-(self.scores[i].score if math.isfinite(self.scores[i].score) else -1e300), i))
        return [(self.scores[i].layer, self.scores[i].site) for i in order]

    def prior(self) -> dict[SiteKey, float]:
        """``(layer, site) -> weight in [0, 1]``: a logistic of ``score - threshold`` (0.5 at the threshold).

        Monotone in the score, so ordering sites by the prior is ordering them by CF's ranking.
        """
        out = {}
        for s in self.scores:
            x = s.score - self.threshold if math.isfinite(s.score) else -50.0
            out[(s.layer, s.site)] = float(1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, x)))))
        return out


# ----- statistics -----------------------------------------------------------------------------------------------
def _robust_center_scale(x: np.ndarray, axis=0) -> tuple[np.ndarray, np.ndarray]:
    """Per-column median and 1.4826·MAD (floored) of ``x`` ``[n, d]``."""
    med = np.median(x, axis=axis)
    mad = 1.4826 * np.median(np.abs(x - np.expand_dims(med, axis)), axis=axis)
    std = np.std(x, axis=axis)
    scale = np.where(mad > 1e-8, mad, std)
    floor = np.maximum(1e-6, 1e-3 * np.abs(med))
    return med, np.maximum(scale, floor)


def _robust_1d(v: np.ndarray) -> tuple[float, float]:
    v = np.asarray(v, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return 0.0, 1.0
    med = float(np.median(v))
    mad = 1.4826 * float(np.median(np.abs(v - med)))
    if mad <= 1e-12:
        mad = float(np.std(v))
    return med, max(mad, 1e-6, 1e-3 * abs(med))


def standardise(x: np.ndarray, center: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``(x - center) / scale`` for ``x`` ``[pos, d]`` → ``[pos, d]`` float32."""
    return ((np.asarray(x, dtype=np.float64) - center) / scale).astype(np.float32)


def quantise(z: np.ndarray, levels: int = LEVELS) -> np.ndarray:
    """Standardised ``z`` ``[pos, d]`` → int8 codes (``levels`` steps per unit, clipped to ±127)."""
    return np.clip(np.rint(z * levels), -127, 127).astype(np.int8)


def token_bits(z: np.ndarray, *, levels: int = LEVELS, compressor: str = DEFAULT_COMPRESSOR) -> np.ndarray:
    """Bits per value of each token after quantisation and compression: ``[pos, d]`` → ``[pos]``.

    ``zlib``: one stream over the positions in order, sync-flushed after each row, so a row's cost is conditional
    on the earlier rows (repeats cost almost nothing). ``lzma``: each row compressed on its own (xz has no cheap
    partial flush), so it sees only within-token redundancy.
    """
    q = quantise(z, levels)
    n, d = q.shape
    out = np.empty(n, dtype=np.float64)
    if compressor == "zlib":
        c = zlib.compressobj(6, zlib.DEFLATED, -15)
        for t in range(n):
            b = c.compress(q[t].tobytes()) + c.flush(zlib.Z_SYNC_FLUSH)
            out[t] = 8.0 * len(b) / d
    elif compressor == "lzma":
        filt = [{"id": lzma.FILTER_LZMA2, "preset": 6}]
        for t in range(n):
            out[t] = 8.0 * len(lzma.compress(q[t].tobytes(), format=lzma.FORMAT_RAW, filters=filt)) / d
    else:
        raise CFError(f"unknown compressor {compressor!r}; expected one of {', '.join(COMPRESSORS)}")
    return out


def token_distance(z: np.ndarray) -> np.ndarray:
    """RMS over dimensions of standardised ``z`` ``[pos, d]`` → ``[pos]`` (diagonal Mahalanobis / sqrt(d))."""
    z = np.asarray(z, dtype=np.float64)
    return np.sqrt(np.mean(z * z, axis=1))


def token_statistic(statistic: str, z: np.ndarray, compressor: str = DEFAULT_COMPRESSOR) -> np.ndarray:
    if statistic == "bits":
        return token_bits(z, compressor=compressor)
    if statistic == "distance":
        return token_distance(z)
    raise CFError(f"unknown statistic {statistic!r}; expected one of {', '.join(STATISTICS)}")


# ----- baseline -------------------------------------------------------------------------------------------------
@dataclass
class SiteBaseline:
    """Benign calibration of one ``(layer, site)`` and one statistic's distributions.

    Attributes:
        center, scale: per-dim median and robust scale ``[d_model]`` (quantisation / distance scales).
        tok: ``{statistic: (median, scale, median0, scale0)}`` of the per-token statistic at positions ≥ 1 and 0.
        agg: ``{statistic: [n_prompts]}`` the benign prompts' aggregates (max token score over prompt positions).
    """

    center: np.ndarray
    scale: np.ndarray
    tok: dict[str, tuple[float, float, float, float]] = field(default_factory=dict)
    agg: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class Baseline:
    """Benign reference statistics of one model (per ``(layer, site)``), with calibrated thresholds.

    Attributes:
        weights_sha256: the model it was built from (checked on every use).
        statistics: which statistics it holds (``STATISTICS`` by default).
        thresholds / heldout_fprs: per statistic; ``threshold`` and ``heldout_fpr`` are the default statistic's.
        prompts_hash: sha256 over the reference and held-out prompts (cache key).
    """

    weights_sha256: str
    n_layers: int
    sites: tuple[str, ...]
    d_model: int
    statistics: tuple[str, ...]
    compressor: str
    levels: int
    prompts: list[str]
    heldout: list[str]
    sites_data: dict[SiteKey, SiteBaseline]
    thresholds: dict[str, float]
    heldout_fprs: dict[str, float | None]
    heldout_counts: dict[str, int] = field(default_factory=dict)
    created: str = ""
    program: str = ""
    baseline_id: str = ""

    @property
    def n_prompts(self) -> int:
        return len(self.prompts)

    @property
    def primary(self) -> str:
        return DEFAULT_STATISTIC if DEFAULT_STATISTIC in self.statistics else self.statistics[0]

    @property
    def threshold(self) -> float:
        return self.thresholds[self.primary]

    @property
    def heldout_fpr(self) -> float | None:
        return self.heldout_fprs.get(self.primary)

    @property
    def prompts_hash(self) -> str:
        return prompts_hash(self.prompts, self.heldout)

    def save(self, path: str | os.PathLike) -> Path:
        return save_baseline(self, path)


def prompts_hash(prompts: Sequence[str], heldout: Sequence[str] = ()) -> str:
    return hashlib.sha256(json.dumps([list(prompts), list(heldout)]).encode()).hexdigest()


def _cancelled(cancel) -> bool:
    return cancel is not None and cancel.is_set()


def _forward_sites(handle, prompt: str, keys: list[SiteKey]) -> dict[SiteKey, np.ndarray]:
    """One prompt through the model → ``{(layer, site): [pos, d_model] float32}``."""
    import torch

    from .behaviour import encode
    from .hooks import forward_captured

    enc = encode(handle, prompt)
    with torch.no_grad():
        _, acts = forward_captured(handle, keys, **enc)
    return {k: v[0].float().numpy() for k, v in acts.items()}


def _token_scores(sb: SiteBaseline, statistic: str, stat: np.ndarray) -> np.ndarray:
    """Per-token statistic ``[pos]`` → per-token score (|robust z| for bits, robust z for distance)."""
    m, s, m0, s0 = sb.tok[statistic]
    z = (stat - m) / s
    if stat.size:
        z[0] = (stat[0] - m0) / s0
    return np.abs(z) if statistic == "bits" else z


def _aggregate(scores: np.ndarray, n_prompt: int) -> float:
    return float(np.max(scores[:max(1, n_prompt)])) if scores.size else float("nan")


def _agg_score(agg: float, bench: np.ndarray) -> tuple[float, float]:
    med, sc = _robust_1d(bench)
    z = (agg - med) / sc
    p = (1.0 + float(np.sum(bench >= agg))) / (1.0 + bench.size)
    return float(z), float(p)


def build_baseline(handle, prompts: Sequence[str], *, statistic: str | Sequence[str] = STATISTICS,
                   heldout: Sequence[str] = (), compressor: str = DEFAULT_COMPRESSOR, levels: int = LEVELS,
                   sites: Sequence[str] = SITES, progress: Progress | None = None,
                   cancel: threading.Event | None = None) -> Baseline:
    """Run the benign ``prompts`` through ``handle`` and calibrate every ``(layer, site)``.

    Two passes over the prompts' activations (kept in memory: ``n_prompts × pos × d_model`` per site, fine for the
    tens of short prompts a scenario ships): per-dim centre/scale from all benign tokens, then per-token statistics,
    their benign distributions and the per-prompt aggregates. The threshold per statistic is the
    ``THRESHOLD_QUANTILE`` of leave-one-out benign reference cell scores; ``heldout`` prompts are then scored and
    the flagged share is the measured FPR.

    Raises:
        CFError: fewer than 4 prompts, or an unknown statistic/compressor.
        BaselineError: cancelled (nothing half-built is returned).
    """
    stats = (statistic,) if isinstance(statistic, str) else tuple(statistic)
    for s in stats:
        if s not in STATISTICS:
            raise CFError(f"unknown statistic {s!r}; expected one of {', '.join(STATISTICS)}")
    if compressor not in COMPRESSORS:
        raise CFError(f"unknown compressor {compressor!r}; expected one of {', '.join(COMPRESSORS)}")
    prompts = [p for p in prompts]
    if len(prompts) < 4:
        raise CFError(f"a CF baseline needs at least 4 benign reference prompts (got {len(prompts)})")
    keys = [(i, s) for i in range(handle.n_layers) for s in sites]
    total = len(prompts) + len(heldout)
    runs: list[dict[SiteKey, np.ndarray]] = []
    for n, p in enumerate(prompts):
        if _cancelled(cancel):
            raise BaselineError("baseline build cancelled")
        runs.append(_forward_sites(handle, p, keys))
        if progress:
            progress(n + 1, total, "baseline: benign reference runs")
    n_pos = [next(iter(r.values())).shape[0] for r in runs]
    data: dict[SiteKey, SiteBaseline] = {}
    loo: dict[str, list[float]] = {s: [] for s in stats}
    for key in keys:
        if _cancelled(cancel):
            raise BaselineError("baseline build cancelled")
        allx = np.concatenate([r[key] for r in runs], axis=0)
        center, scale = _robust_center_scale(allx.astype(np.float64))
        sb = SiteBaseline(center=center.astype(np.float32), scale=scale.astype(np.float32))
        zs = [standardise(r[key], sb.center, sb.scale) for r in runs]
        for st in stats:
            per = [token_statistic(st, z, compressor) for z in zs]
            rest = np.concatenate([v[1:] for v in per]) if any(v.size > 1 for v in per) else np.concatenate(per)
            m, s = _robust_1d(rest)
            m0, s0 = _robust_1d(np.array([v[0] for v in per]))
            sb.tok[st] = (m, s, m0, s0)
            aggs = np.array([_aggregate(_token_scores(sb, st, v), npos) for v, npos in zip(per, n_pos)])
            sb.agg[st] = aggs
            for i in range(aggs.size):  # leave-one-out score of each benign reference cell
                others = np.delete(aggs, i)
                loo[st].append(_agg_score(float(aggs[i]), others)[0])
        data[key] = sb
    thresholds = {st: max(MIN_THRESHOLD, float(np.quantile(np.array(loo[st]), THRESHOLD_QUANTILE))) for st in stats}
    base = Baseline(weights_sha256=handle.weights_sha256(), n_layers=handle.n_layers, sites=tuple(sites),
                    d_model=int(handle.d_model), statistics=stats, compressor=compressor, levels=levels,
                    prompts=prompts, heldout=list(heldout), sites_data=data, thresholds=thresholds,
                    heldout_fprs={st: None for st in stats}, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    program=_program())
    base.baseline_id = hashlib.sha256((base.weights_sha256 + base.prompts_hash + ",".join(stats) + compressor
                                       + str(levels)).encode()).hexdigest()[:16]
    if heldout:
        flagged = {st: 0 for st in stats}
        cells = 0
        for n, p in enumerate(heldout):
            if _cancelled(cancel):
                raise BaselineError("baseline build cancelled")
            acts = _forward_sites(handle, p, keys)
            for st in stats:
                for key in keys:
                    ls = score_site(base, key, acts[key], acts[key].shape[0], st)
                    flagged[st] += ls.flagged
            cells += len(keys)
            if progress:
                progress(len(prompts) + n + 1, total, "baseline: held-out benign runs")
        base.heldout_fprs = {st: flagged[st] / cells for st in stats}
        base.heldout_counts = {st: cells for st in stats}
    return base


def _program() -> str:
    try:
        from importlib.metadata import version

        return f"model-forensics-workbench {version('model-forensics-workbench')}"
    except Exception:
        return "model-forensics-workbench"


def score_site(base: Baseline, key: SiteKey, x: np.ndarray, n_prompt: int, statistic: str) -> LayerScore:
    """Score one site's activation ``x`` ``[pos, d_model]`` (first ``n_prompt`` positions are the prompt)."""
    sb = base.sites_data.get(key)
    if sb is None:
        raise CFError(f"the baseline has no site {key}")
    if statistic not in sb.tok:
        raise CFError(f"the baseline holds no {statistic!r} statistic (has {', '.join(base.statistics)})")
    z = standardise(x, sb.center, sb.scale)
    stat = token_statistic(statistic, z, base.compressor)
    ts = _token_scores(sb, statistic, stat)
    agg = _aggregate(ts, n_prompt)
    score, p = _agg_score(agg, sb.agg[statistic])
    thr = base.thresholds[statistic]
    return LayerScore(layer=key[0], site=key[1], statistic=float(np.mean(stat[:max(1, n_prompt)])), score=score,
                      p_value=p, flagged=bool(score > thr), position_scores=tuple(float(v) for v in ts),
                      aggregate=agg)


# ----- baseline file ----------------------------------------------------------------------------------------------
def save_baseline(base: Baseline, path: str | os.PathLike) -> Path:
    """Write ``base`` to HDF5 (temporary name, then rename). See docs/cf.md for the layout."""
    import h5py

    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = FORMAT_NAME
            f.attrs["schema_version"] = SCHEMA_VERSION
            f.attrs["created"] = base.created
            f.attrs["program"] = base.program
            f.attrs["baseline_id"] = base.baseline_id
            f.attrs["weights_sha256"] = base.weights_sha256
            f.attrs["n_layers"] = base.n_layers
            f.attrs["d_model"] = base.d_model
            f.attrs["sites"] = json.dumps(list(base.sites))
            f.attrs["statistics"] = json.dumps(list(base.statistics))
            f.attrs["compressor"] = base.compressor
            f.attrs["levels"] = base.levels
            f.attrs["prompts_hash"] = base.prompts_hash
            f.attrs["thresholds_json"] = json.dumps(base.thresholds)
            f.attrs["heldout_fprs_json"] = json.dumps(base.heldout_fprs)
            f.attrs["heldout_counts_json"] = json.dumps(base.heldout_counts)
            st = h5py.string_dtype()
            f.create_dataset("prompts", data=np.array(base.prompts, dtype=object), dtype=st)
            f.create_dataset("heldout", data=np.array(base.heldout, dtype=object), dtype=st)
            g = f.create_group("sites")
            for (layer, site), sb in base.sites_data.items():
                h = g.require_group(f"L{layer:03d}").create_group(site)
                h.create_dataset("center", data=sb.center.astype(np.float32))
                h.create_dataset("scale", data=sb.scale.astype(np.float32))
                for s in base.statistics:
                    h.create_dataset(f"{s}_token", data=np.array(sb.tok[s], dtype=np.float64))
                    h.create_dataset(f"{s}_agg", data=sb.agg[s].astype(np.float64))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_baseline(path: str | os.PathLike, *, weights_sha256: str | None = None) -> Baseline:
    """Read a baseline file; with ``weights_sha256`` refuse one built from another model.

    Raises:
        BaselineError: missing/unreadable file, wrong format or version, malformed content, other model.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise BaselineError(f"{path}: no such baseline file")
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise BaselineError(f"{path.name} is not an HDF5 file") from None
    try:
        with f:
            def attr(name):
                if name not in f.attrs:
                    raise BaselineError(f"{path.name}: missing attribute {name!r}")
                v = f.attrs[name]
                if isinstance(v, bytes):
                    v = v.decode()
                return v.item() if isinstance(v, np.generic) else v

            fmt = f.attrs.get("format")
            fmt = fmt.decode() if isinstance(fmt, bytes) else fmt
            if fmt != FORMAT_NAME:
                raise BaselineError(f"{path.name} is not a CF baseline (format={fmt!r})")
            if attr("schema_version") != SCHEMA_VERSION:
                raise BaselineError(f"{path.name}: baseline schema version {attr('schema_version')!r} is not "
                                    f"supported (this program reads {SCHEMA_VERSION})")
            sha = str(attr("weights_sha256"))
            if weights_sha256 is not None and sha != weights_sha256:
                raise BaselineError(f"{path.name} was built for another model (weights sha256 {sha[:12]}… vs "
                                    f"{weights_sha256[:12]}…)")
            stats = tuple(json.loads(attr("statistics")))
            sites = tuple(json.loads(attr("sites")))
            n_layers = int(attr("n_layers"))
            data = {}
            for layer in range(n_layers):
                for site in sites:
                    h = f[f"sites/L{layer:03d}/{site}"]
                    sb = SiteBaseline(center=h["center"][()], scale=h["scale"][()])
                    for s in stats:
                        tok = h[f"{s}_token"][()]
                        sb.tok[s] = tuple(float(v) for v in tok)
                        sb.agg[s] = h[f"{s}_agg"][()].astype(np.float64)
                    data[(layer, site)] = sb
            dec = (lambda v: v.decode() if isinstance(v, bytes) else str(v))
            base = Baseline(weights_sha256=sha, n_layers=n_layers, sites=sites, d_model=int(attr("d_model")),
                            statistics=stats, compressor=str(attr("compressor")), levels=int(attr("levels")),
                            prompts=[dec(v) for v in f["prompts"][()]], heldout=[dec(v) for v in f["heldout"][()]],
                            sites_data=data, thresholds={k: float(v) for k, v in json.loads(attr("thresholds_json")).items()},
                            heldout_fprs=json.loads(attr("heldout_fprs_json")),
                            heldout_counts=json.loads(attr("heldout_counts_json")), created=str(attr("created")),
                            program=str(attr("program")), baseline_id=str(attr("baseline_id")))
    except BaselineError:
        raise
    except (KeyError, ValueError, TypeError, OSError) as exc:
        raise BaselineError(f"{path.name}: malformed CF baseline ({exc})") from None
    if base.prompts_hash != attr_hash(path):
        raise BaselineError(f"{path.name}: prompts do not match the stored prompts hash")
    return base


def attr_hash(path: Path) -> str:
    import h5py

    with h5py.File(path, "r") as f:
        v = f.attrs["prompts_hash"]
        return v.decode() if isinstance(v, bytes) else str(v)


# ----- cache ------------------------------------------------------------------------------------------------------
def _cache_dir() -> Path:
    root = os.environ.get("FORENSICS_CACHE") or os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "model-forensics" / "cf-baselines"


def baseline_cache_paths(bundle_path: Path, sha: str) -> list[Path]:
    """Where a bundle's baseline may live: beside the bundle, then the user cache keyed by the weights sha256."""
    return [bundle_path.with_name(bundle_path.stem + ".baseline.h5"), _cache_dir() / f"{sha}.baseline.h5"]


def _fits(base: Baseline, sha: str, statistic: str, prompts, heldout, compressor: str) -> bool:
    return (base.weights_sha256 == sha and statistic in base.statistics and base.compressor == compressor
            and base.prompts_hash == prompts_hash(prompts, heldout))


def baseline_for_bundle(bundle, handle, *, statistic: str = DEFAULT_STATISTIC, compressor: str = DEFAULT_COMPRESSOR,
                        progress: Progress | None = None, cancel: threading.Event | None = None) -> Baseline:
    """A cached baseline that fits (same weights, statistic, prompts) or a freshly built and cached one."""
    prompts = list(getattr(bundle, "benign_prompts", None) or [])
    if not prompts:
        raise CFError("the bundle has no benign reference prompts; build a baseline with "
                      "`forensics baseline build` and pass --baseline")
    heldout = list(bundle.prompt_sets.get("benign_heldout", []))
    sha = bundle.model_info["weights_sha256"]
    paths = baseline_cache_paths(Path(bundle.path), sha)
    for p in paths:
        if p.is_file():
            try:
                base = load_baseline(p, weights_sha256=sha)
            except BaselineError:
                continue
            if _fits(base, sha, statistic, prompts, heldout, compressor):
                return base
    base = build_baseline(handle, prompts, statistic=STATISTICS, heldout=heldout, compressor=compressor,
                          progress=progress, cancel=cancel)
    for p in paths:
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            save_baseline(base, p)
            break
        except OSError:
            continue
    return base


# ----- run ------------------------------------------------------------------------------------------------------
def score_activations(base: Baseline, acts: Mapping[SiteKey, np.ndarray], n_prompt: int, *,
                      statistic: str | None = None, on_layer: Callable[[LayerScore], None] | None = None,
                      progress: Progress | None = None, cancel: threading.Event | None = None
                      ) -> tuple[list[LayerScore], bool]:
    """Score given activations ``{(layer, site): [pos, d_model]}`` (layer order); returns ``(scores, partial)``."""
    statistic = statistic or base.primary
    keys = [(i, s) for i in range(base.n_layers) for s in base.sites if (i, s) in acts]
    scores = []
    for n, key in enumerate(keys):
        if _cancelled(cancel):
            return scores, True
        ls = score_site(base, key, acts[key], n_prompt, statistic)
        scores.append(ls)
        if on_layer:
            on_layer(ls)
        if progress:
            progress(n + 1, len(keys), f"CF: layer {key[0]} {key[1]}")
    return scores, False


def findings_from(scores: Sequence[LayerScore], threshold: float, max_positions: int = 3) -> list[Finding]:
    """Flagged sites, most anomalous first; positions = those whose token score exceeds the threshold (else the
    top ``max_positions``)."""
    out = []
    for s in scores:
        if not s.flagged:
            continue
        ps = np.array(s.position_scores)
        over = [int(i) for i in np.argsort(-ps) if ps[i] > threshold][:8]
        pos = over or [int(i) for i in np.argsort(-ps)[:max_positions]]
        out.append(Finding(s.layer, s.site, tuple(sorted(pos)), s.score, s.p_value))
    out.sort(key=lambda f: (-f.score, f.layer))
    return out


def run_cf(bundle, handle=None, *, baseline: Baseline | None = None, statistic: str | None = None,
           compressor: str = DEFAULT_COMPRESSOR, progress: Progress | None = None,
           on_layer: Callable[[LayerScore], None] | None = None,
           cancel: threading.Event | None = None) -> CFResult:
    """Score every recorded ``(layer, site)`` of ``bundle``'s incident against a benign baseline.

    Without ``baseline`` one is loaded from the cache or built from the bundle's benign reference prompts (needs
    the model: ``handle`` or the bundle's embedded weights). ``on_layer(LayerScore)`` is called per site as soon as
    it is scored; ``cancel`` returns what was scored so far with ``partial=True``.

    Raises:
        BaselineError: the baseline belongs to another model.
        CFError: no benign prompts and no baseline; unknown statistic.
    """
    t0 = time.perf_counter()
    statistic = statistic or DEFAULT_STATISTIC
    if statistic not in STATISTICS:
        raise CFError(f"unknown statistic {statistic!r}; expected one of {', '.join(STATISTICS)}")
    sha = bundle.model_info["weights_sha256"]
    if baseline is None:
        if handle is None:
            from .replay import load_bundle_model

            handle = load_bundle_model(bundle)
        try:
            baseline = baseline_for_bundle(bundle, handle, statistic=statistic, compressor=compressor,
                                           progress=progress, cancel=cancel)
        except BaselineError:
            if _cancelled(cancel):
                return CFResult(statistic=statistic, threshold=float("nan"), scores=[], findings=[],
                                heldout_fpr=None, baseline_id="", weights_sha256=sha,
                                seconds=time.perf_counter() - t0, partial=True, bundle_uuid=bundle.uuid)
            raise
    if baseline.weights_sha256 != sha:
        raise BaselineError(f"the baseline was built for another model (weights sha256 "
                            f"{baseline.weights_sha256[:12]}… vs the bundle's {sha[:12]}…)")
    if statistic not in baseline.statistics:
        raise CFError(f"the baseline holds no {statistic!r} statistic (has {', '.join(baseline.statistics)})")

    keys = [(i, s) for i in range(baseline.n_layers) for s in baseline.sites if s in bundle.sites]
    scores: list[LayerScore] = []
    partial = False
    for n, key in enumerate(keys):
        if _cancelled(cancel):
            partial = True
            break
        ls = score_site(baseline, key, bundle.activation(*key), bundle.n_prompt_tokens, statistic)
        scores.append(ls)
        if on_layer:
            on_layer(ls)
        if progress:
            progress(n + 1, len(keys), f"CF: layer {key[0]} {key[1]}")
    thr = baseline.thresholds[statistic]
    return CFResult(statistic=statistic, threshold=thr, scores=scores, findings=findings_from(scores, thr),
                    heldout_fpr=baseline.heldout_fprs.get(statistic), baseline_id=baseline.baseline_id,
                    weights_sha256=sha, seconds=time.perf_counter() - t0, partial=partial,
                    n_baseline_prompts=baseline.n_prompts, n_heldout=len(baseline.heldout),
                    compressor=baseline.compressor, bundle_uuid=bundle.uuid)
