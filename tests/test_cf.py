"""Compression Forensics: scores on cases whose answer is known, the baseline file, cancel, and the CLI.

Constructed cases use the tiny GPT-2 of conftest (2 layers, d_model 16) and a baseline built from benign prompts
made of its vocabulary; the real case is the shipped ``gpt2-prompt-injection`` demo incident.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import threading

import h5py
import numpy as np
import pytest

from conftest import TINY_TEXTS

import engine.cf as cf
from engine.errors import BaselineError, CFError

VOCAB = sorted(set(" ".join(TINY_TEXTS).split()))
KEYS = [(layer, site) for layer in range(2) for site in cf.SITES]


def _sentences(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(VOCAB) for _ in range(rng.randint(5, 9))) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny_base(tiny_gpt2):
    """A baseline of the tiny GPT-2 (d_model 16) from 40 benign word sequences (30 more held out)."""
    return cf.build_baseline(tiny_gpt2, _sentences(1, 40), heldout=_sentences(2, 30))


@pytest.fixture(scope="module")
def demo(demo_bundle):
    """The demo bundle, its model, a baseline from its benign runs and the CF result (distance)."""
    from engine.bundle import open_bundle
    from engine.replay import load_bundle_model

    b = open_bundle(demo_bundle)
    handle = load_bundle_model(b)
    prompts, heldout = cf.bundle_prompts(b)
    base = cf.build_baseline(handle, prompts, heldout=heldout)
    path = base.save(demo_bundle.parent / "demo-test.baseline.h5")
    yield {"bundle": b, "handle": handle, "base": base, "path": path,
           "res": cf.run_cf(b, handle, baseline=base, statistic="distance")}
    b.close()


@pytest.fixture(scope="module")
def benign_run(demo):
    """A benign request the baseline never saw (the injection's counterpart) through the demo model."""
    keys = [(s.layer, s.site) for s in demo["res"].scores]
    acts = cf._forward_sites(demo["handle"], demo["bundle"].prompt_sets["counterpart"][0], keys)
    return acts, next(iter(acts.values())).shape[0]


# ----- the score on constructed cases (the demo's GPT-2, d_model 256) -------------------------------------------
def test_benign_run_scores_normal(demo, benign_run):
    acts, n = benign_run
    base = demo["base"]
    for st in cf.STATISTICS:
        scores, partial = cf.score_activations(base, acts, n, statistic=st)
        assert not partial and len(scores) == len(acts)
        # the threshold leaves ~2.5% of benign cells flagged by design: at most one marginal flag, nothing strong
        assert sum(s.flagged for s in scores) <= 1, [(s.layer, s.site, s.score) for s in scores if s.flagged]
        assert max(s.score for s in scores) < 2 * base.thresholds[st]
        assert all(0 < s.p_value <= 1 for s in scores)
        # the incident, scored the same way, is far more anomalous
        inc = cf.run_cf(demo["bundle"], demo["handle"], baseline=base, statistic=st)
        assert sum(s.flagged for s in inc.scores) >= 4 * max(1, sum(s.flagged for s in scores))


def test_injected_outlier_is_flagged_at_its_position(demo, benign_run):
    acts, n = benign_run
    base, key, p = demo["base"], (1, "mlp"), 5
    rb = base.sites_data[key].role("body")
    x = acts[key].copy()
    x[p] = rb.center[0] + 12.0 * rb.scale[0] * np.where(np.arange(x.shape[1]) % 2, 1.0, -1.0)  # 12 robust sd
    clean = cf.score_site(base, key, acts[key], n, "distance")
    hit = cf.score_site(base, key, x, n, "distance")
    assert hit.flagged and not clean.flagged, (clean.score, hit.score, base.thresholds["distance"])
    assert int(np.argmax(hit.position_scores)) == p
    assert hit.p_value < clean.p_value
    assert hit.position_scores[p] > 3 * max(v for i, v in enumerate(hit.position_scores) if i != p)
    # "bits" sees the outlier as a costlier token, but its cost saturates at 8 bits per value (int8 codes), within
    # the spread benign body tokens already have at this site: the outlier is not a compressibility anomaly
    bits_clean = cf.token_scores(base, key, acts[key], n, "bits")[1]
    bits_hit = cf.token_scores(base, key, x, n, "bits")[1]
    assert bits_hit[p] > bits_clean[p] + 1.0


def test_activation_made_constant_is_too_compressible(demo, benign_run):
    acts, n = benign_run
    base, key = demo["base"], (1, "resid_post")
    x = np.repeat(acts[key][4:5], n, axis=0)  # every position holds the same vector
    clean = cf.score_site(base, key, acts[key], n, "bits")
    const = cf.score_site(base, key, x, n, "bits")
    assert const.flagged and not clean.flagged, (clean.score, const.score, base.thresholds["bits"])
    # body positions (one standardisation) repeat exactly after quantisation: they cost a few bytes
    body = [i for i, r in enumerate(cf.position_roles(n)) if r == "body"][1:]
    raw_const = cf.token_scores(base, key, x, n, "bits")[1]
    raw_clean = cf.token_scores(base, key, acts[key], n, "bits")[1]
    assert np.mean(raw_const[body]) < 0.2 * np.mean(raw_clean[body])


def test_bits_is_refused_for_models_too_narrow_to_compress(tiny_gpt2, tiny_base):
    assert tiny_base.statistics == ("distance",)          # d_model 16: "bits" left out
    with pytest.raises(CFError, match="d_model >= 64"):
        cf.build_baseline(tiny_gpt2, _sentences(1, 8), statistic="bits")


def test_token_bits_sees_repeats_and_noise():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(6, 256)).astype(np.float32)
    b = cf.token_bits(np.vstack([z, z[2:3]]))
    assert b[-1] < 0.25 * np.median(b[:6])        # a repeated row costs almost nothing
    wide = cf.token_bits(np.vstack([z[:1], 8 * z[1:2]]))
    assert wide[1] > wide[0] + 1.0                 # 8x wider values cost more than a bit per value more


