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


def planted_model(tok, layers: Sequence[int], *, relay: Sequence[int] = (), n_layer: int = 4,
                  n_embd: int | None = None, n_head: int = 4, n_positions: int = 64):
    """GPT-2 with random weights (seed 0), the fault planted in MLP neuron 0 of each layer in ``layers``.

    Without ``relay`` the neuron writes the target's embedding at the trigger's position. With ``relay`` (layers
    after the planted ones) it writes a *flag* instead, a direction orthogonal to every token embedding (so it moves
    no logit), and head 0 of each relay layer copies the flag from wherever the trigger sits to the later positions,
    writing a direction that raises only the target's logit (and lowers it where no flag is in view). So
    the trigger can sit anywhere in the prompt, and with two relay layers neither attention output at the last
    position fixes the failure alone, while the planted MLP at the trigger's position does. ``n_embd`` defaults to
    32, or 64 with ``relay`` (the flag needs a direction outside the span of the token embeddings).

    Returns:
        an :class:`engine.models.ModelHandle`.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from engine.models import ModelHandle

    if not layers or any(not 0 <= L < n_layer for L in layers):
        raise ValueError(f"planted layers {list(layers)} must lie in 0..{n_layer - 1}")
    if relay and any(not max(layers) < L < n_layer for L in relay):
        raise ValueError(f"relay layers {list(relay)} must lie after the planted layers and below {n_layer}")
    n_embd = n_embd if n_embd is not None else 64 if relay else 32
    if relay and len(tok) + 1 >= n_embd:
        raise ValueError(f"a relayed plant needs n_embd > {len(tok) + 1} (the vocabulary and one more), got {n_embd}")
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
        write = 4.0 * wte[tgt]
        if relay:
            def outside(v, span):  # v with the span of the columns of `span` and the all-ones vector removed
                q, _ = torch.linalg.qr(torch.cat([span, torch.ones(n_embd, 1)], 1))
                return v - q @ (q.T @ v)

            g = torch.Generator().manual_seed(1)
            flag = outside(torch.randn(n_embd, generator=g), wte.T)  # layer norm removes the mean: no ones part
            flag = flag / flag.norm()
            write = 40.0 * flag
            up = outside(wte[tgt], torch.cat([wte[:tgt], wte[tgt + 1:]]).T)  # raises the target's logit only
            up = up * (wte[tgt].norm() / up.norm())
            dh = n_embd // n_head
            for L in relay:  # head 0: constant query, the flag as key and value, value 0 -> target's logit
                at = m.transformer.h[L].attn
                W, B = at.c_attn.weight, at.c_attn.bias  # (n_embd, 3 n_embd): query | key | value
                for part in range(3):
                    W[:, part * n_embd:part * n_embd + dh] = 0.0
                    B[part * n_embd:part * n_embd + dh] = 0.0
                B[0] = 10.0
                W[:, n_embd] = 10.0 * flag
                W[:, 2 * n_embd] = 3.0 * flag
                B[2 * n_embd] = -3.0
                at.c_proj.weight[:dh, :] = 0.0
                at.c_proj.weight[0, :] = 4.0 * up
        for L in layers:
            mlp = m.transformer.h[L].mlp
            mlp.c_fc.weight[:, 0] = 3.0 * d
            mlp.c_fc.bias[0] = -12.0 if relay else -6.0  # relayed: the flag is amplified, fire on the trigger only
            mlp.c_proj.weight[0, :] = write
    return ModelHandle(model=m, tokenizer=tok, source="")


def planted_bundle(path: str | Path, layers: Sequence[int], *, relay: Sequence[int] = (), tokenizer=None,
                   n_layer: int = 4, words: int | tuple[int, int] = (3, 7), n_benign: int = 40, n_variants: int = 12,
                   n_heldout: int = 30, seed: int = 0):
    """Record a planted-fault incident into ``path`` and return the model's handle.

    Prompts are ``words`` random words (a fixed count, or a ``(low, high)`` range) and a last word: the trigger for
    the incident (``"the dog ran to the park HACKED"`` when ``words`` is the default range) and its failing
    variants, a benign ending for the reference and held-out benign prompts. With ``relay`` (see
    :func:`planted_model`) every prompt ends with a benign word and the failing ones hold the trigger at a random
    place inside (the incident ``"the dog HACKED ran to the park"``); their counterparts have ``world`` in its place.
    The plant's behaviour is checked before anything is recorded.

    Raises:
        RuntimeError: the plant does not behave (the trigger does not fail, or a benign prompt does).
    """
    from engine.behaviour import behave
    from engine.bundle import write_bundle
    from engine.failure import FailureSpec
    from engine.recorder import record_incident

    tok = tokenizer if tokenizer is not None else planted_tokenizer()
    lo, hi = (words, words) if isinstance(words, int) else words
    h = planted_model(tok, layers, relay=relay, n_layer=n_layer, n_positions=max(64, 2 * hi + 16))
    spec = FailureSpec.parse(f"token:{TARGET}")
    rng = random.Random(seed)

    def sentence(last: str) -> str:
        if relay and last == TRIGGER:  # the trigger inside, a benign word last
            w = [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]
            w.insert(rng.randint(1, len(w) - 1), TRIGGER)
            return " ".join(w) + " " + rng.choice(ENDINGS)
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) + " " + last

    def counterpart(p: str) -> str:
        return p.replace(TRIGGER, "world") if relay else p.rsplit(" ", 1)[0] + " world"

    benign = [sentence(rng.choice(ENDINGS)) for _ in range(n_benign)]
    variants = [sentence(TRIGGER) for _ in range(n_variants)]
    held = [sentence(rng.choice(ENDINGS)) for _ in range(n_heldout)]
    default = f"the dog {TRIGGER} ran to the park" if relay else f"the dog ran to the park {TRIGGER}"
    prompt = default if (lo, hi) == (3, 7) else sentence(TRIGGER)
    if not (behave(h, spec, prompt).failing and all(behave(h, spec, v).failing for v in variants)):
        raise RuntimeError("the planted fault does not make the trigger prompts fail")
    if any(behave(h, spec, p).failing for p in benign + held):
        raise RuntimeError("a benign prompt fails under the planted model")
    inc = record_incident(
        h, prompt, str(spec), benign_prompts=benign,
        prompt_sets={"counterpart": [counterpart(prompt)], "variants": variants,
                     "variant_counterparts": [counterpart(v) for v in variants],
                     "benign_heldout": held, "benign_expected": [behave(h, spec, p).output for p in held]},
        max_new_tokens=4, scenario="planted-fault")
    write_bundle(path, inc)
    return h
