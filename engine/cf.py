"""Compression Forensics (CF): calibrated anomaly scores of an incident's activations, per layer × site × token.

CF answers "where does this run compute something no benign run computes?" with no forward pass beyond the benign
reference runs. Every recorded activation vector ``x`` (``[d_model]``, one per ``(layer, site)`` and token position)
is compared with the same site's activations on the model's **benign reference prompts**, summarised in a
*baseline* (HDF5, versioned, cached per model; layout in ``docs/cf.md``).

**Positional roles.** A token is compared with benign tokens *in the same role*: ``first`` (position 0), ``end0`` and
``end1`` (the last two prompt tokens, aligned from the end: the decision position of a chat template such as
``Assistant:``, or ``.``/``[SEP]`` of a sentence) and ``body`` (every other position, pooled). Per role the baseline
holds the per-dimension median and robust scale (1.4826·MAD, floored at 1 % of the site's median scale), so
``z = (x − median_role) / scale_role``.

**Two statistics** of ``z``, per token:

* ``"bits"`` — compressibility: ``z`` is quantised (``LEVELS`` steps per robust sd, int8) and the positions are fed
  in order into one zlib stream with a sync flush after each row; the bytes a row adds, as bits per value, are its
  cost *given the earlier positions*. A constant or repeated activation costs almost nothing, a wild one more than
  benign tokens do; both directions are anomalous.
* ``"distance"`` — the RMS of ``z`` over dimensions (a diagonal Mahalanobis distance from the benign centre); only
  far is anomalous.

**Token score.** The statistic is calibrated per role on the benign reference tokens to a *tail-matched z*:
``1.645 · (s − median) / (q95 − median)`` (below the median the same with ``q05``; ``bits`` takes the absolute
value), so a benign token reaches 1.645 at its role's 95th percentile whatever the shape of the distribution.

**Cross-fitting by length.** The benign values the calibration is made of are computed out of sample: the reference
prompts are split into ``FOLDS`` folds *by token length* (prompts of one length share a fold) and a prompt's tokens
are standardised with the centre and scale of the prompts in the other folds. So the calibration contains the shift
a prompt of an unseen length brings (for GPT-2's absolute positions the end roles move with the length), as
held-out prompts do. A run that is not in the baseline is measured the same way: with the centre/scale of the fold
its prompt length belongs to, or, for a length no reference prompt has, under every fold and averaged.

**Site score, p-value, threshold.** A ``(layer, site)`` is summarised by the maximum token score over the prompt
positions; that aggregate is scored against the same (cross-fitted) aggregate of every benign reference prompt:
robust z ``(A − median) / (1.4826 MAD)`` (that scale at least 0.1: token scores are z units) and the empirical
``p = (1 + #benign ≥ A) / (1 + n)`` — a rank against the reference prompts, not a calibrated false-alarm probability
for a new benign prompt (``docs/cf.md`` has how often held-out benign cells reach ``p <= 0.05``). The threshold is the
97.5th percentile of the leave-one-out scores of the benign reference cells (never below 2); the share of held-out
benign prompt × site cells it flags is then *measured* (``heldout_fpr``), never tuned on them.

**Run-level verdict.** A run has 12 to 24 sites, so a per-site threshold at ~2.5 % flags some site of a sizeable
share of benign prompts. The run as a whole is judged by a max-statistic (family-wise) test: ``T`` = the maximum site
``score`` of the run, compared with the same maximum of benign *calibration runs*: the run threshold is the
``ceil(RUN_QUANTILE · (m + 1))``-th smallest of their ``m`` values (the conformal 95th percentile), the run p-value
``(1 + #{T_j >= T}) / (1 + m)``, and the run is anomalous iff ``T >`` the run threshold. The calibration runs are a
fixed random half of the held-out benign prompts, scored exactly as an incident is; the other half measures the
threshold's false-positive rate (``heldout_run_fpr``), never used to set it. The benign *reference* prompts' own
maxima (of their leave-one-out cell scores, ``T_i``) are the fallback when there are too few held-out prompts (fewer
than ``2 · MIN_RUN_CALIBRATION``) or the baseline file predates the run verdict: on the shipped scenarios they
under-state a new benign prompt's maximum (a held-out prompt with words or phrasings the reference set lacks has
higher site scores than a reference prompt left out of one site's aggregate), so a threshold calibrated on them
flags well over 5 % of held-out benign prompts on some scenarios (``docs/cf.md`` has the measured rates). With
fewer than ``MIN_RUN_CALIBRATION`` (19) calibration runs there is **no verdict** (``run_anomalous`` is ``None``,
``run_no_verdict_reason`` ``"too_few_calibration_runs"``): the conformal 95th percentile does not exist and the
smallest attainable p-value ``1 / (m + 1)`` is above 5 %, so the run threshold is NaN; the run statistic and its
p-value are still reported.

**Position anomaly and candidate order.** ``CFResult.position_anomaly[p]`` is the median over the scored sites of
the token scores at position ``p``: a token anomalous at most layers and sites is anomalous *as an input*.
:meth:`CFResult.order_candidates` orders single-site interventions ``(layer, component, positions)`` by the position
anomaly of their positions, then by their own token score: the order a CF-guided search visits them in.

**Default statistic.** ``benchmarks/cf_localisation.py`` measures both statistics on the shipped scenarios against an
exhaustive single-site mean-ablation sweep (which candidates really flip each incident); ``docs/cf.md`` holds its
table. ``"distance"`` reached a flipping candidate within 50 % of the random-order search on every scenario, ``"bits"``
missed on ``bert-sentiment-bypass`` (the trigger token there is no harder to compress than benign words), so
``"distance"`` is the default; ``"bits"`` stays selectable (``statistic="bits"``, ``forensics cf --statistic bits``) and
is the one that sees an activation made constant (too compressible).
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from .atomic import written_to_temp
from .errors import BaselineError, CFError

STATISTICS = ("bits", "distance")
DEFAULT_STATISTIC = "distance"
COMPRESSORS = ("zlib", "lzma")
DEFAULT_COMPRESSOR = "zlib"
LEVELS = 4                    # quantisation steps per unit of robust scale (step = 0.25 robust sd)
END_ROLES = 2                 # the last END_ROLES prompt positions are compared with benign tokens aligned from the end
ROLES = ("first", *(f"end{e}" for e in range(END_ROLES)), "body")
FOLDS = 5                     # cross-fitting folds (by prompt token length) for the benign calibration values
THRESHOLD_QUANTILE = 0.975    # of the leave-one-out benign reference cell scores
RUN_QUANTILE = 0.95           # run verdict: conformal quantile of the benign calibration runs' max site score
MIN_RUN_CALIBRATION = 19      # fewest calibration runs whose ceil(0.95 (m + 1))-th smallest exists
NO_VERDICT_REASONS = ("partial", "no_finite_score", "too_few_calibration_runs")  # CFResult.run_no_verdict_reason
RUN_SPLIT_SEED = 0            # which half of the held-out prompts calibrates the run threshold (the rest measure it)
MIN_THRESHOLD = 2.0           # never flag below a robust z of 2
TAIL_Z = 1.6448536269514722   # standard normal 95th percentile: a benign token's score at its role's q95
MIN_BITS_DIM = 64             # "bits" needs rows of at least this many values to resolve differences in cost
SCALE_FLOOR = 0.01            # per-dim scale >= SCALE_FLOOR x the site's median per-dim scale
FORMAT_NAME = "forensics.cf-baseline"
SCHEMA_VERSION = 2
SITES = ("resid_pre", "attn", "mlp", "resid_post")

Progress = Callable[[int, int, str], None]
SiteKey = tuple[int, str]


# ----- result types -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerScore:
    """One ``(layer, site)`` of the incident.

    Attributes:
        statistic: raw statistic of the incident — mean over prompt positions of the per-token sequential/centre
            component (bits per value for ``bits``, RMS standardised distance for ``distance``).
        score: anomaly score (robust z of the max token score against the benign reference prompts); larger =
            more anomalous.
        p_value: empirical p-value against the benign reference prompts.
        flagged: ``score > threshold``.
        position_scores: per token position score (tail-matched z; len = incident positions, continuation
            included).
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
    """Everything CF found for one incident (JSON-ready with :meth:`to_dict`).

    ``position_anomaly`` is the per-position median of the sites' token scores (see the module docstring); it and
    the per-site ``position_scores`` give :meth:`order_candidates`.

    The run-level (family-wise) verdict: ``run_statistic`` = max site ``score`` (T), ``run_threshold`` = the
    conformal ``RUN_QUANTILE`` of the ``n_run_reference`` benign calibration runs' T (``run_calibration``:
    ``"heldout"`` = half of the held-out prompts, ``"reference"`` = the reference prompts' leave-one-out maxima),
    ``run_p_value`` = ``(1 + #{T_j >= T}) / (1 + n_run_reference)``, ``run_anomalous`` = ``T > run_threshold``
    (``None``: no verdict, e.g. a partial run), ``heldout_run_fpr`` = share of the ``n_run_heldout`` held-out benign
    runs not used for calibration whose T exceeds the run threshold (``None``: not measured).

    ``run_no_verdict_reason`` says why ``run_anomalous`` is ``None`` (see :data:`NO_VERDICT_REASONS`; ``""`` when
    there is a verdict, or for a result that predates the run verdict): ``"too_few_calibration_runs"`` when the
    calibration has fewer than ``run_min_calibration`` runs: the conformal 95th percentile does not exist and the
    smallest attainable p-value ``1 / (n_run_reference + 1)`` is above 5 %, so no 5 % verdict can be made;
    ``run_threshold`` is then NaN, while ``run_statistic`` and ``run_p_value`` are still computed.
    """

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
    position_anomaly: tuple[float, ...] = ()
    n_prompt_tokens: int = 0
    run_statistic: float = float("nan")
    run_threshold: float = float("nan")
    run_p_value: float = float("nan")
    run_anomalous: bool | None = None
    heldout_run_fpr: float | None = None
    n_run_reference: int = 0
    run_calibration: str = ""
    n_run_heldout: int = 0
    run_no_verdict_reason: str = ""
    run_min_calibration: int = MIN_RUN_CALIBRATION

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
            "position_anomaly": [_num(v) for v in self.position_anomaly],
            "n_prompt_tokens": self.n_prompt_tokens,
            "heldout_fpr": _num(self.heldout_fpr) if self.heldout_fpr is not None else None,
            "n_baseline_prompts": self.n_baseline_prompts, "n_heldout": self.n_heldout,
            "baseline_id": self.baseline_id, "weights_sha256": self.weights_sha256, "bundle_uuid": self.bundle_uuid,
            "seconds": self.seconds, "partial": self.partial,
            "run_statistic": _num(self.run_statistic), "run_threshold": _num(self.run_threshold),
            "run_p_value": _num(self.run_p_value),
            "run_anomalous": None if self.run_anomalous is None else bool(self.run_anomalous),
            "heldout_run_fpr": None if self.heldout_run_fpr is None else _num(self.heldout_run_fpr),
            "n_run_reference": self.n_run_reference, "run_calibration": self.run_calibration,
            "n_run_heldout": self.n_run_heldout,
            "run_no_verdict_reason": (self.run_no_verdict_reason or None) if self.run_anomalous is None else None,
            "run_min_calibration": self.run_min_calibration,
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
            res = cls(statistic=str(d["statistic"]), threshold=_unnum(d["threshold"]), scores=scores,
                      findings=findings, heldout_fpr=None if d.get("heldout_fpr") is None else float(d["heldout_fpr"]),
                      baseline_id=str(d.get("baseline_id", "")), weights_sha256=str(d.get("weights_sha256", "")),
                      seconds=float(d.get("seconds", 0.0)), partial=bool(d.get("partial", False)),
                      n_baseline_prompts=int(d.get("n_baseline_prompts", 0)), n_heldout=int(d.get("n_heldout", 0)),
                      compressor=str(d.get("compressor", DEFAULT_COMPRESSOR)),
                      bundle_uuid=str(d.get("bundle_uuid", "")),
                      position_anomaly=tuple(_unnum(v) for v in d.get("position_anomaly", ())),
                      n_prompt_tokens=int(d.get("n_prompt_tokens", 0)),
                      run_statistic=_unnum(d.get("run_statistic")), run_threshold=_unnum(d.get("run_threshold")),
                      run_p_value=_unnum(d.get("run_p_value")),
                      run_anomalous=None if d.get("run_anomalous") is None else bool(d["run_anomalous"]),
                      heldout_run_fpr=None if d.get("heldout_run_fpr") is None else float(d["heldout_run_fpr"]),
                      n_run_reference=int(d.get("n_run_reference", 0)),
                      run_calibration=str(d.get("run_calibration", "")),
                      n_run_heldout=int(d.get("n_run_heldout", 0)),
                      run_no_verdict_reason=str(d.get("run_no_verdict_reason") or ""),
                      run_min_calibration=int(d.get("run_min_calibration") or MIN_RUN_CALIBRATION))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CFError(f"malformed CF result: {exc}") from None
        if res.run_anomalous is not None and res.n_run_reference < res.run_min_calibration:
            # written before a verdict needed MIN_RUN_CALIBRATION runs: that verdict was not a 5 % test
            res.run_anomalous, res.run_threshold = None, float("nan")
            res.heldout_run_fpr, res.n_run_heldout = None, 0   # the rate of a threshold that is not one
            res.run_no_verdict_reason = "too_few_calibration_runs"
        elif res.run_anomalous is None and not res.run_no_verdict_reason and (res.partial or res.run_calibration):
            # written before the reason was recorded (a result with no run_calibration predates the verdict)
            res.run_no_verdict_reason = "partial" if res.partial else (
                "no_finite_score" if not math.isfinite(res.run_statistic) else
                "too_few_calibration_runs" if res.n_run_reference < res.run_min_calibration else "")
        return res

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

    # -- single-site candidates ------------------------------------------------------------------------------
    def candidate_key(self, layer: int, site: str, positions) -> tuple[float, float]:
        """``(position anomaly, token score)`` of an intervention site; larger = visit earlier.

        ``positions``: a sequence of token positions or ``"all"``. Both parts are maxima over the positions; a site
        CF did not score (another component, or a partial result) gets ``(-inf, -inf)``.
        """
        s = self.score_of(layer, site)
        if s is None:
            return (-math.inf, -math.inf)
        n = len(s.position_scores)
        pos = range(n) if isinstance(positions, str) else [int(p) for p in positions if 0 <= int(p) < n]
        pa = self.position_anomaly
        a = [pa[p] for p in pos if p < len(pa) and math.isfinite(pa[p])]
        t = [s.position_scores[p] for p in pos if math.isfinite(s.position_scores[p])]
        return (max(a) if a else -math.inf, max(t) if t else -math.inf)

    def order_candidates(self, candidates: Sequence) -> list[int]:
        """Indices of ``candidates`` in the order a CF-guided search visits them (most anomalous first).

        Args:
            candidates: interventions (anything with ``layer``, ``component``, ``positions``) or
                ``(layer, site, positions)`` tuples.

        Returns:
            A permutation of ``range(len(candidates))``: by :meth:`candidate_key` descending, ties in the given
            order.
        """
        keys = []
        for c in candidates:
            if isinstance(c, tuple):
                layer, site, pos = c
            else:
                layer, site, pos = c.layer, c.component, c.positions
            keys.append(self.candidate_key(int(layer), str(site), pos))
        return sorted(range(len(keys)), key=lambda i: (-keys[i][0], -keys[i][1], i))