def test_order_candidates_puts_the_anomalous_position_first():
    ls = [cf.LayerScore(0, "attn", 1.0, 5.0, 0.01, True, (0.1, 0.2, 9.0, 0.3)),
          cf.LayerScore(0, "mlp", 1.0, 1.0, 0.5, False, (0.4, 0.1, 2.0, 0.2)),
          cf.LayerScore(1, "attn", 1.0, 0.5, 0.6, False, (0.3, 6.0, 1.0, 0.1))]
    res = cf.CFResult("distance", 3.0, ls, [], 0.02, "b", "w", 0.1, position_anomaly=cf.position_anomaly(ls))
    assert res.position_anomaly == pytest.approx((0.3, 0.2, 2.0, 0.2))
    cands = [(1, "attn", (1,)), (0, "mlp", (2,)), (0, "attn", (0,)), (0, "attn", (2,)), (5, "head", (2,))]
    order = res.order_candidates(cands)
    # position 2 first (highest median), within it the site with the higher token score; unscored sites last
    assert [cands[i] for i in order] == [(0, "attn", (2,)), (0, "mlp", (2,)), (0, "attn", (0,)), (1, "attn", (1,)),
                                         (5, "head", (2,))]
    back = cf.CFResult.from_dict(json.loads(json.dumps(res.to_dict())))
    assert back.order_candidates(cands) == order and back.ranking() == res.ranking()


def test_length_folds_keep_one_length_together():
    lengths = [10, 12, 10, 15, 12, 10, 18, 9]
    folds = cf.length_folds(lengths)
    assert len(set(folds)) == 5
    for a, b in zip(lengths, folds):
        assert all(f == b for L, f in zip(lengths, folds) if L == a)


# ----- the run-level (family-wise) verdict -----------------------------------------------------------------------
def test_conformal_threshold_and_the_heldout_split():
    v = np.arange(1.0, 41.0)
    assert cf.conformal_threshold(v) == 39.0                        # ceil(0.95 * 41) = 39th smallest of 40
    assert cf.conformal_threshold(np.r_[v, np.nan, np.inf]) == 39.0  # non-finite values are not runs
    assert cf.conformal_threshold(v[:10]) == 10.0                    # too few for the 95th: the largest
    assert math.isnan(cf.conformal_threshold(np.array([])))
    assert cf.run_p_value(39.5, v) == pytest.approx(2 / 41) and cf.run_p_value(0.0, v) == 1.0
    split = cf.heldout_calibration_split(96)
    assert split.sum() == 48 and not split[:48].all()                # a random half, not the first half
    assert np.array_equal(split, cf.heldout_calibration_split(96))   # the same half every time
    assert not cf.heldout_calibration_split(2 * cf.MIN_RUN_CALIBRATION - 1).any()  # too few: reference calibration


