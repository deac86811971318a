"""``forensics cca`` on every shipped scenario (issue 6): the numbers each one reaches, the JSON contract, a missed
criterion said plainly, and cancelling mid-search.

The bundles are recorded here from the shipped scenarios (``build_scenario_bundle``, as ``forensics scenario build``
does) once per module, with one torch thread (see ``engine.cca.torch_threads``: on this 2-core machine two threads
were measured 10x slower); the CLI runs in-process with its defaults (CF prior, 200 controls).
"""

from __future__ import annotations

import json
import math
import threading
import time

import pytest

import scenarios
from engine.bundle import open_bundle
from engine.cca import CCAResult, run_cca, torch_threads
from engine.replay import load_bundle_model
from workbench.cli import build_scenario_bundle, main

# What each scenario reaches with the defaults: the fix set (component, layer, positions) and the evidence counts.
EXPECTED = {
    "gpt2-prompt-injection": {"set": [("attn", 0, [15])], "flips": (40, 40), "changed": (0, 96),
                              "recreated": (41, 41)},
    "gpt2-toxic-generation": {"set": [("attn", 0, [15])], "flips": (40, 40), "changed": (0, 96),
                              "recreated": (40, 41)},
    "llama-secret-leak": {"set": [("resid_pre", 0, [4])], "flips": (33, 33), "changed": (0, 145),
                          "recreated": (31, 34)},
    "bert-sentiment-bypass": {"set": [("mlp", 4, [10])], "flips": (54, 60), "changed": (0, 160),
                              "recreated": (16, 61)},
}
ELEMENT_KEYS = {"layer", "component", "positions", "op"}
RESULT_KEYS = {"flipped", "flip_rate", "side_effect_rate", "fraction_of_activations", "forward_passes", "p_value"}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("cca-scenarios")
    out = {}
    with torch_threads(1):
        for name in EXPECTED:
            path = root / f"{name}.h5"
            info = build_scenario_bundle(scenarios.get(name), path)
            assert info["failing"], name
            out[name] = path
    return out


@pytest.fixture(scope="module")
def cli_results(bundles, tmp_path_factory):
    """``forensics cca BUNDLE --json --out FILE`` per scenario: (exit code, stdout JSON, file JSON)."""
    out_dir = tmp_path_factory.mktemp("cca-results")
    return {name: _run_cli(path, out_dir / f"{name}.json") for name, path in bundles.items()}


