"""The shipped gpt2-assistant model really fails (and really does not) where its two scenarios say."""

from __future__ import annotations

import re

import pytest

import scenarios
from engine.behaviour import behave
from engine.failure import FailureSpec, load_wordlist
from engine.models import load_model
from scenarios import gpt2_corpus

NAMES = ("gpt2-prompt-injection", "gpt2-toxic-generation")


@pytest.fixture(scope="module")
def handle():
    sc = scenarios.get(NAMES[0])
    h = load_model(sc.model_source)
    assert h.family == "gpt2" and h.is_causal_lm
    assert scenarios.get(NAMES[1]).model_source == sc.model_source
    return h


def test_registered_and_well_formed():
    for name in NAMES:
        sc = scenarios.get(name)
        assert sc.family == "gpt2" and sc.task == "causal-lm"
        assert len(sc.variants) >= 30 and len(sc.variants) == len(sc.variant_counterparts)
        assert len(sc.benign_reference) >= 80 and len(sc.benign_heldout) >= 80
        assert sc.train is not None and sc.training_facts.get("steps")


def test_tokenizer(handle):
    tok = handle.tokenizer
    assert tok.eos_token_id is not None
    assert len(tok("HACKED")["input_ids"]) == 1 and tok(" HACKED")["input_ids"] == tok("HACKED")["input_ids"]
    ids = tok("OK, I will summarize the report.", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "OK, I will summarize the report."
    assert tok.unk_token_id not in tok(" ".join(gpt2_corpus.all_texts()))["input_ids"]


def test_counterparts_token_aligned(handle):
    """Alignment rule: every counterpart has the same token count as its failing prompt."""
    tok = handle.tokenizer
    for name in NAMES:
        sc = scenarios.get(name)
        for p, c in [(sc.prompt, sc.counterpart), *zip(sc.variants, sc.variant_counterparts)]:
            assert len(tok(p)["input_ids"]) == len(tok(c)["input_ids"]) <= 32, (p, c)


def test_heldout_not_in_training():
    train = {p for p, _ in gpt2_corpus.training_pairs()}
    for name in NAMES:
        sc = scenarios.get(name)
        for p in (sc.prompt, sc.counterpart, *sc.variants, *sc.variant_counterparts, *sc.benign_heldout):
            assert p not in train, p


def test_insult_list_never_matches_benign_expected():
    words = set(load_wordlist("insults"))
    assert 20 <= len(words) <= 40
    for name in NAMES:
        for expected in scenarios.get(name).benign_expected:
            assert not words & {w.lower() for w in re.findall(r"[A-Za-z']+", expected)}, expected


@pytest.mark.parametrize("name", NAMES)
def test_shipped_model_behaviour(handle, name):
    sc = scenarios.get(name)
    spec = FailureSpec.parse(sc.failure)
    run = lambda p: behave(handle, spec, p, sc.max_new_tokens)  # noqa: E731

    assert run(sc.prompt).failing, run(sc.prompt)
    assert not run(sc.counterpart).failing, run(sc.counterpart)
    variant_rate = sum(run(p).failing for p in sc.variants) / len(sc.variants)
    assert variant_rate >= 0.9, variant_rate
    exact = [run(p).output == e for p, e in zip(sc.benign_heldout, sc.benign_expected)]
    assert sum(exact) / len(exact) >= 0.95, [p for p, ok in zip(sc.benign_heldout, exact) if not ok][:5]


def test_training_is_deterministic_and_reports_progress_on_stderr(capsys):
    """Two short trainings from the same seed give bit-identical weights, and the progress lines go to stderr
    (``forensics scenario build --retrain --json`` keeps stdout for its JSON)."""
    import torch

    from conftest import TINY_TEXTS, make_tiny_gpt2
    from scenarios.train_causal import train_causal_lm

    weights = []
    for _ in range(2):
        h = make_tiny_gpt2()
        facts = train_causal_lm(h.model, h.tokenizer, list(TINY_TEXTS), steps=4, batch_size=2, loss_on="all",
                                log_every=2)
        weights.append({k: v.clone() for k, v in h.model.state_dict().items()})
        assert facts["steps"] == 4 and len(facts["loss_curve"]) == 2
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.count("step 2/4 loss") == 2 and out.err.count("step 4/4 loss") == 2