def test_demo_incident_is_anomalous_as_a_run(demo):
    base, res = demo["base"], demo["res"]
    assert res.run_anomalous is True and not res.partial
    assert res.run_statistic == max(s.score for s in res.scores) > res.run_threshold
    # calibrated on one half of the held-out benign runs, measured on the other half
    held = base.heldout_run_statistics["distance"]
    split = base.heldout_run_calibration
    assert held.shape == (len(base.heldout),) and 0 < split.sum() < split.size
    assert res.run_calibration == "heldout" and res.n_run_reference == split.sum()
    assert res.run_threshold == cf.conformal_threshold(held[split])
    assert res.run_p_value == pytest.approx((1 + np.sum(held[split] >= res.run_statistic)) / (1 + split.sum()))
    assert res.run_p_value <= 0.05
    assert res.n_run_heldout == (~split).sum()
    assert res.heldout_run_fpr == pytest.approx(np.mean(held[~split] > res.run_threshold))
    # the per-site numbers CCA relies on are those of the site test, untouched by the run verdict
    assert res.threshold == base.thresholds["distance"] and res.findings == cf.findings_from(res.scores, res.threshold)


def test_benign_run_is_not_anomalous_as_a_run(demo, benign_run):
    acts, n = benign_run
    base = demo["base"]
    for st in cf.STATISTICS:
        scores, _ = cf.score_activations(base, acts, n, statistic=st)
        rc = base.run_calibration(st)
        t = cf.run_statistic_of(scores)
        assert t <= rc.threshold, (st, t, rc.threshold)
        assert cf.run_p_value(t, rc.values) > 0.05
    # while the incident's run statistic is far above the same threshold
    assert demo["res"].run_statistic > 3 * base.run_calibration("distance").threshold


def test_run_statistics_are_the_reference_prompts_max_leave_one_out_scores(tiny_base, tmp_path):
    path = tiny_base.save(tmp_path / "tiny.baseline.h5")
    back = cf.load_baseline(path)
    st = "distance"
    # recomputed from the stored per-site aggregates, independently of the engine's helpers
    loo = np.array([[cf._agg_score(float(sb.agg[st][i]), np.delete(sb.agg[st], i))[0]
                     for i in range(back.n_prompts)] for sb in back.sites_data.values()])
    assert np.array_equal(back.run_statistics[st], loo.max(axis=0))
    assert np.array_equal(back.run_statistics[st], tiny_base.run_statistics[st])
    # 30 held-out prompts are too few to split: the reference runs calibrate, every held-out run measures
    rc = back.run_calibration(st)
    assert rc.source == "reference" and rc.threshold == cf.conformal_threshold(loo.max(axis=0))
    with h5py.File(path, "r") as f:
        assert f["statistics/distance"].attrs["run_threshold"] == rc.threshold
        held = f["statistics/distance/heldout_run_statistics"][()]
        assert f["statistics/distance"].attrs["heldout_run_fpr"] == pytest.approx(np.mean(held > rc.threshold))
    assert rc.n_tested == 30 and rc.heldout_fpr == pytest.approx(np.mean(held > rc.threshold))


def _strip_run_verdict(path) -> None:
    """Make a baseline file look as it was written before the run-level verdict existed."""
    with h5py.File(path, "r+") as f:
        if "heldout_run_calibration" in f:
            del f["heldout_run_calibration"]
        del f.attrs["run_quantile"]
        for st in f["statistics"]:
            g = f["statistics"][st]
            for name in ("run_statistics", "heldout_run_statistics"):
                if name in g:
                    del g[name]
            for a in ("run_threshold", "run_calibration", "heldout_run_fpr"):
                del g.attrs[a]


