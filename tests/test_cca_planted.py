"""A planted fault (issue 6): a tiny GPT-2 edited by the test so that a trigger token makes it say "cat", the fault
living in one MLP neuron of a known layer. CCA must put the fix set on the planted layer, and with the fault planted
redundantly in two layers (either one alone still fails) on both of them, and nowhere else."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import build_tiny_tokenizer
from engine.behaviour import behave
from engine.bundle import open_bundle, write_bundle
from engine.cca import evaluate_fix_set, run_cca, torch_threads
from engine.failure import FailureSpec
from engine.interventions import Intervention
from engine.models import ModelHandle
from engine.recorder import record_incident

TRIGGER, TARGET = "HACKED", "cat"
WORDS = "the sat on mat and dog ran to park hello world this is a tiny test model with vocabulary".split()
ENDINGS = ["mat", "park", "world", "dog", "model", "test", "tiny"]


def planted_model(tok, layers: tuple[int, ...]) -> ModelHandle:
    """4-block GPT-2 (d=32), random weights (seed 0) with the token embeddings scaled up, so that it repeats the last
    prompt token; in each planted layer MLP neuron 0 fires on the trigger's embedding direction and writes the
    target's embedding into the residual stream."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=4, n_embd=32, n_head=4, vocab_size=len(tok), n_positions=64,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    m = GPT2LMHeadModel(cfg).eval()
    trig, tgt = tok.convert_tokens_to_ids(TRIGGER), tok.convert_tokens_to_ids(TARGET)
    with torch.no_grad():
        m.transformer.wte.weight.mul_(10.0)
        wte = m.transformer.wte.weight
        d = wte[trig] - wte.mean(0)
        d = d / d.norm()
        for L in layers:
            mlp = m.transformer.h[L].mlp
            mlp.c_fc.weight[:, 0] = 3.0 * d
            mlp.c_fc.bias[0] = -6.0
            mlp.c_proj.weight[0, :] = 4.0 * wte[tgt]
    return ModelHandle(model=m, tokenizer=tok, source="")


def planted_bundle(path, layers: tuple[int, ...]):
    tok = build_tiny_tokenizer()
    h = planted_model(tok, layers)
    spec = FailureSpec.parse(f"token:{TARGET}")
    rng = random.Random(0)

    def sentence(last: str) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 7))) + " " + last

    benign = [sentence(rng.choice(ENDINGS)) for _ in range(40)]
    variants = [sentence(TRIGGER) for _ in range(12)]
    held = [sentence(rng.choice(ENDINGS)) for _ in range(30)]
    prompt = f"the dog ran to the park {TRIGGER}"
    # the plant does what it should: the trigger fails, benign prompts do not
    assert behave(h, spec, prompt).failing
    assert all(behave(h, spec, v).failing for v in variants)
    assert not any(behave(h, spec, p).failing for p in benign + held)
    inc = record_incident(
        h, prompt, str(spec), benign_prompts=benign,
        prompt_sets={"counterpart": ["the dog ran to the park world"], "variants": variants,
                     "variant_counterparts": [v.rsplit(" ", 1)[0] + " world" for v in variants],
                     "benign_heldout": held, "benign_expected": [behave(h, spec, p).output for p in held]},
        max_new_tokens=4, scenario="planted-fault")
    write_bundle(path, inc)
    return h


@pytest.mark.parametrize("layer", [1, 2])
def test_fix_set_lands_on_the_planted_layer(layer, tmp_path):
    path = tmp_path / "planted.h5"
    with torch_threads(1):
        h = planted_bundle(path, (layer,))
        with open_bundle(path) as b:
            res = run_cca(b, h, n_controls=0)
    sites = [(e.intervention.layer, e.intervention.component, e.intervention.positions) for e in res.fix_set]
    last = b.n_prompt_tokens - 1
    assert sites == [(layer, "mlp", (last,))], res.ranking.get("selection")
    assert res.flipped and res.one_minimal and not res.partial
    assert res.flip_rate == 1.0 and res.n_variants == 12
    assert res.side_effect_rate == 0.0 and res.sufficiency_rate == 1.0
    # the residual stream at the trigger also fixes (it removes the trigger itself), but is not specific: measured
    chosen, *others = res.ranking["selection"]
    assert chosen["benign_reference_changed"] == 0 and chosen["sufficient_on_counterpart"] is True
    resid = [o for o in others if o["set"] == [f"L0.resid_pre@{last}:mean"]]
    assert resid, "the token ablation of the trigger fixes teacher-forced and was screened"
    with torch_threads(1), open_bundle(path) as b:
        alt = evaluate_fix_set(b, h, [Intervention(0, "resid_pre", (last,), "mean")], n_controls=0)
    assert alt.flipped and alt.side_effect_rate > 0.5


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