def _run_cli(bundle, out_file, *extra):
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["cca", str(bundle), "--json", "--out", str(out_file), *extra])
    text = buf.getvalue()
    assert len(text.strip().splitlines()) == 1, "--json prints one JSON object on one line"
    return code, json.loads(text), json.loads(out_file.read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", list(EXPECTED))
def test_cli_meets_every_criterion(name, cli_results):
    code, d, written = cli_results[name]
    exp = EXPECTED[name]
    assert written == d
    res = CCAResult.from_dict(d)
    assert res.failed_criteria() == [], {k: res.criteria[k]["detail"] for k in res.failed_criteria()}
    assert code == 0 and d["flipped"] and not d["partial"]
    # the fix set
    got = [(e["component"], e["layer"], e["positions"]) for e in d["fix_set"]]
    assert got == exp["set"]
    assert all(e["op"] == "mean" and e["drop_one_failing"] for e in d["fix_set"]) and d["one_minimal"]
    # flip rate on the held-out failing variants, with its Wilson interval
    k, n = exp["flips"]
    assert (d["n_variants"], round(d["flip_rate"] * n)) == (n, k) and d["flip_rate"] >= 0.80
    lo, hi = d["flip_rate_ci"]
    assert lo <= d["flip_rate"] <= hi and lo > 0.6
    # side effects on the held-out benign prompts
    c, nb = exp["changed"]
    assert (d["n_benign"], sum(r["changed"] for r in d["side_effects"])) == (nb, c)
    assert d["side_effect_rate"] <= 0.05 and len(d["side_effects"]) == nb
    # sufficiency (failing activations written into the benign counterparts)
    r, ns = exp["recreated"]
    assert (d["n_sufficiency"], d["evidence"]["sufficiency"]["n_recreated"]) == (ns, r)
    # minimality and significance
    assert 0 < d["fraction_of_activations"] <= 0.05
    assert d["n_controls"] == 200 and d["p_value"] == pytest.approx(1 / 201)
    assert d["evidence"]["controls"]["n_at_least_as_extreme"] == 0
    assert set(d["fdr"]) >= {"flip_rate_vs_controls", "variant_flip_rate_above_control_rate"}
    assert all(0 <= q <= 1 for q in d["fdr"].values())
    # budget: real forward passes, fewer candidate sites evaluated than there are
    assert d["forward_passes"] > 0 and d["rows"] >= d["forward_passes"]
    assert 0 < d["ranking"]["candidates_evaluated"] < d["ranking"]["n_candidates"]


@pytest.mark.parametrize("name", list(EXPECTED))
def test_intervene_reports_the_search_metric_cca_reported(name, bundles, cli_results, tmp_path, capsys):
    """``forensics intervene`` (and the GUI editor, which shows the same numbers) on CCA's fix set reports CCA's
    search metric before and after, equal to the result's own (same teacher-forced forward up to float rounding).
    On the Llama incident the set makes the model say "I cannot ..." at the first generated token, so the recorded
    metric, the failing span's log-prob after the recorded prefix "The code is", does not move: the editor said
    "FIXED (log-prob of the failing text -1.16e-04 -> -1.19e-04)", a fix with no visible effect."""
    _, d, written = cli_results[name]
    result = tmp_path / "fix.json"
    result.write_text(json.dumps(written), encoding="utf-8")
    assert main(["intervene", str(bundles[name]), "--set", str(result), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["fixed"]
    before, after = s["before"]["search_metric"], s["after"]["search_metric"]
    assert before == pytest.approx(d["baseline_metric"], abs=2e-3) and before > 0
    assert after == pytest.approx(d["fixed_metric"], abs=2e-3) and after <= -1
    assert s["search_metric_change"] == pytest.approx(after - before)
    if name.startswith("bert"):      # a label incident: the failure metric is that margin already
        assert s["after"]["metric"] == pytest.approx(after)
    if name == "llama-secret-leak":
        assert abs(s["metric_change"]) < 1e-3 and s["search_metric_change"] < -20
        assert main(["intervene", str(bundles[name]), "--set", str(result)]) == 0
        text = capsys.readouterr().out
        assert "search metric 11.22" in text and "search metric -11.17" in text and "search metric change -22.38" in text


def test_json_result_has_the_keys_the_architecture_fixes(cli_results):
    _, d, _ = cli_results["gpt2-prompt-injection"]
    assert RESULT_KEYS <= set(d)
    for e in d["fix_set"]:
        assert ELEMENT_KEYS <= set(e)
        assert isinstance(e["layer"], int) and isinstance(e["positions"], list)
    assert isinstance(d["flipped"], bool) and isinstance(d["forward_passes"], int)
    for k in ("flip_rate", "side_effect_rate", "fraction_of_activations", "p_value"):
        assert isinstance(d[k], float) and math.isfinite(d[k])
    again = CCAResult.from_dict(json.loads(json.dumps(d))).to_dict()
    assert again["fix_set"] == d["fix_set"] and again["criteria"] == d["criteria"]


def test_missed_criterion_is_named_with_its_size(bundles, tmp_path, capsys):
    """50 controls cannot give p < 0.01 (the smallest possible p is 1/51): exit 1, MISSED p_value with the gap."""
    code = main(["cca", str(bundles["gpt2-prompt-injection"]), "--controls", "50", "--no-cf"])
    out = capsys.readouterr().out
    assert code == 1
    missed = [ln for ln in out.splitlines() if ln.strip().startswith("MISSED")]
    assert len(missed) == 1 and "p_value" in missed[0], out
    assert "p = 0.0196 from 50 controls" in missed[0] and "fewer than 200 controls" in missed[0]
    assert "0.0096 above 0.01" in missed[0]
    element = [ln for ln in out.splitlines() if ln.startswith("    L0.attn@15")]   # the demo's fix, and its token
    assert len(element) == 1 and element[0].endswith("(necessary) at ':'"), out


@pytest.fixture(scope="module")
def demo(bundles):
    with open_bundle(bundles["gpt2-prompt-injection"]) as b:
        yield b, load_bundle_model(b)


def _cancel_when(demo, should_cancel):
    """Run CCA on a thread; when ``should_cancel(kind, payload)`` first says so, set the event from this thread and
    time how long the run takes to return."""
    b, h = demo
    cancel, armed = threading.Event(), threading.Event()
    box: dict = {}

    def on_step(d):
        if should_cancel("step", d):
            armed.set()

    def progress(done, total, what):
        if should_cancel("progress", what):
            armed.set()

    def work():
        box["res"] = run_cca(b, h, n_controls=2000, progress=progress, on_step=on_step, cancel=cancel)
        box["t"] = time.perf_counter()

    th = threading.Thread(target=work)
    th.start()
    assert armed.wait(120), "the run never reached the point to cancel at"
    t0 = time.perf_counter()
    cancel.set()
    th.join(30)
    assert not th.is_alive()
    return box["res"], box["t"] - t0


def test_cancel_mid_search_returns_partial_within_half_a_second(demo):
    res, dt = _cancel_when(demo, lambda kind, d: kind == "step" and d["stage"] == "search")
    print(f"cancel mid-search -> returned in {dt:.3f} s")
    assert dt < 0.5, f"cancel took {dt:.3f} s"
    assert res.partial and not res.flipped
    assert res.fix_set and res.forward_passes > 0 and math.isfinite(res.fixed_metric)  # the best set so far
    assert res.trace and res.trace[-1]["stage"] == "search"
    assert res.to_dict()["partial"] is True
    # its best set was never run on the incident: it has no verdict there, rather than "does not fix"
    assert not res.checked
    crit = res.criteria
    for key in ("incident_flipped", "one_minimal"):
        assert crit[key]["value"] is None and not crit[key]["ok"]
        assert crit[key]["detail"].startswith("not measured: the run was cancelled before the set was checked")
    from engine.certificate import certificate_status, verdict_sentence

    doc = {"cca": res.to_dict(), "incident": {"failure": {"spec": "contains:HACKED"}}, "replay": {}}
    assert "was not checked on the incident" in verdict_sentence(doc) and "does NOT" not in verdict_sentence(doc)
    status = certificate_status(doc)
    assert status["level"] == "not-certified" and "the fix set was not checked on the incident" in status["reasons"]


def test_cancel_during_controls_keeps_the_measured_evidence(demo):
    res, dt = _cancel_when(demo, lambda kind, d: kind == "progress" and str(d).startswith("significance"))
    print(f"cancel during controls -> returned in {dt:.3f} s")
    assert dt < 0.5, f"cancel took {dt:.3f} s"
    assert res.partial and res.flipped and res.n_variants == 40 and res.flip_rate == 1.0
    assert res.checked and res.criteria["incident_flipped"]["value"] == 1.0   # checked before the cancel
    assert res.fix_set[0].intervention.describe() == "L0.attn@15:mean"


def test_units_refine_the_demo_attention_to_heads(bundles, cli_results, tmp_path):
    """``--units``: the demo's attention element becomes a few of its 8 heads, touching fewer values, and every
    criterion still holds."""
    code, d, _ = _run_cli(bundles["gpt2-prompt-injection"], tmp_path / "units.json", "--units")
    assert code == 0 and not CCAResult.from_dict(d).failed_criteria()
    (e,) = d["fix_set"]
    assert (e["component"], e["layer"], e["positions"]) == ("head", 0, [15])
    assert 1 <= len(e["indices"]) < 8 and e["drop_one_failing"]
    default = cli_results["gpt2-prompt-injection"][1]
    assert d["fraction_of_activations"] == pytest.approx(default["fraction_of_activations"] * len(e["indices"]) / 8)
    assert d["flip_rate"] >= 0.8 and d["p_value"] < 0.01
    (note,) = d["ranking"]["unit_refinement"]
    assert note["refined_metric"] <= 0.5 * note["whole_metric"]   # kept at least half the whole element's effect


def test_group_tests_clear_sites_and_every_fixing_set_was_evaluated_alone(cli_results):
    """The default search screens positions by group testing in CF's order: some sites are cleared by a union that
    does not fix (never evaluated alone), and every set in the selection table carries its own measured metric."""
    for name in EXPECTED:
        rk = cli_results[name][1]["ranking"]
        assert rk["group_tests"] > 0, name
        assert rk["candidates_evaluated"] <= rk["candidates_resolved"] <= rk["n_candidates"]
        assert rk["order"].startswith("CF position anomaly"), rk["order"]
        sel = rk["selection"]
        assert all(len(r["set"]) == 1 and r["metric"] <= -1.0 for r in sel), name
        chosen = sel[0]
        assert chosen["confirmed"] and not chosen["changed_is_lower_bound"]
        assert chosen["n_benign_reference_run"] == chosen["n_benign_reference"]