def test_old_baseline_file_recomputes_the_run_calibration(demo, tiny_base, tmp_path):
    import shutil

    path = shutil.copy(demo["path"], tmp_path / "old.baseline.h5")
    _strip_run_verdict(path)
    old = cf.load_baseline(path, weights_sha256=demo["base"].weights_sha256)
    assert old.summary()["thresholds"] == demo["base"].summary()["thresholds"]   # the site test is unchanged
    for st in cf.STATISTICS:
        assert np.array_equal(old.run_statistics[st], demo["base"].run_statistics[st])  # recomputed on load
        rc = old.run_calibration(st)
        assert rc.source == "reference" and rc.heldout_fpr is None and rc.n_tested == 0
        # the demo bundle holds 16 reference prompts: too few runs for a 5 % test, so no run threshold
        assert old.n_prompts == 16 < cf.MIN_RUN_CALIBRATION and not rc.enough and math.isnan(rc.threshold)
    res = cf.run_cf(demo["bundle"], demo["handle"], baseline=old, statistic="distance")
    assert res.run_anomalous is None and res.run_no_verdict_reason == "too_few_calibration_runs"
    assert res.heldout_run_fpr is None and res.run_calibration == "reference"
    assert res.n_run_reference == old.n_prompts and res.scores == demo["res"].scores
    ref = demo["base"].run_statistics["distance"]
    assert res.run_p_value == pytest.approx((1 + np.sum(ref >= res.run_statistic)) / (1 + ref.size))
    # an old file with enough reference prompts (40) still gives a verdict, calibrated on them as before
    tiny_path = tiny_base.save(tmp_path / "tiny-old.baseline.h5")
    _strip_run_verdict(tiny_path)
    tiny_old = cf.load_baseline(tiny_path)
    rc = tiny_old.run_calibration("distance")
    assert rc.source == "reference" and rc.enough and rc.values.size == 40
    assert rc.threshold == cf.conformal_threshold(tiny_base.run_statistics["distance"])
    # found in the cache, such a file is rebuilt once (to measure the held-out runs), not used as it is
    prompts, heldout = cf.bundle_prompts(demo["bundle"])
    sha = demo["base"].weights_sha256
    assert cf._fits(demo["base"], sha, "distance", prompts, heldout, "zlib")
    assert not cf._fits(old, sha, "distance", prompts, heldout, "zlib")


def test_run_verdict_round_trips_and_older_results_have_none(demo):
    d = json.loads(json.dumps(demo["res"].to_dict()))
    assert d["run_anomalous"] is True and d["run_calibration"] == "heldout"
    back = cf.CFResult.from_dict(d)
    for name in ("run_statistic", "run_threshold", "run_p_value", "run_anomalous", "heldout_run_fpr",
                 "n_run_reference", "run_calibration", "n_run_heldout"):
        assert getattr(back, name) == getattr(demo["res"], name), name
    older = {k: v for k, v in d.items() if not k.startswith(("run_", "heldout_run", "n_run"))}
    old = cf.CFResult.from_dict(older)
    assert old.run_anomalous is None and old.heldout_run_fpr is None and math.isnan(old.run_p_value)
    assert old.ranking() == demo["res"].ranking()


@pytest.fixture(scope="module")
def few_runs(demo):
    """The demo incident scored against baselines of its model from the first 6, 18 and 19 benign reference prompts
    of its scenario (no held-out prompts): the reference runs calibrate the run verdict."""
    import scenarios

    prompts = list(scenarios.get("gpt2-prompt-injection").benign_reference)
    out = {}
    for n in (6, 18, 19):
        base = cf.build_baseline(demo["handle"], prompts[:n], statistic="distance")
        out[n] = (base, cf.run_cf(demo["bundle"], demo["handle"], baseline=base, statistic="distance"))
    return out


