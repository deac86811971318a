"""Which fix set the search reports: ``engine.cca._Chooser`` on a scripted incident.

The chooser decides which of the sets that fix the incident becomes the reported fix set (fewest benign reference
outputs changed, then sufficient on the counterpart, then the narrowest components, then the strongest metric). Its
checks are lazy: these tests give it an incident whose every check answer is scripted, and assert that the set it
returns is the exact minimum over every confirmed set, and that it runs no check a set no longer in the running
would need."""

from __future__ import annotations

import random

import pytest

from engine import cca
from engine.interventions import Intervention


class ScriptedIncident:
    """The three checks the chooser runs, answered from a table, each call logged."""

    def __init__(self, truth: dict, n_ref: int):
        self.truth = truth  # skey -> {"confirmed", "sufficient", "changed": [bool] * n_ref}
        self.n_ref = n_ref
        self.calls: list[tuple] = []

    def _benign_items(self):
        return [None] * self.n_ref

    def fixed(self, sets, tf_results):
        self.calls += [("fixed", cca._skey(s.interventions)) for s in sets]
        return [self.truth[cca._skey(s.interventions)]["confirmed"] for s in sets], tf_results

    def pair_sufficient(self, fixes):
        self.calls += [("sufficient", cca._skey(f)) for f in fixes]
        return [self.truth[cca._skey(f)]["sufficient"] for f in fixes]

    def benign_block(self, fixes, start, stop):
        self.calls += [("benign", cca._skey(f), start, stop) for f in fixes]
        return [sum(self.truth[cca._skey(f)]["changed"][start:stop]) for f in fixes]

    def checked(self, s) -> list[tuple]:
        return [c for c in self.calls if c[1] == cca._skey(s)]


def site(layer: int, component: str, pos: int = 3) -> tuple[Intervention, ...]:
    idx = (0,) if component in ("head", "neuron") else ()
    return (Intervention(layer, component, (pos,), "mean", indices=idx),)


def chooser_with(rows, n_ref=40):
    """``rows``: (set, metric, confirmed, sufficient, n_changed) -> (chooser, scripted incident)."""
    truth = {}
    for s, _m, confirmed, sufficient, n_changed in rows:
        truth[cca._skey(s)] = {"confirmed": confirmed, "sufficient": sufficient,
                               "changed": [True] * n_changed + [False] * (n_ref - n_changed)}
    inc = ScriptedIncident(truth, n_ref)
    ch = cca._Chooser(inc)
    ch.add([(s, m) for s, m, *_ in rows])
    return ch, inc


def test_fewest_benign_changes_beat_a_stronger_metric():
    strong = site(1, "attn")
    gentle = site(1, "resid_post")
    ch, _ = chooser_with([(strong, -9.0, True, True, 6), (gentle, -1.5, True, True, 0)])
    assert ch.best()["set"] == gentle


def test_an_unconfirmed_set_is_never_reported():
    # teacher-forced it fixes best, but its generated continuation still fails
    bogus = site(0, "head")
    real = site(1, "mlp")
    ch, inc = chooser_with([(bogus, -20.0, False, True, 0), (real, -2.0, True, True, 0)])
    assert ch.best()["set"] == real
    assert inc.checked(bogus) == [("fixed", cca._skey(bogus))]  # dropped after its one check


def test_insufficient_loses_to_sufficient_at_equal_changes():
    insuff = site(0, "head")  # narrower component and stronger, but transplanting it does not re-create the failure
    suff = site(1, "resid_post")
    ch, _ = chooser_with([(insuff, -8.0, True, False, 0), (suff, -1.2, True, True, 0)])
    assert ch.best()["set"] == suff


def test_narrower_component_wins_a_tie_then_the_metric():
    resid = site(1, "resid_pre")
    attn_weak = site(1, "attn", 4)
    attn_strong = site(1, "attn", 5)
    ch, _ = chooser_with([(resid, -30.0, True, True, 0), (attn_weak, -1.1, True, True, 0),
                          (attn_strong, -4.0, True, True, 0)])
    assert ch.best()["set"] == attn_strong


def test_a_set_out_of_the_running_is_not_checked_further():
    # the narrow set is clean; the residual-stream set's lower bound (rank 2) can never beat it: not one check
    narrow = site(1, "attn")
    wide = site(0, "resid_post")
    ch, inc = chooser_with([(narrow, -2.0, True, True, 0), (wide, -12.0, True, True, 0)])
    assert ch.best()["set"] == narrow
    assert inc.checked(wide) == []
    # the reported set was checked on every benign reference prompt, in growing blocks from 8
    blocks = [(c[2], c[3]) for c in inc.checked(narrow) if c[0] == "benign"]
    assert blocks[0] == (0, cca._Chooser.FIRST_BLOCK) and blocks[-1][1] == 40
    assert all(a == prev_b for (a, _), (_, prev_b) in zip(blocks[1:], blocks))


def test_a_set_whose_first_block_already_changes_outputs_is_not_run_on_the_rest():
    noisy = site(0, "head")  # best bound at first (rank 0), but changes every one of the first 8 prompts
    clean = site(1, "mlp")
    ch, inc = chooser_with([(noisy, -5.0, True, True, 30), (clean, -2.0, True, True, 0)], n_ref=40)
    assert ch.best()["set"] == clean
    noisy_blocks = [c for c in inc.checked(noisy) if c[0] == "benign"]
    assert noisy_blocks == [("benign", cca._skey(noisy), 0, 8)]


@pytest.mark.parametrize("seed", range(25))
def test_best_is_the_exact_minimum_over_confirmed_sets(seed):
    rng = random.Random(seed)
    comps = ["head", "neuron", "attn", "mlp", "resid_pre", "resid_post"]
    rows, seen = [], set()
    while len(rows) < 12:
        s = site(rng.randrange(3), rng.choice(comps), rng.randrange(6))
        if cca._skey(s) in seen:
            continue
        seen.add(cca._skey(s))
        rows.append((s, -rng.uniform(1, 10), rng.random() < 0.8, rng.choice([True, False, None]),
                     rng.choice([0, 0, 1, 2, 5, 20])))
    ch, inc = chooser_with(rows)
    got = ch.best()
    confirmed = [(s, m, su, n) for s, m, ok, su, n in rows if ok]
    if not confirmed:
        assert got is None
        return
    want = min(confirmed, key=lambda r: (r[3], 1 if r[2] is False else 0, cca._rank(r[0]), r[1]))
    assert got["set"] == want[0]
    assert got["benign_reference_changed"] == want[3]
    # and it ran each check at most once per set and block
    assert len(inc.calls) == len(set(inc.calls))


def test_clean_looks_past_an_insufficient_best_for_a_clean_set():
    # the best set changes nothing but is not sufficient; another changes 1 of 40 (2.5% <= 5%) and is sufficient
    insuff = site(1, "attn")
    ok = site(1, "resid_post")
    ch, _ = chooser_with([(insuff, -3.0, True, False, 0), (ok, -2.0, True, True, 1)])
    assert ch.clean()
    assert ch.best()["set"] == insuff  # clean() tells the search it may stop; the choice itself is unchanged


def test_not_clean_when_every_fix_changes_too_many_benign_outputs():
    a, b = site(1, "attn"), site(1, "mlp")
    ch, _ = chooser_with([(a, -3.0, True, True, 3), (b, -2.0, True, True, 10)])  # 7.5% and 25% > 5%
    assert not ch.clean()
    assert ch.best()["set"] == a
