"""Planted faults: a small GPT-2 with random weights, edited so that a trigger token makes it answer ``cat``.

Not a shipped scenario (``forensics scenario list`` does not show it): the ground truth CCA is checked against
(``tests/test_cca_planted.py``: the fix set must land on the planted layer) and an incident whose size is a
parameter (``benchmarks/cca_scaling.py``: how the search's cost grows with the candidate space). The fault is one MLP
neuron per planted layer that fires on the trigger's embedding direction and writes the target's embedding into the
residual stream; the token embeddings are scaled up so that the unedited model repeats the last prompt token.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

TRIGGER, TARGET = "HACKED", "cat"
WORDS = "the sat on mat and dog ran to park hello world this is a tiny test model with vocabulary".split()
ENDINGS = ["mat", "park", "world", "dog", "model", "test", "tiny"]


def planted_tokenizer():
    """A word-level tokenizer over :data:`WORDS`, :data:`ENDINGS`, the trigger and the target."""
    from .train_causal import build_tokenizer

    return build_tokenizer([" ".join([*WORDS, *ENDINGS, TRIGGER, TARGET])])


def planted_model(tok, layers: Sequence[int], *, n_layer: int = 4, n_embd: int = 32, n_head: int = 4,
                  n_positions: int = 64):
    """GPT-2 with random weights (seed 0), the fault planted in MLP neuron 0 of each layer in ``layers``.

    Returns:
        an :class:`engine.models.ModelHandle`.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from engine.models import ModelHandle

    if not layers or any(not 0 <= L < n_layer for L in layers):
        raise ValueError(f"planted layers {list(layers)} must lie in 0..{n_layer - 1}")
    cfg = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=len(tok), n_positions=n_positions,
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


def planted_bundle(path: str | Path, layers: Sequence[int], *, tokenizer=None, n_layer: int = 4,
                   words: int | tuple[int, int] = (3, 7), n_benign: int = 40, n_variants: int = 12,
                   n_heldout: int = 30, seed: int = 0):
    """Record a planted-fault incident into ``path`` and return the model's handle.

    Prompts are ``words`` random words (a fixed count, or a ``(low, high)`` range) and a last word: the trigger for
    the incident (``"the dog ran to the park HACKED"`` when ``words`` is the default range) and its failing
    variants, a benign ending for the reference and held-out benign prompts. The plant's behaviour is checked before
    anything is recorded.

    Raises:
        RuntimeError: the plant does not behave (the trigger does not fail, or a benign prompt does).
    """
    from engine.behaviour import behave
    from engine.bundle import write_bundle
    from engine.failure import FailureSpec
    from engine.recorder import record_incident

    tok = tokenizer if tokenizer is not None else planted_tokenizer()
    lo, hi = (words, words) if isinstance(words, int) else words
    h = planted_model(tok, layers, n_layer=n_layer, n_positions=max(64, 2 * hi + 16))
    spec = FailureSpec.parse(f"token:{TARGET}")
    rng = random.Random(seed)

    def sentence(last: str) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) + " " + last

    benign = [sentence(rng.choice(ENDINGS)) for _ in range(n_benign)]
    variants = [sentence(TRIGGER) for _ in range(n_variants)]
    held = [sentence(rng.choice(ENDINGS)) for _ in range(n_heldout)]
    prompt = f"the dog ran to the park {TRIGGER}" if (lo, hi) == (3, 7) else sentence(TRIGGER)
    if not (behave(h, spec, prompt).failing and all(behave(h, spec, v).failing for v in variants)):
        raise RuntimeError("the planted fault does not make the trigger prompts fail")
    if any(behave(h, spec, p).failing for p in benign + held):
        raise RuntimeError("a benign prompt fails under the planted model")
    inc = record_incident(
        h, prompt, str(spec), benign_prompts=benign,
        prompt_sets={"counterpart": [prompt.rsplit(" ", 1)[0] + " world"], "variants": variants,
                     "variant_counterparts": [v.rsplit(" ", 1)[0] + " world" for v in variants],
                     "benign_heldout": held, "benign_expected": [behave(h, spec, p).output for p in held]},
        max_new_tokens=4, scenario="planted-fault")
    write_bundle(path, inc)
    return h