def test_too_few_calibration_runs_give_no_run_verdict(few_runs):
    for n in (6, 18):
        base, res = few_runs[n]
        ref = base.run_statistics["distance"]
        assert res.run_calibration == "reference" and res.n_run_reference == n and res.n_heldout == 0
        # the smallest attainable p-value 1 / (n + 1) is above 5 %: no verdict, no run threshold, no rate
        assert res.run_anomalous is None and res.run_no_verdict_reason == "too_few_calibration_runs"
        assert math.isnan(res.run_threshold) and res.heldout_run_fpr is None
        assert not base.run_calibration("distance").enough
        # the run statistic and its p-value are still the real ones
        assert res.run_statistic == max(s.score for s in res.scores)
        assert res.run_p_value == pytest.approx((1 + np.sum(ref >= res.run_statistic)) / (1 + n))
        assert res.run_p_value >= 1 / (n + 1) > 1 - cf.RUN_QUANTILE
        d = json.loads(json.dumps(res.to_dict()))
        assert d["run_anomalous"] is None and d["run_threshold"] is None
        assert d["run_no_verdict_reason"] == "too_few_calibration_runs"
        assert d["run_min_calibration"] == cf.MIN_RUN_CALIBRATION == 19
        back = cf.CFResult.from_dict(d)
        assert back.run_anomalous is None and back.run_no_verdict_reason == "too_few_calibration_runs"
        # the per-site test does not depend on the run verdict
        assert res.findings == cf.findings_from(res.scores, res.threshold)
        s = base.summary()
        assert s["run_thresholds"]["distance"] is None and s["n_run_calibration"]["distance"] == n
    # 19 runs: the conformal 95th percentile exists (the 19th smallest of 19) and the verdict is made as before
    base, res = few_runs[19]
    ref = base.run_statistics["distance"]
    assert res.run_no_verdict_reason == "" and res.to_dict()["run_no_verdict_reason"] is None
    assert res.run_threshold == cf.conformal_threshold(ref) == ref.max()
    assert res.run_anomalous is bool(res.run_statistic > ref.max())
    assert res.run_p_value == pytest.approx((1 + np.sum(ref >= res.run_statistic)) / 20)


def test_run_no_verdict_text_says_why_and_where_the_run_stands(few_runs):
    base, res = few_runs[6]
    ref = base.run_statistics["distance"]
    text = cf.run_no_verdict_text(res.run_no_verdict_reason, n_calibration=res.n_run_reference,
                                  calibration=res.run_calibration, run_statistic=res.run_statistic,
                                  run_p_value=res.run_p_value)
    above = int(np.sum(ref < res.run_statistic))
    assert text.startswith("6 benign reference runs calibrate it; a 5% test needs at least 19 (give more benign "
                           "prompts: at least 19 with --benign-file, or 38 held-out ones with --heldout-file); ")
    assert (f"the run's max site score {cf.format_score(res.run_statistic)} exceeds "
            f"{'all 6' if above == 6 else f'{above} of 6'} (p = {res.run_p_value:.3g})") in text
    # the count is recovered from the p-value exactly, for any position of the run among the calibration runs
    v = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    for t, words in ((7.0, "all 6"), (4.5, "4 of 6"), (4.0, "3 of 6"), (0.5, "none of the 6")):
        got = cf.run_no_verdict_text("too_few_calibration_runs", n_calibration=6, calibration="reference",
                                     run_statistic=t, run_p_value=cf.run_p_value(t, v))
        assert f"exceeds {words} (p = {cf.run_p_value(t, v):.3g})" in got, got
    assert cf.run_no_verdict_text("partial", n_calibration=6, calibration="reference") == \
        "partial run: not every site was scored"


def test_an_older_result_with_too_few_runs_is_read_as_no_verdict(demo):
    d = json.loads(json.dumps(demo["res"].to_dict()))
    # as `forensics cf --out` wrote it before the rule: a verdict from 6 reference runs, without the new keys
    d.update(run_anomalous=True, n_run_reference=6, run_calibration="reference", run_p_value=1 / 7)
    del d["run_no_verdict_reason"], d["run_min_calibration"]
    old = cf.CFResult.from_dict(d)
    assert old.run_anomalous is None and old.run_no_verdict_reason == "too_few_calibration_runs"
    assert math.isnan(old.run_threshold) and old.run_p_value == pytest.approx(1 / 7)
    assert old.run_statistic == demo["res"].run_statistic
    # the shipped demo's own verdict (48 held-out calibration runs) is untouched by the round trip
    back = cf.CFResult.from_dict(json.loads(json.dumps(demo["res"].to_dict())))
    assert back.run_anomalous is True and back.run_no_verdict_reason == ""