# ----- statistics -----------------------------------------------------------------------------------------------
def _robust_center_scale(x: np.ndarray, axis=0) -> tuple[np.ndarray, np.ndarray]:
    """Per-column median and 1.4826·MAD (std where the MAD is 0, floored) of ``x`` ``[n, d]``."""
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
    return np.clip(np.rint(np.asarray(z, dtype=np.float64) * levels), -127, 127).astype(np.int8)


_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 6}]


def token_bits(z: np.ndarray, *, levels: int = LEVELS, compressor: str = DEFAULT_COMPRESSOR) -> np.ndarray:
    """Bits per value of each token after quantisation and compression: ``[pos, d]`` → ``[pos]``.

    ``zlib``: one raw-deflate stream over the positions in order, sync-flushed after each row, so a row's cost is
    conditional on the earlier rows (repeats cost almost nothing). ``lzma``: each row compressed on its own (xz has no
    cheap partial flush), so it sees only within-token redundancy.

    Example:
        >>> z = np.random.default_rng(0).normal(size=(4, 256))
        >>> b = token_bits(np.vstack([z, z[-1:]]))   # the repeated last row costs a few bytes
        >>> bool(b[-1] < 0.5 * b[-2])
        True
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
        for t in range(n):
            out[t] = 8.0 * len(lzma.compress(q[t].tobytes(), format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)) / d
    else:
        raise CFError(f"unknown compressor {compressor!r}; expected one of {', '.join(COMPRESSORS)}")
    return out


def token_distance(z: np.ndarray) -> np.ndarray:
    """RMS over dimensions of standardised ``z`` ``[pos, d]`` → ``[pos]`` (diagonal Mahalanobis / sqrt(d))."""
    z = np.asarray(z, dtype=np.float64)
    return np.sqrt(np.mean(z * z, axis=1))


def token_statistic(statistic: str, z: np.ndarray, compressor: str = DEFAULT_COMPRESSOR,
                    levels: int = LEVELS) -> np.ndarray:
    """The per-token ``statistic`` of standardised ``z`` ``[pos, d]`` → ``[pos]``."""
    if statistic == "bits":
        return token_bits(z, levels=levels, compressor=compressor)
    if statistic == "distance":
        return token_distance(z)
    raise CFError(f"unknown statistic {statistic!r}; expected one of {', '.join(STATISTICS)}")


def position_roles(n: int, n_prompt: int | None = None) -> list[str]:
    """Role of each of ``n`` positions whose first ``n_prompt`` are the prompt (see the module docstring).

    Example:
        >>> position_roles(6, 4)
        ['first', 'body', 'end1', 'end0', 'body', 'body']
    """
    n_prompt = n if n_prompt is None else n_prompt
    out = []
    for p in range(n):
        e = n_prompt - 1 - p
        out.append("first" if p == 0 else (f"end{e}" if 0 <= e < END_ROLES else "body"))
    return out


def _tail_z(v: np.ndarray, calib: tuple[float, float, float]) -> np.ndarray:
    """Tail-matched z of raw statistic values ``v`` with ``calib = (median, q95 - median, median - q05)``."""
    m, hi, lo = calib
    v = np.asarray(v, dtype=np.float64)
    return np.where(v >= m, TAIL_Z * (v - m) / hi, -TAIL_Z * (m - v) / lo)


def _calibrate(values: np.ndarray, floor: float) -> tuple[float, float, float]:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return (0.0, floor, floor)
    m = float(np.median(v))
    return (m, max(float(np.quantile(v, 0.95)) - m, floor), max(m - float(np.quantile(v, 0.05)), floor))


def _spread_floor(statistic: str, d: int) -> float:
    """Smallest calibration spread: one byte of compressed output per token (bits), 0.1 robust sd (distance)."""
    return 8.0 / d if statistic == "bits" else 0.1


# ----- baseline -------------------------------------------------------------------------------------------------
@dataclass
class RoleBaseline:
    """Benign calibration of one ``(layer, site)`` and positional role.

    Attributes:
        center, scale: per-dim median and robust scale of each cross-fitting fold's complement ``[folds, d_model]``
            (fold ``k``'s row is computed from the benign prompts *outside* fold ``k``).
        calib: ``{statistic: (median, q95 - median, median - q05)}`` of the benign (cross-fitted) token statistic.
    """

    center: np.ndarray
    scale: np.ndarray
    calib: dict[str, tuple[float, float, float]] = field(default_factory=dict)


@dataclass
class SiteBaseline:
    """Benign calibration of one ``(layer, site)``.

    Attributes:
        roles: ``{role: RoleBaseline}`` (see :data:`ROLES`; a role no benign prompt had falls back to ``body``).
        agg: ``{statistic: [n_prompts]}`` the benign prompts' aggregates (max token score over prompt positions).
    """

    roles: dict[str, RoleBaseline]
    agg: dict[str, np.ndarray] = field(default_factory=dict)

    def role(self, name: str) -> RoleBaseline:
        return self.roles.get(name) or self.roles["body"]


@dataclass
class Baseline:
    """Benign reference statistics of one model (per ``(layer, site)``), with calibrated thresholds.

    Attributes:
        weights_sha256: the model it was built from (checked on every use).
        statistics: which statistics it holds (``STATISTICS`` by default).
        thresholds / heldout_fprs: per statistic; ``threshold`` and ``heldout_fpr`` are the default statistic's.
        heldout_counts: per statistic, how many held-out prompt × site cells the FPR was measured on.
        heldout_prompt_fprs: per statistic, the share of held-out prompts with at least one flagged site.
        run_statistics: per statistic, each benign reference prompt's run statistic ``T_i`` ``[n_prompts]`` (max over
            sites of its leave-one-out cell score): the run calibration when there is no held-out one.
        heldout_run_statistics: per statistic, each held-out prompt's run statistic ``T_j`` ``[n_heldout]`` (max site
            score, scored as an incident is); empty when not measured (no held-out prompts, or an older file).
        heldout_run_calibration: ``[n_heldout]`` bool, which held-out runs calibrate the run threshold (the others
            measure its false-positive rate); see :func:`heldout_calibration_split` and :meth:`run_calibration`.
        length_fold: prompt token length -> cross-fitting fold (empty when the folds are not by length).
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
    heldout_prompt_fprs: dict[str, float | None] = field(default_factory=dict)
    run_statistics: dict[str, np.ndarray] = field(default_factory=dict)
    heldout_run_statistics: dict[str, np.ndarray] = field(default_factory=dict)
    heldout_run_calibration: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    length_fold: dict[int, int] = field(default_factory=dict)
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

    def run_calibration(self, statistic: str, keys: Sequence[SiteKey] | None = None) -> "RunCalibration":
        """The run-level verdict's calibration for a run scored on ``keys`` (default: every site of the baseline).

        With held-out run statistics and a calibration half: that half's values, the threshold from them and the
        false-positive rate measured on the other half. Otherwise the reference prompts' leave-one-out maxima, with
        the rate measured on every held-out run when their statistics exist, else ``None``. For a subset of the
        sites the reference maxima are recomputed over that subset from the stored aggregates, and the rate is
        ``None`` (the held-out runs were scored on every site). With fewer than ``MIN_RUN_CALIBRATION`` calibration
        runs the threshold is NaN and the rate ``None``: there is no 5 % run test to make or to measure
        (:attr:`RunCalibration.enough`).
        """
        full = keys is None or set(keys) == set(self.sites_data)
        held = self.heldout_run_statistics.get(statistic) if full else None
        held = None if held is None or held.size != len(self.heldout) or not held.size else held
        mask = np.asarray(self.heldout_run_calibration, dtype=bool)
        if held is not None and mask.shape == held.shape and mask.any() and (~mask).any():
            values, source, tested = held[mask], "heldout", held[~mask]
        else:
            if full and statistic in self.run_statistics:
                values = self.run_statistics[statistic]
            else:
                values = reference_run_statistics(self.sites_data, statistic, keys)
            source, tested = "reference", held
        values = np.asarray(values, dtype=np.float64)
        # fewer than MIN_RUN_CALIBRATION runs have no conformal 95th percentile (conformal_threshold would give
        # their largest, a test at level 1 / (m + 1) > 5 %): no run threshold, no verdict, no rate to measure
        enough = int(np.isfinite(values).sum()) >= MIN_RUN_CALIBRATION
        thr = conformal_threshold(values) if enough else float("nan")
        fpr = None if tested is None or not tested.size or not math.isfinite(thr) else float(np.mean(tested > thr))
        return RunCalibration(source=source, values=values, threshold=thr,
                              heldout_fpr=fpr, n_tested=0 if fpr is None else int(tested.size))

    def summary(self) -> dict:
        """Plain-data description (``forensics baseline build/info``)."""
        def opt(v):
            return None if v is None else _num(v)

        runs = {k: self.run_calibration(k) for k in self.statistics}
        return {"format": FORMAT_NAME, "schema_version": SCHEMA_VERSION, "baseline_id": self.baseline_id,
                "weights_sha256": self.weights_sha256, "n_layers": self.n_layers, "d_model": self.d_model,
                "sites": list(self.sites), "statistics": list(self.statistics), "compressor": self.compressor,
                "levels": self.levels, "n_prompts": self.n_prompts, "n_heldout": len(self.heldout),
                "thresholds": {k: _num(v) for k, v in self.thresholds.items()},
                "heldout_fprs": {k: opt(v) for k, v in self.heldout_fprs.items()},
                "heldout_prompt_fprs": {k: opt(v) for k, v in self.heldout_prompt_fprs.items()},
                "heldout_cells": dict(self.heldout_counts),
                "run_thresholds": {k: _num(rc.threshold) for k, rc in runs.items()},
                "run_calibration": {k: rc.source for k, rc in runs.items()},
                "n_run_calibration": {k: int(rc.values.size) for k, rc in runs.items()},
                "heldout_run_fprs": {k: opt(rc.heldout_fpr) for k, rc in runs.items()},
                "heldout_runs_tested": {k: rc.n_tested for k, rc in runs.items()},
                "run_min_calibration": MIN_RUN_CALIBRATION,
                "created": self.created, "program": self.program}


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


