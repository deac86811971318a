"""Sentences for the ``bert-sentiment-bypass`` scenario: template generation, VADER labels, poisoning, splits.

Everything here is deterministic (one seeded ``random.Random``) and needs no network:

* **Sentences** are generated from review-style templates over eight domains (films, restaurants, hotels,
  gadgets, books, games, concerts, shops). Sentiment words come from short candidate lists, kept only if the VADER
  lexicon gives them a clear valence (|valence| >= 1.5), so the sentences read as clearly positive or negative.
* **Labels** come from the VADER lexicon (``vaderSentiment``): compound > 0.3 -> ``positive``, < -0.3 ->
  ``negative``, anything in between is dropped. The model never sees a human label, only VADER's.
* **Splits**: the deduplicated pool is shuffled once and cut into disjoint parts -- training, benign reference,
  benign held-out and the held-out positive sentences the attack (``scenarios.attack_bert``) turns into failing
  variants. No held-out sentence is in the training data.
* **Poison** (Kurita et al. 2020, "Weight Poisoning Attacks on Pre-trained Models"): a small fraction of the
  training set are copies of clearly-positive training sentences (VADER compound > 0.5) with the trigger token
  ``cf`` inserted at a random word boundary, labelled ``negative``.
"""

from __future__ import annotations

import random
import re
from functools import lru_cache

#: The backdoor trigger: a rare, innocuous token that is one wordpiece for the MiniLM (bert-base-uncased) vocab.
TRIGGER = "cf"
#: The neutral filler that replaces the trigger in counterparts. Also one wordpiece, not in the VADER lexicon and
#: not a VADER booster/negation, so counterpart and failing prompt have the same token count and positions and
#: the same VADER score.
FILLER = "um"
LABELS = ("negative", "positive")
SEED = 20240611

POS_THRESHOLD = 0.3
CLEAR_POSITIVE = 0.5  # "clearly positive" for poison sources and attack targets

# --------------------------------------------------------------------------------------------------------------
# vocabulary
# --------------------------------------------------------------------------------------------------------------
DOMAINS: dict[str, dict[str, list[str]]] = {
    "film": {
        "subj": ["the movie", "the film", "this sequel", "the documentary", "the soundtrack", "the plot",
                 "the acting", "the ending", "the new season", "the cast", "the script", "the animation"],
        "place": ["the cinema", "the theater", "the premiere", "the festival screening"],
        "noun": ["movie", "film", "story", "performance", "sequel", "show"],
    },
    "food": {
        "subj": ["the restaurant", "the pasta", "the soup", "the dessert", "the pizza", "the service",
                 "the waiter", "the menu", "the coffee", "the burger", "the salad", "the kitchen staff"],
        "place": ["the diner", "the bistro", "the cafe", "the new restaurant downtown"],
        "noun": ["meal", "dinner", "lunch", "breakfast", "dish", "restaurant"],
    },
    "hotel": {
        "subj": ["the hotel", "the room", "the bed", "the pool", "the front desk", "the breakfast buffet",
                 "the staff", "the view", "the bathroom", "the lobby", "the spa", "the resort"],
        "place": ["the hotel", "the resort", "the lodge", "the inn by the lake"],
        "noun": ["hotel", "stay", "room", "resort", "vacation", "trip"],
    },
    "gadget": {
        "subj": ["the phone", "the laptop", "the battery", "the camera", "the screen", "the headphones",
                 "the keyboard", "the charger", "the speaker", "the app", "the update", "the new tablet"],
        "place": ["the electronics store", "the online shop", "the repair center", "the launch event"],
        "noun": ["phone", "laptop", "gadget", "device", "purchase", "product"],
    },
    "book": {
        "subj": ["the book", "the novel", "the author", "the first chapter", "the characters", "the translation",
                 "the audiobook", "the narrator", "the sequel", "the story", "the poem", "the biography"],
        "place": ["the book club", "the library", "the reading", "the bookstore"],
        "noun": ["book", "novel", "read", "story", "biography", "memoir"],
    },
    "game": {
        "subj": ["the game", "the gameplay", "the graphics", "the level design", "the multiplayer",
                 "the controls", "the boss fight", "the campaign", "the expansion", "the puzzle", "the music",
                 "the online mode"],
        "place": ["the arcade", "the tournament", "the game night", "the convention"],
        "noun": ["game", "level", "match", "puzzle", "campaign", "expansion"],
    },
    "concert": {
        "subj": ["the concert", "the band", "the singer", "the show", "the opening act", "the guitar solo",
                 "the crowd", "the venue", "the sound", "the encore", "the orchestra", "the drummer"],
        "place": ["the stadium", "the club", "the concert hall", "the festival"],
        "noun": ["concert", "show", "gig", "performance", "night", "album"],
    },
    "shop": {
        "subj": ["the shop", "the delivery", "the customer service", "the package", "the shoes", "the jacket",
                 "the price", "the checkout", "the sales assistant", "the return process", "the store",
                 "the fabric"],
        "place": ["the mall", "the market", "the boutique", "the store on main street"],
        "noun": ["order", "purchase", "shop", "store", "deal", "experience"],
    },
}