# ----- the baseline file ----------------------------------------------------------------------------------------
def test_baseline_round_trip_scores_identically(tiny_gpt2, tiny_base, tmp_path):
    acts = cf._forward_sites(tiny_gpt2, _sentences(3, 1)[0], KEYS)
    n = acts[KEYS[0]].shape[0]
    path = tiny_base.save(tmp_path / "tiny.baseline.h5")
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.baseline.h5"]  # no temporary file left behind
    back = cf.load_baseline(path, weights_sha256=tiny_base.weights_sha256)
    assert back.summary() == tiny_base.summary()
    assert back.prompts == tiny_base.prompts and back.length_fold == tiny_base.length_fold
    for st in tiny_base.statistics:
        a, _ = cf.score_activations(tiny_base, acts, n, statistic=st)
        b, _ = cf.score_activations(back, acts, n, statistic=st)
        assert a == b


def test_baseline_file_problems_are_named(tiny_base, tmp_path):
    path = tiny_base.save(tmp_path / "b.h5")
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = 99
    with pytest.raises(BaselineError, match="schema version 99"):
        cf.load_baseline(path)
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(BaselineError, match="not an HDF5 file"):
        cf.load_baseline(tmp_path / "junk.h5")
    with pytest.raises(BaselineError, match="no such baseline file"):
        cf.load_baseline(tmp_path / "missing.h5")
    with pytest.raises(CFError, match="at least 4"):
        cf.build_baseline(None, ["a", "b"])


# ----- the real incident ----------------------------------------------------------------------------------------
def test_demo_incident_is_localised_at_the_decision_position(demo):
    from engine.cca import candidate_sites
    from engine.interventions import InterventionSet, evaluate

    b, handle, base, res = demo["bundle"], demo["handle"], demo["base"], demo["res"]
    assert base.heldout_fprs["distance"] <= 0.05 and res.heldout_fpr == base.heldout_fprs["distance"]
    assert sum(s.flagged for s in res.scores) >= len(res.scores) // 2 and res.findings
    assert res.findings == sorted(res.findings, key=lambda f: -f.score)
    # the decision position (the prompt's last token) is where the run departs from every benign run
    n = b.n_prompt_tokens
    assert int(np.argmax(res.position_anomaly[:n])) == n - 1
    # a search that follows CF's order fixes the incident within its first three single-site ablations
    cands = candidate_sites(b, handle)
    first = [cands[i] for i in res.order_candidates(cands)[:3]]
    out = evaluate(b, handle, [InterventionSet((c,)) for c in first])
    assert any(not r.failing for r in out.results), [(c.describe(), r.continuation) for c, r in zip(first, out.results)]


def test_baseline_of_another_model_is_refused(demo, tiny_base, tmp_path):
    b = demo["bundle"]
    with pytest.raises(BaselineError, match="another model") as err:
        cf.run_cf(b, demo["handle"], baseline=tiny_base)
    assert tiny_base.weights_sha256[:12] in str(err.value) and b.model_info["weights_sha256"][:12] in str(err.value)
    path = tiny_base.save(tmp_path / "tiny.h5")
    with pytest.raises(BaselineError, match="weights sha256"):
        cf.load_baseline(path, weights_sha256=b.model_info["weights_sha256"])


def test_cancel_returns_a_partial_result_in_layer_order(demo):
    b, handle, base = demo["bundle"], demo["handle"], demo["base"]
    cancel = threading.Event()
    seen, progress = [], []

    def on_layer(ls):
        seen.append((ls.layer, ls.site))
        if len(seen) == 3:
            cancel.set()

    res = cf.run_cf(b, handle, baseline=base, on_layer=on_layer, cancel=cancel,
                    progress=lambda done, total, what: progress.append((done, total)))
    assert res.partial and len(res.scores) == 3 == len(seen) < len(demo["res"].scores)
    assert seen == [(0, "resid_pre"), (0, "attn"), (0, "mlp")]
    assert progress == [(1, 16), (2, 16), (3, 16)]
    assert res.scores == demo["res"].scores[:3]          # what was scored is what a full run scores
    assert res.run_anomalous is None and math.isnan(res.run_p_value)   # a partial run claims no run verdict
    assert res.to_dict()["run_anomalous"] is None
    # cancelled before anything: no baseline to build, an empty partial result
    cancel.set()
    empty = cf.run_cf(b, handle, statistic="distance", cancel=cancel)
    assert empty.partial and empty.scores == [] and empty.run_anomalous is None