def _nonfinite_text(x: np.ndarray) -> str:
    """``""`` when ``x`` ``[pos, d]`` is finite, else how many values are NaN/inf and at which positions."""
    bad = ~np.isfinite(np.asarray(x, dtype=np.float64))
    if not bad.any():
        return ""
    pos = np.flatnonzero(bad.any(axis=1)).tolist()
    where = ", ".join(str(p) for p in pos[:8]) + (f" and {len(pos) - 8} more" if len(pos) > 8 else "")
    kinds = " and ".join(k for k, m in (("NaN", np.isnan(x).any()), ("inf", np.isinf(x).any())) if m)
    return (f"{int(bad.sum())} non-finite value{'s' if bad.sum() != 1 else ''} ({kinds}) at "
            f"position{'s' if len(pos) != 1 else ''} {where}")


def _check_benign_finite(acts: Mapping[SiteKey, np.ndarray], which: str, n: int, total: int, prompt: str) -> None:
    """Refuse a benign run whose activations are not finite (a baseline of NaN centres scores nothing)."""
    for (layer, site), x in acts.items():
        bad = _nonfinite_text(x)
        if bad:
            short = prompt if len(prompt) <= 60 else prompt[:57] + "..."
            raise CFError(f"{which} benign prompt {n} of {total} ({short!r}) gives activations that are not finite "
                          f"at L{layer} {site} ({bad}): a CF baseline needs finite benign activations")