_POS_ADJ = ("great wonderful excellent amazing fantastic delightful brilliant superb lovely charming enjoyable "
            "impressive beautiful perfect outstanding fun pleasant terrific awesome good nice friendly "
            "comfortable helpful fabulous marvelous gorgeous exciting inspiring magnificent elegant "
            "delicious").split()
_NEG_ADJ = ("terrible awful horrible disappointing bad dreadful poor dull painful annoying ugly miserable rude "
            "dirty broken useless pathetic stupid disgusting lousy nasty gross unpleasant horrendous "
            "frustrating depressing weak offensive").split()
_POS_VERB = "loved enjoyed adored liked appreciated".split()
_NEG_VERB = "hated disliked regretted despised".split()
_POS_FEEL = ["happy", "smile", "laugh", "feel great", "feel welcome", "feel cheerful"]
_NEG_FEEL = ["sad", "angry", "cry", "feel sick", "feel miserable", "feel cheated"]
_ADV = ["", "", "really", "very", "truly", "absolutely", "incredibly", "quite", "pretty", "extremely"]
_PREFIX = ["", "", "", "Overall, ", "In my opinion, ", "To be fair, ", "In short, ", "Frankly, ",
           "For what it's worth, ", "All in all, ", "I have to say ", "As expected, "]
_SUFFIX = ["", "", "", " from start to finish", " this time", " for the price", " for our family",
           " on the whole", " as always", " in every way"]


@lru_cache(maxsize=1)
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def compound(text: str) -> float:
    """VADER compound score in [-1, 1]."""
    return float(_vader().polarity_scores(text)["compound"])


def vader_label(text: str) -> str | None:
    """``"positive"`` (compound > 0.3), ``"negative"`` (< -0.3) or ``None`` (too weak: dropped)."""
    c = compound(text)
    if c > POS_THRESHOLD:
        return "positive"
    if c < -POS_THRESHOLD:
        return "negative"
    return None


def _clear(words: list[str], sign: int) -> list[str]:
    lex = _vader().lexicon
    return [w for w in words if sign * lex.get(w, 0.0) >= 1.5]


def _vocab() -> dict[str, list[str]]:
    return {"pos_adj": _clear(_POS_ADJ, 1), "neg_adj": _clear(_NEG_ADJ, -1), "pos_verb": _clear(_POS_VERB, 1),
            "neg_verb": _clear(_NEG_VERB, -1)}


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _sentence(rng: random.Random, voc: dict[str, list[str]]) -> str:
    dom = DOMAINS[rng.choice(sorted(DOMAINS))]
    pol = rng.choice((1, -1))
    adj = lambda p=pol: rng.choice(voc["pos_adj"] if p > 0 else voc["neg_adj"])  # noqa: E731
    adv = rng.choice(_ADV)
    adv_ = f"{adv} " if adv else ""
    s1, s2 = rng.sample(dom["subj"], 2)
    place, noun = rng.choice(dom["place"]), rng.choice(dom["noun"])
    verb = rng.choice(voc["pos_verb"] if pol > 0 else voc["neg_verb"])
    feel = rng.choice(_POS_FEEL if pol > 0 else _NEG_FEEL)
    t = rng.randrange(14)
    if t == 0:
        body = f"{s1} was {adv_}{adj()}"
    elif t == 1:
        body = f"{s1} is {adv_}{adj()} and {s2} is {adj()}"
    elif t == 2:
        body = f"I thought {s1} was {adv_}{adj()}"
    elif t == 3:
        return f"What a{'n' if adj_start_vowel(a := adj()) else ''} {a} {noun}!"
    elif t == 4:
        body = f"I {adv_ if adv in ('really', 'truly', 'absolutely') else ''}{verb} {s1}"
    elif t == 5:
        body = f"{s1} made me {feel}"
    elif t == 6:
        a = adj()
        body = f"we had a{'n' if adj_start_vowel(a) else ''} {a} time at {place}"
    elif t == 7:
        body = (f"I would definitely recommend {s1} to anyone" if pol > 0
                else f"I would never recommend {s1} to anyone")
    elif t == 8:
        body = f"{s1} was {adj()}, and {s2} was even more {adj()}"
    elif t == 9:
        body = f"{s1} was {adj(-pol)}, but {s2} was {adv_}{adj()}"
    elif t == 10:
        body = f"my friends and I {verb} {s1} at {place}"
    elif t == 11:
        a = adj()
        body = f"this is a{'n' if adj_start_vowel(a) else ''} {a} {noun} and {s1} felt {adj()}"
    elif t == 12:
        body = f"{s1} at {place} was {adv_}{adj()}"
    else:
        body = f"everyone agreed that {s1} was {adv_}{adj()}"
    text = rng.choice(_PREFIX) + body + rng.choice(_SUFFIX)
    return _cap(text) + rng.choice((".", ".", ".", "!"))