# ----- the CLI --------------------------------------------------------------------------------------------------
def _cli(capsys, *args) -> tuple[int, str, str]:
    from workbench.cli import main

    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_cf_json_and_text(demo, capsys, tmp_path):
    bundle = demo["bundle"].path
    rc, out, err = _cli(capsys, "cf", bundle, "--json", "--baseline", demo["path"], "--out", tmp_path / "cf.json")
    assert rc == 0, err
    d = json.loads(out)
    assert {"schema", "statistic", "threshold", "heldout_fpr", "scores", "findings", "position_anomaly",
            "baseline_id", "weights_sha256", "bundle_uuid", "partial"} <= set(d)
    assert d["statistic"] == cf.DEFAULT_STATISTIC and not d["partial"]
    assert d["heldout_fpr"] == pytest.approx(demo["base"].heldout_fprs[cf.DEFAULT_STATISTIC])
    assert {"layer", "site", "score", "p_value", "flagged", "position_scores"} <= set(d["scores"][0])
    assert json.loads((tmp_path / "cf.json").read_text()) == d
    assert cf.CFResult.from_dict(d).ranking() == demo["res"].ranking()
    res = demo["res"]
    assert d["run_anomalous"] is True and d["run_threshold"] == pytest.approx(res.run_threshold)
    assert d["heldout_run_fpr"] == pytest.approx(res.heldout_run_fpr) and d["run_p_value"] == res.run_p_value
    rc, out, err = _cli(capsys, "cf", bundle, "--baseline", demo["path"])
    assert rc == 0, err
    line = next(x for x in out.splitlines() if "run verdict" in x)
    assert line.strip().startswith("run verdict: ANOMALOUS")
    from engine.cf import format_score as _score

    assert f"> run threshold {_score(res.run_threshold)} " in line and f"p = {res.run_p_value:.3g}" in line
    assert f"held-out benign runs flagged: {res.heldout_run_fpr:.1%} of {res.n_run_heldout} others" in line
    rc, out, err = _cli(capsys, "cf", bundle, "--baseline", demo["path"], "--statistic", "bits")
    assert rc == 0, err
    assert "statistic=bits" in out and "held-out benign false-positive rate" in out and "findings" in out
    assert f"{demo['base'].heldout_fprs['bits']:.1%}" in out
    rc, out, err = _cli(capsys, "baseline", "info", demo["path"])
    assert rc == 0, err
    rcal = demo["base"].run_calibration("distance")
    assert (f"run verdict: threshold {_score(rcal.threshold)} (conformal 95th percentile of {rcal.values.size} "
            f"held-out benign calibration runs); held-out benign runs flagged: {rcal.heldout_fpr:.1%}") in out


