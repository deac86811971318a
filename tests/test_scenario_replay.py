"""Recording each shipped scenario's primary incident and replaying it is bit-identical (issue 3)."""

from __future__ import annotations

import pytest

import scenarios
from engine.bundle import open_bundle
from engine.replay import replay
from workbench.cli import build_scenario_bundle


@pytest.mark.parametrize("name", ["gpt2-prompt-injection", "gpt2-toxic-generation", "bert-sentiment-bypass",
                                  "llama-secret-leak"])
def test_record_then_replay_bit_identical(name, tmp_path):
    sc = scenarios.get(name)
    path = tmp_path / f"{name}.h5"
    info = build_scenario_bundle(sc, path)
    assert info["failing"] is True
    with open_bundle(path) as b:
        assert b.failing and b.prompt == sc.prompt
        assert len(b.prompt_sets["variants"]) == len(sc.variants)
        assert len(b.benign_prompts) == len(sc.benign_reference)
    report = replay(path)
    failed = [(c.name, c.detail) for c in report.checks if not c.ok]
    assert report.bit_identical, failed
    assert {c.name for c in report.checks} >= {"weights", "tokenizer", "logits", "activations"}