def _standardise_roles(sb: SiteBaseline, x: np.ndarray, roles: Sequence[str], fold: int) -> np.ndarray:
    """``x`` ``[pos, d]`` standardised per position with its role's centre/scale of cross-fitting ``fold``."""
    z = np.empty(x.shape, dtype=np.float32)
    for r in set(roles):
        idx = [p for p, q in enumerate(roles) if q == r]
        rb = sb.role(r)
        z[idx] = standardise(x[idx], rb.center[fold], rb.scale[fold])
    return z


def _site_statistic(sb: SiteBaseline, x: np.ndarray, roles: Sequence[str], statistic: str, compressor: str,
                    levels: int, fold: int | None) -> np.ndarray:
    """Raw per-token statistic of a run that is not part of the baseline, measured as a benign run was.

    A benign reference value was computed with the centre/scale of the prompts outside its fold (folds group prompts
    by token length). A run whose prompt length belongs to fold ``fold`` is measured the same way; a run of a length
    no reference prompt had (``fold=None``) is outside every fold, so it is measured under each and averaged.
    """
    if fold is not None:
        return token_statistic(statistic, _standardise_roles(sb, x, roles, fold), compressor, levels)
    k = next(iter(sb.roles.values())).center.shape[0]
    return np.mean([token_statistic(statistic, _standardise_roles(sb, x, roles, f), compressor, levels)
                    for f in range(k)], axis=0)


def _token_scores(sb: SiteBaseline, statistic: str, roles: Sequence[str], stat: np.ndarray) -> np.ndarray:
    """Raw per-token statistic ``[pos]`` → tail-matched token score per position (``bits``: two-sided)."""
    out = np.empty(len(roles), dtype=np.float64)
    for r in set(roles):
        idx = np.array([p for p, q in enumerate(roles) if q == r])
        out[idx] = _tail_z(stat[idx], sb.role(r).calib[statistic])
    return np.abs(out) if statistic == "bits" else out


def _aggregate(scores: np.ndarray, n_prompt: int) -> float:
    return float(np.max(scores[:max(1, n_prompt)])) if scores.size else float("nan")


def _agg_score(agg: float, bench: np.ndarray) -> tuple[float, float]:
    med, sc = _robust_1d(bench)
    sc = max(sc, 0.1)  # token scores are z units: a spread below 0.1 is resolution, not signal
    z = (agg - med) / sc
    p = (1.0 + float(np.sum(bench >= agg))) / (1.0 + bench.size)
    return float(z), float(p)


def _loo_scores(aggs: np.ndarray) -> np.ndarray:
    """Leave-one-out score of each benign reference prompt's aggregate against the others' ``[n] -> [n]``."""
    aggs = np.asarray(aggs, dtype=np.float64)
    return np.array([_agg_score(float(aggs[i]), np.delete(aggs, i))[0] for i in range(aggs.size)],
                    dtype=np.float64)


def _max_over_sites(loo_rows: Sequence[np.ndarray]) -> np.ndarray:
    """``[sites][n]`` leave-one-out scores → each prompt's maximum over the sites ``[n]`` (non-finite ignored)."""
    m = np.stack([np.asarray(r, dtype=np.float64) for r in loo_rows])
    return np.where(np.isfinite(m), m, -np.inf).max(axis=0)


def reference_run_statistics(sites_data: Mapping[SiteKey, SiteBaseline], statistic: str,
                             keys: Sequence[SiteKey] | None = None) -> np.ndarray:
    """Each benign reference prompt's run statistic ``T_i`` ``[n_prompts]``: the maximum over ``keys`` (default all
    sites) of its leave-one-out cell score, from the stored per-site aggregates (exactly as ``build_baseline``)."""
    keys = list(sites_data) if keys is None else list(keys)
    if not keys:
        raise CFError("no sites to compute the run statistics over")
    return _max_over_sites([_loo_scores(sites_data[k].agg[statistic]) for k in keys])


def conformal_threshold(values: np.ndarray, quantile: float = RUN_QUANTILE) -> float:
    """The ``ceil(quantile · (m + 1))``-th smallest of the ``m`` finite ``values`` (their largest when ``m`` is too
    small for that, i.e. ``m < MIN_RUN_CALIBRATION`` at 0.95); NaN when there are none.

    A new run exchangeable with the calibration runs exceeds it with probability at most ``1 - quantile`` (when
    ``m >= MIN_RUN_CALIBRATION``).

    Example:
        >>> conformal_threshold(np.arange(1.0, 41.0))   # ceil(0.95 * 41) = 39th smallest of 1..40
        39.0
    """
    v = np.sort(np.asarray(values, dtype=np.float64)[np.isfinite(values)])
    if not v.size:
        return float("nan")
    k = math.ceil(round(quantile * (v.size + 1), 9))
    return float(v[min(k, v.size) - 1])