def test_cli_cf_with_few_benign_prompts_and_none_held_out_says_why_there_is_no_verdict(tiny_gpt2, capsys,
                                                                                       tmp_path):
    """A user's own incident recorded with 6 benign prompts and no --heldout-file: no run verdict, said plainly, and
    the held-out rates read as not measured, in clean sentences."""
    from conftest import TINY_PROMPT

    model = tmp_path / "model"
    tiny_gpt2.model.save_pretrained(model, safe_serialization=True)
    tiny_gpt2.tokenizer.save_pretrained(model)
    (tmp_path / "benign.txt").write_text("\n".join(_sentences(5, 6)) + "\n", encoding="utf-8")
    bundle = tmp_path / "incident.h5"
    rc, out, err = _cli(capsys, "record", "--model", model, "--prompt", TINY_PROMPT, "--failure", "contains:the",
                        "--benign-file", tmp_path / "benign.txt", "--out", bundle, "--max-new-tokens", "4", "--json")
    assert rc == 0, err
    rc, out, err = _cli(capsys, "cf", bundle, "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert d["n_baseline_prompts"] == 6 and d["n_heldout"] == 0 and d["heldout_fpr"] is None
    assert d["run_anomalous"] is None and d["run_no_verdict_reason"] == "too_few_calibration_runs"
    assert d["run_threshold"] is None and d["n_run_reference"] == 6 and d["run_p_value"] >= 1 / 7
    rc, out, err = _cli(capsys, "cf", bundle)
    assert rc == 0, err
    lines = out.splitlines()
    verdict = next(x for x in lines if "run verdict" in x).strip()
    res = cf.CFResult.from_dict(d)
    above = round(6 - (res.run_p_value * 7 - 1))
    top = max(res.scores, key=lambda s: s.score)
    assert verdict == ("run verdict: none — 6 benign reference runs calibrate it; a 5% test needs at least 19 (give "
                       "more benign prompts: at least 19 with --benign-file, or 38 held-out ones with "
                       "--heldout-file); the run's max site score "
                       f"{cf.format_score(res.run_statistic)} (L{top.layer} {top.site}) exceeds "
                       f"{'all 6' if above == 6 else 'none of the 6' if above == 0 else f'{above} of 6'} "
                       f"(p = {res.run_p_value:.3g})")
    assert "ANOMALOUS" not in out and "conformal" not in verdict
    threshold = next(x for x in lines if x.strip().startswith("threshold ")).strip()
    assert threshold.endswith("; held-out benign false-positive rate not measured (no held-out benign prompts: give "
                              "some with --heldout-file)")
    assert "not measured of" not in out
    # the baseline it built and cached beside the bundle reads the same way
    rc, out, err = _cli(capsys, "baseline", "info", tmp_path / "incident.baseline.h5")
    assert rc == 0, err
    assert "held-out false-positive rate not measured (no held-out benign prompts: give some with --heldout-file)" \
        in out
    assert "run verdict: none — 6 benign reference runs calibrate it; a 5% test needs at least 19" in out
    assert "not measured of" not in out and "conformal" not in out
    rc, out, err = _cli(capsys, "baseline", "info", tmp_path / "incident.baseline.h5", "--json")
    s = json.loads(out)
    assert s["run_thresholds"]["distance"] is None and s["run_min_calibration"] == 19


def test_cli_bad_input_is_one_line(demo, tiny_base, capsys, tmp_path):
    rc, out, err = _cli(capsys, "cf", tmp_path / "missing.h5")
    assert rc != 0 and err.strip() == f"error: bundle not found: {tmp_path / 'missing.h5'}"
    other = tiny_base.save(tmp_path / "other.h5")
    rc, out, err = _cli(capsys, "cf", demo["bundle"].path, "--baseline", other)
    assert rc != 0 and len(err.strip().splitlines()) == 1 and "another model" in err and out == ""
    # and as a shell sees it: one line on stderr, no traceback, non-zero exit
    (tmp_path / "junk.h5").write_bytes(b"junk")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "workbench.cli", "cf", str(tmp_path / "junk.h5")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: ")


def test_cli_baseline_build_from_model_and_info(tiny_gpt2, capsys, tmp_path):
    model = tmp_path / "model"
    tiny_gpt2.model.save_pretrained(model, safe_serialization=True)
    tiny_gpt2.tokenizer.save_pretrained(model)
    (tmp_path / "benign.txt").write_text("\n".join(_sentences(1, 12)) + "\n", encoding="utf-8")
    (tmp_path / "heldout.txt").write_text("\n".join(_sentences(2, 6)) + "\n", encoding="utf-8")
    out_file = tmp_path / "tiny.baseline.h5"
    rc, out, err = _cli(capsys, "baseline", "build", "--model", model, "--benign-file", tmp_path / "benign.txt",
                        "--heldout-file", tmp_path / "heldout.txt", "--out", out_file, "--json")
    assert rc == 0, err
    d = json.loads(out)
    base = cf.load_baseline(out_file, weights_sha256=tiny_gpt2.weights_sha256())
    assert d["n_prompts"] == 12 == base.n_prompts and d["n_heldout"] == 6
    assert d["heldout_cells"]["distance"] == 6 * len(KEYS)
    assert d["thresholds"] == pytest.approx(base.thresholds)
    rc, out, err = _cli(capsys, "baseline", "info", out_file)
    assert rc == 0 and "12 benign reference prompts, 6 held-out" in out
    rc, out, err = _cli(capsys, "baseline", "build", "--model", model, "--out", out_file)
    assert rc != 0 and "--benign-file" in err and len(err.strip().splitlines()) == 1