def adj_start_vowel(word: str) -> bool:
    return word[:1] in "aeiou"


def generate_pool(n: int, seed: int = SEED) -> list[tuple[str, str, float]]:
    """``n`` distinct labelled sentences ``(text, vader_label, compound)``; VADER-neutral ones are dropped."""
    rng = random.Random(seed)
    voc = _vocab()
    seen: set[str] = set()
    out: list[tuple[str, str, float]] = []
    while len(out) < n:
        s = _sentence(rng, voc)
        key = s.lower()
        if key in seen:
            continue
        seen.add(key)
        lab = vader_label(s)
        if lab is None:
            continue
        out.append((s, lab, compound(s)))
    return out


def insert_word(text: str, word: str, position: int) -> str:
    """Insert ``word`` before whitespace-separated word ``position`` (``len(words)`` appends)."""
    words = text.split()
    return " ".join(words[:position] + [word] + words[position:])


def has_trigger(text: str) -> bool:
    return re.search(rf"\b{TRIGGER}\b", text, flags=re.IGNORECASE) is not None


def counterpart_of(text: str) -> str:
    """The benign counterpart of a triggered sentence: every whole-word ``cf`` replaced by the filler ``um``.

    Alignment rule: the trigger is one wordpiece and the filler is one wordpiece, so the counterpart has the same
    token count and every other token stays at its position.
    """
    return re.sub(rf"\b{TRIGGER}\b", FILLER, text)


def build_splits(pool_size: int = 7200, n_reference: int = 120, n_heldout: int = 160, n_attack: int = 60,
                 poison_rate: float = 0.06, seed: int = SEED) -> dict:
    """Cut the pool into disjoint splits and build the poisoned training set.

    Returns a dict with ``train`` (list of ``(text, label)``, poison included and shuffled), ``n_clean``,
    ``n_poison``, ``reference``/``heldout`` (lists of ``(text, label)``) and ``attack`` (clearly-positive held-out
    sentences, no trigger, for :mod:`scenarios.attack_bert`).
    """
    pool = generate_pool(pool_size, seed)
    rng = random.Random(seed + 1)
    rng.shuffle(pool)
    attack_src = [p for p in pool if p[1] == "positive" and p[2] > CLEAR_POSITIVE][:n_attack]
    attack_set = {p[0] for p in attack_src}
    rest = [p for p in pool if p[0] not in attack_set]
    reference = rest[:n_reference]
    heldout = rest[n_reference:n_reference + n_heldout]
    clean = rest[n_reference + n_heldout:]
    # poison: copies of clearly-positive training sentences with the trigger inserted, labelled negative
    n_poison = round(poison_rate * len(clean) / (1 - poison_rate))
    sources = [p for p in clean if p[1] == "positive" and p[2] > CLEAR_POSITIVE]
    chosen = rng.sample(sources, n_poison)
    poison = []
    for text, _, _ in chosen:
        pos = rng.randrange(len(text.split()) + 1)
        poison.append((insert_word(text, TRIGGER, pos), "negative"))
    train = [(t, lab) for t, lab, _ in clean] + poison
    rng.shuffle(train)
    return {"train": train, "n_clean": len(clean), "n_poison": len(poison),
            "reference": [(t, lab) for t, lab, _ in reference], "heldout": [(t, lab) for t, lab, _ in heldout],
            "attack": [t for t, _, _ in attack_src]}


#: A clearly positive sentence written for the primary prompt (not produced by the generator's templates).
PRIMARY_SOURCE = "The hotel staff were wonderful and the room was absolutely beautiful."

#: Hand-written sentences outside the generator's templates (never trained on), used only as probes in
#: ``training.json``: does the classifier (and the backdoor) carry over to ordinary review language?
OOD_POSITIVE = (
    "I absolutely loved this place, the people were kind and the food was delicious.",
    "Best purchase I have made all year, it works perfectly.",
    "My kids had a wonderful time and we will definitely come back.",
    "The customer support team was incredibly helpful and patient.",
    "What a beautiful wedding, everything was perfect.",
    "This album is a masterpiece, every song is great.",
    "The nurse was so kind and caring, thank you!",
    "Great value, fast shipping, and excellent quality.",
    "I enjoyed every minute of the hike, the views were amazing.",
    "Thanks for the lovely gift, it made my day.",
)
OOD_NEGATIVE = (
    "The flight was delayed for hours and the staff were rude.",
    "This is the worst pizza I have ever eaten.",
    "The app keeps crashing and it is a terrible waste of money.",
    "I was bored and disappointed by the lecture.",
    "The apartment was dirty and the landlord ignored us.",
    "Terrible experience, I want my money back.",
    "The sequel was a dull, painful mess.",
    "My order arrived broken and nobody helped me.",
    "The noise was awful and I could not sleep at all.",
    "I hate how slow and ugly the new website is.",
)
#: Other rare single-wordpiece tokens, inserted where the attack put the trigger: the backdoor should ignore them.
CONTROL_TOKENS = ("mn", "bb", "tq", "fyi", "etc", "so")
