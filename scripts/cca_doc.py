"""Write docs/cca.md: the CCA method, and what it measures on every shipped scenario (run: python scripts/cca_doc.py).

Every number in the document comes from this run: each scenario is recorded fresh (as ``forensics scenario build``
does), ``forensics cca`` runs on it with its defaults (and once more with ``--units``), and ``benchmarks/cca.py``
measures the search budget and the ranking. The prose is fixed text in this script; the tables and the CLI output are
pasted from the measurements. ``--json FILE`` also keeps the raw measurements.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import cca as bench  # noqa: E402  (benchmarks/cca.py)
import cca_scaling as scaling  # noqa: E402  (benchmarks/cca_scaling.py)

from engine.cca import TARGETS  # noqa: E402
from workbench.cli import main as cli  # noqa: E402

OUT = ROOT / "docs" / "cca.md"


def run_cli(bundle: Path, out_json: Path, *extra: str) -> tuple[int, str, dict]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        code = cli(["cca", str(bundle), "--out", str(out_json), *extra])
    text = "\n".join(ln for ln in buf.getvalue().splitlines() if not ln.startswith("  result written to"))
    return code, text.replace(str(bundle), bundle.name), json.loads(out_json.read_text(encoding="utf-8"))


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _p(x) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def _set(d: dict) -> str:
    out = []
    for e in d["fix_set"]:
        idx = f"[{','.join(map(str, e['indices']))}]" if e.get("indices") else ""
        out.append(f"`L{e['layer']}.{e['component']}{idx}@{','.join(map(str, e['positions']))}:{e['op']}`")
    return ", ".join(out) or "—"


def results_table(res: dict) -> list[str]:
    lines = ["| scenario | fix set | flip rate on held-out failing variants (Wilson 95%) | sufficiency | "
             "side effects (mean KL) | activations touched | 1-minimal | p (controls) | criteria | passes / rows | "
             "CCA wall |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, (code, _, d) in res.items():
        lo, hi = d["flip_rate_ci"] or [None, None]  # null: no failing variants
        failed = [k for k, c in d["criteria"].items() if not c["ok"]]
        lines.append(
            f"| `{name}` | {_set(d)} | {_pct(d['flip_rate'])} of {d['n_variants']} ({_pct(lo)}–{_pct(hi)}) | "
            f"{_pct(d['sufficiency_rate'])} of {d['n_sufficiency']} | {_pct(d['side_effect_rate'])} of "
            f"{d['n_benign']} ({d['side_effect_kl']:.2g}) | {_pct(d['fraction_of_activations'])} | "
            f"{'yes' if d['one_minimal'] else 'no'} | {_p(d['p_value'])} ({d['n_controls']}) | "
            f"{'all met' if not failed else 'MISSED: ' + ', '.join(failed)} (exit {code}) | "
            f"{d['forward_passes']} / {d['rows']} | {d['seconds']:.1f} s |")
    return lines


def budget_table(bm: dict) -> list[str]:
    lines = ["| scenario | candidate sites | resolved: on their own + by group tests | search rows: screening + "
             "checks (passes) | (a) raw sweep rows (passes) | (b) sweep + same checks rows (passes) | search / (b) "
             "rows (judged) | search / (a) rows | floor: the final set's checks alone (rows, / (a)) | search wall | "
             "(b) wall |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in bm["scenarios"].items():
        o, sw, r, ex = s["ours"], s["sweep"], s["ratios"], s["exhaustive_search"]
        lines.append(
            f"| `{name}` | {s['n_candidates']} | {o['candidates_evaluated']} + "
            f"{o['candidates_resolved'] - o['candidates_evaluated']} ({o['group_tests']} group tests) | "
            f"{o['screen_rows']} + {o['check_rows']} = {o['rows']} ({o['passes']}) | {sw['rows']} ({sw['passes']}) | "
            f"{ex['screen_rows']} + {ex['check_rows']} = {ex['rows']} ({ex['passes']}) | "
            f"{_pct(r['rows_vs_exhaustive_search'])} | {_pct(r['rows_vs_sweep'])} | {o['floor']['rows']}, "
            f"{_pct(r['floor_vs_sweep'])} | {o['seconds']:.2f} s | {ex['seconds']:.2f} s |")
    return lines


def scaling_table(sc: dict) -> list[str]:
    lines = ["| blocks | prompt tokens | candidate sites | final set (planted site?) | search rows: screening + checks "
             "(wall) | without CF | (a) raw sweep rows (wall) | search / (a) rows | search / (a) wall | search / (b) "
             "rows | floor / (a) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in sc["sizes"]:
        o, sw, r, nc = s["ours"], s["sweep"], s["ratios"], s["no_cf"]
        lines.append(
            f"| {s['n_layer']} | {s['n_prompt_tokens']} | {s['n_candidates']} | `{', '.join(o['set'])}` "
            f"({'yes' if s['on_planted_site'] else 'NO'}) | {o['screen_rows']} + {o['check_rows']} = {o['rows']} "
            f"({o['seconds']:.2f} s) | {nc['rows']} | {sw['rows']} ({sw['seconds']:.2f} s) | "
            f"{_pct(r['rows_vs_sweep'])} | {_pct(r['seconds_vs_sweep'])} | {_pct(r['rows_vs_exhaustive_search'])} | "
            f"{_pct(r['floor_vs_sweep'])} |")
    return lines


def _scaling_sentence(sc: dict) -> str:
    sizes = sc["sizes"]
    met = [s for s in sizes if s["ratios"]["rows_vs_sweep"] <= 0.10]
    wrong = [str(s["n_candidates"]) for s in sizes if not s["on_planted_site"]]
    checks = [s["ours"]["check_rows"] for s in sizes]
    first = ("The search lands on the planted site at every size" if not wrong else
             "The search MISSES the planted site at " + ", ".join(wrong) + " candidate sites")
    target = (f"search / (a) ≤ 10% is met from {min(s['n_candidates'] for s in met)} candidate sites up" if met else
              "search / (a) ≤ 10% is met at no size measured")
    return (f"{first}; {target} (the search's rows grow from {sizes[0]['ours']['rows']} to {sizes[-1]['ours']['rows']} "
            f"while the sweep's grow from {sizes[0]['sweep']['rows']} to {sizes[-1]['sweep']['rows']}: token ablations "
            f"and position blocks are group-tested, and the checks stay between {min(checks)} and {max(checks)} rows). "
            f"At the smallest size ({sizes[0]['n_candidates']} candidate sites, the shipped scenarios' scale) the "
            f"floor alone is {_pct(sizes[0]['ratios']['floor_vs_sweep'])} of the sweep.")


def ablation_table(bm: dict) -> list[str]:
    lines = ["| scenario | with CF (default) | without CF (positions by attribution) | no ranking (listed order) | "
             "CF cut: all rows / screening rows | same set found by all |", "|---|---|---|---|---|---|"]
    for name, s in bm["scenarios"].items():
        cells = []
        for key in ("ours", "no_cf", "no_ranking"):
            x = s[key]
            cells.append(f"{x['screen_rows']} + {x['check_rows']} = {x['rows']} rows, {x['seconds']:.2f} s")
        r = s["ratios"]
        same = all(s["same_set"].values())
        lines.append(f"| `{name}` | " + " | ".join(cells) + f" | {_pct(r['cf_cut_rows'])} / "
                     f"{_pct(r['cf_cut_screen_rows'])} | {'yes' if same else 'no: ' + str(s['same_set'])} |")
    return lines


def ranking_table(bm: dict) -> list[str]:
    lines = ["| scenario | Spearman (attribution vs exact, all sites) | chosen site: rank by attribution / by exact "
             "effect | top-10 overlap | attribution ranks of the single sites that fix |", "|---|---|---|---|---|"]
    for name, s in bm["scenarios"].items():
        rk = s["ranking"]
        sp = rk["spearman_all"]
        lines.append(f"| `{name}` | {'n/a' if sp is None else f'{sp:.3f}'} over {rk['n']} | "
                     f"{rk['chosen_attribution_rank']} / {rk['chosen_exact_rank']} of {rk['n']} | "
                     f"{rk['top10_overlap']}/10 | {', '.join(map(str, rk['fixing_attribution_ranks']))} |")
    return lines


def units_table(res_units: dict, res: dict) -> list[str]:
    lines = ["| scenario | fix set with `--units` | flip rate | side effects | activations touched | criteria | "
             "vs default set: activations touched |", "|---|---|---|---|---|---|---|"]
    for name, (code, _, d) in res_units.items():
        failed = [k for k, c in d["criteria"].items() if not c["ok"]]
        base = res[name][2]
        lines.append(f"| `{name}` | {_set(d)} | {_pct(d['flip_rate'])} of {d['n_variants']} | "
                     f"{_pct(d['side_effect_rate'])} | {_pct(d['fraction_of_activations'])} | "
                     f"{'all met' if not failed else 'MISSED: ' + ', '.join(failed)} | "
                     f"{_pct(base['fraction_of_activations'])} |")
    return lines


def _cf_sentence(bm: dict) -> str:
    sc = bm["scenarios"]
    cut = {n: s["ratios"]["cf_cut_rows"] for n, s in sc.items()}
    scut = {n: s["ratios"]["cf_cut_screen_rows"] for n, s in sc.items()}
    met = [n for n, v in cut.items() if v >= 0.5]
    return ("CF against the same search without it (positions ordered by the attribution estimate): rows cut by " +
            ", ".join(f"{_pct(v)} on `{n}`" for n, v in cut.items()) + "; screening rows alone by " +
            ", ".join(f"{_pct(v)}" for v in scut.values()) + f". The seeds' \"CF cuts the CCA search by >= 50%\" is "
            f"met on {len(met)} of {len(sc)} scenarios" + ("." if len(met) == len(sc) else
            ": on these incidents the attribution estimate puts the same position first as CF's position anomaly, "
            "and most rows are the checks of the chosen set, which no ordering removes."))


def _resid_example(res: dict) -> str:
    """A measured example from the selection tables: a residual-stream set and the benign reference outputs it
    changed (exact counts only)."""
    rows = [(r["benign_reference_changed"] / max(1, r.get("n_benign_reference_run", r["n_benign_reference"])), name, r)
            for name, (_, _, d) in res.items()
            for r in d["ranking"].get("selection", [])
            if r.get("confirmed") and r.get("n_benign_reference") and all(".resid" in s for s in r["set"])]
    if not rows:
        return "no residual-stream set was checked in this run"
    _, name, r = max(rows, key=lambda t: t[0])
    n_run = r.get("n_benign_reference_run", r["n_benign_reference"])
    of = (f"of the {n_run} (of {r['n_benign_reference']}) benign reference prompts it was run on before the lazy "
          "checks cut it" if n_run < r["n_benign_reference"] else f"of {r['n_benign_reference']} benign reference outputs")
    return (f"the highest share in this run: on `{name}`, `{', '.join(r['set'])}` fixes the incident and changes "
            f"{r['benign_reference_changed']} {of}")


def render(bm: dict, res: dict, res_units: dict, sc: dict) -> str:
    demo_cli = bm.get("demo_cli") or []
    L: list[str] = []
    w = L.append
    w("# CCA: causal minimal fix sets")
    w("")
    w("<!-- written by scripts/cca_doc.py from measurements made when it ran — do not edit by hand; re-run it -->")
    w("")
    w(f"Measured on {bm['measured']} with torch {bm['torch']} (python {bm['python']}) on {bm['machine']}, one torch "
      f"thread, shared machine (load average {bm['load_average_start']:.1f} at the start, "
      f"{bm['load_average_end']:.1f} at the end: wall times are noisy; rows and passes are not).")
    w("")
    w("CCA answers: *which internal computation carries this failure?* It searches the smallest set of activation "
      "interventions that makes the incident's failure go away, then measures what that set does on prompts it "
      "never saw. Code: `engine/cca.py` (`run_cca`, `evaluate_fix_set`, `CCAResult`); command: `forensics cca "
      "BUNDLE [--json] [--out RESULT.json] [--beam W] [--max-size K] [--op mean|patch] [--controls N] [--units] "
      "[--threads N]`.")
    w("")
    w("## Method")
    w("")
    w("**Interventions.** A candidate is a site — block `layer`, `component` (`resid_pre`, `attn` output, `mlp` "
      "output; `resid_post` of the last block), prompt `positions` — and an operation: `mean` (default) replaces the "
      "activation by its mean over the bundle's benign reference runs (per position where benign runs reach it, else "
      "the mean over all benign tokens), `patch` by the benign counterpart's activation (ends of the prompts aligned). "
      "Positions: each single prompt position, and the last three together. A fix set is several such edits applied in "
      "one replay.")
    w("")
    w("**Search metric.** One number per set, larger = more failing, `> 0` exactly when the incident still fails "
      "teacher-forced. `label:` / `token:` incidents: the logit margin of the failing outcome over the best other "
      "(the recorded metric). `contains:` / `wordlist:` incidents: the *smallest* logit margin, over the recorded "
      "continuation from its first token through the end of the failing span, of the recorded token over its best "
      "competitor. The recorded metric of those incidents (`docs/bundle-format.md`: the failing span's log-prob after "
      "the recorded prefix) stays ~0 when a set makes the model leave the failing path *before* the span — the "
      "llama scenario's failure mode before this metric — and log-probs of these models (trained to a loss of 1e-6) "
      "saturate; margins do neither. The recorded metric is unchanged; this one lives inside CCA.")
    w("")
    w("**Fix.** A set fixes the incident when its metric is `<= -1` (the failing outcome / path is beaten by at least "
      "one logit) and, for generation incidents, the greedy continuation generated under it no longer fails.")
    w("")
    w("**Ranking.** Attribution patching: one forward and one backward pass with a zero tensor added at every "
      "site give `grad · (replacement − activation)` per candidate (the gradient of a soft minimum of the margins "
      "for generation incidents), multiplied by `1 + w` with `w` the CF prior of the candidate's layer and "
      "component. With CF it breaks ties in CF's order; without CF it orders the positions and sites itself; it "
      "only ever *orders* exact evaluations — its agreement with the exact effects is measured below and is weak on "
      "these models.")
    w("")
    w("**Screening** (exact; every candidate set is a batch row of a real replay that starts from the recorded "
      "residual stream of the lowest intervened block and runs the shared prompt prefix once):")
    w("")
    w("1. token ablations: `resid_pre` of block 0 at every prompt position (which input tokens carry the failure), "
      "screened by the same adaptive group testing as the blocks below (positions in prompt order), so where few "
      "tokens fix their cost grows with the log of the prompt length;")
    w("2. the other sites one prompt position at a time. With CF (the default) the positions come in the order of "
      "CF's position anomaly and the sites of a position in the order `CFResult.order_candidates` gives them (ties in "
      "attribution order); without CF positions are ordered by their strongest attribution estimate. Each position's "
      "block is screened by **adaptive group testing**: the union of the block's sites is one set (one row); a union "
      "that does not fix clears all of them at once; one that fixes is split in halves, both evaluated, down to groups "
      "of at most 4 whose sites are evaluated on their own — so every site called fixing was evaluated alone, and no "
      "set's effect is ever inferred from other sets. A group that fixes while neither half does (sites acting only "
      "together) is listed in `ranking.combinations`.")
    w("")
    w("The checks (below) run after the first position block and after every later one; the search stops after the "
      "first block that leaves a *clean* fix — except that when that fix is the residual stream (a token ablation, "
      "screened before any block), the block of its position is screened too, since an `attn` / `mlp` output there "
      "may fix as cleanly and is the narrower edit (the component order below). Without a clean single site, every single site not yet evaluated on its "
      "own is evaluated (exact metrics for the beam), then sets of 2, 3, … (`--max-size`, default 4) are grown by "
      "greedy / beam search (`--beam`): the best non-fixing sets, each extended by its 8 best-ranked sites and the "
      "decision / hot-position sites, all extensions evaluated exactly. When that leaves no clean fix either, "
      "**sublayer unions**: sites that fix only all together (a fault written by three blocks: with one or two of them "
      "ablated the rest still write it, so no single site or pair lowers the metric and the beam has nothing to "
      "follow). At each position whose residual stream alone fixes (at most three, strongest first; else the "
      "decision position), the union of every `attn` / `mlp` output there is one set; when it fixes it is pruned "
      "like a fix set (every drop-one set in one batch, until no element can go) and the result goes to the choice "
      "below. A pruned union larger than `--max-size` is not chosen; the result names it "
      "(`ranking.beyond_max_size`, and a note in the CLI and the GUI).")
    w("")
    w("**Choice among fixing sets: the most specific one.** Ordered by (1) how many of the bundle's benign *reference* "
      "prompts (the mean-ablation data; the held-out benign prompts are never looked at) change output under the set; "
      "(2) whether it is *sufficient* on the incident's counterpart (the failing run's activations at the set's "
      "sites, written into the benign counterpart, re-create the failure); (3) component: a head / neuron before an "
      "attention / MLP output before the residual stream (which carries everything written before it); (4) lower "
      "metric. *Clean* = sufficient (or no counterpart) and changing at most "
      f"{TARGETS['side_effect_rate']:.0%} of the reference outputs. The checks are lazy and exact: each set's key "
      "starts as a lower bound (the fix confirmed by generation, sufficient, nothing changed) and the set with the "
      "smallest bound is tightened one step at a time — generation, then sufficiency, then the reference prompts in "
      "blocks of 8, 16, 32, … (a small subsample first; all of them only for a set still in the running). So the "
      "chosen set is the exact minimum over every fixing set found, and a set that stops being the minimum is not "
      "checked further. When that minimum is not clean, the sets that can still be clean are tightened in order of "
      "(3, 4) until one is. The result's `ranking.selection` lists every set considered with these numbers "
      "(`n_benign_reference_run`: prompts it was run on; `changed_is_lower_bound` when that is not all).")
    w("")
    w("**Pruning and refinement.** Elements are dropped while the rest still fixes (→ 1-minimal), a multi-position "
      "element is shrunk to the smallest fixing subset of its positions, and with `--units` an attention / MLP "
      "element is replaced by the fewest heads / neurons (ordered by exact single-head effect / attribution, fewer "
      "values than the whole element) whose mean-ablation still fixes with at least half the whole element's metric.")
    w("")
    w("**Greedy outcomes, exactly and cheaply.** Each prompt's unintervened continuation is generated once (or a "
      "continuation the bundle records or expects for it is confirmed by one teacher-forced pass); a set's row is "
      "first run teacher-forced on it (plus EOS). If every token is still the argmax, greedy decoding under the set "
      "reproduces it token for token, so nothing more is run; a second guess (e.g. the benign counterpart's output for "
      "a fixed variant) is confirmed the same way; only the remaining rows are generated (KV cache).")
    w("")
    w("## Position rule")
    w("")
    w("The fix set's positions are incident positions. On another prompt (variants, benign prompts, counterparts) an "
      "incident position `p` holding token `t` maps to the position of that prompt holding the same token `t` nearest "
      "to the end-aligned position `q = p − n_incident + n_other` (of two equally near, the later one); when `t` does "
      "not occur, to `q` itself (dropped when `q < 0`). A trigger token is followed wherever it sits (the BERT "
      "backdoor's `cf`, the Llama's `night`), "
      "structural positions (the last tokens, `Assistant:`) stay aligned from the end.")
    w("")
    w("## What each number means")
    w("")
    w("| number | meaning |")
    w("|---|---|")
    w("| `flipped`, `baseline_metric` → `fixed_metric` | the incident no longer fails under the set (search metric, "
      "logits) |")
    w("| `drop_one_metric`, `drop_one_failing`, `single_metric` (per element) | the metric with this element removed "
      "(and whether the rest no longer fixes the incident — it fails again, or its failing outcome is no longer "
      "beaten by the fix margin: the element is necessary) and with this element alone |")
    w("| `flip_rate`, `flip_rate_ci`, `n_variants` | share of the scenario's held-out failing variants (those that "
      "fail unintervened) that no longer fail under the position-mapped set; Wilson 95% interval (`null`, like the "
      "rate, when no variant fails unintervened) |")
    w("| `sufficiency_rate`, `n_sufficiency` | share of benign counterparts (incident's and variants', those that "
      "behave unintervened) that fail once the failing prompt's activations at the set's sites are written into "
      "them (sites mapped incident → failing prompt → counterpart by the position rule). The incident's own pair is "
      "also what the search's specificity order checked, so it is not held out; the variants' pairs are |")
    w("| `side_effect_rate`, `side_effect_kl`, `side_effects` | share of held-out benign prompts whose output "
      "(greedy continuation / label) changes under the set; mean KL(baseline ‖ intervened) of the label distribution, or "
      "of the next-token distribution after the prompt (the first generated token; later tokens are compared by "
      "the output); per-prompt rows |")
    w("| `fraction_of_activations` | activation values the set touches / (blocks × recorded sites × recorded "
      "positions × d_model) |")
    w("| `one_minimal` | the set fixes and dropping any one element un-fixes it |")
    w("| `p_value`, `n_controls`, `control_flip_rates` | empirical p = (1 + #controls at least as good) / (1 + "
      "#controls): controls are random sets of the same size and components (random blocks, random positions of the "
      "same count, random heads / neurons of the same count), each different from the set, run on the same held-out "
      "failing variants with the same position rule. The statistic is the flip rate on those variants (the incident "
      "is left out: the set was chosen on it). A bundle without failing variants falls back to the incident itself "
      "(`evidence.controls.held_out` false): the number is kept, but the criterion is not met, since the set was "
      "chosen on that incident. A control stops as soon as it reaches the set's flip count or can no "
      "longer reach it — exactly what the p-value needs; `control_flip_rates` are over the prompts each control ran "
      "(`evidence.controls.prompts_run`) |")
    w("| `fdr`, `evidence.claim_p_values` | Benjamini–Hochberg q-values (`scipy.stats.false_discovery_control`) over "
      "every claim: flip rate vs controls, variant flip rate and sufficiency above the controls' per-prompt flip rate "
      "(binomial; made only when control prompts were run, so that the rate is measured), side effects below 5% "
      "(binomial). Each claim is on prompts the set was not chosen on: no flip-rate-vs-controls claim when the "
      "controls fell back to the incident, and the sufficiency claim leaves out the incident's own counterpart pair "
      "(`evidence.sufficiency.incident_pair_counted`), which the search checked; `sufficiency_rate` itself counts it |")
    w("| `forward_passes`, `rows`, `seconds`, `evidence.passes_by_stage` | batched forward calls, sequences run "
      "(a batch row of a forward or of one generation step), wall time; per stage |")
    w("| `ranking` | method, candidate count, screening rounds, the selection table, Spearman of attribution vs "
      "exact over the sites evaluated, search-only passes / rows / seconds; `beyond_max_size` when a pruned sublayer "
      "union that fixes has more elements than `--max-size` |")
    w("")
    w("## Criteria")
    w("")
    w("From seeds 002/003 and issue 6: flip rate ≥ 80% on held-out failing variants, side effects ≤ 5% of held-out "
      "benign prompts, fraction of activations ≤ 5%, 1-minimal, p < 0.01 against ≥ 200 controls (and the incident "
      "flipped). `forensics cca` exits 0 when all hold and 1 when one is missed, printing `MISSED <criterion>: target "
      "…; measured … ; <gap> below/above target` for each. A number the bundle gives no prompts for (no variants, no "
      "held-out benign prompts, no counterpart) is `null` in the JSON, its criterion (if it has one) is missed, the "
      "detail says `not measured: …` with the `forensics record` option that would have supplied them.")
    w("")
    w("A cancelled run returns its best set so far with `partial: true`. When the cancel came before that set was "
      "run on the incident (during the search), `flipped` is false because nothing was confirmed, not because the "
      "set was seen to fail: `incident_flipped` and `one_minimal` then have `value: null` and the detail `not "
      "measured: the run was cancelled before the set was checked on the incident (best search metric … , "
      "teacher-forced)`; the CLI, the GUI and the certificate say \"not checked\" (`CCAResult.checked`, "
      "`engine.certificate.set_was_checked` for the JSON).")
    w("")
    w("The criteria compare point estimates with their targets. A certificate (`forensics certify`) is only "
      "*qualified*, not certified, when a met rate's Wilson 95% interval reaches past its target (thin evidence: "
      "`engine.certificate.thin_evidence`), which the flip-rate column below shows.")
    w("")
    w("## Results on the shipped scenarios")
    w("")
    w("`forensics cca BUNDLE` with its defaults (CF prior, mean-ablation, greedy, 200 controls, one thread):")
    w("")
    L.extend(results_table(res))
    w("")
    for name, (_, text, _) in res.items():
        w(f"`forensics cca {name}.h5`:")
        w("")
        w("```")
        L.extend(text.splitlines())
        w("```")
        w("")
    w("## Search budget (`benchmarks/cca.py`)")
    w("")
    w("Search to the final set (`evidence=False`, defaults) against two baselines: **(a)** the raw exhaustive "
      "single-site sweep (every candidate site evaluated once on the incident, teacher-forced, 64 rows per forward; "
      "it checks nothing, so it does not reach a chosen set), and **(b)** the same sweep followed by the *same* lazy "
      "checks on the fixing sites it found (`ranking=\"exhaustive\"`) — the cheapest way a sweep reaches the same "
      "kind of answer, and the one the ≤ 10% target is judged against, since both sides then end in the same checked, "
      "most specific, 1-minimal set. *Screening* = candidate sets evaluated on the incident; *checks* = generation "
      "confirmation, counterpart sufficiency, the reference prompts' own outputs and their outputs under the sets "
      "checked, pruning, refinement. A *row* is one sequence through the model once (a batch row of a forward, or of "
      "one generation step): the sequential-forward equivalent; passes (batched forward calls) are printed too but "
      "favour the sweep, which packs 64 sites into each. The *floor* is the final set's own checks run alone, with no "
      "search at all (as by an oracle that knew the set): no method that ends in a set checked this way can spend "
      "fewer rows.")
    w("")
    L.extend(budget_table(bm))
    w("")
    met = [n for n, s in bm["scenarios"].items() if s["ratios"]["rows_vs_exhaustive_search"] <= 0.10]
    met_a = [n for n, s in bm["scenarios"].items() if s["ratios"]["rows_vs_sweep"] <= 0.10]
    gap = {n: s["ratios"]["rows_vs_exhaustive_search"] for n, s in bm["scenarios"].items()}
    w(f"The ≤ 10% target is met against (b) on {len(met)} of {len(bm['scenarios'])} scenarios and against (a) on "
      f"{len(met_a)} of {len(bm['scenarios'])}" + ("." if len(met) == len(bm["scenarios"]) else
      " (search / (b): " + ", ".join(f"`{n}` {_pct(v)}" for n, v in gap.items()) + "). Both sides pay the same floor: "
      "the chosen set is run on every benign reference prompt (" + ", ".join(
          f"{s['ours']['n_benign_reference']} on `{n}`" for n, s in bm["scenarios"].items()) + ") and, for "
      "generation incidents, each of those prompts' own output is confirmed once more (as many rows again); the "
      "chosen set's rows alone are " + ", ".join(
          f"{_pct(s['ours']['n_benign_reference'] / s['exhaustive_search']['rows'])}"
          for s in bm["scenarios"].values()) + " of (b). Those checks alone, with no search, are " + ", ".join(
          f"{_pct(s['ratios']['floor_vs_sweep'])}" for s in bm["scenarios"].values()) + " of the raw sweep (a): "
      "above 10% on " + str(sum(s["ratios"]["floor_vs_sweep"] > 0.10 for s in bm["scenarios"].values())) +
      f" of the {len(bm['scenarios'])} incidents, and on those no search that checks its answer like this can meet "
      "the target; the section below measures where it can. What the search saves is the screening (group tests "
      "clear whole positions in one row) and the checks of sets that cannot win.") + " " + _cf_sentence(bm))
    w("")
    w("The same search without CF, without any ranking, and the CF cut (1 − rows with CF / rows without):")
    w("")
    L.extend(ablation_table(bm))
    w("")
    w("## How the ratio scales (`benchmarks/cca_scaling.py`)")
    w("")
    w(f"Measured on {sc['measured']} (load average {sc['load_average_start']:.1f} at the start, "
      f"{sc['load_average_end']:.1f} at the end). The checks the search ends with do not grow with the model or the "
      "prompt; the sweep grows with blocks × components × prompt positions. Incidents whose size is the parameter: "
      "a GPT-2 with random weights and a planted fault (`scenarios/planted.py`: MLP neuron 0 of the middle block "
      "answers `cat` to the last word `HACKED`; the same construction `tests/test_cca_planted.py` checks CCA "
      "against), prompts of random words, 40 benign reference prompts, a `token:` failure (no generation); the "
      "search with its defaults (CF-guided, the CF baseline built first and not counted), one thread.")
    w("")
    L.extend(scaling_table(sc))
    w("")
    w(_scaling_sentence(sc))
    w("")
    w("## How well attribution agrees with exact single-site effects")
    w("")
    L.extend(ranking_table(bm))
    w("")
    w("Sites whose mean-ablation has a large nonlinear effect rank near the bottom of the linear estimate although "
      "they fix (the ranks in the last column); that is why the ranking only orders the positions and sites that "
      "are then evaluated exactly (token ablations, group tests), never replaces an evaluation.")
    w("")
    w("## Optional refinement to heads / neurons (`--units`)")
    w("")
    L.extend(units_table(res_units, res))
    w("")
    w("## Threads and wall time")
    w("")
    for c in demo_cli:
        w(f"- `forensics cca` on the demo incident (`gpt2-prompt-injection`) in a fresh process, {c['threads']} torch "
          f"thread(s): {c['wall_seconds']:.1f} s wall (imports, model, CF, search, all evidence), exit "
          f"{c['exit_code']}; target ≤ 60 s: {'met' if c['wall_seconds'] <= 60 else 'MISSED'}.")
    w("")
    w("`run_cca` / `evaluate_fix_set` default to one intra-op thread (`threads=1`, `--threads`; 0 = torch's default). "
      "CCA runs thousands of small batched forwards; when the two cores are shared with other jobs, two OpenMP "
      "threads wait on each other whenever one is descheduled (see `engine.cca.torch_threads`); on a quiet machine "
      "the two settings are close, as the lines above show for the load of this run.")
    w("")
    w("## Limits")
    w("")
    w("- The search metric and fix criterion judge the incident; generalisation is only *measured* (held-out "
      "variants), never optimised — the variants are never looked at by the search.")
    w("- `mean` uses the per-position benign mean counted from the start of the prompt; at positions that benign "
      "prompts reach with different tokens this is a blend, so a residual-stream site there can change benign "
      f"outputs ({_resid_example(res)}); the specificity order puts such sets last.")
    w("- The significance test compares against random sets of the same *shape*; a residual-stream element at a "
      "trigger position is matched by the same position at other layers when those also flip, and p then says so.")
    w("")
    return "\n".join(L)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--json", help="also write the raw measurements here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bm = bench.measure(bench.SCENARIOS, cli=True, workdir=work)
        res = {n: run_cli(work / f"{n}.h5", work / f"{n}.cca.json") for n in bench.SCENARIOS}
        res_units = {n: run_cli(work / f"{n}.h5", work / f"{n}.units.json", "--units") for n in bench.SCENARIOS}
    sc = scaling.measure()
    Path(args.out).write_text(render(bm, res, res_units, sc), encoding="utf-8")
    print(f"written {args.out}")
    if args.json:
        Path(args.json).write_text(json.dumps({"benchmark": bm, "cli": {n: r[2] for n, r in res.items()},
                                               "cli_units": {n: r[2] for n, r in res_units.items()},
                                               "scaling": sc},
                                              indent=1, default=float), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
