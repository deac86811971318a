"""Small statistics used by the causal analysis (CCA): intervals, empirical p-values, FDR control, rank agreement.

Every function is a plain computation on numbers already measured (no model calls).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion.

    Args:
        successes: number of successes ``k`` (0 <= k <= n).
        n: number of trials; ``n == 0`` gives ``(0.0, 1.0)`` (nothing is known).
        confidence: two-sided confidence level.

    Returns:
        ``(low, high)`` within ``[0, 1]``.
    """
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got {successes}/{n}")
    if n == 0:
        return 0.0, 1.0
    from scipy.stats import norm

    z = float(norm.ppf(0.5 + confidence / 2))
    p = successes / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    # the interval always contains p; clamp to it so that rounding cannot put 0/n's lower bound at 5.6e-17 or
    # n/n's upper bound at 0.9999999999999999 (the rate outside its own interval)
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


def empirical_p_value(observed: float, controls: Sequence[float], greater: bool = True) -> float:
    """Empirical p-value ``(1 + #{controls at least as extreme as observed}) / (1 + n)``.

    Args:
        observed: the statistic of the tested object (e.g. its flip rate).
        controls: the same statistic for ``n`` random controls.
        greater: ``True`` = larger is more extreme (``control >= observed`` counts), else smaller.
    """
    c = np.asarray(list(controls), dtype=np.float64)
    hits = int(np.sum(c >= observed)) if greater else int(np.sum(c <= observed))
    return (1 + hits) / (1 + c.size)


def bh_adjust(p_values: Mapping[str, float]) -> dict[str, float]:
    """Benjamini–Hochberg adjusted q-values (``scipy.stats.false_discovery_control``), keyed like the input."""
    if not p_values:
        return {}
    from scipy.stats import false_discovery_control

    names = list(p_values)
    ps = np.clip(np.asarray([float(p_values[k]) for k in names], dtype=np.float64), 0.0, 1.0)
    q = false_discovery_control(ps, method="bh")
    return {k: float(v) for k, v in zip(names, np.atleast_1d(q))}


def binomial_p_value(successes: int, n: int, p0: float, alternative: str = "greater") -> float:
    """Exact binomial test p-value of ``successes``/``n`` against rate ``p0`` (``scipy.stats.binomtest``)."""
    if n == 0:
        return 1.0
    from scipy.stats import binomtest

    p0 = min(max(float(p0), 1e-12), 1 - 1e-12)
    return float(binomtest(int(successes), int(n), p0, alternative=alternative).pvalue)


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman rank correlation of two equal-length sequences; ``None`` when undefined (n < 3 or constant)."""
    x = np.asarray(list(a), dtype=np.float64)
    y = np.asarray(list(b), dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"spearman needs equal lengths, got {x.shape} and {y.shape}")
    if x.size < 3 or np.all(x == x[0]) or np.all(y == y[0]):
        return None
    from scipy.stats import spearmanr

    r = spearmanr(x, y).statistic
    return None if not np.isfinite(r) else float(r)


def json_safe(obj):
    """``obj`` with every non-finite float (NaN, ±inf: "not measured") replaced by ``None``, recursively through
    dicts, lists and tuples (tuples become lists), so ``json.dumps(..., allow_nan=False)`` accepts it: standard JSON
    has no NaN, and the project's JSON files write "not measured" as ``null``.

    Example:
        >>> json_safe({"a": float("nan"), "b": [1.0, float("inf")], "c": "x"})
        {'a': None, 'b': [1.0, None], 'c': 'x'}
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj
