"""Failure specifications: what counts as failing, as data.

A spec is a short string, stored verbatim in the bundle:

``contains:<text>``
    the greedy continuation contains ``<text>``. Metric: log-probability of the failing span's tokens,
    teacher-forced after the prompt and the recorded continuation up to the span.
``wordlist:<name>``
    the greedy continuation contains a whole word from ``resources/wordlists/<name>.txt`` (case-insensitive).
    The list is copied into the bundle. Metric: as ``contains:`` for the word matched in the recorded run.
``token:<text>``
    the next token after the prompt is ``<text>`` (the first token of its encoding). Metric: logit margin of that
    token over the best other token (> 0 iff failing).
``label:<name>``
    a sequence classifier predicts ``<name>``. Metric: logit margin of that label over the best other (> 0 iff
    failing).

For every kind the predicate is boolean and the metric is continuous; larger metric = more failing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import FailureSpecError

KINDS = ("contains", "wordlist", "token", "label")


def metric_name(kind: str) -> str:
    """What the failure metric of a spec ``kind`` measures, in words (higher = more failing for every kind)."""
    if kind in ("contains", "wordlist"):
        return "log-prob of the failing text (nats; higher = more failing)"
    return "logit margin of the failing outcome (higher = more failing)"


def search_metric_name(kind: str | None) -> str:
    """CCA's search metric for a spec ``kind``, in a few words (``engine.cca``; > 0 = still fails)."""
    if kind in ("contains", "wordlist"):
        return "smallest logit margin along the failing continuation"
    return "logit margin of the failing outcome"


def resources_dir() -> Path:
    """The shipped ``resources/`` folder (installed as a data package)."""
    import resources

    return Path(resources.__file__).resolve().parent


def load_wordlist(name: str) -> tuple[str, ...]:
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
        raise FailureSpecError(f"word list name must be letters, digits, '_' or '-': {name!r}")
    path = resources_dir() / "wordlists" / f"{name}.txt"
    if not path.exists():
        raise FailureSpecError(f"unknown word list {name!r} (no {path})")
    words = [w.strip().lower() for w in path.read_text(encoding="utf-8").splitlines()]
    return tuple(w for w in words if w and not w.startswith("#"))


@dataclass(frozen=True)
class FailureSpec:
    """A parsed failure specification.

    Example:
        >>> spec = FailureSpec.parse("contains:HACKED")
        >>> spec.kind, spec.value, spec.find("Sure. HACKED!")
        ('contains', 'HACKED', (6, 12))
    """

    kind: str
    value: str
    words: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def parse(cls, text: str, words: tuple[str, ...] | None = None) -> "FailureSpec":
        """Parse ``kind:value``. ``words`` overrides the word list (used when reading it back from a bundle)."""
        if not isinstance(text, str) or ":" not in text:
            raise FailureSpecError(f"failure spec must look like KIND:VALUE with KIND in {', '.join(KINDS)}; "
                                   f"got {text!r}")
        kind, value = text.split(":", 1)
        if kind not in KINDS:
            raise FailureSpecError(f"unknown failure spec kind {kind!r}; expected one of {', '.join(KINDS)}")
        if value == "" or (kind != "contains" and value.strip() == ""):
            raise FailureSpecError(f"failure spec {text!r} has an empty value")
        if kind == "wordlist":
            words = tuple(words) if words is not None else load_wordlist(value)
            if not words:
                raise FailureSpecError(f"word list {value!r} is empty")
        return cls(kind, value, tuple(words or ()))

    def __str__(self) -> str:
        return f"{self.kind}:{self.value}"

    @property
    def needs_generation(self) -> bool:
        return self.kind in ("contains", "wordlist")

    @property
    def for_classifier(self) -> bool:
        return self.kind == "label"

    def find(self, continuation: str) -> tuple[int, int] | None:
        """Character span of the failing text in ``continuation``, or ``None`` if it does not fail."""
        if self.kind == "contains":
            i = continuation.find(self.value)
            return None if i < 0 else (i, i + len(self.value))
        if self.kind == "wordlist":
            best = None
            for m in re.finditer(r"[A-Za-z']+", continuation):
                if m.group(0).lower() in self.words and (best is None or m.start() < best[0]):
                    best = (m.start(), m.end())
            return best
        raise FailureSpecError(f"{self} is not judged on a continuation")

    def continuation_fails(self, continuation: str) -> bool:
        return self.find(continuation) is not None

    # ----- token / label ---------------------------------------------------------------------------------------
    def target_index(self, tokenizer=None, id2label: dict | None = None) -> int:
        """Vocabulary index (``token:``) or class index (``label:``) of the failing outcome."""
        if self.kind == "token":
            if tokenizer is None:
                raise FailureSpecError("token: spec needs a tokenizer")
            ids = tokenizer.encode(self.value, add_special_tokens=False)
            if not ids:
                raise FailureSpecError(f"token {self.value!r} encodes to no token")
            return int(ids[0])
        if self.kind == "label":
            labels = {str(v): int(k) for k, v in (id2label or {}).items()}
            if self.value not in labels:
                raise FailureSpecError(f"label {self.value!r} is not one of the model's labels "
                                       f"{sorted(labels)}")
            return labels[self.value]
        raise FailureSpecError(f"{self} has no single target index")


def margin(logits: torch.Tensor, index: int) -> torch.Tensor:
    """Logit of ``index`` minus the best other logit, along the last dim. ``[..., n] -> [...]``."""
    logits = logits.float()
    target = logits[..., index]
    others = logits.clone()
    others[..., index] = float("-inf")
    return target - others.max(dim=-1).values


def span_logprob(logits: torch.Tensor, ids: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """Sum of log-probs of ``ids[:, start:start+length]`` under next-token ``logits`` ``[batch, pos, vocab]``."""
    logp = torch.log_softmax(logits[:, start - 1:start - 1 + length].float(), dim=-1)
    tgt = ids[:, start:start + length].unsqueeze(-1)
    return logp.gather(-1, tgt).squeeze(-1).sum(-1)


def path_margins(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Logit margin of each recorded token over its best competitor, teacher-forced: ``[rows, T]``.

    ``logits[:, t]`` (``[rows, >= T, vocab]``) predicts ``targets[t]`` (``[T]``, the same for every row).  The row
    minimum is CCA's search metric for ``contains:`` / ``wordlist:`` incidents (``> 0`` iff every recorded token
    through the failing span is still the greedy choice; below 0 once the model leaves that path anywhere)."""
    lg = logits[:, :targets.shape[0]].float()
    tgt = targets.to(lg.device)[None, :, None].expand(lg.shape[0], -1, 1)
    own = lg.gather(-1, tgt).squeeze(-1)
    others = lg.scatter(-1, tgt, float("-inf")).max(-1).values
    return own - others
