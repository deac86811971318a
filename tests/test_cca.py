"""Tests of the causal minimal fix set search (engine/cca.py) and its statistics (engine/stats.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine import stats


def test_wilson_interval_known_values():
    lo, hi = stats.wilson_interval(8, 10)
    assert abs(lo - 0.4902) < 1e-3 and abs(hi - 0.9433) < 1e-3  # textbook values for 8/10 at 95%
    assert stats.wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = stats.wilson_interval(40, 40)
    assert hi == 1.0 and 0.9 < lo < 0.92


def test_empirical_p_value_and_bh():
    assert stats.empirical_p_value(1.0, [0.0] * 200) == pytest.approx(1 / 201)
    assert stats.empirical_p_value(0.0, [0.0] * 9) == 1.0
    q = stats.bh_adjust({"a": 0.01, "b": 0.04, "c": 0.03})
    assert q["a"] == pytest.approx(0.03) and q["b"] == pytest.approx(0.04) and q["c"] == pytest.approx(0.04)


def test_spearman():
    assert stats.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert stats.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert stats.spearman([1, 1, 1], [1, 2, 3]) is None
