"""Audit of engine/stats.py against independent references (scipy), edge cases included."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest, false_discovery_control

from engine import stats


def test_wilson_interval_matches_scipy_and_contains_the_rate_at_the_extremes():
    # 0/n must give a lower bound of exactly 0 and n/n an upper bound of exactly 1 (the formula's centre - half
    # and centre + half round to 5.6e-17 / 0.9999999999999999 for many n), so the rate lies inside its interval
    for n in range(1, 41):
        for k in range(n + 1):
            lo, hi = stats.wilson_interval(k, n)
            ci = binomtest(k, n).proportion_ci(0.95, method="wilson")
            assert lo == pytest.approx(ci.low, abs=1e-12) and hi == pytest.approx(ci.high, abs=1e-12), (k, n)
            assert lo <= k / n <= hi, (k, n, lo, hi)
    for n in range(1, 1000):
        assert stats.wilson_interval(0, n)[0] == 0.0, n
        assert stats.wilson_interval(n, n)[1] == 1.0, n


def test_bh_adjust_matches_scipy_and_keeps_the_keys():
    rng = np.random.default_rng(1)
    p = rng.uniform(0, 0.2, size=7)
    names = [f"c{i}" for i in range(7)]
    q = stats.bh_adjust(dict(zip(names, p)))
    want = false_discovery_control(p, method="bh")
    assert list(q) == names
    for k, w in zip(names, want):
        assert q[k] == pytest.approx(w, rel=1e-12)


def test_empirical_p_value_counts_ties_as_at_least_as_extreme():
    assert stats.empirical_p_value(0.5, [0.5, 0.4, 0.6, 0.1]) == pytest.approx(3 / 5)
    assert stats.empirical_p_value(0.5, [0.5, 0.4, 0.6, 0.1], greater=False) == pytest.approx(4 / 5)


def _result(controls: dict | None, n_controls: int, p_value: float):
    from engine.cca import CCAResult

    return CCAResult(fix_set=[], flipped=True, baseline_metric=1.0, fixed_metric=-1.0, flip_rate=0.9,
                     flip_rate_ci=stats.wilson_interval(36, 40), n_variants=40, sufficiency_rate=1.0,
                     side_effect_rate=0.0, side_effect_kl=0.0, side_effects=[], n_benign=96,
                     fraction_of_activations=0.01, one_minimal=True, p_value=p_value, control_flip_rates=[],
                     n_controls=n_controls, fdr={}, criteria={}, forward_passes=1, seconds=0.0, partial=False,
                     trace=[], ranking={}, n_sufficiency=40, evidence={"controls": controls} if controls else {})


def test_claims_against_the_control_rate_need_a_measured_control_rate():
    # no control set run (--controls 0), or controls that ran no prompt: there is no measured per-prompt control
    # flip rate, so no claim is tested against one (an assumed 5% stood in before)
    from engine.cca import _fdr

    for res in (_result(None, 0, float("nan")), _result({"first_block_flips": 0, "first_block_rows": 0}, 200, 1.0)):
        _fdr(res)
        assert not any("control_rate" in k for k in res.fdr), res.fdr
        assert "side_effects_below_5pct" in res.fdr
        # 0 of 96 benign prompts changed: the one-sided test that the side-effect rate is below 5%
        assert res.evidence["claim_p_values"]["side_effects_below_5pct"] == pytest.approx(0.95 ** 96)
    measured = _result({"first_block_flips": 3, "first_block_rows": 200}, 200, 1 / 201)
    _fdr(measured)
    rate = 4 / 201
    want = binomtest(36, 40, rate, alternative="greater").pvalue
    assert measured.evidence["claim_p_values"]["variant_flip_rate_above_control_rate"] == pytest.approx(want)
    assert set(measured.fdr) == {"flip_rate_vs_controls", "variant_flip_rate_above_control_rate",
                                 "sufficiency_above_control_rate", "side_effects_below_5pct"}
    # the reported q-values are Benjamini-Hochberg across every claim, not the claims' own p-values
    names = sorted(measured.fdr)
    ps = [measured.evidence["claim_p_values"][k] for k in names]
    assert [measured.fdr[k] for k in names] == pytest.approx(list(false_discovery_control(ps, method="bh")))
    assert [measured.fdr[k] for k in names] != pytest.approx(ps)


def test_claims_leave_out_what_the_set_was_chosen_on():
    # the search chose the set on the incident and checked it on the incident's own counterpart pair: controls that
    # fell back to the incident (no failing variants) make no flip-rate claim, and the sufficiency claim is the
    # held-out pairs' (40 pairs counted, the incident's among them: 39 held out, 38 of them recreated)
    from engine.cca import _fdr

    ctl = {"first_block_flips": 3, "first_block_rows": 200}
    fell_back = _result(dict(ctl, held_out=False), 200, 1 / 201)
    _fdr(fell_back)
    assert "flip_rate_vs_controls" not in fell_back.fdr and "variant_flip_rate_above_control_rate" in fell_back.fdr
    res = _result(dict(ctl, held_out=True), 200, 1 / 201)
    res.sufficiency_rate = 39 / 40
    res.evidence["sufficiency"] = {"incident_pair_counted": True, "incident_pair_recreated": True}
    _fdr(res)
    want = binomtest(38, 39, 4 / 201, alternative="greater").pvalue
    assert res.evidence["claim_p_values"]["sufficiency_above_control_rate"] == pytest.approx(want)
    assert "flip_rate_vs_controls" in res.fdr
    only_own = _result(dict(ctl, held_out=True), 200, 1 / 201)
    only_own.n_sufficiency = 1
    only_own.evidence["sufficiency"] = {"incident_pair_counted": True, "incident_pair_recreated": True}
    _fdr(only_own)
    assert "sufficiency_above_control_rate" not in only_own.fdr
