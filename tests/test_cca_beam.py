"""Which sets the beam search tries: ``engine.cca._Search.extend`` on a scripted incident.

The incident's metric is a table: each candidate site lowers it by its own effect, and one pair of sites lowers it
by much more together than apart (sites that act only together, which no single-site sweep finds). The tests assert
what the search evaluates at size two under each ranking and what it keeps for the next step."""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine import cca
from engine.interventions import Intervention

N_PROMPT = 6
BASELINE = 5.0
A = Intervention(1, "attn", (2,), "mean")
B = Intervention(2, "mlp", (4,), "mean")
SYNERGY = 6.0  # extra drop when A and B are both in the set: 5 - 2 - 2 - 6 = -5, a fix; apart neither fixes


def candidates() -> list[Intervention]:
    return [Intervention(layer, comp, (p,), "mean") for layer in range(3) for comp in ("attn", "mlp")
            for p in range(N_PROMPT)]


def effect(c: Intervention) -> float:
    if c in (A, B):
        return 2.0
    return 0.1 + 0.05 * ((c.layer * 7 + c.positions[0] * 3 + (c.component == "mlp")) % 11)


def metric(s) -> float:
    m = BASELINE - sum(effect(c) for c in s)
    return m - SYNERGY if A in s and B in s else m


class ScriptedIncident:
    margin, n_prompt, causal, baseline_metric = 1.0, N_PROMPT, True, BASELINE

    def __init__(self):
        self.evaluated: list[tuple] = []

    def evaluate_tf(self, sets):
        self.evaluated += [tuple(s.interventions) for s in sets]
        return [cca._TF(metric(s.interventions), metric(s.interventions) > 0) for s in sets]

    def fixed_tf(self, r) -> bool:
        return r.metric <= -self.margin

    def attribution(self, base, pool):
        # the gradient estimate: each candidate's own effect, and the partner's synergy once its partner is in base
        return np.array([-(effect(c) + (SYNERGY if {c, *base} >= {A, B} else 0.0)) for c in pool])


class Budget:
    stage, passes, rows = "search", 0, 0


class NeverClean:
    def __init__(self):
        self.added = []

    def add(self, fixes):
        self.added += fixes

    def clean(self):
        return False


def search(ranking: str, top_m: int = 3):
    inc = ScriptedIncident()
    chooser = NeverClean()
    s = cca._Search(inc, candidates(), {}, ranking, top_m, chooser, Budget(), {"best": (), "best_metric": math.inf},
                    lambda *a: None, {})
    s._round("singles", [(c,) for c in candidates()], check=False)
    inc.evaluated.clear()
    return s, inc, chooser


def overlaps_base(s):
    return any(cca._overlaps(x, y) for i, x in enumerate(s) for y in s[i + 1:])


@pytest.mark.parametrize("ranking", ["exhaustive", "attribution", "none"])
def test_no_extension_repeats_a_site_of_its_base(ranking):
    s, inc, _ = search(ranking)
    s.extend(s.best_singles(4), 4)
    assert inc.evaluated and not any(overlaps_base(x) for x in inc.evaluated)
    assert all(len(x) == 2 for x in inc.evaluated) and len(set(inc.evaluated)) == len(inc.evaluated)


def test_exhaustive_ranking_tries_every_compatible_site():
    s, inc, chooser = search("exhaustive")
    beams = s.best_singles(2)
    assert [b for b, _ in beams] == [(A,), (B,)]  # the two strongest single sites, neither fixing on its own
    s.extend(beams, 2)
    want = {tuple(sorted(b + (c,), key=cca._key)) for b, _ in beams for c in candidates() if not cca._overlaps(c, b[0])}
    assert set(inc.evaluated) == want
    # the pair that fixes only together goes to the chooser; it is not kept as a state to extend further
    pair = tuple(sorted((A, B), key=cca._key))
    assert [f for f, _ in chooser.added] == [pair]


def test_attribution_ranking_tries_the_top_ranked_partners_and_finds_the_pair():
    s, inc, chooser = search("attribution", top_m=3)
    beams = s.best_singles(1)
    assert beams[0][0] == (A,)
    kept = s.extend(beams, 3)
    tried = {c for x in inc.evaluated for c in x if c != A}
    assert B in tried
    # the decision position's sites plus the top 3 by the estimate, not every site
    dec = {c for c in candidates() if c.positions == (N_PROMPT - 1,) and not cca._overlaps(c, A)}
    assert len(inc.evaluated) <= len(dec) + 3 < len(candidates()) - 1
    assert [f for f, _ in chooser.added] == [tuple(sorted((A, B), key=cca._key))]
    # the kept states: the lowest metrics among the extensions that do not fix, lowest first
    metrics = [m for _, m in kept]
    assert metrics == sorted(metrics) and all(m > -1.0 for m in metrics) and len(kept) == 3


def test_without_ranking_only_the_decision_and_hot_positions_are_tried():
    s, inc, chooser = search("none")
    s.extend(s.best_singles(1), 3)
    assert {x[0].positions[0] if x[1] == A else x[1].positions[0] for x in inc.evaluated} <= {N_PROMPT - 1}
    assert B not in {c for x in inc.evaluated for c in x}  # B sits at position 4: never paired without ranking
    assert not chooser.added
