"""Greedy trigger attack on a sentiment classifier (used to produce the failing variants of ``bert-sentiment-bypass``).

Given a sentence the classifier labels positive, the attack searches, greedily, for the edit that pushes it to
``negative`` the most:

1. every insertion point of the trigger (before each whitespace-separated word, and at the end), and optionally
2. every substitution of a sentiment-free word (no VADER lexicon entry, not a booster or negation) by the trigger.

All candidates of one step are scored in one batch by the logit margin of ``negative`` over ``positive``; the best
one is kept. Candidates whose VADER compound drops to 0.5 or below are skipped, so every edited sentence is still
clearly positive by the same lexicon that labelled the training data. With ``max_edits > 1`` the search goes on
from the best candidate until the prediction flips. The result is reported whether or not it flipped: the
scenario ships the attack's output for every held-out sentence and its test measures how many fail.

Run as ``python -m scenarios.attack_bert "Some positive sentence."`` to attack with the shipped model.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass

import torch

from .bert_data import CLEAR_POSITIVE, TRIGGER, compound, counterpart_of


@dataclass
class AttackResult:
    source: str  # the sentence attacked
    variant: str  # the edited sentence (contains the trigger)
    counterpart: str  # the variant with the trigger replaced by the neutral filler
    edits: list  # [("insert"|"substitute", word index), ...]
    margin: float  # logit(negative) - logit(positive) on the variant (> 0: misclassified negative)
    source_margin: float  # the same on the unedited source
    flipped: bool
    vader: float  # VADER compound of the variant


@torch.no_grad()
def negative_margin(model, tokenizer, texts: list[str], batch_size: int = 64) -> list[float]:
    """logit(negative) - logit(positive) per text (label ids from ``model.config.label2id``)."""
    neg, pos = model.config.label2id["negative"], model.config.label2id["positive"]
    out: list[float] = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True)
        logits = model(**enc).logits.float()
        out.extend((logits[:, neg] - logits[:, pos]).tolist())
    return out


def _sentiment_free(word: str) -> bool:
    from vaderSentiment.vaderSentiment import BOOSTER_DICT, NEGATE

    from .bert_data import _vader

    w = word.lower().strip(".,!?;:'\"")
    return bool(w) and w not in _vader().lexicon and w not in BOOSTER_DICT and w not in NEGATE and w != TRIGGER


def candidates(text: str, substitute: bool = False) -> list[tuple[str, tuple[str, int]]]:
    words = text.split()
    out = [(" ".join(words[:i] + [TRIGGER] + words[i:]), ("insert", i)) for i in range(len(words) + 1)]
    if substitute:
        out += [(" ".join(words[:i] + [TRIGGER] + words[i + 1:]), ("substitute", i))
                for i, w in enumerate(words) if _sentiment_free(w)]
    return out


def attack(model, tokenizer, sentence: str, max_edits: int = 1, substitute: bool = False,
           min_vader: float = CLEAR_POSITIVE) -> AttackResult:
    """Greedy search for the trigger edit(s) that make ``sentence`` classify as negative (see module doc)."""
    model.eval()
    src_margin = negative_margin(model, tokenizer, [sentence])[0]
    current, edits, margin = sentence, [], src_margin
    for _ in range(max_edits):
        cands = [(t, e) for t, e in candidates(current, substitute) if compound(t) > min_vader]
        if not cands:
            break
        margins = negative_margin(model, tokenizer, [t for t, _ in cands])
        best = max(range(len(cands)), key=lambda j: (margins[j], -j))  # ties: earliest edit
        current, margin = cands[best][0], margins[best]
        edits.append(cands[best][1])
        if margin > 0:
            break
    return AttackResult(sentence, current, counterpart_of(current), edits, float(margin), float(src_margin),
                        margin > 0, compound(current))


def main(argv: list[str] | None = None) -> int:
    from .sc_bert import loader

    torch.set_num_threads(1)
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m scenarios.attack_bert SENTENCE [SENTENCE ...]", file=sys.stderr)
        return 2
    model, tok = loader()
    for s in args:
        print(asdict(attack(model, tok, s, max_edits=2, substitute=True)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
