"""A planted fault (issue 6): a tiny GPT-2 edited by the test so that a trigger token makes it say "cat", the fault
living in one MLP neuron of a known layer. CCA must put the fix set on the planted layer, and with the fault planted
redundantly in two layers (either one alone still fails) on both of them, and nowhere else."""

from __future__ import annotations

import pytest

from conftest import build_tiny_tokenizer
from engine.bundle import open_bundle
from engine.cca import evaluate_fix_set, run_cca, torch_threads
from engine.interventions import Intervention
from engine.stats import wilson_interval
from scenarios.planted import planted_bundle as _planted_bundle


def planted_bundle(path, layers: tuple[int, ...]):
    """The planted-fault incident (``scenarios.planted``) over the tests' tiny tokenizer: prompts of 3 to 7 words
    and a last word, the incident ``the dog ran to the park HACKED``."""
    return _planted_bundle(path, layers, tokenizer=build_tiny_tokenizer())


@pytest.mark.parametrize("layer", [1, 2])
def test_fix_set_lands_on_the_planted_layer(layer, tmp_path):
    path = tmp_path / "planted.h5"
    with torch_threads(1):
        h = planted_bundle(path, (layer,))
        calls = []          # every forward of the model, to check the budget CCA reports
        hook = h.model.register_forward_pre_hook(lambda module, args: calls.append(1))
        with open_bundle(path) as b:
            res = run_cca(b, h, n_controls=0)
        hook.remove()
    assert res.forward_passes == len(calls) > 0
    sites = [(e.intervention.layer, e.intervention.component, e.intervention.positions) for e in res.fix_set]
    last = b.n_prompt_tokens - 1
    assert sites == [(layer, "mlp", (last,))], res.ranking.get("selection")
    assert res.flipped and res.one_minimal and not res.partial
    assert res.flip_rate == 1.0 and res.n_variants == 12
    assert res.flip_rate_ci == wilson_interval(12, 12) and res.flip_rate_ci[0] < 0.8    # 12 of 12: CI [0.76, 1]
    assert res.side_effect_rate == 0.0 and res.sufficiency_rate == 1.0
    # the residual stream at the trigger also fixes (it removes the trigger itself), but is not specific: measured
    chosen, *others = res.ranking["selection"]
    assert chosen["benign_reference_changed"] == 0 and chosen["sufficient_on_counterpart"] is True
    resid = [o for o in others if o["set"] == [f"L0.resid_pre@{last}:mean"]]
    assert resid, "the token ablation of the trigger fixes teacher-forced and was screened"
    with torch_threads(1), open_bundle(path) as b:
        alt = evaluate_fix_set(b, h, [Intervention(0, "resid_pre", (last,), "mean")], n_controls=0)
    assert alt.flipped and alt.side_effect_rate > 0.5
    # the fix set with an element that does nothing added: still a fix, but not 1-minimal, and the criterion says
    # which element is not needed
    padded = [res.fix_set[0].intervention, Intervention(0, "attn", (0,), "mean")]
    with torch_threads(1), open_bundle(path) as b:
        more = evaluate_fix_set(b, h, padded, n_controls=0)
    assert more.flipped and not more.one_minimal and not more.criteria["one_minimal"]["ok"]
    assert [e.drop_one_failing for e in more.fix_set] == [True, False]
    # the idle element alone: no fix, and transplanting the failing run's activations there into the benign
    # counterparts re-creates the failure in none of them
    with torch_threads(1), open_bundle(path) as b:
        idle = evaluate_fix_set(b, h, padded[1:], n_controls=0)
    assert not idle.flipped and idle.flip_rate == 0.0 and idle.sufficiency_rate == 0.0 and idle.n_sufficiency > 0


def test_redundant_plant_needs_both_layers(tmp_path):
    """Planted in layers 1 and 2: removing either neuron's layer alone leaves the other firing. The fix set is both
    MLPs at the trigger, 1-minimal, found by extending single sites (beam search), not the residual stream."""
    path = tmp_path / "planted2.h5"
    with torch_threads(1):
        h = planted_bundle(path, (1, 2))
        with open_bundle(path) as b:
            res = run_cca(b, h, n_controls=0, max_size=3)
    last = b.n_prompt_tokens - 1
    sites = sorted((e.intervention.layer, e.intervention.component, e.intervention.positions) for e in res.fix_set)
    assert sites == [(1, "mlp", (last,)), (2, "mlp", (last,))]
    assert res.flipped and res.one_minimal
    assert all(e.drop_one_failing for e in res.fix_set)          # each one is necessary ...
    assert all(e.single_metric > 0 for e in res.fix_set)          # ... and neither fixes alone
    assert res.flip_rate == 1.0 and res.side_effect_rate == 0.0
    assert any(r["round"].startswith("size 2") for r in res.ranking["rounds"])

def test_a_fault_written_by_three_blocks_is_fixed_by_all_three(tmp_path, capsys):
    """Planted in layers 1, 2 and 3: with one or two of the three MLPs ablated the rest still write the target (the
    final layer norm scales it back up), so no single site and no pair lowers the metric and the beam has nothing to
    follow. The residual stream at the trigger fixes, but changes most benign outputs. The union of every attn / mlp
    output at the trigger, pruned, is the three MLPs: a 1-minimal set with no side effects. With ``--max-size 2``
    that set is out of reach: the result misses the side-effect criterion, and says a set of 3 exists."""
    from workbench.cli import main
    from workbench.views.cca_view import summary_lines

    path = tmp_path / "planted3.h5"
    with torch_threads(1):
        h = planted_bundle(path, (1, 2, 3))
        with open_bundle(path) as b:
            res = run_cca(b, h, max_size=3)      # with the 200 control sets: every criterion is measured
    last = b.n_prompt_tokens - 1
    sites = [(e.intervention.layer, e.intervention.component, e.intervention.positions) for e in res.fix_set]
    assert sites == [(1, "mlp", (last,)), (2, "mlp", (last,)), (3, "mlp", (last,))], res.ranking["selection"]
    assert res.flipped and res.one_minimal and not res.failed_criteria() and res.n_controls == 200
    assert all(e.drop_one_failing and e.single_metric > 0 for e in res.fix_set)
    assert res.flip_rate == 1.0 and res.side_effect_rate == 0.0 and res.sufficiency_rate == 1.0
    rounds = [r["round"] for r in res.ranking["rounds"]]
    assert "size 2 extensions" in rounds and "size 3 extensions" in rounds      # the beam ran first, found no clean
    union = res.ranking["rounds"][-1]                                           # set, and the union found this one
    assert union["round"].startswith(f"sublayer union at position {last}") and union["fixing_teacher_forced"] == 1
    assert union["set"] == [e.intervention.describe() for e in res.fix_set]
    resid = [r for r in res.ranking["selection"] if r["set"] == [f"L1.resid_pre@{last}:mean"]]
    assert resid and resid[0]["benign_reference_changed"] > 0.5 * resid[0]["n_benign_reference"]

    code = main(["cca", str(path), "--max-size", "2", "--controls", "0", "--no-cf"])
    out = capsys.readouterr().out
    assert code == 1
    assert any(ln.strip().startswith("MISSED side_effect_rate") for ln in out.splitlines()), out
    note = [ln for ln in out.splitlines() if ln.strip().startswith("note:")]
    assert note == [f"  note: 3 sublayer sites fix the incident teacher-forced only all together "
                    f"(L1.mlp@{last}:mean, L2.mlp@{last}:mean, L3.mlp@{last}:mean), more than --max-size 2: search "
                    f"again with --max-size 3"], out
    with torch_threads(1), open_bundle(path) as b:
        small = run_cca(b, h, n_controls=0, max_size=2)
    assert "side_effect_rate" in small.failed_criteria()
    assert summary_lines(small)[-1].startswith("Note: 3 sublayer sites fix the incident only all together")
    assert not any(ln.startswith("Note:") for ln in summary_lines(res))


def test_a_fault_relayed_from_inside_the_prompt_is_fixed_where_the_trigger_sits(tmp_path):
    """The trigger sits inside the prompt (the last word is benign): the planted MLP writes a flag at the trigger's
    position, and head 0 of layers 2 and 3 each carry it to the last position, where either one alone still makes
    the model say the target. So no single site at the decision position fixes but the residual stream there, and
    the fix lands away from it: the planted MLP at the trigger's position. The token ablation of the trigger fixes as
    cleanly (and is found first), but random residual-stream controls at the trigger's position fix too (p above
    0.01 on this 17-token prompt); the search also screens the trigger's position and reports the narrower MLP,
    which meets every criterion. On the variants the trigger sits elsewhere, and the position rule follows it."""
    from scenarios.planted import TRIGGER

    path = tmp_path / "planted-relay.h5"
    tok = build_tiny_tokenizer()
    with torch_threads(1):
        h = _planted_bundle(path, (1,), relay=(2, 3), tokenizer=tok, words=(12, 16))
        with open_bundle(path) as b:
            res = run_cca(b, h)
            ids = [int(t) for t in b.input_ids[:b.n_prompt_tokens]]
    last = len(ids) - 1
    trig = ids.index(tok.convert_tokens_to_ids(TRIGGER))
    assert 0 < trig < last - 2
    sites = [(e.intervention.layer, e.intervention.component, e.intervention.positions) for e in res.fix_set]
    assert sites == [(1, "mlp", (trig,))], res.ranking["selection"]
    assert res.flipped and res.one_minimal and not res.failed_criteria(), res.failed_criteria()
    assert res.flip_rate == 1.0 and res.n_variants == 12 and res.sufficiency_rate == 1.0
    assert res.side_effect_rate == 0.0 and res.p_value < 0.01
    token = [r for r in res.ranking["selection"] if r["set"] == [f"L0.resid_pre@{trig}:mean"]]
    assert token and token[0]["benign_reference_changed"] == 0        # as clean, but the residual stream
    assert any(r["round"].startswith(f"position {trig} ") and "residual-stream fix" in r["round"]
               for r in res.ranking["rounds"])
    with torch_threads(1), open_bundle(path) as b:
        alone = [evaluate_fix_set(b, h, [Intervention(L, "attn", (last,), "mean")], n_controls=0) for L in (2, 3)]
        both = evaluate_fix_set(b, h, [Intervention(L, "attn", (last,), "mean") for L in (2, 3)], n_controls=0)
        token_set = evaluate_fix_set(b, h, [Intervention(0, "resid_pre", (trig,), "mean")])
        where = {ids_.index(tok.convert_tokens_to_ids(TRIGGER)) - len(ids_)
                 for ids_ in (tok(v)["input_ids"] for v in b.prompt_sets["variants"])}
    assert not any(r.flipped for r in alone) and both.flipped      # each relay alone carries the failure
    assert token_set.flipped and token_set.side_effect_rate == 0.0 and token_set.p_value > 0.01
    assert len(where) > 3, where                                    # the trigger's place, counted from the end


def test_token_ablations_are_group_tested_on_a_long_prompt(tmp_path):
    """Token ablations cost far fewer rows than the prompt has tokens when few tokens matter (unions of positions
    that do not fix are cleared in one row), and the trigger's token ablation is still evaluated on its own."""
    path = tmp_path / "planted-long.h5"
    with torch_threads(1):
        h = _planted_bundle(path, (2,), words=40)
        with open_bundle(path) as b:
            msgs = []
            res = run_cca(b, h, evidence=False, n_controls=0, progress=lambda k, t, what: msgs.append((k, what)))
            n = int(b.n_prompt_tokens)
    # progress within the search stage: how many candidate sites are settled so far, passes used, best metric
    resolved = [int(w.split(" of ")[0].split()[-1]) for k, w in msgs if w.startswith("screening:")]
    total = res.ranking["n_candidates"]
    assert len(resolved) >= 2 and resolved == sorted(resolved) and 0 < resolved[-1] <= total, msgs
    assert all(f"of {total} candidate sites resolved" in w and "passes" in w and "best metric" in w
               for k, w in msgs if w.startswith("screening:"))
    tok = res.ranking["rounds"][0]
    assert tok["round"].startswith("token ablations") and tok["sites"] == n == 41
    assert tok["group_tests"] > 0 and tok["rows"] < n // 2, tok
    trigger = [r for r in res.ranking["selection"] if r["set"] == [f"L0.resid_pre@{n - 1}:mean"]]
    assert trigger, "the trigger's token ablation fixes teacher-forced and was evaluated alone"
    assert [e.intervention.describe() for e in res.fix_set] == [f"L2.mlp@{n - 1}:mean"]


def test_side_effect_kl_is_kl_of_the_baseline_from_the_intervened_distribution(tmp_path):
    """Each side-effect row's KL is KL(baseline || intervened) of the next-token distribution after the prompt
    (documented direction), checked against plain forwards of the same prompts."""
    import torch

    from engine.behaviour import encode
    from engine.interventions import InterventionSet, run_with_interventions

    path = tmp_path / "planted.h5"
    iv = Intervention(1, "resid_post", "all", "scale", value=0.2)
    with torch_threads(1):
        h = planted_bundle(path, (1,))
        with open_bundle(path) as b:
            res = evaluate_fix_set(b, h, [iv], n_controls=0)
            prompts = list(b.prompt_sets["benign_heldout"])[:6]
        rows = {r["prompt"]: r for r in res.side_effects}
        kls = []
        for p in prompts:
            ids = encode(h, p)["input_ids"]
            with torch.no_grad():
                lp0 = torch.log_softmax(h.model(ids).logits[0, -1].float(), -1)
                lp1 = torch.log_softmax(run_with_interventions(h, ids, [InterventionSet((iv,))])[0, -1].float(), -1)
            kls.append(float((lp0.exp() * (lp0 - lp1)).sum()))
            reverse = float((lp1.exp() * (lp1 - lp0)).sum())
            assert rows[p]["kl"] == pytest.approx(kls[-1], rel=1e-3, abs=1e-6), (p, reverse)
    assert max(kls) > 1e-3            # the scale changes the distributions: the check is not 0 == 0


def test_a_set_with_an_idle_element_is_pruned_to_the_planted_site(tmp_path, monkeypatch):
    """Pruning to 1-minimal: when the search's chosen set carries an element that is not needed (here added to
    what the search chose), the final fix set drops it, and the result is 1-minimal."""
    import engine.cca as cca

    best = cca._Chooser.best
    idle = Intervention(0, "attn", (0,), "mean")

    def padded(self):
        r = best(self)
        return None if r is None else dict(r, set=(idle, *r["set"]))

    monkeypatch.setattr(cca._Chooser, "best", padded)
    path = tmp_path / "planted.h5"
    with torch_threads(1):
        h = planted_bundle(path, (1,))
        with open_bundle(path) as b:
            res = run_cca(b, h, n_controls=0, evidence=False)
    last = b.n_prompt_tokens - 1
    assert [(e.intervention.layer, e.intervention.component, e.intervention.positions) for e in res.fix_set] == \
        [(1, "mlp", (last,))]
    assert res.flipped and res.one_minimal
    assert any(t["stage"] == "prune" for t in res.trace)