def heldout_calibration_split(m: int) -> np.ndarray:
    """Which of ``m`` held-out runs calibrate the run threshold ``[m]`` bool: a fixed random half (seed
    ``RUN_SPLIT_SEED``), the other half measures it; none when ``m < 2 · MIN_RUN_CALIBRATION``."""
    mask = np.zeros(m, dtype=bool)
    if m >= 2 * MIN_RUN_CALIBRATION:
        mask[np.random.default_rng(RUN_SPLIT_SEED).permutation(m)[:(m + 1) // 2]] = True
    return mask


@dataclass(frozen=True)
class RunCalibration:
    """The run-level verdict's calibration (see :meth:`Baseline.run_calibration`).

    Attributes:
        source: ``"heldout"`` (half of the held-out runs) or ``"reference"`` (reference prompts, leave-one-out).
        values: the calibration runs' statistics ``[m]``; p-values are computed against them.
        threshold: :func:`conformal_threshold` of ``values``; NaN when there are fewer than ``MIN_RUN_CALIBRATION``
            finite values (no conformal 95th percentile exists, so no run verdict is made).
        heldout_fpr: share of the held-out runs not used for calibration above ``threshold`` (``None``: not measured).
        n_tested: how many held-out runs ``heldout_fpr`` was measured on.
    """

    source: str
    values: np.ndarray
    threshold: float
    heldout_fpr: float | None
    n_tested: int

    @property
    def n(self) -> int:
        """How many calibration runs (finite values) there are."""
        return int(np.isfinite(self.values).sum())

    @property
    def enough(self) -> bool:
        """Whether a 5 % run verdict can be made: at least ``MIN_RUN_CALIBRATION`` calibration runs."""
        return self.n >= MIN_RUN_CALIBRATION


def run_statistic_of(scores: Sequence[LayerScore]) -> float:
    """A run's statistic ``T``: the maximum site ``score`` (NaN when no site has a finite score)."""
    v = [s.score for s in scores if math.isfinite(s.score)]
    return float(max(v)) if v else float("nan")


def format_score(x) -> str:
    """A site / run score for a person: one decimal from 10 on, two below (2792.2, not 2.79e+03); ``n/a`` when not
    finite. The CLI and the CF view print run verdicts with it."""
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"


def run_no_verdict_text(reason: str, *, n_calibration: int, calibration: str, run_statistic: float = float("nan"),
                        run_p_value: float = float("nan"), min_calibration: int = MIN_RUN_CALIBRATION,
                        where: str = "") -> str:
    """Why a run has no run-level verdict, for a person (the CLI, the CF view and the certificate print it).

    ``reason`` is a ``CFResult.run_no_verdict_reason`` (``""``: a result written before the run verdict);
    ``where`` (e.g. ``"L0 resid_pre"``) names the site of the run's maximum score. For too few calibration runs
    the text says how many a 5 % test needs, which prompts would give them, and where the run stands against the
    runs there are (the count is recovered exactly from ``run_p_value = (1 + #{T_j >= T}) / (1 + m)``).

    Example:
        >>> run_no_verdict_text("too_few_calibration_runs", n_calibration=6, calibration="reference",
        ...                     run_statistic=3321.74, run_p_value=1 / 7)  # doctest: +NORMALIZE_WHITESPACE
        "6 benign reference runs calibrate it; a 5% test needs at least 19 (give more benign prompts: at least 19
        with --benign-file, or 38 held-out ones with --heldout-file); the run's max site score 3321.7 exceeds all 6
        (p = 0.143)"
    """
    if reason == "partial":
        return "partial run: not every site was scored"
    if reason == "no_finite_score":
        return "no site has a finite score"
    if reason != "too_few_calibration_runs":
        return "this CF result predates the run-level verdict; run CF again"
    m = int(n_calibration)
    runs = (f"{m} held-out benign calibration run{'s' if m != 1 else ''}" if calibration == "heldout" else
            f"{m} benign reference run{'s' if m != 1 else ''}")
    out = (f"{runs} calibrate{'s' if m == 1 else ''} it; a {1 - RUN_QUANTILE:.0%} test needs at least "
           f"{min_calibration} (give more benign prompts: at least {min_calibration} with --benign-file, or "
           f"{2 * min_calibration} held-out ones with --heldout-file)")
    if m > 0 and run_statistic is not None and math.isfinite(run_statistic) and run_p_value is not None \
            and math.isfinite(run_p_value):
        above = m - (round(run_p_value * (m + 1)) - 1)  # runs whose statistic is below T
        n_words = f"all {m}" if above == m else f"none of the {m}" if above == 0 else f"{above} of {m}"
        site = f" ({where})" if where else ""
        out += (f"; the run's max site score {format_score(run_statistic)}{site} exceeds {n_words} "
                f"(p = {run_p_value:.3g})")
    return out


def run_p_value(t: float, run_stats: np.ndarray) -> float:
    """``(1 + #{T_j >= t}) / (1 + m)`` against the benign calibration runs' statistics ``T_j``."""
    ref = np.asarray(run_stats, dtype=np.float64)
    return (1.0 + float(np.sum(ref >= t))) / (1.0 + ref.size)


def _role_params(runs_x: Sequence[np.ndarray], use: Sequence[int], floor: float
                 ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Centre and scale ``([d], [d])`` per role from the benign runs ``use``."""
    by: dict[str, list[np.ndarray]] = {}
    for i in use:
        x = runs_x[i]
        for p, r in enumerate(position_roles(x.shape[0])):
            by.setdefault(r, []).append(x[p])
    if "body" not in by or len(by["body"]) < 8:  # tiny prompts: the body role is every token
        by["body"] = [runs_x[i][p] for i in use for p in range(runs_x[i].shape[0])]
    out = {}
    for r, rows in by.items():
        c, sc = _robust_center_scale(np.stack(rows).astype(np.float64))
        out[r] = (c.astype(np.float32), np.maximum(sc, floor).astype(np.float32))
    return out


def length_folds(lengths: Sequence[int], folds: int = FOLDS) -> list[int]:
    """Fold of each prompt for cross-fitting: prompts of one token length share a fold (balanced greedily).

    With a single length the folds are ``index mod folds``.

    Example:
        >>> length_folds([10, 12, 10, 15, 12, 10])
        [0, 1, 0, 2, 1, 0]
    """
    n = len(lengths)
    distinct = sorted(set(lengths), key=lambda v: (-list(lengths).count(v), v))
    if len(distinct) < 2:
        k = max(2, min(folds, n))
        return [i % k for i in range(n)]
    k = min(folds, len(distinct))
    size = [0] * k
    fold_of = {}
    for v in distinct:
        f = min(range(k), key=lambda j: (size[j], j))
        fold_of[v] = f
        size[f] += list(lengths).count(v)
    return [fold_of[v] for v in lengths]


def _calibrate_site(runs_x: list[np.ndarray], stats: Sequence[str], compressor: str, levels: int,
                    folds: Sequence[int]) -> SiteBaseline:
    """One site's :class:`SiteBaseline` from the benign runs ``[n_i, d]``.

    The benign statistic values the calibration and the aggregates are made of are cross-fitted: a run's tokens are
    standardised with the centre and scale of the runs in the other ``folds`` — as an incident is scored against a
    baseline it is not part of.
    """
    n = len(runs_x)
    allx = np.concatenate(runs_x).astype(np.float64)
    floor = SCALE_FLOOR * float(np.median(_robust_center_scale(allx)[1]))
    fold_ids = sorted(set(folds))
    per_fold = [_role_params(runs_x, [i for i in range(n) if folds[i] != f], floor) for f in fold_ids]
    names = [r for r in ROLES if any(r in pf for pf in per_fold)]
    roles = {r: RoleBaseline(center=np.stack([pf.get(r, pf["body"])[0] for pf in per_fold]),
                             scale=np.stack([pf.get(r, pf["body"])[1] for pf in per_fold])) for r in names}
    sb = SiteBaseline(roles=roles)
    run_roles = [[q if q in roles else "body" for q in position_roles(x.shape[0])] for x in runs_x]
    raw: dict[str, list[np.ndarray]] = {st: [np.empty(0)] * n for st in stats}
    for i in range(n):
        z = _standardise_roles(sb, runs_x[i], run_roles[i], fold_ids.index(folds[i]))
        for st in stats:
            raw[st][i] = token_statistic(st, z, compressor, levels)
    d = runs_x[0].shape[1]
    for st in stats:
        fl = _spread_floor(st, d)
        for r in roles:
            v = [raw[st][i][p] for i in range(n) for p, q in enumerate(run_roles[i]) if q == r]
            roles[r].calib[st] = _calibrate(np.array(v), fl)
        sb.agg[st] = np.array([_aggregate(_token_scores(sb, st, run_roles[i], raw[st][i]), len(run_roles[i]))
                               for i in range(n)], dtype=np.float64)
    return sb


def build_baseline(handle, prompts: Sequence[str], *, statistic: str | Sequence[str] = STATISTICS,
                   heldout: Sequence[str] = (), compressor: str = DEFAULT_COMPRESSOR, levels: int = LEVELS,
                   sites: Sequence[str] = SITES, progress: Progress | None = None,
                   cancel: threading.Event | None = None) -> Baseline:
    """Run the benign ``prompts`` through ``handle`` and calibrate every ``(layer, site)``.

    The prompts' activations are kept in memory (``n_prompts × pos × d_model`` per site: fine for the tens to
    hundreds of short prompts a scenario ships). Per site and role: centre and scale; the cross-fitted benign token
    statistics give the role's calibration and each prompt's aggregate. The threshold per statistic is the
    ``THRESHOLD_QUANTILE`` of the leave-one-out benign reference cell scores; the ``heldout`` prompts are then scored
    and the flagged share of their prompt × site cells is the measured FPR. Each held-out prompt's maximum site score
    is kept: half of them calibrate the run-level verdict, the other half measure its false-positive rate
    (:meth:`Baseline.run_calibration`); each reference prompt's maximum leave-one-out cell score is kept too.

    Example:
        >>> base = build_baseline(handle, benign_prompts, heldout=more_benign_prompts)  # doctest: +SKIP
        >>> base.save("gpt2.baseline.h5"); base.heldout_fprs  # doctest: +SKIP

    ``"bits"`` is left out for models with ``d_model < MIN_BITS_DIM``: a quantised row of so few values barely
    compresses, every token costs the same whole number of bytes and the statistic cannot tell tokens apart.

    Raises:
        CFError: fewer than 4 prompts, an unknown statistic/compressor, only ``"bits"`` asked of a model too
            narrow for it, or a benign prompt whose activations are not finite (NaN/inf: named with the site).
        BaselineError: cancelled (nothing half-built is returned).
    """
    stats = (statistic,) if isinstance(statistic, str) else tuple(statistic)
    for s in stats:
        if s not in STATISTICS:
            raise CFError(f"unknown statistic {s!r}; expected one of {', '.join(STATISTICS)}")
    if handle is not None and int(handle.d_model) < MIN_BITS_DIM and "bits" in stats:
        stats = tuple(s for s in stats if s != "bits")
        if not stats:
            raise CFError(f"the 'bits' statistic needs d_model >= {MIN_BITS_DIM} (this model has "
                          f"{handle.d_model}); use 'distance'")
    if not stats:
        raise CFError("no statistic to build a baseline for")
    if compressor not in COMPRESSORS:
        raise CFError(f"unknown compressor {compressor!r}; expected one of {', '.join(COMPRESSORS)}")
    prompts = [str(p) for p in prompts]
    heldout = [str(p) for p in heldout]
    if len(prompts) < 4:
        raise CFError(f"a CF baseline needs at least 4 benign reference prompts (got {len(prompts)})")
    keys = [(i, s) for i in range(handle.n_layers) for s in sites]
    total = len(prompts) + len(keys) + len(heldout)
    runs: list[dict[SiteKey, np.ndarray]] = []
    for n, p in enumerate(prompts):
        if _cancelled(cancel):
            raise BaselineError("baseline build cancelled")
        runs.append(_forward_sites(handle, p, keys))
        _check_benign_finite(runs[-1], "reference", n + 1, len(prompts), p)
        if progress:
            progress(n + 1, total, "baseline: benign reference runs")
    lengths = [r[keys[0]].shape[0] for r in runs]
    folds = length_folds(lengths)
    length_fold = {} if len(set(lengths)) < 2 else {int(n): int(f) for n, f in zip(lengths, folds)}
    data: dict[SiteKey, SiteBaseline] = {}
    loo: dict[str, list[np.ndarray]] = {s: [] for s in stats}
    for n, key in enumerate(keys):
        if _cancelled(cancel):
            raise BaselineError("baseline build cancelled")
        sb = _calibrate_site([r[key] for r in runs], stats, compressor, levels, folds)
        for st in stats:
            loo[st].append(_loo_scores(sb.agg[st]))  # leave-one-out score of each benign reference cell
        data[key] = sb
        if progress:
            progress(len(prompts) + n + 1, total, f"baseline: calibrating layer {key[0]} {key[1]}")
    del runs
    thresholds = {st: max(MIN_THRESHOLD, float(np.quantile(np.concatenate(loo[st]), THRESHOLD_QUANTILE)))
                  for st in stats}
    run_stats = {st: _max_over_sites(loo[st]) for st in stats}  # T_i: each reference prompt's max over sites
    base = Baseline(weights_sha256=handle.weights_sha256(), n_layers=handle.n_layers, sites=tuple(sites),
                    d_model=int(handle.d_model), statistics=stats, compressor=compressor, levels=levels,
                    prompts=prompts, heldout=heldout, sites_data=data, thresholds=thresholds,
                    heldout_fprs={st: None for st in stats}, heldout_prompt_fprs={st: None for st in stats},
                    run_statistics=run_stats, length_fold=length_fold,
                    created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), program=_program())
    base.baseline_id = hashlib.sha256((base.weights_sha256 + base.prompts_hash + ",".join(stats) + compressor
                                       + str(levels) + f"v{SCHEMA_VERSION}").encode()).hexdigest()[:16]
    if heldout:
        flagged = {st: 0 for st in stats}
        prompts_flagged = {st: 0 for st in stats}
        heldout_t: dict[str, list[float]] = {st: [] for st in stats}
        for n, p in enumerate(heldout):
            if _cancelled(cancel):
                raise BaselineError("baseline build cancelled")
            acts = _forward_sites(handle, p, keys)
            _check_benign_finite(acts, "held-out", n + 1, len(heldout), p)
            for st in stats:
                sc = [score_site(base, key, acts[key], acts[key].shape[0], st) for key in keys]
                k = sum(s.flagged for s in sc)
                flagged[st] += k
                prompts_flagged[st] += k > 0
                heldout_t[st].append(run_statistic_of(sc))  # the held-out run's statistic T
            if progress:
                progress(len(prompts) + len(keys) + n + 1, total, "baseline: held-out benign runs")
        cells = len(heldout) * len(keys)
        base.heldout_fprs = {st: flagged[st] / cells for st in stats}
        base.heldout_prompt_fprs = {st: prompts_flagged[st] / len(heldout) for st in stats}
        base.heldout_run_statistics = {st: np.array(heldout_t[st], dtype=np.float64) for st in stats}
        base.heldout_run_calibration = heldout_calibration_split(len(heldout))
        base.heldout_counts = {st: cells for st in stats}
    return base


def _program() -> str:
    try:
        from importlib.metadata import version

        return f"model-forensics-workbench {version('model-forensics-workbench')}"
    except Exception:  # noqa: BLE001 - not installed as a distribution: the name alone
        return "model-forensics-workbench"


def token_scores(base: Baseline, key: SiteKey, x: np.ndarray, n_prompt: int, statistic: str
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Token score ``[pos]`` and raw statistic ``[pos]`` of one site's activation ``x`` ``[pos, d_model]``.

    Raises:
        CFError: the baseline lacks the site or the statistic, or ``x`` has the wrong shape or non-finite values
            (NaN/inf would give a NaN score that is never flagged; the error names the positions).
    """
    sb = base.sites_data.get(key)
    if sb is None:
        raise CFError(f"the baseline has no site {key}")
    if statistic not in sb.agg:
        raise CFError(f"the baseline holds no {statistic!r} statistic (has {', '.join(base.statistics)})")
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != base.d_model:
        raise CFError(f"activation of {key} has shape {tuple(x.shape)}; expected [positions, {base.d_model}]")
    bad = _nonfinite_text(x)
    if bad:
        raise CFError(f"the activation of L{key[0]} {key[1]} has {bad}: CF scores finite activations only")
    roles = [r if r in sb.roles else "body" for r in position_roles(x.shape[0], n_prompt)]
    stat = _site_statistic(sb, x, roles, statistic, base.compressor, base.levels,
                           base.length_fold.get(int(n_prompt)))
    return _token_scores(sb, statistic, roles, stat), stat


def score_site(base: Baseline, key: SiteKey, x: np.ndarray, n_prompt: int, statistic: str) -> LayerScore:
    """Score one site's activation ``x`` ``[pos, d_model]`` (first ``n_prompt`` positions are the prompt)."""
    ts, stat = token_scores(base, key, x, n_prompt, statistic)
    agg = _aggregate(ts, n_prompt)
    score, p = _agg_score(agg, base.sites_data[key].agg[statistic])
    thr = base.thresholds[statistic]
    return LayerScore(layer=key[0], site=key[1], statistic=float(np.mean(stat[:max(1, n_prompt)])), score=score,
                      p_value=p, flagged=bool(score > thr), position_scores=tuple(float(v) for v in ts),
                      aggregate=agg)


def position_anomaly(scores: Sequence[LayerScore]) -> tuple[float, ...]:
    """Median over ``scores`` (sites) of the token score at each position."""
    if not scores:
        return ()
    n = max(len(s.position_scores) for s in scores)
    m = np.full((len(scores), n), np.nan)
    for i, s in enumerate(scores):
        m[i, :len(s.position_scores)] = s.position_scores
    out = []
    for p in range(n):
        col = m[:, p][np.isfinite(m[:, p])]
        out.append(float(np.median(col)) if col.size else float("nan"))
    return tuple(out)


# ----- baseline file ----------------------------------------------------------------------------------------------
def _str_array(values: Sequence[str]) -> np.ndarray:
    import h5py

    return np.array(list(values), dtype=h5py.string_dtype())


def save_baseline(base: Baseline, path: str | os.PathLike) -> Path:
    """Write ``base`` to HDF5 (a temporary name, then renamed). ``docs/cf.md`` documents the layout.

    Raises:
        BaselineError: the file cannot be written.
    """
    import h5py

    path = Path(path)
    try:
        with written_to_temp(path) as tmp, h5py.File(tmp, "w") as f:
            f.attrs["format"] = FORMAT_NAME
            f.attrs["schema_version"] = SCHEMA_VERSION
            f.attrs["created"] = base.created
            f.attrs["program"] = base.program
            f.attrs["baseline_id"] = base.baseline_id
            f.attrs["weights_sha256"] = base.weights_sha256
            f.attrs["n_layers"] = base.n_layers
            f.attrs["d_model"] = base.d_model
            f.attrs["sites"] = _str_array(base.sites)
            f.attrs["statistics"] = _str_array(base.statistics)
            f.attrs["roles"] = _str_array(ROLES)
            f.attrs["compressor"] = base.compressor
            f.attrs["levels"] = base.levels
            f.attrs["folds"] = next(iter(next(iter(base.sites_data.values())).roles.values())).center.shape[0]
            f.attrs["prompts_hash"] = base.prompts_hash
            f.create_dataset("length_fold", data=np.array(sorted(base.length_fold.items()), dtype=np.int64)
                             .reshape(-1, 2))
            st = h5py.string_dtype()
            f.create_dataset("prompts", data=np.array(base.prompts, dtype=object), dtype=st)
            f.create_dataset("heldout", data=np.array(base.heldout, dtype=object), dtype=st)
            f.attrs["run_quantile"] = RUN_QUANTILE
            if base.heldout_run_calibration.size == len(base.heldout) and base.heldout_run_statistics:
                f.create_dataset("heldout_run_calibration", data=base.heldout_run_calibration.astype(np.uint8))
            gs = f.create_group("statistics")
            for s in base.statistics:
                h = gs.create_group(s)
                h.attrs["threshold"] = float(base.thresholds[s])
                fpr = base.heldout_fprs.get(s)
                h.attrs["heldout_fpr"] = float("nan") if fpr is None else float(fpr)
                pf = base.heldout_prompt_fprs.get(s)
                h.attrs["heldout_prompt_fpr"] = float("nan") if pf is None else float(pf)
                h.attrs["heldout_cells"] = int(base.heldout_counts.get(s, 0))
                rc = base.run_calibration(s)
                h.attrs["run_threshold"] = float(rc.threshold)
                h.attrs["run_calibration"] = rc.source
                h.attrs["heldout_run_fpr"] = float("nan") if rc.heldout_fpr is None else float(rc.heldout_fpr)
                ref = base.run_statistics.get(s)
                ref = reference_run_statistics(base.sites_data, s) if ref is None else ref
                h.create_dataset("run_statistics", data=np.asarray(ref, dtype=np.float64))
                held = base.heldout_run_statistics.get(s)
                if held is not None and held.size == len(base.heldout) and held.size:
                    h.create_dataset("heldout_run_statistics", data=np.asarray(held, dtype=np.float64))
            g = f.create_group("sites")
            for (layer, site), sb in base.sites_data.items():
                h = g.require_group(f"L{layer:03d}").create_group(site)
                for s in base.statistics:
                    h.create_dataset(f"{s}_agg", data=sb.agg[s].astype(np.float64))
                for r, rb in sb.roles.items():
                    k = h.create_group(r)
                    k.create_dataset("center", data=rb.center.astype(np.float32))
                    k.create_dataset("scale", data=rb.scale.astype(np.float32))
                    for s in base.statistics:
                        k.create_dataset(f"{s}_calib", data=np.array(rb.calib[s], dtype=np.float64))
    except OSError as exc:
        raise BaselineError(f"cannot write the CF baseline {path}: {exc.strerror or exc}") from None
    return path


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _texts(v) -> list[str]:
    return [_text(x) for x in np.atleast_1d(v)]


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
            def attr(obj, name, where="/"):
                if name not in obj.attrs:
                    raise BaselineError(f"{path.name}: missing attribute {name!r} at {where}")
                v = obj.attrs[name]
                if isinstance(v, bytes):
                    v = v.decode()
                return v.item() if isinstance(v, np.generic) else v

            fmt = f.attrs.get("format")
            fmt = _text(fmt) if fmt is not None else None
            if fmt != FORMAT_NAME:
                raise BaselineError(f"{path.name} is not a CF baseline (format={fmt!r})")
            version = attr(f, "schema_version")
            if version != SCHEMA_VERSION:
                raise BaselineError(f"{path.name}: baseline schema version {version!r} is not supported (this "
                                    f"program reads {SCHEMA_VERSION}; rebuild it with `forensics baseline build`)")
            sha = str(attr(f, "weights_sha256"))
            if weights_sha256 is not None and sha != weights_sha256:
                raise BaselineError(f"{path.name} was built for another model: weights sha256 {sha[:12]}… does "
                                    f"not match the model's {weights_sha256[:12]}…")
            stats = tuple(_texts(attr(f, "statistics")))
            sites = tuple(_texts(attr(f, "sites")))
            roles_stored = tuple(_texts(attr(f, "roles")))
            if roles_stored != ROLES:
                raise BaselineError(f"{path.name}: built with positional roles {list(roles_stored)}, this program "
                                    f"uses {list(ROLES)}; rebuild it")
            for s in stats:
                if s not in STATISTICS:
                    raise BaselineError(f"{path.name}: unknown statistic {s!r}")
            n_layers = int(attr(f, "n_layers"))
            d_model = int(attr(f, "d_model"))
            n_folds = int(attr(f, "folds"))
            if n_folds < 1:
                raise BaselineError(f"{path.name}: folds = {n_folds}")
            data = {}
            for layer in range(n_layers):
                for site in sites:
                    where = f"sites/L{layer:03d}/{site}"
                    if where not in f:
                        raise BaselineError(f"{path.name}: missing group /{where}")
                    h = f[where]
                    roles = {}
                    for r in ROLES:
                        if r not in h:
                            continue
                        k = h[r]
                        rb = RoleBaseline(center=k["center"][()], scale=k["scale"][()])
                        if rb.center.shape != (n_folds, d_model) or rb.scale.shape != (n_folds, d_model):
                            raise BaselineError(f"{path.name}: /{where}/{r} centre/scale are not "
                                                f"[{n_folds}, {d_model}]")
                        if not (np.all(np.isfinite(rb.center)) and np.all(rb.scale > 0)):
                            raise BaselineError(f"{path.name}: /{where}/{r} has non-finite or non-positive values")
                        for s in stats:
                            cal = k[f"{s}_calib"][()]
                            if cal.shape != (3,) or not np.all(np.isfinite(cal)) or cal[1] <= 0 or cal[2] <= 0:
                                raise BaselineError(f"{path.name}: /{where}/{r}/{s}_calib is malformed")
                            rb.calib[s] = tuple(float(v) for v in cal)
                        roles[r] = rb
                    if "body" not in roles:
                        raise BaselineError(f"{path.name}: /{where} has no 'body' role")
                    sb = SiteBaseline(roles=roles)
                    for s in stats:
                        sb.agg[s] = h[f"{s}_agg"][()].astype(np.float64)
                    data[(layer, site)] = sb
            thresholds, fprs, pfprs, counts = {}, {}, {}, {}
            run_stats, held_stats = {}, {}
            n_prompts, n_heldout = int(f["prompts"].shape[0]), int(f["heldout"].shape[0])
            for s in stats:
                g = f[f"statistics/{s}"]
                thresholds[s] = float(attr(g, "threshold", f"/statistics/{s}"))
                v = float(attr(g, "heldout_fpr", f"/statistics/{s}"))
                fprs[s] = None if math.isnan(v) else v
                v = float(attr(g, "heldout_prompt_fpr", f"/statistics/{s}"))
                pfprs[s] = None if math.isnan(v) else v
                counts[s] = int(attr(g, "heldout_cells", f"/statistics/{s}"))
                for sb in data.values():
                    if sb.agg[s].shape != (n_prompts,):
                        raise BaselineError(f"{path.name}: a {s}_agg dataset is not [{n_prompts}]")
                if "run_statistics" in g:
                    run_stats[s] = g["run_statistics"][()].astype(np.float64)
                    if run_stats[s].shape != (n_prompts,):
                        raise BaselineError(f"{path.name}: /statistics/{s}/run_statistics is not [{n_prompts}]")
                else:  # written before the run-level verdict: T_i recomputed from the aggregates, as build does
                    run_stats[s] = reference_run_statistics(data, s)
                if "heldout_run_statistics" in g:  # absent (older file, no held-out prompts): not measured
                    held_stats[s] = g["heldout_run_statistics"][()].astype(np.float64)
                    if held_stats[s].shape != (n_heldout,):
                        raise BaselineError(f"{path.name}: /statistics/{s}/heldout_run_statistics is not "
                                            f"[{n_heldout}]")
            split = f["heldout_run_calibration"][()].astype(bool) if "heldout_run_calibration" in f else \
                np.zeros(0, dtype=bool)
            if held_stats and split.shape != (n_heldout,):
                raise BaselineError(f"{path.name}: /heldout_run_calibration is not [{n_heldout}]")
            base = Baseline(weights_sha256=sha, n_layers=n_layers, sites=sites, d_model=d_model,
                            statistics=stats, compressor=str(attr(f, "compressor")), levels=int(attr(f, "levels")),
                            prompts=[_text(v) for v in f["prompts"][()]], heldout=[_text(v) for v in f["heldout"][()]],
                            sites_data=data, thresholds=thresholds, heldout_fprs=fprs, heldout_counts=counts,
                            heldout_prompt_fprs=pfprs, run_statistics=run_stats,
                            heldout_run_statistics=held_stats, heldout_run_calibration=split,
                            created=str(attr(f, "created")),
                            program=str(attr(f, "program")), baseline_id=str(attr(f, "baseline_id")))
            stored_hash = str(attr(f, "prompts_hash"))
            lf = f["length_fold"][()]
            if lf.ndim != 2 or lf.shape[1] != 2 or (lf.size and not (0 <= lf[:, 1].min() and lf[:, 1].max() < n_folds)):
                raise BaselineError(f"{path.name}: /length_fold is malformed")
            base.length_fold = {int(a): int(b) for a, b in lf}
    except BaselineError:
        raise
    except (KeyError, ValueError, TypeError, OSError) as exc:
        raise BaselineError(f"{path.name}: malformed CF baseline ({exc})") from None
    if base.compressor not in COMPRESSORS:
        raise BaselineError(f"{path.name}: unknown compressor {base.compressor!r}")
    if base.prompts_hash != stored_hash:
        raise BaselineError(f"{path.name}: prompts do not match the stored prompts hash")
    return base


# ----- cache ------------------------------------------------------------------------------------------------------
def _cache_dir() -> Path:
    root = os.environ.get("FORENSICS_CACHE") or os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "model-forensics" / "cf-baselines"


def baseline_cache_paths(bundle_path: Path, sha: str) -> list[Path]:
    """Where a bundle's baseline may live: beside the bundle, then the user cache keyed by the weights sha256."""
    return [bundle_path.with_name(bundle_path.stem + ".baseline.h5"), _cache_dir() / f"{sha}.baseline.h5"]


def _fits(base: Baseline, sha: str, statistic: str, prompts, heldout, compressor: str) -> bool:
    return (base.weights_sha256 == sha and statistic in base.statistics and base.compressor == compressor
            and base.prompts_hash == prompts_hash(prompts, heldout)
            # a file written before the run verdict lacks the held-out runs' statistics: rebuilt once to measure them
            and (not heldout or statistic in base.heldout_run_statistics))


def bundle_prompts(bundle) -> tuple[list[str], list[str]]:
    """The bundle's benign reference prompts and held-out benign prompts."""
    prompts = list(getattr(bundle, "benign_prompts", None) or [])
    heldout = list(getattr(bundle, "prompt_sets", {}).get("benign_heldout", []))
    return prompts, heldout


def baseline_for_bundle(bundle, handle, *, statistic: str = DEFAULT_STATISTIC, compressor: str = DEFAULT_COMPRESSOR,
                        progress: Progress | None = None, cancel: threading.Event | None = None) -> Baseline:
    """A cached baseline that fits (same weights, statistic, prompts) or a freshly built and cached one.

    Raises:
        CFError: the bundle has no benign reference prompts (or :func:`build_baseline`'s errors).
        BaselineError: ``handle`` is not the bundle's model (checked before building anything).
    """
    prompts, heldout = bundle_prompts(bundle)
    if not prompts:
        raise CFError("the bundle has no benign reference prompts: re-record it with --benign-file, or build a "
                      "baseline with `forensics baseline build --model DIR --benign-file FILE` and pass it to "
                      "`forensics cf --baseline`")
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
    if handle.weights_sha256() != sha:  # before the build: a baseline of another model would be built and cached
        raise BaselineError(f"the model given is not the bundle's: weights sha256 {handle.weights_sha256()[:12]}… "
                            f"does not match the bundle's {sha[:12]}…; a baseline built from it would score "
                            f"another model's benign runs")
    base = build_baseline(handle, prompts, statistic=STATISTICS, heldout=heldout, compressor=compressor,
                          progress=progress, cancel=cancel)
    for p in paths:
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            save_baseline(base, p)
            break
        except (OSError, BaselineError):
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
    """Flagged sites, most anomalous first; positions = those whose token score exceeds the threshold (at most 8,
    else the top ``max_positions``)."""
    out = []
    for s in scores:
        if not s.flagged:
            continue
        ps = np.nan_to_num(np.array(s.position_scores, dtype=np.float64), nan=-np.inf)
        over = [int(i) for i in np.argsort(-ps, kind="stable") if ps[i] > threshold][:8]
        pos = over or [int(i) for i in np.argsort(-ps, kind="stable")[:max_positions]]
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

    Example:
        >>> with open_bundle("incident.h5") as b:  # doctest: +SKIP
        ...     res = run_cf(b, statistic="distance")
        ...     order = res.order_candidates(candidate_sites(b, handle))

    Raises:
        BaselineError: the baseline belongs to another model.
        CFError: no benign prompts and no baseline; unknown statistic; ``"bits"`` for a model narrower than
            ``MIN_BITS_DIM``.
    """
    t0 = time.perf_counter()
    statistic = statistic or DEFAULT_STATISTIC
    if statistic not in STATISTICS:
        raise CFError(f"unknown statistic {statistic!r}; expected one of {', '.join(STATISTICS)}")
    sha = bundle.model_info["weights_sha256"]
    d_model = int(bundle.model_info.get("d_model") or 0)
    if statistic == "bits" and 0 < d_model < MIN_BITS_DIM:  # before any baseline is looked for or built
        raise CFError(f"the 'bits' statistic needs d_model >= {MIN_BITS_DIM} (this model has {d_model}): its "
                      f"baselines hold 'distance' only; use --statistic distance")
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
                                seconds=time.perf_counter() - t0, partial=True, bundle_uuid=bundle.uuid,
                                n_prompt_tokens=int(bundle.n_prompt_tokens))
            raise
    if baseline.weights_sha256 != sha:
        raise BaselineError(f"the baseline was built for another model: weights sha256 "
                            f"{baseline.weights_sha256[:12]}… does not match the bundle's {sha[:12]}…")
    if statistic not in baseline.statistics:
        raise CFError(f"the baseline holds no {statistic!r} statistic (has {', '.join(baseline.statistics)})")
    if baseline.d_model != int(bundle.model_info.get("d_model", baseline.d_model)):
        raise BaselineError(f"the baseline has d_model {baseline.d_model}, the bundle's model "
                            f"{bundle.model_info.get('d_model')}")

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
    rc = baseline.run_calibration(statistic, keys)
    run_t = float("nan") if partial else run_statistic_of(scores)  # a partial run claims no verdict
    why = ("partial" if partial else "no_finite_score" if not math.isfinite(run_t) else
           "too_few_calibration_runs" if not rc.enough else "")
    verdict = not why and math.isfinite(rc.threshold)
    has_p = math.isfinite(run_t) and rc.values.size > 0  # the p-value is real even where no 5 % verdict can be made
    return CFResult(statistic=statistic, threshold=thr, scores=scores, findings=findings_from(scores, thr),
                    heldout_fpr=baseline.heldout_fprs.get(statistic), baseline_id=baseline.baseline_id,
                    weights_sha256=sha, seconds=time.perf_counter() - t0, partial=partial,
                    n_baseline_prompts=baseline.n_prompts, n_heldout=len(baseline.heldout),
                    compressor=baseline.compressor, bundle_uuid=bundle.uuid,
                    position_anomaly=position_anomaly(scores), n_prompt_tokens=int(bundle.n_prompt_tokens),
                    run_statistic=run_t, run_threshold=rc.threshold,
                    run_p_value=run_p_value(run_t, rc.values) if has_p else float("nan"),
                    run_anomalous=bool(run_t > rc.threshold) if verdict else None, heldout_run_fpr=rc.heldout_fpr,
                    n_run_reference=int(rc.values.size), run_calibration=rc.source, n_run_heldout=rc.n_tested,
                    run_no_verdict_reason=why)
