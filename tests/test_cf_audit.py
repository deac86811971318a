"""Audit of Compression Forensics against docs/cf.md, recomputed independently, and its edge cases.

``_recompute`` derives every number ``forensics cf --json`` reports from the definitions in docs/cf.md (*Method*)
with numpy, zlib and plain torch forward hooks on the model — nothing from ``engine.cf`` but its constants' values
written out again here. A 64-wide two-layer GPT-2 (``bits`` needs rows of >= 64 values) with 40 benign reference
prompts and 40 held-out ones (>= 38, so the run verdict is calibrated on a held-out half and measured on the other).
"""

from __future__ import annotations

import json
import math
import random
import zlib

import numpy as np
import pytest
import torch

from conftest import TINY_PROMPT, TINY_TEXTS

import engine.cf as cf
from engine.errors import BaselineError, CFError

VOCAB = sorted(set(" ".join(TINY_TEXTS).split()))
SITES = ("resid_pre", "attn", "mlp", "resid_post")
TAIL_Z = 1.6448536269514722


def _sentences(seed: int, n: int, lo: int = 5, hi: int = 9) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(VOCAB) for _ in range(rng.randint(lo, hi))) for _ in range(n)]


def _gpt2(width: int = 64, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    from conftest import build_tiny_tokenizer
    from engine.models import ModelHandle

    tok = build_tiny_tokenizer()
    cfg = GPT2Config(n_layer=2, n_embd=width, n_head=2, vocab_size=len(tok), n_positions=64,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(seed)
    return ModelHandle(model=GPT2LMHeadModel(cfg).eval(), tokenizer=tok, source="")


@pytest.fixture(scope="module")
def wide():
    return _gpt2()


# ----- the independent recomputation -------------------------------------------------------------------------------
def _capture(handle, text: str) -> dict:
    """``{(layer, site): [pos, d] float32}`` with forward hooks of our own (block input/output, c_proj outputs)."""
    model, got, hooks = handle.model, {}, []
    ids = handle.tokenizer(text, return_tensors="pt")["input_ids"]
    for L, blk in enumerate(model.transformer.h):
        def put(key, t):
            got[key] = t[0].detach().float().numpy().copy()
        hooks += [blk.register_forward_pre_hook(lambda m, a, k, L=L: put((L, "resid_pre"), a[0] if a else
                                                                          k["hidden_states"]), with_kwargs=True),
                  blk.register_forward_hook(lambda m, a, o, L=L: put((L, "resid_post"), o[0] if isinstance(o, tuple)
                                                                     else o)),
                  blk.attn.c_proj.register_forward_hook(lambda m, a, o, L=L: put((L, "attn"), o)),
                  blk.mlp.c_proj.register_forward_hook(lambda m, a, o, L=L: put((L, "mlp"), o))]
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        for h in hooks:
            h.remove()
    return got


def _roles(n: int, n_prompt: int | None = None) -> list[str]:
    n_prompt = n if n_prompt is None else n_prompt
    return ["first" if p == 0 else f"end{n_prompt - 1 - p}" if 0 <= n_prompt - 1 - p < 2 else "body"
            for p in range(n)]


def _scale(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """docs/cf.md: per-dimension median and 1.4826·MAD, the std where the MAD is 0, at least max(1e-6, 1e-3|median|)."""
    med = np.median(x, axis=0)
    mad = 1.4826 * np.median(np.abs(x - med), axis=0)
    return med, np.maximum(np.where(mad > 1e-8, mad, x.std(axis=0)), np.maximum(1e-6, 1e-3 * np.abs(med)))


def _stat(statistic: str, z: np.ndarray) -> np.ndarray:
    if statistic == "distance":
        return np.sqrt(np.mean(z.astype(np.float64) ** 2, axis=1))
    q = np.clip(np.rint(z.astype(np.float64) * 4), -127, 127).astype(np.int8)   # 4 steps per robust sd
    c = zlib.compressobj(6, zlib.DEFLATED, -15)                                    # raw deflate, one stream
    return np.array([8.0 * len(c.compress(r.tobytes()) + c.flush(zlib.Z_SYNC_FLUSH)) / r.size for r in q])


def _robust_z(a: float, bench: np.ndarray) -> tuple[float, float]:
    """docs/cf.md *Site score*: robust z against the benign aggregates and the empirical p-value."""
    med = float(np.median(bench))
    sc = 1.4826 * float(np.median(np.abs(bench - med)))
    sc = float(np.std(bench)) if sc <= 1e-12 else sc
    sc = max(sc, 1e-6, 1e-3 * abs(med), 0.1)
    return (a - med) / sc, (1 + float(np.sum(bench >= a))) / (1 + bench.size)


def _folds(lengths: list[int]) -> tuple[list[int], dict[int, int]]:
    distinct = sorted(set(lengths), key=lambda v: (-lengths.count(v), v))
    if len(distinct) < 2:
        k = max(2, min(5, len(lengths)))
        return [i % k for i in range(len(lengths))], {}
    size, fold_of = [0] * min(5, len(distinct)), {}
    for v in distinct:
        f = min(range(len(size)), key=lambda j: (size[j], j))
        fold_of[v], size[f] = f, size[f] + lengths.count(v)
    return [fold_of[v] for v in lengths], fold_of


def _recompute(handle, refs: list[str], held: list[str], incident: dict, n_prompt: int, statistic: str) -> dict:
    R = [_capture(handle, p) for p in refs]
    H = [_capture(handle, p) for p in held]
    keys = [(L, s) for L in range(handle.n_layers) for s in SITES]
    folds, length_fold = _folds([r[keys[0]].shape[0] for r in R])
    d = R[0][keys[0]].shape[1]
    spread = 8.0 / d if statistic == "bits" else 0.1
    site = {}
    for key in keys:
        X = [r[key].astype(np.float64) for r in R]
        floor = 0.01 * float(np.median(_scale(np.concatenate(X))[1]))
        params = []
        for f in sorted(set(folds)):
            by: dict[str, list] = {}
            for i, x in enumerate(X):
                if folds[i] != f:
                    for p, r in enumerate(_roles(len(x))):
                        by.setdefault(r, []).append(x[p])
            params.append({r: (c.astype(np.float32), np.maximum(s, floor).astype(np.float32))
                           for r, (c, s) in ((r, _scale(np.stack(v))) for r, v in by.items())})

        def raw(x, roles, f, params=params):
            z = np.stack([(x[p] - params[f].get(r, params[f]["body"])[0]) / params[f].get(r, params[f]["body"])[1]
                          for p, r in enumerate(roles)])
            return _stat(statistic, z)

        vals = [raw(x, _roles(len(x)), folds[i]) for i, x in enumerate(X)]
        calib = {}
        for r in ("first", "end0", "end1", "body"):
            v = np.array([vals[i][p] for i, x in enumerate(X) for p, q in enumerate(_roles(len(x))) if q == r])
            if v.size:
                m = float(np.median(v))
                calib[r] = (m, max(float(np.quantile(v, 0.95)) - m, spread),
                            max(m - float(np.quantile(v, 0.05)), spread))

        def token_score(s, roles, calib=calib):
            out = []
            for v, r in zip(s, roles):
                m, hi, lo = calib.get(r, calib["body"])
                t = TAIL_Z * (v - m) / hi if v >= m else -TAIL_Z * (m - v) / lo
                out.append(abs(t) if statistic == "bits" else t)
            return np.array(out)

        aggs = np.array([token_score(vals[i], _roles(len(x))).max() for i, x in enumerate(X)])
        site[key] = (raw, token_score, aggs, len(params))

    def score_run(acts, npr):
        out = {}
        for key in keys:
            raw, token_score, aggs, k = site[key]
            roles = _roles(acts[key].shape[0], npr)
            f = length_fold.get(npr)
            s = raw(acts[key], roles, f) if f is not None else np.mean([raw(acts[key], roles, g) for g in range(k)], 0)
            ts = token_score(s, roles)
            out[key] = (*_robust_z(float(ts[:npr].max()), aggs), ts)
        return out

    loo = [_robust_z(a[i], np.delete(a, i))[0] for _, _, a, _ in site.values() for i in range(a.size)]
    thr = max(2.0, float(np.quantile(loo, 0.975)))
    held_scores = [score_run(h, h[keys[0]].shape[0]) for h in H]
    T_held = np.array([max(v[0] for v in hs.values()) for hs in held_scores])
    mask = np.zeros(len(H), bool)
    mask[np.random.default_rng(0).permutation(len(H))[:(len(H) + 1) // 2]] = True   # the calibration half
    cal = np.sort(T_held[mask])
    run_thr = float(cal[math.ceil(round(0.95 * (cal.size + 1), 9)) - 1])
    inc = score_run(incident, n_prompt)
    T = max(v[0] for v in inc.values())
    return {"threshold": thr, "run_threshold": run_thr, "run_statistic": T,
            "heldout_fpr": float(np.mean([v[0] > thr for hs in held_scores for v in hs.values()])),
            "heldout_run_fpr": float(np.mean(T_held[~mask] > run_thr)),
            "run_p_value": (1 + float(np.sum(cal >= T))) / (1 + cal.size), "run_anomalous": bool(T > run_thr),
            "n_run_reference": int(mask.sum()), "n_run_heldout": int((~mask).sum()),
            "scores": {k: v[:2] for k, v in inc.items()}, "flagged": {k: v[0] > thr for k, v in inc.items()},
            "position_anomaly": np.median(np.stack([inc[k][2] for k in keys]), axis=0)}


@pytest.fixture(scope="module")
def audit_bundle(wide, tmp_path_factory):
    """An incident of the wide model recorded with 40 benign reference prompts and 40 held-out ones."""
    from engine.bundle import write_bundle
    from engine.recorder import record_incident

    path = tmp_path_factory.mktemp("cfaudit") / "wide.h5"
    inc = record_incident(wide, TINY_PROMPT, "contains:the", benign_prompts=_sentences(11, 40),
                          prompt_sets={"benign_heldout": _sentences(12, 40, 4, 11)}, max_new_tokens=3)
    write_bundle(path, inc)
    return path


@pytest.mark.parametrize("statistic", cf.STATISTICS)
def test_forensics_cf_json_is_what_docs_cf_md_defines(wide, audit_bundle, statistic, capsys, monkeypatch, tmp_path):
    """Every reported number of ``forensics cf --json`` equals the recomputation from the documented method."""
    from engine.bundle import open_bundle
    from workbench.cli import main

    monkeypatch.setenv("FORENSICS_CACHE", str(tmp_path))
    rc = main(["cf", str(audit_bundle), "--json", "--statistic", statistic])
    out, err = capsys.readouterr()
    assert rc == 0, err
    got = json.loads(out)
    with open_bundle(audit_bundle) as b:
        prompts, held = cf.bundle_prompts(b)
        n_prompt = int(b.n_prompt_tokens)
        incident = {(L, s): b.activation(L, s) for L in range(b.n_layers) for s in SITES}
    mine = _recompute(wide, prompts, held, incident, n_prompt, statistic)
    assert got["run_calibration"] == "heldout" and got["run_anomalous"] is mine["run_anomalous"]
    for k in ("threshold", "heldout_fpr", "run_threshold", "run_statistic", "run_p_value", "heldout_run_fpr",
              "n_run_reference", "n_run_heldout"):
        assert got[k] == pytest.approx(mine[k], rel=1e-5, abs=1e-9), k
    for s in got["scores"]:
        score, p = mine["scores"][(s["layer"], s["site"])]
        assert (s["score"], s["p_value"]) == pytest.approx((score, p), rel=1e-5, abs=1e-9), (s["layer"], s["site"])
        assert s["flagged"] is bool(mine["flagged"][(s["layer"], s["site"])])
    assert got["position_anomaly"] == pytest.approx(list(mine["position_anomaly"]), rel=1e-5, abs=1e-9)


# ----- edge cases: named errors ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_distance_base(wide):
    return cf.build_baseline(wide, _sentences(1, 12), statistic="distance")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_activation_is_a_named_error_not_an_unflagged_site(wide, tiny_distance_base, bad):
    """A NaN made the site's score NaN, never flagged and left out of the run statistic, with the smallest p-value
    (a NaN compares false with every benign aggregate); an inf gave a score the JSON writes as null."""
    x = _capture(wide, "the cat sat on the mat")[(1, "mlp")]
    x[3, 5] = bad
    with pytest.raises(CFError, match=r"L1 mlp has 1 non-finite value \((NaN|inf)\) at position 3: CF scores finite"):
        cf.score_site(tiny_distance_base, (1, "mlp"), x, x.shape[0], "distance")
    with pytest.raises(CFError, match="non-finite"):
        cf.score_activations(tiny_distance_base, {(1, "mlp"): x}, x.shape[0])


def test_benign_prompt_with_non_finite_activations_is_a_named_error():
    """A model that gives NaN on the benign prompts built a baseline of NaN centres without a word (its saved file
    is then refused as malformed, so every run built it again)."""
    handle = _gpt2(width=16, seed=3)
    with torch.no_grad():
        handle.model.transformer.h[1].mlp.c_proj.bias[0] = float("nan")
    with pytest.raises(CFError, match=r"reference benign prompt 1 of 6 \('.*'\) gives activations that are not "
                                      r"finite at L1 mlp \(\d+ non-finite values \(NaN\) at positions 0, 1"):
        cf.build_baseline(handle, _sentences(4, 6))


def test_run_cf_with_another_models_handle_builds_and_caches_nothing(wide, audit_bundle, monkeypatch, tmp_path):
    """run_cf(bundle, other_model) built a whole baseline from the other model's benign runs and cached it under the
    bundle's model's name (beside the bundle and in the user cache) before refusing it."""
    import shutil

    from engine.bundle import open_bundle

    monkeypatch.setenv("FORENSICS_CACHE", str(tmp_path / "cache"))
    bundle = shutil.copy(audit_bundle, tmp_path / "incident.h5")   # no baseline cached for it anywhere
    other = _gpt2(seed=7)
    with open_bundle(bundle) as b:
        with pytest.raises(BaselineError, match="not the bundle's: weights sha256 .* does not match"):
            cf.run_cf(b, other, statistic="distance")
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["incident.h5"]


@pytest.mark.parametrize("n", [1, 2, 3])
def test_fewer_than_four_benign_runs_is_a_named_error(wide, n):
    with pytest.raises(CFError, match=f"at least 4 benign reference prompts \\(got {n}\\)"):
        cf.build_baseline(wide, _sentences(5, n))


def test_constant_benign_site_scores_a_benign_run_zero(tiny_distance_base):
    """Zero variance: a site whose benign activations are all zero (its scale floored at 1e-6) scores a run with the
    same zeros at 0, not NaN/inf."""
    handle = _gpt2(seed=0)
    with torch.no_grad():
        handle.model.transformer.h[0].mlp.c_proj.weight.zero_()
        handle.model.transformer.h[0].mlp.c_proj.bias.zero_()
    base = cf.build_baseline(handle, _sentences(1, 12), statistic="distance")
    x = _capture(handle, "the cat sat on the mat")[(0, "mlp")]
    assert not x.any()
    s = cf.score_site(base, (0, "mlp"), x, x.shape[0], "distance")
    assert s.score == 0.0 and not s.flagged and s.p_value == 1.0


def test_cli_says_when_the_site_threshold_is_the_floor_not_the_percentile(audit_bundle, capsys, monkeypatch,
                                                                          tmp_path):
    """The threshold is max(2, 97.5th percentile); at 2 the CLI said '2 (97.5th percentile of ...)'."""
    import shutil

    import h5py

    from workbench.cli import main

    monkeypatch.setenv("FORENSICS_CACHE", str(tmp_path))
    path = tmp_path / "b.baseline.h5"
    rc = main(["baseline", "build", str(audit_bundle), "--out", str(path)])
    assert rc == 0
    with h5py.File(path, "r") as f:
        percentile = float(f["statistics/distance"].attrs["threshold"])
    assert percentile > 2.0
    rc = main(["cf", str(audit_bundle), "--baseline", str(path)])
    out = capsys.readouterr().out
    assert rc == 0 and f"threshold {percentile:.3g} (97.5th percentile of leave-one-out benign reference scores)" in out
    floored = shutil.copy(path, tmp_path / "floored.baseline.h5")
    with h5py.File(floored, "r+") as f:
        f["statistics/distance"].attrs["threshold"] = 2.0
    rc = main(["cf", str(audit_bundle), "--baseline", str(floored)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "threshold 2 (the floor: the 97.5th percentile of leave-one-out benign reference scores is lower)" in out


def test_bits_on_a_narrow_model_says_why_before_building_anything(capsys, monkeypatch, tmp_path):
    """`forensics cf --statistic bits` on a d_model-16 incident rebuilt (and re-cached) a whole baseline on every call,
    then said only "the baseline holds no 'bits' statistic (has distance)"."""
    from engine.bundle import write_bundle
    from engine.recorder import record_incident
    from workbench.cli import main

    monkeypatch.setenv("FORENSICS_CACHE", str(tmp_path / "cache"))
    handle = _gpt2(width=16)
    bundle = tmp_path / "narrow.h5"
    write_bundle(bundle, record_incident(handle, TINY_PROMPT, "contains:the", benign_prompts=_sentences(6, 8),
                                         max_new_tokens=2))
    rc = main(["cf", str(bundle), "--statistic", "bits"])
    err = capsys.readouterr().err
    assert rc != 0 and err.strip() == ("error: the 'bits' statistic needs d_model >= 64 (this model has 16): its "
                                       "baselines hold 'distance' only; use --statistic distance")
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["narrow.h5"]
