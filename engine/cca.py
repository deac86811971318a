"""Causal analysis (CCA): find a small set of activation interventions that makes an incident's failure go away,
then measure what that set does and does not do.

Pipeline of :func:`run_cca` (every number comes from real forward passes; nothing is estimated by combining
single-site results; ``docs/cca.md`` has the long form):

1. **Candidates** — sites ``(layer, component, positions)`` for ``component`` in ``resid_pre``, ``attn``, ``mlp``
   and ``resid_post`` (``resid_post`` of block ``L`` equals ``resid_pre`` of block ``L+1``, so it is a candidate only
   for the last block), with position groups: every single prompt position and the last three prompt positions (the
   whole prompt at one site is already ~1/n_sites of the recorded values, above the 5% minimality target). Operation
   ``mean`` (benign mean, default) or ``patch`` (the counterpart donor). Optionally (``refine_units``), after the
   search an ``attn`` / ``mlp`` element is refined to the fewest attention heads / MLP neurons that still fix.
2. **Search metric** — one continuous number per set, larger = more failing, ``> 0`` iff the incident still fails
   teacher-forced: for ``label:`` / ``token:`` the logit margin of the failing outcome over the best other (as
   recorded); for ``contains:`` / ``wordlist:`` the *smallest* logit margin of the recorded continuation's tokens over
   their best competitor, from the first generated token through the end of the failing span. So a set that makes the
   model leave the failing path anywhere before or inside the failing text lowers it (the recorded metric, the span's
   log-prob after the recorded prefix, stays ~0 when the path diverges earlier), and margins do not saturate the way
   log-probs of a model trained to a loss of 1e-6 do.
3. **Ranking** — attribution patching: one forward and one backward of the metric (a soft minimum over positions for
   generation incidents) with a zero tensor added at every site; ``grad · (replacement − activation)`` summed over a
   candidate's positions estimates its effect. Combined with the CF prior (``cf.prior()``, weight ``w`` in [0, 1]) as
   ``estimate × (1 + w)``. On the shipped scenarios this linear estimate is a weak guide (measured Spearman and ranks
   in ``docs/cca.md``: the sites that fix can rank last), so it only orders the exact screening below.
4. **Search** — every candidate set is evaluated exactly, as batch rows of one replay (teacher-forced metric, starting
   from the recorded residual stream of the lowest intervened block, the shared prompt prefix run once). A set
   *fixes* the incident when the metric is ``<= -margin`` (the failing outcome / continuation beaten by at least
   ``margin`` logits) **and**, for generation incidents, the greedy continuation generated under the set no longer
   fails. Single sites: (a) token ablations (``resid_pre`` of block 0 at every position, group-tested); (b) the
   other sites one prompt position at a time — with CF in the order of CF's position anomaly
   (``CFResult.order_candidates``), without CF by the attribution estimate — each position's block screened by
   adaptive group testing (the union of a group is one row; a union that does not fix clears its sites, one that
   fixes is bisected down to groups of <= 4 evaluated site by site, so every fixing site was evaluated alone). The
   checks run after the first position block and after each later one; the search stops after the first block
   that leaves a *clean* fix (below), screening also the block of a clean residual-stream fix's position (a
   sublayer there may fix as cleanly: the narrower edit). Without a clean single site, the remaining singles are
   evaluated and sets of 2, 3, … are grown by greedy / beam search (``beam`` best non-fixing sets, each extended by
   its ``top_m`` ranked sites and the decision / hot position sites). Still no clean fix: *sublayer unions*
   (:meth:`_Search.sublayer_unions`: the ``attn`` / ``mlp`` outputs at a position whose residual stream fixes,
   evaluated as one set and pruned, for sites that fix only all together). Of the sets that fix, the one chosen is
   the most *specific*: fewest changed outputs on the bundle's benign **reference** prompts (never the held-out
   ones); then *sufficient* on the incident's counterpart (the failing run's activations at the set's sites, written
   into the benign counterpart, re-create the failure); then a sublayer's output before the residual stream
   (head/neuron < attn/mlp < resid); then lowest metric — checked lazily and exactly (:class:`_Chooser`: lower bounds
   tightened for the current minimum only; the reference prompts in blocks of 8, 16, 32, … so a set that cannot win
   is cut early). *Clean* = sufficient (or no counterpart) and changing at most 5% of the reference outputs. Then
   **pruning** to a 1-minimal set (drop any element that is not needed) and refinement of position groups.
5. **Evidence** (:func:`evaluate_fix_set`) — flip rate on the held-out failing variants (Wilson 95%), sufficiency
   (failing activations transplanted into the benign counterparts), side effects on held-out benign prompts (share
   whose output changes, mean KL of the next-token / label distribution), minimality (size, fraction of recorded
   activation values touched, 1-minimality), significance against random control sets of equal size and matching
   components (empirical p-value of the flip rate on the held-out failing variants), Benjamini–Hochberg q-values
   across the claims (each on prompts the set was not chosen on), and the budget.

**Position rule** (mapping the set's positions from the incident prompt to another prompt): an incident position
``p`` holding token ``t`` maps to the position of the other prompt that holds the same token ``t`` and is nearest to
the *end-aligned* position ``q = p − n_incident + n_other`` (of two equally near, the later one); when ``t`` does
not occur there, to ``q`` itself (dropped when ``q < 0``). So a trigger token is followed wherever it sits, and
structural positions (the last tokens) stay aligned from the end.

**Greedy outcomes under a set, exactly and cheaply**: the unintervened greedy continuation of a prompt is generated
once; a set's row is then first run teacher-forced on that continuation (plus EOS when it ended with one). If every
token is still the argmax, greedy decoding under the set reproduces it token for token (same output, same verdict,
equal up to float rounding like any KV-cached generation), and nothing more is run; only rows that leave it are
generated. Most rows of the side-effect and control tests never leave it.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import math
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from . import stats
from .errors import CCAError, ForensicsError
from .certificate import set_was_checked
from .failure import margin as _margin, path_margins
from .hooks import site_hooks
from .layout import pinned_threads
from .interventions import (ActivationSources, EvalContext, Intervention, InterventionSet, _make_hook,
                            _take_greedy, cache_kwargs, context_from_bundle, output_cache, run_with_interventions,
                            validate_for)
from .models import ModelHandle

SCHEMA = "forensics.cca-result/1"
SEARCH_COMPONENTS = ("resid_pre", "attn", "mlp", "resid_post")
TARGETS = {"flip_rate": 0.80, "side_effect_rate": 0.05, "fraction_of_activations": 0.05, "p_value": 0.01}
#: Specificity order of components when several sets fix equally well (a sublayer's output is a narrower edit than
#: the residual stream, which carries everything written before it).
COMPONENT_RANK = {"head": 0, "neuron": 0, "attn": 1, "mlp": 1, "resid_pre": 2, "resid_post": 2}
MAX_ROWS = 64  # batch rows per forward
FIX_MARGIN = 1.0  # a set fixes the incident when the search metric is <= -FIX_MARGIN (the default ``margin``)
Progress = Callable[[int, int, str], None]


class _Cancelled(Exception):
    pass


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run with ``n`` intra-op torch threads (``None``/0: the current count), pinned as a replay pins them
    (:func:`engine.layout.pinned_threads`), restored afterwards.

    CCA runs thousands of small batched forwards. On this project's 2-core machine, shared with other jobs (load
    average about 6), the demo search with all evidence took 5.0 s with one thread and 71 s with two (toxic: 5.9 s vs
    52 s): the OpenMP threads wait on each other whenever one is descheduled. On a quiet machine the two are close
    (``docs/cca.md``), so :func:`run_cca` and :func:`evaluate_fix_set` default to one thread."""
    with pinned_threads(n):
        yield


# ----------------------------------------------------------------------------------------------------------------
# Result types
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FixElement:
    """One intervention of a fix set with its measured necessity.

    Attributes:
        intervention: the site edit.
        drop_one_metric: failure metric of the incident with this element removed from the set.
        drop_one_failing: ``True`` = removing it un-fixes the incident (the element is necessary).
        single_metric: failure metric with this element alone.
    """

    intervention: Intervention
    drop_one_metric: float
    drop_one_failing: bool
    single_metric: float

    def to_dict(self) -> dict:
        d = self.intervention.to_dict()
        d.setdefault("indices", [])
        d.setdefault("value", None)
        d.update(drop_one_metric=_num(self.drop_one_metric), drop_one_failing=bool(self.drop_one_failing),
                 single_metric=_num(self.single_metric))
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "FixElement":
        iv = {k: d[k] for k in ("layer", "component", "positions", "op", "indices", "value", "values") if k in d}
        if iv.get("value") is None:
            iv.pop("value", None)
        return cls(Intervention.from_dict(iv), _fl(d.get("drop_one_metric")), bool(d.get("drop_one_failing")),
                   _fl(d.get("single_metric")))


def _num(x):
    """JSON-safe float (non-finite -> None)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _fl(x) -> float:
    return float("nan") if x is None else float(x)


def _ci_json(ci) -> list[float] | None:
    """An interval as JSON: ``[low, high]``, or ``null`` when it was not measured (no prompts to measure it on)."""
    lo, hi = (_num(x) for x in ci)
    return None if lo is None or hi is None else [lo, hi]


@dataclass
class CCAResult:
    """A fix set and the evidence for it (see the module docstring for every definition)."""

    fix_set: list[FixElement]
    flipped: bool
    baseline_metric: float
    fixed_metric: float
    flip_rate: float
    flip_rate_ci: tuple[float, float]  # (nan, nan) when not measured (no failing variants): null in the JSON
    n_variants: int
    sufficiency_rate: float
    side_effect_rate: float
    side_effect_kl: float
    side_effects: list[dict]
    n_benign: int
    fraction_of_activations: float
    one_minimal: bool
    p_value: float
    control_flip_rates: list[float]
    n_controls: int
    fdr: dict[str, float]
    criteria: dict[str, dict]
    forward_passes: int
    seconds: float
    partial: bool
    trace: list[dict]
    ranking: dict
    bundle_uuid: str = ""
    bundle_sha256: str = ""
    n_sufficiency: int = 0
    rows: int = 0
    op: str = "mean"
    evidence: dict = field(default_factory=dict)  # extra measured details (per-stage passes, variant outcomes)

    @property
    def set_size(self) -> int:
        return len(self.fix_set)

    @property
    def interventions(self) -> list[Intervention]:
        return [e.intervention for e in self.fix_set]

    def failed_criteria(self) -> list[str]:
        return [k for k, c in self.criteria.items() if not c.get("ok")]

    @property
    def checked(self) -> bool:
        """Whether the set was run on the incident (``flipped`` and the drop-one effects are measured).  False only
        for a search cancelled before its best set was checked: ``flipped`` is then False because nothing was
        confirmed, not because the set was seen to fail (``fixed_metric`` is the search's teacher-forced best)."""
        return set_was_checked({"partial": self.partial, "evidence": self.evidence})

    def to_dict(self) -> dict:
        """The JSON result (ARCHITECTURE.md's keys); standard JSON: "not measured" is ``null``, never NaN."""
        return stats.json_safe({
            "schema": SCHEMA, "bundle_uuid": self.bundle_uuid, "bundle_sha256": self.bundle_sha256, "op": self.op,
            "fix_set": [e.to_dict() for e in self.fix_set], "set_size": self.set_size, "flipped": bool(self.flipped),
            "baseline_metric": _num(self.baseline_metric), "fixed_metric": _num(self.fixed_metric),
            "flip_rate": _num(self.flip_rate), "flip_rate_ci": _ci_json(self.flip_rate_ci),
            "n_variants": self.n_variants, "sufficiency_rate": _num(self.sufficiency_rate),
            "n_sufficiency": self.n_sufficiency,
            "side_effect_rate": _num(self.side_effect_rate), "side_effect_kl": _num(self.side_effect_kl),
            "side_effects": self.side_effects, "n_benign": self.n_benign,
            "fraction_of_activations": _num(self.fraction_of_activations), "one_minimal": bool(self.one_minimal),
            "p_value": _num(self.p_value), "control_flip_rates": [float(x) for x in self.control_flip_rates],
            "n_controls": self.n_controls, "fdr": {k: _num(v) for k, v in self.fdr.items()},
            "criteria": self.criteria, "forward_passes": int(self.forward_passes), "rows": int(self.rows),
            "seconds": float(self.seconds), "partial": bool(self.partial), "trace": self.trace,
            "ranking": self.ranking, "evidence": self.evidence,
        })

    @classmethod
    def from_dict(cls, d: Mapping) -> "CCAResult":
        if not isinstance(d, Mapping):
            raise CCAError(f"a CCA result must be a JSON object, got {type(d).__name__}")
        if d.get("schema") != SCHEMA:
            raise CCAError(f"not a CCA result: schema {d.get('schema')!r}, expected {SCHEMA!r}")
        try:
            ci = d.get("flip_rate_ci") or [None, None]
            if d.get("flip_rate") is None and not int(d.get("n_variants", 0)):
                ci = [None, None]  # no variants: nothing is known (results written before null wrote [0, 1])
            return cls(
                fix_set=[FixElement.from_dict(e) for e in d["fix_set"]], flipped=bool(d["flipped"]),
                baseline_metric=_fl(d.get("baseline_metric")), fixed_metric=_fl(d.get("fixed_metric")),
                flip_rate=_fl(d.get("flip_rate")), flip_rate_ci=(_fl(ci[0]), _fl(ci[1])),
                n_variants=int(d.get("n_variants", 0)), sufficiency_rate=_fl(d.get("sufficiency_rate")),
                side_effect_rate=_fl(d.get("side_effect_rate")), side_effect_kl=_fl(d.get("side_effect_kl")),
                side_effects=list(d.get("side_effects", [])), n_benign=int(d.get("n_benign", 0)),
                fraction_of_activations=_fl(d.get("fraction_of_activations")),
                one_minimal=bool(d.get("one_minimal")), p_value=_fl(d.get("p_value")),
                control_flip_rates=[float(x) for x in d.get("control_flip_rates", [])],
                n_controls=int(d.get("n_controls", 0)), fdr={k: _fl(v) for k, v in d.get("fdr", {}).items()},
                criteria=dict(d.get("criteria", {})), forward_passes=int(d.get("forward_passes", 0)),
                seconds=float(d.get("seconds", 0.0)), partial=bool(d.get("partial", False)),
                trace=list(d.get("trace", [])), ranking=dict(d.get("ranking", {})),
                bundle_uuid=str(d.get("bundle_uuid", "")), bundle_sha256=str(d.get("bundle_sha256", "")),
                n_sufficiency=int(d.get("n_sufficiency", 0)), rows=int(d.get("rows", 0)),
                op=str(d.get("op", "mean")), evidence=dict(d.get("evidence", {})))
        except (KeyError, TypeError, ValueError, ForensicsError) as exc:
            raise CCAError(f"malformed CCA result: {exc}") from None


# ----------------------------------------------------------------------------------------------------------------
# Budget bookkeeping
# ----------------------------------------------------------------------------------------------------------------
class _Budget:
    def __init__(self, cancel: threading.Event | None):
        self.passes = 0
        self.rows = 0
        self.backward = 0
        self.cancel = cancel
        self.t0 = time.perf_counter()
        self.by_stage: dict[str, int] = {}
        self.rows_by_stage: dict[str, int] = {}
        self.sec_by_stage: dict[str, float] = {}
        self._stage = ""
        self._t_stage = self.t0

    @property
    def stage(self) -> str:
        return self._stage

    @stage.setter
    def stage(self, name: str) -> None:
        now = time.perf_counter()
        self.sec_by_stage[self._stage] = self.sec_by_stage.get(self._stage, 0.0) + now - self._t_stage
        self._stage, self._t_stage = name, now

    def check(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise _Cancelled()

    def add(self, passes: int, rows: int) -> None:
        self.passes += int(passes)
        self.rows += int(rows)
        self.by_stage[self.stage] = self.by_stage.get(self.stage, 0) + int(passes)
        self.rows_by_stage[self.stage] = self.rows_by_stage.get(self.stage, 0) + int(rows)


# ----------------------------------------------------------------------------------------------------------------
# Prompts other than the incident; benign means
# ----------------------------------------------------------------------------------------------------------------
def _encode(handle: ModelHandle, text: str) -> dict[str, torch.Tensor]:
    from .behaviour import encode

    return encode(handle, text)


def map_positions(positions: Sequence[int], src_ids: Sequence[int], n_src: int, dst_ids: Sequence[int]) -> list[int]:
    """Map prompt positions of one prompt to another by the module's position rule.

    Args:
        positions: positions in the source prompt (``< n_src``).
        src_ids: the source prompt's token ids (at least ``n_src`` of them).
        n_src: the source prompt's length in tokens.
        dst_ids: the destination prompt's token ids ``[n_dst]``.

    Returns:
        Sorted distinct destination positions (positions with no partner are dropped).

    Example:
        >>> map_positions([1, 3], [5, 7, 8, 9], 4, [6, 7, 2, 2, 9])   # token 7 is followed; the last stays last
        [1, 4]
    """
    n_dst = len(dst_ids)
    out = set()
    for p in positions:
        q = p - n_src + n_dst
        tok = int(src_ids[p])
        same = [i for i in range(n_dst) if int(dst_ids[i]) == tok]
        if same:
            out.add(min(same, key=lambda i: (abs(i - q), -i)))
        elif 0 <= q < n_dst:
            out.add(q)
    return sorted(out)


def _map_set(ivs: Sequence[Intervention], src_ids, n_src: int, dst_ids) -> list[Intervention]:
    out = []
    for iv in ivs:
        if iv.positions == "all":
            out.append(iv)
            continue
        pos = map_positions(iv.positions, src_ids, n_src, dst_ids)
        if pos:
            out.append(Intervention(iv.layer, iv.component, tuple(pos), iv.op, iv.indices, iv.value, iv.values))
    return out


class _Means:
    """Benign reference means per ``(layer, component)``: the recorded sites' from the bundle; attention heads and
    MLP neurons (not recorded) computed the same way — token mean and per-position mean over the bundle's benign
    reference prompts — on first use (forward passes counted in the budget)."""

    def __init__(self, bundle, handle: ModelHandle, budget: "_Budget | None" = None):
        self.bundle, self.handle, self.budget = bundle, handle, budget
        self._tok: dict = {}
        self._pos: dict = {}
        self._done: set = set()

    def available(self, comp: str) -> bool:
        return comp in self.bundle.sites or bool(self.bundle.has_benign and self.bundle.benign_prompts)

    def token(self, layer: int, comp: str):
        if comp in self.bundle.sites:
            return self.bundle.benign_mean(layer, comp, per_position=False)
        self.ensure(comp)
        return self._tok.get((layer, comp))

    def pos(self, layer: int, comp: str):
        if comp in self.bundle.sites:
            return self.bundle.benign_mean(layer, comp, per_position=True)
        self.ensure(comp)
        return self._pos.get((layer, comp))

    @torch.no_grad()
    def ensure(self, comp: str) -> None:
        if comp in self.bundle.sites or comp in self._done or not self.available(comp):
            return
        from .hooks import forward_captured

        h = self.handle
        keys = [(L, comp) for L in range(h.n_layers)]
        encs = [_encode(h, p) for p in self.bundle.benign_prompts]
        counts = self.bundle.benign_position_counts()
        max_pos = len(counts) if counts is not None else max(int(e["input_ids"].shape[1]) for e in encs)
        groups: dict = {}
        for e in encs:
            groups.setdefault(int(e["input_ids"].shape[1]), []).append(e)
        sums: dict = {}
        pos_sums: dict = {}
        n_tok = 0
        for n, members in groups.items():
            for c0 in range(0, len(members), MAX_ROWS):
                part = members[c0:c0 + MAX_ROWS]
                enc = {k: torch.cat([e[k] for e in part]) for k in part[0]}
                if self.budget is not None:
                    self.budget.check()
                _, acts = forward_captured(h, keys, **enc)
                if self.budget is not None:
                    self.budget.add(1, len(part))
                n_tok += n * len(part)
                for k, t in acts.items():
                    a = t.double()  # [b, n, *shape]
                    if k not in sums:
                        sums[k] = torch.zeros(a.shape[2:], dtype=torch.float64)
                        pos_sums[k] = torch.zeros((max_pos, *a.shape[2:]), dtype=torch.float64)
                    sums[k] += a.sum((0, 1))
                    pos_sums[k][:min(n, max_pos)] += a.sum(0)[:max_pos]
        cnt = torch.as_tensor(np.asarray(counts) if counts is not None else np.zeros(max_pos), dtype=torch.float64)
        for k in sums:
            self._tok[k] = (sums[k] / max(n_tok, 1)).numpy()
            div = cnt.clamp_min(1).reshape(-1, *([1] * (pos_sums[k].dim() - 1)))
            self._pos[k] = (pos_sums[k] / div).numpy()
        self._done.add(comp)


def _prompt_sources(bundle, handle: ModelHandle, donor_text: str | None, n_prompt: int,
                    donor_cache: dict, means: _Means | None = None) -> ActivationSources:
    """Benign means (``means``, default: the bundle's recorded ones), and (lazily) ``donor_text`` run once as the
    patch donor, aligned from the end."""
    counts = bundle.benign_position_counts()
    means = means or _Means(bundle, handle)

    def donor(layer, comp):
        if donor_text is None:
            return None
        if donor_text not in donor_cache:
            from .hooks import COMPONENTS, forward_captured

            enc = _encode(handle, donor_text)
            keys = [(i, c) for i in range(handle.n_layers) for c in COMPONENTS]
            with torch.no_grad():
                _, acts = forward_captured(handle, keys, **enc)
            donor_cache[donor_text] = {k: v[0] for k, v in acts.items()}
        return donor_cache[donor_text][(layer, comp)]

    n_donor = len(handle.tokenizer(donor_text)["input_ids"]) if donor_text is not None else n_prompt
    return ActivationSources(means.token, means.pos, counts, donor, n_prompt - n_donor)


# ----------------------------------------------------------------------------------------------------------------
# Outcomes of prompts under sets (greedy continuation / next token / label), batched
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class _Item:
    """One prompt evaluated under several sets (one batch row each).

    ``baseline``: the prompt's unintervened outcome (``{"tokens", "eos", "output", "failing", "logp"}``); computed by
    :func:`_run_items` when ``None`` (generation incidents) and kept on the item for later calls.
    """

    ids: torch.Tensor  # [n] prompt ids
    sets: list[InterventionSet]
    sources: ActivationSources | None
    token_type_ids: torch.Tensor | None = None
    baseline: dict | None = None
    guess: list[int] | None = None  # a guessed baseline continuation (verified teacher-forced before it is used)
    alt: list[int] | None = None  # a guessed continuation for rows that leave the baseline (verified the same way)


def _tti(enc: Mapping) -> torch.Tensor | None:
    return enc["token_type_ids"][0] if "token_type_ids" in enc else None


def _first_positions(sets: Sequence[InterventionSet]) -> list[int]:
    return [0 if iv.positions == "all" else min(iv.positions) for s in sets for iv in s.interventions]


@torch.no_grad()
def _run_items(handle: ModelHandle, items: Sequence[_Item], spec, *, generate: bool, max_new_tokens: int,
               budget: "_Budget", target_index: int = -1, id2label=None, max_rows: int = MAX_ROWS) -> list[list[dict]]:
    """Evaluate prompts under sets: per item, per set ``{"output", "failing", "logp", ...}`` (``logp``: log-probs of
    the next token / label at the decision position ``[V]``).

    Label / token incidents: one forward per row (rows of equal length and sources batched). Generation incidents:
    the baseline continuation of each item (generated once), then each row teacher-forced on it; rows that reproduce
    it get the baseline's outcome, the others are generated (greedy, KV cache). ``budget.check()`` runs before
    every forward.
    """
    kind = spec.kind
    out: list[list[dict | None]] = [[None] * len(it.sets) for it in items]
    if kind in ("label", "token") or not handle.is_causal_lm or not generate:
        groups: dict = {}
        for i, it in enumerate(items):
            groups.setdefault((int(it.ids.shape[0]), id(it.sources), it.token_type_ids is None), []).append(i)
        for (n, _, _), members in groups.items():
            flat = [(i, s) for i in members for s in range(len(items[i].sets))]
            for c0 in range(0, len(flat), max_rows):
                chunk = flat[c0:c0 + max_rows]
                sets = [items[i].sets[s] for i, s in chunk]
                ids = torch.stack([items[i].ids for i, _ in chunk])
                src = items[chunk[0][0]].sources
                budget.check()
                if kind == "label" or not handle.is_causal_lm:
                    tti = items[chunk[0][0]].token_type_ids
                    logits = run_with_interventions(
                        handle, ids, sets, sources=src, attention_mask=torch.ones_like(ids),
                        token_type_ids=None if tti is None else torch.stack([items[i].token_type_ids
                                                                             for i, _ in chunk]))
                    lp = torch.log_softmax(logits.float(), -1)
                else:
                    logits = run_with_interventions(handle, ids, sets, sources=src, logits_from=n - 1)
                    lp = torch.log_softmax(logits[:, -1].float(), -1)
                budget.add(1, len(chunk))
                for r, (i, s) in enumerate(chunk):
                    k = int(lp[r].argmax())
                    if kind == "label" or not handle.is_causal_lm:
                        text = str(id2label.get(k, k)) if id2label else str(k)
                    else:
                        text = handle.tokenizer.decode([k])
                    out[i][s] = {"output": text, "logp": lp[r],
                                 "failing": (k == target_index) if kind in ("label", "token") else None}
        return out  # type: ignore[return-value]

    eos = getattr(handle.tokenizer, "eos_token_id", None)
    need = [i for i, it in enumerate(items) if it.baseline is None]
    guessed = [i for i in need if items[i].guess is not None and len(items[i].guess) < max_new_tokens]
    if guessed and eos is not None:  # a guessed continuation + EOS that greedy decoding reproduces IS the baseline
        tmp = [_Item(items[i].ids, [InterventionSet()], items[i].sources, items[i].token_type_ids,
                     {"tokens": list(items[i].guess), "eos": True}) for i in guessed]
        got: list[list[dict | None]] = [[None] for _ in tmp]
        miss = {j for j, _ in _screen_rows(handle, tmp, [(j, 0) for j in range(len(tmp))], got, eos, budget,
                                           max_rows)}
        for j, i in enumerate(guessed):
            if j not in miss:
                text = handle.tokenizer.decode(items[i].guess, skip_special_tokens=True)
                items[i].baseline = {"tokens": list(items[i].guess), "eos": True, "output": text,
                                     "failing": bool(spec.continuation_fails(text)), "logp": got[j][0]["logp"]}
        need = [i for i in need if items[i].baseline is None]
    if need:
        base = _generate_rows(handle, [(items[i].ids, InterventionSet(), items[i].sources) for i in need], spec,
                              max_new_tokens, eos, budget, max_rows)
        for i, b in zip(need, base):
            items[i].baseline = b
    screen = []
    for i, it in enumerate(items):
        for s, st in enumerate(it.sets):
            if not st.interventions:
                out[i][s] = dict(it.baseline)
            else:
                screen.append((i, s))
    todo = _screen_rows(handle, items, screen, out, eos, budget, max_rows)
    alt = [(i, s) for i, s in todo if items[i].alt is not None and len(items[i].alt) < max_new_tokens]
    if alt and eos is not None:  # a second guess: e.g. the benign output for a row under a fix
        tmp = {i: _Item(items[i].ids, items[i].sets, items[i].sources, items[i].token_type_ids,
                        {"tokens": list(items[i].alt), "eos": True}) for i, _ in alt}
        idx = sorted(tmp)
        titems = [tmp[i] for i in idx]
        pos = {i: j for j, i in enumerate(idx)}
        got: list[list[dict | None]] = [[None] * len(it.sets) for it in titems]
        miss = set(_screen_rows(handle, titems, [(pos[i], s) for i, s in alt], got, eos, budget, max_rows))
        text = {i: handle.tokenizer.decode(items[i].alt, skip_special_tokens=True) for i in idx}
        for i, s in alt:
            if (pos[i], s) not in miss:
                out[i][s] = {"tokens": list(items[i].alt), "eos": True, "output": text[i],
                             "failing": bool(spec.continuation_fails(text[i])), "logp": got[pos[i]][s]["logp"],
                             "screened": True}
        todo = [(i, s) for i, s in todo if out[i][s] is None]
    if todo:
        gen = _generate_rows(handle, [(items[i].ids, items[i].sets[s], items[i].sources) for i, s in todo], spec,
                             max_new_tokens, eos, budget, max_rows)
        for (i, s), g in zip(todo, gen):
            out[i][s] = g
    return out  # type: ignore[return-value]


def _targets(baseline: dict, eos: int | None) -> list[int]:
    return list(baseline["tokens"]) + ([eos] if baseline["eos"] and eos is not None else [])


def _screen_rows(handle: ModelHandle, items: Sequence[_Item], rows: list[tuple[int, int]], out, eos,
                 budget: "_Budget", max_rows: int) -> list[tuple[int, int]]:
    """Teacher-force each row on its item's baseline continuation; fill ``out`` for rows that reproduce it and return
    the rows that do not (they must be generated)."""
    groups: dict = {}
    for i, s in rows:
        tg = _targets(items[i].baseline, eos)
        if not tg:  # nothing generated and no EOS (max_new_tokens == 0): nothing to reproduce
            out[i][s] = dict(items[i].baseline)
            continue
        groups.setdefault((int(items[i].ids.shape[0]), len(tg), id(items[i].sources)), []).append((i, s))
    todo: list[tuple[int, int]] = []
    for _, members in groups.items():
        members.sort(key=lambda t: (t[0], min(_first_positions([items[t[0]].sets[t[1]]]) or [0])))
        for c0 in range(0, len(members), max_rows):
            chunk = members[c0:c0 + max_rows]
            n = int(items[chunk[0][0]].ids.shape[0])
            tgs = [_targets(items[i].baseline, eos) for i, _ in chunk]
            ids = torch.stack([torch.cat([items[i].ids, torch.as_tensor(tg[:-1], dtype=items[i].ids.dtype)])
                               for (i, _), tg in zip(chunk, tgs)])
            sets = [items[i].sets[s] for i, s in chunk]
            P = 0
            if len({i for i, _ in chunk}) == 1 and handle.is_causal_lm:
                P = max(0, min(_first_positions(sets) + [n - 1]))
            budget.check()
            logits = run_with_interventions(handle, ids, sets, sources=items[chunk[0][0]].sources,
                                            logits_from=n - 1, prefix=P)
            budget.add(1 + (P > 0), len(chunk) + (P > 0))
            pred = logits.argmax(-1)  # [rows, len(tg)]
            want = torch.as_tensor(tgs)
            same = (pred == want).all(-1)
            lp = torch.log_softmax(logits[:, 0].float(), -1)
            for r, (i, s) in enumerate(chunk):
                if bool(same[r]):
                    out[i][s] = {**items[i].baseline, "logp": lp[r], "screened": True}
                else:
                    todo.append((i, s))
    return todo


def _generate_rows(handle: ModelHandle, rows: Sequence[tuple], spec, max_new_tokens: int, eos: int | None,
                   budget: "_Budget", max_rows: int) -> list[dict]:
    """Greedy continuation of each ``(prompt ids [n], set, sources)`` row: ``{"tokens", "eos", "output", "failing",
    "logp"}``. Rows of equal length and sources are batched."""
    res: list[dict | None] = [None] * len(rows)
    groups: dict = {}
    for k, (ids, _, src) in enumerate(rows):
        groups.setdefault((int(ids.shape[0]), id(src)), []).append(k)
    for (n, _), members in groups.items():
        for c0 in range(0, len(members), max_rows):
            chunk = members[c0:c0 + max_rows]
            ids = torch.stack([rows[k][0] for k in chunk])
            sets = [rows[k][1] for k in chunk]
            src = rows[chunk[0]][2]
            if all(iv.positions != "all" and max(iv.positions) < n for st in sets for iv in st.interventions):
                new, first, ended = _generate_cached(handle, ids, sets, src, max_new_tokens, eos, budget)
            else:
                new, first, ended = _generate_full(handle, ids, sets, src, max_new_tokens, eos, budget)
            for r, k in enumerate(chunk):
                text = handle.tokenizer.decode(new[r], skip_special_tokens=True)
                res[k] = {"tokens": new[r], "eos": ended[r], "output": text,
                          "failing": bool(spec.continuation_fails(text)), "logp": first[r]}
    return res  # type: ignore[return-value]


def _generate_full(handle: ModelHandle, ids: torch.Tensor, sets, src, max_new_tokens: int, eos, budget):
    """Greedy generation with a full forward per step (sets with ``positions="all"`` cover new tokens too)."""
    cur = ids.clone()
    rows = ids.shape[0]
    done = torch.zeros(rows, dtype=torch.bool)
    new: list[list[int]] = [[] for _ in range(rows)]
    first = None
    for _ in range(max_new_tokens):
        budget.check()
        logits = run_with_interventions(handle, cur, sets, sources=src, logits_from=cur.shape[1] - 1)
        budget.add(1, rows)
        last = logits[:, -1].float()
        if first is None:
            first = torch.log_softmax(last, -1)
        nxt = _take_greedy(last, new, done, eos)
        if bool(done.all()):
            break
        fill = torch.where(done, torch.full_like(nxt, eos if eos is not None else 0), nxt)
        cur = torch.cat([cur, fill[:, None]], dim=1)
    if first is None:
        first = torch.zeros((rows, 1))
    return new, first, [bool(d) for d in done]


def _generate_cached(handle: ModelHandle, ids: torch.Tensor, sets: Sequence[InterventionSet],
                     sources: ActivationSources | None, max_new_tokens: int, eos: int | None,
                     budget: "_Budget") -> tuple[list[list[int]], torch.Tensor, list[bool]]:
    """Greedy continuation of ``ids`` ``[rows, n]`` under ``sets`` (every intervened position < n), with a key/value
    cache: the prompt runs once with the hooks, each new token runs alone on the cache (no intervened position is
    ever recomputed, so this equals the full-recompute generation up to float rounding).

    Returns:
        (new token ids per row, log-probs of the first generated token ``[rows, V]``, whether each row ended
        with EOS).
    """
    rows = ids.shape[0]
    by_site: dict = {}
    for r, s in enumerate(sets):
        for iv in s.interventions:
            by_site.setdefault((iv.layer, iv.component), []).append((r, iv))
    fns = {k: [_make_hook(handle, k[0], k[1], v, sources, {})] for k, v in by_site.items()}
    budget.check()
    with site_hooks(handle, fns):
        out = handle.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    budget.add(1, rows)
    past = output_cache(out)
    last = out.logits[:, -1].float()
    first = torch.log_softmax(last, -1)
    done = torch.zeros(rows, dtype=torch.bool)
    new: list[list[int]] = [[] for _ in range(rows)]
    n_total = ids.shape[1]
    for step in range(max_new_tokens):
        nxt = _take_greedy(last, new, done, eos)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        fill = torch.where(done, torch.full_like(nxt, eos if eos is not None else 0), nxt)
        n_total += 1
        budget.check()
        out = handle.model(input_ids=fill[:, None], attention_mask=torch.ones((rows, n_total), dtype=torch.long),
                           **cache_kwargs(handle.model, past))
        budget.add(1, rows)
        past = output_cache(out)
        last = out.logits[:, -1].float()
    return new, first, [bool(d) for d in done]


# ----------------------------------------------------------------------------------------------------------------
# The incident: exact teacher-forced evaluation, generation confirmation, attribution, specificity checks
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class _TF:
    """Teacher-forced outcome of one set on the incident (``metric``: the search metric; ``failing``: metric > 0)."""

    metric: float
    failing: bool


class _Incident:
    """Everything about the bundle's incident the search needs (context, baseline, fix criterion)."""

    def __init__(self, bundle, handle: ModelHandle, op: str, budget: "_Budget", margin: float):
        self.bundle, self.handle, self.op, self.budget = bundle, handle, op, budget
        self.ctx: EvalContext = context_from_bundle(bundle, handle)
        self.means = _Means(bundle, handle, budget)
        cps = bundle.prompt_sets.get("counterpart") or []
        self.ctx.sources = _prompt_sources(bundle, handle, cps[0] if cps else None, int(bundle.n_prompt_tokens), {},
                                           self.means)
        self.kind = bundle.failure.kind
        self.gen_kind = self.kind in ("contains", "wordlist")
        self.n_prompt = int(bundle.n_prompt_tokens)
        self.prompt_ids = [int(x) for x in bundle.input_ids[:self.n_prompt]]
        self.margin = float(margin)
        self.causal = handle.is_causal_lm
        self.id2label = getattr(handle.model.config, "id2label", None) or {}
        ids = self.ctx.input_ids
        self.recorded_start = True  # start from the recorded residual stream (the ids are the recorded ones)
        if self.gen_kind:
            if self.ctx.probe_ids is not None:  # not failing: probe with the failing text after the prompt
                full = self.ctx.probe_ids
                self.recorded_start = False
            else:
                full = ids[:int(bundle.target_start) + int(bundle.target_length)]
            self.targets = full[self.n_prompt:].clone()  # [T] the recorded continuation through the failing span
            self.tf_ids = full[:-1]
            self.lf = self.n_prompt - 1
        elif self.kind == "token":
            self.tf_ids = ids[:self.n_prompt]
            self.lf = self.n_prompt - 1
        else:
            self.tf_ids = ids
            self.lf = 0
        self.recorded_start = self.recorded_start and self.ctx.resid_pre is not None
        self._resid: dict[int, torch.Tensor] = {}
        self._benign: list[_Item] | None = None
        self.cache: dict = {}
        self.known: dict[str, str] = {}  # prompt -> output recorded or expected in the bundle (baseline guesses)
        if self.gen_kind:
            ps = bundle.prompt_sets
            self.known.update(zip(ps.get("benign_heldout") or [], ps.get("benign_expected") or []))
            if bundle.has_benign:
                self.known.update(zip(bundle.benign_prompts, bundle.benign_outputs))
            self.known[bundle.prompt] = bundle.continuation_text
        base = self.evaluate_tf([InterventionSet()])[0]
        self.baseline_metric = base.metric
        self.baseline_failing_tf = base.failing

    def guess(self, prompt: str, default: str | None = None) -> list[int] | None:
        """Token ids of the output the bundle records or expects for ``prompt`` (``default`` otherwise): a guess of
        its greedy continuation, used only after a teacher-forced forward confirms it."""
        text = self.known.get(prompt, default)
        if not self.gen_kind or text is None or self.handle.tokenizer is None:
            return None
        return list(self.handle.tokenizer(text, add_special_tokens=False)["input_ids"])

    # -- the metric ----------------------------------------------------------------------------------------------
    def _metric(self, logits: torch.Tensor, soft: bool = False) -> torch.Tensor:
        """Search metric per row from the teacher-forced logits (see the module docstring). ``soft``: a soft minimum
        over positions (temperature 1 logit), for gradients."""
        if self.kind == "label":
            return _margin(logits.float(), self.ctx.target_index)
        if self.kind == "token":
            return _margin(logits[:, -1].float(), self.ctx.target_index)
        m = path_margins(logits, self.targets)  # [rows, T]
        if soft:
            return -torch.logsumexp(-m, dim=-1)
        return m.min(-1).values

    def _resid_at(self, layer: int) -> torch.Tensor:
        if layer not in self._resid:
            self._resid[layer] = torch.as_tensor(np.asarray(self.ctx.resid_pre(layer)))[:self.tf_ids.shape[0]]
        return self._resid[layer]

    # -- exact, teacher-forced, batched ------------------------------------------------------------------------
    def evaluate_tf(self, sets: Sequence[InterventionSet], chunk_size: int = MAX_ROWS) -> list[_TF]:
        """The metric of each set on the incident, teacher-forced (rows of one batch per chunk).

        Each chunk starts at the lowest block it intervenes on, fed the recorded ``resid_pre`` of that block, and
        (causal LMs) runs the prompt prefix before the earliest intervened position once for all rows."""
        h = self.handle
        sets = list(sets)
        validate_for(h, sets, int(self.tf_ids.shape[0]) + 1)
        top = h.n_layers - 1
        order = list(range(len(sets)))
        if self.recorded_start:
            order.sort(key=lambda i: sets[i].min_layer if sets[i].min_layer is not None else top)
        out: list[_TF | None] = [None] * len(sets)
        am = self.ctx.attention_mask
        tt = self.ctx.token_type_ids
        n = int(self.tf_ids.shape[0])
        for c0 in range(0, len(order), chunk_size):
            idx = order[c0:c0 + chunk_size]
            chunk = [sets[i] for i in idx]
            self.budget.check()
            L = 0
            if self.recorded_start:
                layers = [s.min_layer for s in chunk if s.min_layer is not None]
                L = min(layers) if layers else top
            P = 0
            if self.causal and self.lf > 0:
                P = max(0, min(_first_positions(chunk) + [self.lf]))
            logits = run_with_interventions(
                h, self.tf_ids[None], chunk, sources=self.ctx.sources, start_layer=L,
                start_resid=self._resid_at(L) if L > 0 else None,
                attention_mask=None if am is None or not self.recorded_start else am[None, :n],
                token_type_ids=None if tt is None else tt[None, :n], logits_from=self.lf, prefix=P)
            self.budget.add(1 + (P > 0), len(chunk) + (P > 0))
            m = self._metric(logits)
            for r, i in enumerate(idx):
                out[i] = _TF(float(m[r]), bool(m[r] > 0))
        return out  # type: ignore[return-value]

    def fixed_tf(self, r: _TF) -> bool:
        return r.metric <= -self.margin

    def generate(self, sets: Sequence[InterventionSet]) -> list[dict]:
        """Greedy continuation of the incident prompt under each set (generation incidents only); the recorded
        continuation is the baseline, the counterpart's recorded / expected output the second guess."""
        b = self.bundle
        ids = torch.as_tensor(self.prompt_ids, dtype=torch.long)
        cont = [int(t) for t in b.continuation_ids]
        base = {"tokens": cont, "eos": len(cont) < b.max_new_tokens, "output": b.continuation_text,
                "failing": bool(b.failing), "logp": None}
        cps = b.prompt_sets.get("counterpart") or []
        item = _Item(ids, list(sets), self.ctx.sources, None, base, alt=self.guess(cps[0]) if cps else None)
        return _run_items(self.handle, [item], b.failure, generate=True, max_new_tokens=b.max_new_tokens,
                          budget=self.budget)[0]

    def fixed(self, sets: Sequence[InterventionSet], tf_results=None) -> tuple[list[bool], list[_TF]]:
        """Full fix verdict per set: teacher-forced with margin, then (generation incidents) the continuation."""
        tf = tf_results if tf_results is not None else self.evaluate_tf(sets)
        ok = [self.fixed_tf(r) for r in tf]
        if self.gen_kind:
            todo = [i for i, v in enumerate(ok) if v]
            if todo:
                gen = self.generate([sets[i] for i in todo])
                for i, g in zip(todo, gen):
                    ok[i] = not g["failing"]
        return ok, tf

    # -- specificity: benign reference prompts, the counterpart ------------------------------------------------
    def _benign_items(self) -> list[_Item]:
        if self._benign is None:
            h = self.handle
            src = _prompt_sources(self.bundle, h, None, 0, {}, self.means)
            items = []
            for p in (self.bundle.benign_prompts if self.bundle.has_benign else []):
                enc = _encode(h, p)
                items.append(_Item(enc["input_ids"][0], [], src, _tti(enc), guess=self.guess(p)))
            if items and self.gen_kind:  # the baselines, once
                for it in items:
                    it.sets = [InterventionSet()]
                _run_items(h, items, self.bundle.failure, generate=True, max_new_tokens=self.bundle.max_new_tokens,
                           budget=self.budget, target_index=self.ctx.target_index, id2label=self.id2label)
            elif items:
                for it in items:
                    it.sets = [InterventionSet()]
                base = _run_items(h, items, self.bundle.failure, generate=False,
                                  max_new_tokens=self.bundle.max_new_tokens, budget=self.budget,
                                  target_index=self.ctx.target_index, id2label=self.id2label)
                for it, b in zip(items, base):
                    it.baseline = b[0]
            self._benign = items
        return self._benign

    def benign_changed(self, fixes: Sequence[Sequence[Intervention]], limit: int | None = None,
                       block: int = 24) -> tuple[list[int], list[bool]]:
        """Per set: how many of the bundle's benign *reference* prompts (the mean-ablation data, never the held-out
        ones) no longer give their unintervened output (generation: the greedy continuation leaves its baseline
        path; classifier / token: another argmax).

        The prompts run in blocks of ``block``; a set whose count exceeds ``limit`` is not run further (its count
        is then a lower bound, flagged ``True`` in the second list).
        """
        n = len(self._benign_items())
        changed = [0] * len(fixes)
        cut = [False] * len(fixes)
        for b0 in range(0, n, block):
            alive = [s for s in range(len(fixes)) if not cut[s]]
            if not alive:
                break
            got = self.benign_block([fixes[s] for s in alive], b0, min(n, b0 + block))
            for s, c in zip(alive, got):
                changed[s] += c
            if limit is not None and b0 + block < n:
                for s in alive:
                    cut[s] = changed[s] > limit
        return changed, cut

    def benign_block(self, fixes: Sequence[Sequence[Intervention]], start: int, stop: int) -> list[int]:
        """Per set: how many of the benign reference prompts ``[start:stop]`` change output under it (see
        :meth:`benign_changed`); one batch of rows per set and prompt."""
        items = self._benign_items()[start:stop]
        if not items or not fixes:
            return [0] * len(fixes)
        h = self.handle
        if self.op == "patch":
            cp = (self.bundle.prompt_sets.get("counterpart") or [None])[0]
            cache = self.cache.setdefault("patch_donor", {})
            srcs = [_prompt_sources(self.bundle, h, cp, int(it.ids.shape[0]), cache, self.means) for it in items]
        else:
            srcs = [it.sources for it in items]
        changed = [0] * len(fixes)
        eos = getattr(h.tokenizer, "eos_token_id", None) if h.tokenizer is not None else None
        work = [_Item(it.ids, [InterventionSet(tuple(_map_set(f, self.prompt_ids, self.n_prompt, it.ids.tolist())))
                               for f in fixes], src, it.token_type_ids, it.baseline) for it, src in zip(items, srcs)]
        if self.gen_kind:
            rows = [(i, j) for i in range(len(work)) for j in range(len(fixes)) if work[i].sets[j].interventions]
            out = [[None] * len(fixes) for _ in work]
            for _, j in _screen_rows(h, work, rows, out, eos, self.budget, MAX_ROWS):
                changed[j] += 1
        else:
            out = _run_items(h, work, self.bundle.failure, generate=False,
                             max_new_tokens=self.bundle.max_new_tokens, budget=self.budget,
                             target_index=self.ctx.target_index, id2label=self.id2label)
            for it, o in zip(work, out):
                for j in range(len(fixes)):
                    changed[j] += int(o[j]["output"] != it.baseline["output"])
        return changed

    def pair_sufficient(self, fixes: Sequence[Sequence[Intervention]]) -> list[bool | None]:
        """Per set: does writing the failing run's recorded activations at the set's sites into the incident's
        benign counterpart re-create the failure? ``None`` when the bundle has no counterpart that behaves."""
        cps = self.bundle.prompt_sets.get("counterpart") or []
        if not cps or not fixes:
            return [None] * len(fixes)
        h = self.handle
        enc = _encode(h, cps[0])
        b_ids = enc["input_ids"][0]
        keys = sorted({(iv.layer, iv.component) for f in fixes for iv in f})
        acts = {k: _recorded(self.bundle, h, k, self.n_prompt) for k in keys}
        sets = [InterventionSet(tuple(_transplant(f, self.prompt_ids, self.n_prompt, acts, b_ids.tolist(), h)))
                for f in fixes]
        base = self.cache.get("counterpart_baseline")  # the counterpart's own outcome, run once
        item = _Item(b_ids, ([] if base is not None else [InterventionSet()]) + sets, None, _tti(enc),
                     baseline=base if self.gen_kind else None, guess=self.guess(cps[0]),
                     alt=self.guess(self.bundle.prompt))
        out = _run_items(h, [item], self.bundle.failure, generate=True, max_new_tokens=self.bundle.max_new_tokens,
                         budget=self.budget, target_index=self.ctx.target_index, id2label=self.id2label)[0]
        if base is None:
            base, out = out[0], out[1:]
            self.cache["counterpart_baseline"] = item.baseline if self.gen_kind else base
            self.cache["counterpart_baseline_failing"] = bool(base["failing"])
        if self.cache["counterpart_baseline_failing"]:
            return [None] * len(fixes)
        return [bool(o["failing"]) for o in out]

    # -- attribution patching ----------------------------------------------------------------------------------
    def _grad_terms(self, base: Sequence[Intervention], keys: Sequence[tuple[int, str]]) -> dict:
        """One forward and one backward under ``base``: per site ``grad · (replacement − activation)`` elementwise,
        ``[n_pos, *site_shape]`` float64 (generation incidents: gradient of the soft minimum of the margins)."""
        self.budget.check()
        h, ctx = self.handle, self.ctx
        ids = self.tf_ids[None]
        n_pos = int(ids.shape[1])
        zeros = {k: torch.zeros((1, n_pos, *h.site_shape(k[1])), requires_grad=True) for k in keys}
        acts: dict = {}
        fns: dict = {}
        sources = ctx.sources
        by_site: dict = {}
        for iv in base:
            by_site.setdefault((iv.layer, iv.component), []).append((0, iv))
        for k in set(keys) | set(by_site):
            lst = []
            if k in by_site:
                lst.append(_make_hook(h, k[0], k[1], by_site[k], sources, {}))
            if k in zeros:
                def add(t, k=k):
                    acts[k] = t.detach()
                    return t + zeros[k].to(t.dtype)
                lst.append(add)
            fns[k] = lst
        kw: dict = {"input_ids": ids}
        if ctx.attention_mask is not None and self.recorded_start:
            kw["attention_mask"] = ctx.attention_mask[None, :n_pos]
        if ctx.token_type_ids is not None:
            kw["token_type_ids"] = ctx.token_type_ids[None, :n_pos]
        with torch.enable_grad(), site_hooks(h, fns):
            logits = h.model(**kw).logits
            if self.lf:
                logits = logits[:, self.lf:]
            metric = self._metric(logits, soft=True).sum()
            order = list(zeros)
            grads = torch.autograd.grad(metric, [zeros[k] for k in order], allow_unused=True)
        self.budget.add(1, 1)
        self.budget.backward += 1
        out: dict = {}
        for k, g in zip(order, grads):
            shape = h.site_shape(k[1])
            g = g[0].double() if g is not None else torch.zeros((n_pos, *shape), dtype=torch.float64)
            a = acts[k][0].double()
            if self.op == "mean":
                out[k] = (sources.mean(k[0], k[1], n_pos, shape).double() - a) * g
            else:
                d = torch.zeros((n_pos, *shape), dtype=torch.float64)
                pos, src, _ = sources.donor_positions(list(range(n_pos)), k[0], k[1], shape)
                if pos:
                    donor = sources.donor(k[0], k[1], shape)[torch.tensor(src)].double()
                    d[torch.tensor(pos)] = (donor - a[pos]) * g[pos]
                out[k] = d
        return out

    def attribution(self, base: Sequence[Intervention], cands: Sequence[Intervention]) -> np.ndarray:
        """Estimated change of the search metric when each candidate is added to ``base`` (one fwd + one bwd).

        Returns:
            ``[len(cands)]`` float64: ``sum_p grad[p] · (replacement[p] − activation[p])`` over the candidate's
            positions, gradients and activations taken under ``base``.
        """
        terms = self._grad_terms(base, sorted({(c.layer, c.component) for c in cands}))
        per_pos = {k: v.reshape(v.shape[0], -1).sum(-1) for k, v in terms.items()}
        est = np.zeros(len(cands))
        for i, c in enumerate(cands):
            ps = per_pos[(c.layer, c.component)]
            pos = range(ps.shape[0]) if c.positions == "all" else c.positions
            est[i] = float(sum(float(ps[p]) for p in pos if p < ps.shape[0]))
        return est

    def unit_attribution(self, base: Sequence[Intervention], probe: Intervention) -> np.ndarray:
        """Per head / neuron of ``probe``'s site: the attribution estimate of mean-ablating that unit alone at
        ``probe``'s positions (one fwd + one bwd). Returns ``[n_units]``."""
        key = (probe.layer, probe.component)
        t = self._grad_terms(base, [key])[key]  # [n_pos, n_units(, d_head)]
        pos = list(range(t.shape[0])) if probe.positions == "all" else [p for p in probe.positions if p < t.shape[0]]
        t = t[pos].sum(0)
        return (t.reshape(t.shape[0], -1).sum(-1)).numpy()


def _recorded(bundle, handle: ModelHandle, key: tuple[int, str], n: int) -> torch.Tensor:
    """The failing run's activation at a site for its first ``n`` positions ``[n, *site_shape]`` (recorded sites read
    from the bundle; heads / neurons, which are not recorded, captured by one forward of the recorded ids)."""
    layer, comp = key
    if comp in bundle.sites:
        return torch.as_tensor(np.asarray(bundle.activation(layer, comp)))[:n]
    from .hooks import forward_captured
    from .replay import bundle_inputs

    enc = {k: v[:, :n] for k, v in bundle_inputs(bundle).items()}
    with torch.no_grad():
        _, acts = forward_captured(handle, [key], **enc)
    return acts[key][0]


def _transplant(fix: Sequence[Intervention], f_ids: Sequence[int], n_f: int, acts: Mapping, b_ids: Sequence[int],
                handle: ModelHandle) -> list[Intervention]:
    """``set`` interventions writing the failing prompt's activations ``acts[(layer, comp)]`` ``[n_f, ...]`` at
    the set's sites (mapped to the failing prompt by the position rule) into the benign prompt ``b_ids``."""
    tr = []
    for iv in fix:
        pos = range(n_f) if iv.positions == "all" else iv.positions
        for p in pos:
            if p >= n_f:
                continue
            q = map_positions([p], f_ids, n_f, b_ids)
            if not q:
                continue
            a = acts[(iv.layer, iv.component)][p]
            if iv.indices:
                a = a.reshape(*handle.site_shape(iv.component))[list(iv.indices)]
            tr.append(Intervention(iv.layer, iv.component, (q[0],), "set", iv.indices,
                                   values=tuple(float(x) for x in a.reshape(-1))))
    return tr


# ----------------------------------------------------------------------------------------------------------------
# Candidates
# ----------------------------------------------------------------------------------------------------------------
def candidate_sites(bundle, handle: ModelHandle, op: str = "mean",
                    components: Sequence[str] = SEARCH_COMPONENTS) -> list[Intervention]:
    """Every candidate intervention: (layer, component, position group) × ``op`` (see the module docstring)."""
    n = int(bundle.n_prompt_tokens)
    groups: list[tuple[int, ...]] = [(p,) for p in range(n)]
    if n > 3:
        groups.append(tuple(range(n - 3, n)))
    out = []
    comps = [c for c in components if c in bundle.sites]
    for L in range(handle.n_layers):
        for c in comps:
            if c == "resid_post" and L < handle.n_layers - 1 and "resid_pre" in comps:
                continue  # equal to resid_pre of block L+1
            for g in groups:
                out.append(Intervention(L, c, g, op))
    return out


def _key(iv: Intervention):
    return (iv.layer, iv.component, iv.positions, iv.op, iv.indices)


def _overlaps(a: Intervention, b: Intervention) -> bool:
    la, lb = a.layer, b.layer
    ca = "attn" if a.component == "head" else "mlp" if a.component == "neuron" else a.component
    cb = "attn" if b.component == "head" else "mlp" if b.component == "neuron" else b.component
    if (la, ca) != (lb, cb):
        return False
    if a.positions == "all" or b.positions == "all":
        return True
    return bool(set(a.positions) & set(b.positions))


def fraction_touched(bundle, handle: ModelHandle, ivs: Sequence[Intervention]) -> float:
    """Touched activation values / (n_layers × n_sites × recorded positions × d_model)."""
    n_pos = int(bundle.n_positions)
    total = handle.n_layers * len(bundle.sites) * n_pos * handle.d_model
    touched = 0
    for iv in ivs:
        npos = n_pos if iv.positions == "all" else len(iv.positions)
        if iv.component == "head":
            width = len(iv.indices) * handle.d_head
        elif iv.indices:
            width = len(iv.indices)
        else:
            width = int(np.prod(handle.site_shape(iv.component)))
        touched += npos * width
    return touched / total if total else float("nan")


def bundle_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _rank(s: Sequence[Intervention]) -> int:
    return sum(COMPONENT_RANK.get(iv.component, 2) for iv in s)


# ----------------------------------------------------------------------------------------------------------------
# Search
# ----------------------------------------------------------------------------------------------------------------
def _cf_prior(cf) -> dict:
    if cf is None:
        return {}
    try:
        pr = cf.prior() if hasattr(cf, "prior") else {}
    except Exception:  # noqa: BLE001 - a CF result that cannot give a prior just gives none
        return {}
    return {(int(k[0]), str(k[1])): float(v) for k, v in pr.items()}


def run_cca(bundle, handle: ModelHandle | None = None, *, cf=None, op: str = "mean", beam: int = 1,
            max_size: int = 4, n_controls: int = 200, seed: int = 0, top_m: int = 8, ranking: str = "attribution",
            margin: float = FIX_MARGIN, evidence: bool = True, refine_units: bool = False, threads: int | None = 1,
            progress: Progress | None = None, on_step: Callable[[dict], None] | None = None,
            cancel: threading.Event | None = None) -> CCAResult:
    """Search a 1-minimal fix set for the bundle's incident and measure the evidence for it.

    Args:
        bundle: an open incident bundle.
        handle: its model (loaded from the bundle when ``None``).
        cf: a CF result (``prior()`` weights the ranking) or ``None``.
        op: ``"mean"`` (benign mean) or ``"patch"`` (counterpart donor).
        beam: beam width (1 = greedy) for sets of two or more elements.
        max_size: largest set searched.
        n_controls: random control sets for the significance test (>= 200 for the issue's criterion).
        seed: seeds the control sets.
        top_m: candidates added per beam state and step from the ranking.
        ranking: ``"attribution"`` (CF's positional order when ``cf`` is given, attribution × (1 + CF prior) within
            its ties; the attribution order alone without ``cf``), ``"none"`` (the same search with positions and
            sites in listed order) or ``"exhaustive"`` (every single site evaluated at once, then the same checks:
            the like-for-like baseline of the benchmark).
        margin: fix margin in logits (the failing outcome / recorded continuation beaten by at least this much).
        evidence: compute the evidence (variants, sufficiency, side effects, controls); ``False`` = search only.
        refine_units: refine ``attn`` / ``mlp`` elements to the fewest heads / neurons (fewer values than the whole
            element) that still fix with at least half the whole element's effect (a set that only just fixes the
            incident generalises worse). Off by default: it costs extra passes; ``docs/cca.md`` gives what it
            yields per scenario.
        threads: intra-op torch threads for the run (see :func:`torch_threads`; ``None`` = torch's setting).
        progress: ``progress(done, total, what)``.
        on_step: called with ``{"stage", "passes", "best_metric", "set_size"}`` at each search step.
        cancel: set it to stop between forward passes: the best result so far is returned with ``partial=True``.

    Example:
        >>> with open_bundle("gpt2-prompt-injection.h5") as b:          # doctest: +SKIP
        ...     res = run_cca(b)
        ...     res.fix_set[0].intervention.describe(), res.flip_rate, res.failed_criteria()
        ('L0.attn@15:mean', 1.0, [])
    """
    if op not in ("mean", "patch"):
        raise CCAError(f"op must be 'mean' or 'patch', got {op!r}")
    if beam < 1 or max_size < 1 or top_m < 1:
        raise CCAError("beam, max_size and top_m must be >= 1")
    if ranking not in ("attribution", "none", "exhaustive"):
        raise CCAError(f"ranking must be 'attribution', 'none' or 'exhaustive', got {ranking!r}")
    if not margin > 0:
        raise CCAError(f"margin must be > 0, got {margin}")
    if not bundle.failing:
        raise CCAError("the incident does not fail: there is nothing to fix")
    if handle is None:
        from .replay import load_bundle_model

        handle = load_bundle_model(bundle)
    with torch_threads(threads):
        return _run_cca(bundle, handle, cf=cf, op=op, beam=beam, max_size=max_size, n_controls=n_controls, seed=seed,
                        top_m=top_m, ranking=ranking, margin=margin, evidence=evidence, refine_units=refine_units,
                        progress=progress, on_step=on_step, cancel=cancel)


def _run_cca(bundle, handle: ModelHandle, *, cf, op, beam, max_size, n_controls, seed, top_m, ranking, margin,
             evidence, refine_units, progress, on_step, cancel) -> CCAResult:
    budget = _Budget(cancel)
    trace: list[dict] = []
    total_stages = 7 if evidence else 3
    state = {"best": (), "best_metric": float("nan")}

    searching: dict = {}  # the running search and its stage number, for progress within the search stage

    def step(stage: str, best_metric: float, size: int) -> None:
        d = {"stage": stage, "passes": budget.passes, "best_metric": _num(best_metric), "set_size": size}
        trace.append(d)
        if on_step:
            on_step(dict(d))
        if stage == "search" and searching and progress:
            srch, k = searching["search"], searching["k"]
            best = f"best metric {best_metric:.3g}" if math.isfinite(best_metric) else "no set evaluated yet"
            if k == 0:  # single sites: how many of the candidates are settled (evaluated, or cleared by a group)
                done = len({key for key in srch.evaluated if len(key) == 1} | srch.eliminated)
                what = f"screening: {done} of {len(srch.cands)} candidate sites resolved"
            else:
                what = f"search: sets of {size}"
            prog(k, f"{what}, {budget.passes} passes, {best}")

    def prog(k: int, what: str) -> None:
        if progress:
            progress(k, total_stages, what)

    prior = _cf_prior(cf) if ranking == "attribution" else {}
    rank_info: dict = {"method": {"attribution": "attribution patching (grad x (replacement - activation))" +
                                                 (" x (1 + CF prior)" if prior else ""),
                                  "none": "no ranking (screening rounds, candidates in listed order)",
                                  "exhaustive": "exhaustive (every candidate at once)"}[ranking],
                       "cf_prior": bool(prior), "top_m": top_m, "metric": _METRIC_DOC}
    inc = None
    try:
        budget.stage = "baseline"
        inc = _Incident(bundle, handle, op, budget, margin)
        if not inc.baseline_failing_tf:
            raise CCAError("the recorded failure does not reproduce teacher-forced (search metric "
                           f"{inc.baseline_metric:.3f} <= 0): the bundle and the model disagree")
        state["best_metric"] = inc.baseline_metric
        step("baseline", inc.baseline_metric, 0)
        cands = candidate_sites(bundle, handle, op)
        rank_info["n_candidates"] = len(cands)
        prog(0, f"screening {len(cands)} candidate sites")
        budget.stage = "search"
        chooser = _Chooser(inc)
        srch = _Search(inc, cands, prior, ranking, top_m, chooser, budget, state, step, rank_info,
                       cf=cf if ranking == "attribution" else None)
        searching.update(search=srch, k=0)
        srch.size1()
        size = 1
        if not chooser.clean() and max_size > 1:
            srch.singles_for_beam()
        beams = srch.best_singles(beam)
        # larger sets while nothing fixes, or while no fix is specific enough ("clean", see _Chooser.clean)
        while not chooser.clean() and size < max_size and beams:
            size += 1
            searching["k"] = 1
            prog(1, f"search: size {size}")
            beams = srch.extend(beams, beam)
        if not chooser.clean() and max_size > 1:
            searching["k"] = 1
            prog(1, "search: sublayer unions (sites that fix only all together)")
            srch.sublayer_unions(max_size)
        found = chooser.best()
        rank_info["selection"] = chooser.table()
        rank_info["rounds"] = srch.rounds
        if found is not None:
            fix = list(found["set"])
            state["best"], state["best_metric"] = tuple(fix), found["metric"]
            step("confirm", found["metric"], len(fix))
        else:
            fix = list(state["best"])
        # prune to 1-minimal
        budget.stage = "prune"
        prog(2, "pruning to a 1-minimal set")
        if found is not None:
            def dropped(rest: list[Intervention], metric: float) -> None:
                state["best"] = tuple(rest)
                step("prune", metric, len(rest))

            _prune(fix, inc.fixed, dropped)
            budget.stage = "refine"
            fix = _refine(inc, fix, step, state)
            if refine_units:
                fix = _refine_units(inc, fix, step, state, rank_info)
        state["best"] = tuple(fix)
        rank_info["search_passes"] = budget.passes
        rank_info["search_rows"] = budget.rows
        rank_info["search_seconds"] = time.perf_counter() - budget.t0
        rank_info["backward_passes"] = budget.backward
        rank_info["search_passes_by_stage"] = dict(budget.by_stage)
        rank_info["search_rows_by_stage"] = dict(budget.rows_by_stage)
        rank_info["candidates_evaluated"] = sum(1 for k in srch.evaluated if len(k) == 1)
        rank_info.setdefault("candidates_resolved", rank_info["candidates_evaluated"])
        rank_info["group_tests"] = srch.group_tests
        res = _evidence(bundle, handle, inc, fix, budget, n_controls=n_controls, seed=seed, evidence=evidence,
                        progress=(lambda k, what: prog(3 + k, what)), trace=trace, ranking=rank_info)
        step("done", res.fixed_metric, len(fix))
        res.trace = trace
        return res
    except _Cancelled:
        return _partial(bundle, handle, inc, list(state["best"]), state["best_metric"], budget, trace, rank_info, op)


_METRIC_DOC = ("label/token: logit margin of the failing outcome over the best other; contains/wordlist: smallest "
               "logit margin of the recorded continuation's tokens (first generated token through the end of the "
               "failing span) over their best competitor, teacher-forced; > 0 iff the incident still fails "
               "teacher-forced")


def _skey(s: Sequence[Intervention]) -> tuple:
    return tuple(_key(iv) for iv in s)


class _Chooser:
    """Collects sets that fix the incident teacher-forced and finds the most *specific* confirmed one, checking as
    little as that needs.

    Key, smallest first: benign reference outputs changed, not sufficient on the counterpart, component rank,
    metric. Every check is lazy and exact: a set's key starts as a lower bound (generation assumed to confirm the
    fix, sufficiency assumed, 0 reference outputs changed) and is tightened one step at a time — the generation
    confirmation, then counterpart sufficiency, then the benign reference prompts in growing blocks (8, 16, 32, …,
    all of them: a small subsample first, the full set only for a set that is still in the running). The set with
    the smallest bound is the one tightened next, so the answer is the exact minimum over every set collected, and
    a set that stops being the minimum is never checked further (``changed_is_lower_bound`` in the table)."""

    FIRST_BLOCK = 8

    def __init__(self, inc: _Incident):
        self.inc = inc
        self.rows: dict = {}

    @property
    def n_ref(self) -> int:
        return len(self.inc._benign_items())

    def add(self, fixes: list[tuple[tuple[Intervention, ...], float]]) -> None:
        for s, m in fixes:
            k = _skey(s)
            if k not in self.rows:
                self.rows[k] = {"set": s, "metric": m, "component_rank": _rank(s), "confirmed": None,
                                "sufficient_on_counterpart": "?", "benign_reference_changed": 0, "n_run": 0}

    # kept for callers of the earlier eager interface
    def consider(self, fixes: list[tuple[tuple[Intervention, ...], float]]) -> None:
        self.add(fixes)
        self.clean()

    def _done(self, r: dict) -> bool:
        return r["confirmed"] is True and r["sufficient_on_counterpart"] != "?" and r["n_run"] >= self.n_ref

    def _bound(self, r: dict):
        su = r["sufficient_on_counterpart"]
        return (r["benign_reference_changed"], 1 if su is False else 0, r["component_rank"], r["metric"])

    def _tighten(self, r: dict) -> None:
        """One exact check of ``r``: generation confirmation, else sufficiency, else the next block of reference
        prompts."""
        inc = self.inc
        if r["confirmed"] is None:
            ok, _ = inc.fixed([InterventionSet(r["set"])], [_TF(r["metric"], r["metric"] > 0)])
            r["confirmed"] = bool(ok[0])
        elif r["sufficient_on_counterpart"] == "?":
            r["sufficient_on_counterpart"] = inc.pair_sufficient([r["set"]])[0]
        else:
            a = r["n_run"]
            b = self.n_ref if a >= self.n_ref // 2 else min(self.n_ref, max(self.FIRST_BLOCK, 2 * a))
            r["benign_reference_changed"] += inc.benign_block([r["set"]], a, b)[0]
            r["n_run"] = b

    def _live(self):
        return [r for r in self.rows.values() if r["confirmed"] is not False]

    def best(self) -> dict | None:
        """The exact most specific confirmed set collected so far (tightening bounds until the smallest is exact)."""
        while True:
            live = self._live()
            if not live:
                return None
            r = min(live, key=self._bound)
            if self._done(r):
                return r
            self._tighten(r)

    def is_clean(self, r: dict) -> bool:
        return self._done(r) and r["sufficient_on_counterpart"] is not False and \
            r["benign_reference_changed"] <= TARGETS["side_effect_rate"] * self.n_ref

    def clean(self) -> bool:
        """Whether a confirmed set exists that is sufficient (or there is no counterpart) and changes at most the
        side-effect target's share of the benign reference outputs. The exact best set is found first (often it is
        the clean one); otherwise the sets that can still be clean are checked in order of (component rank,
        metric) until one is."""
        b = self.best()
        if b is None:
            return False
        if self.is_clean(b):
            return True
        bar = TARGETS["side_effect_rate"] * self.n_ref
        while True:
            live = [r for r in self._live() if r["sufficient_on_counterpart"] is not False and
                    r["benign_reference_changed"] <= bar]
            if not live:
                return False
            if any(self._done(r) for r in live):
                return True
            self._tighten(min(live, key=lambda r: (r["component_rank"], r["metric"], r["benign_reference_changed"])))

    def table(self) -> list[dict]:
        n_ref = len(self.inc._benign) if self.inc._benign is not None else None
        conf = sorted((r for r in self.rows.values() if r["confirmed"]), key=self._bound)
        rest = sorted((r for r in self.rows.values() if not r["confirmed"]),
                      key=lambda r: (r["confirmed"] is None, r["component_rank"], r["metric"]))
        out = []
        for r in conf + rest:
            d = {"set": [iv.describe() for iv in r["set"]], "metric": r["metric"],
                 "component_rank": r["component_rank"],
                 "confirmed": r["confirmed"]}  # None: never checked (it could not beat the chosen set)
            if r["confirmed"]:
                su = r["sufficient_on_counterpart"]
                d.update(benign_reference_changed=r["benign_reference_changed"], n_benign_reference=n_ref,
                         n_benign_reference_run=r["n_run"], sufficient_on_counterpart=None if su == "?" else su,
                         sufficiency_checked=su != "?",
                         changed_is_lower_bound=r["n_run"] < (n_ref or 0))
            out.append(d)
        return out


class _Search:
    """The exact search for fixing sets (see the module docstring, step 4)."""

    def __init__(self, inc: _Incident, cands, prior, ranking, top_m, chooser: _Chooser, budget, state, step,
                 info: dict, cf=None):
        self.inc, self.cands, self.prior, self.ranking, self.top_m = inc, cands, prior, ranking, top_m
        self.chooser, self.budget, self.state, self.step, self.info = chooser, budget, state, step, info
        self.cf = cf
        self.evaluated: dict = {}  # key of set -> (set, metric): sets evaluated on their own
        self.eliminated: set = set()  # keys of single sites cleared by a group test that did not fix
        self.group_tests = 0  # rows that evaluated a union of several candidate sites
        self.combinations: list = []  # groups that fixed although neither half did (sites that act together)
        self.rounds: list[dict] = []
        self.dec = inc.n_prompt - 1 if inc.causal else 0
        self.hot: list[int] = []
        self._pending: list = []  # fixing sets screened but not yet handed to the chooser

    def _score(self, base: Sequence[Intervention], pool: list[Intervention]):
        est = self.inc.attribution(base, pool)
        w = np.array([self.prior.get((c.layer, c.component), 0.0) for c in pool])
        return est * (1.0 + w), est

    def _record(self, sets, tf) -> None:
        for s, r in zip(sets, tf):
            self.evaluated[_skey(s)] = (s, r.metric)
            if self.inc.fixed_tf(r):
                self._pending.append((s, r.metric))
        best = min(self.evaluated.values(), key=lambda t: t[1])
        if not self.state["best"] or best[1] < self.state["best_metric"]:
            self.state["best"], self.state["best_metric"] = best

    def _round(self, name: str, sets: list[tuple[Intervention, ...]], check: bool = True) -> None:
        """Evaluate ``sets`` exactly, each on its own; the ones that fix teacher-forced go to the chooser (whose
        checks run now when ``check``)."""
        sets = [s for s in sets if _skey(s) not in self.evaluated]
        if sets:
            self.budget.stage = "search"
            n0, r0 = len(self._pending), self.budget.rows
            self._record(sets, self.inc.evaluate_tf([InterventionSet(s) for s in sets]))
            self.step("search", self.state["best_metric"], len(sets[0]))
            self.rounds.append({"round": name, "evaluated": len(sets), "group_tests": 0, "sites": len(sets),
                                "fixing_teacher_forced": len(self._pending) - n0, "passes": self.budget.passes,
                                "rows": self.budget.rows - r0})
        if check:
            self._check()

    def _check(self) -> bool:
        if self._pending:
            self.chooser.add(self._pending)
            self._pending = []
        self.budget.stage = "select"
        ok = self.chooser.clean()
        self.budget.stage = "search"
        if self.rounds:
            self.rounds[-1]["checked_through_passes"] = self.budget.passes
            self.rounds[-1]["checked_through_rows"] = self.budget.rows
        return ok

    def group_test(self, name: str, members: list[tuple[Intervention, ...]]) -> None:
        """Adaptive group testing over single sites ``members`` (in the order given): the union of a group is
        evaluated as one set (one row); a group that does not fix clears all its sites at once; one that fixes is
        split in halves, both evaluated, down to groups of at most 4 whose sites are evaluated one by one — so every
        site reported as fixing was evaluated on its own. A group that fixes while neither half does holds sites
        that act only together; it is kept in ``combinations``. Each level of the bisection is one batch."""
        members = [m for m in members if _skey(m) not in self.evaluated and _skey(m) not in self.eliminated]
        if not members:
            return
        self.budget.stage = "search"
        n0, r0, e0 = len(self._pending), self.budget.rows, len(self.evaluated)
        tests = 0
        level: list[tuple[list, int | None]] = [(members, None)]  # (group, index of its parent in `parents`)
        parents: list[dict] = []
        while level:
            sets = [tuple(iv for m in g for iv in m) for g, _ in level]
            tf = self.inc.evaluate_tf([InterventionSet(s) for s in sets])
            nxt: list[tuple[list, int | None]] = []
            singles = [(g[0], r) for (g, _), r in zip(level, tf) if len(g) == 1]
            if singles:
                self._record([m for m, _ in singles], [r for _, r in singles])
            for (g, par), r in zip(level, tf):
                fixes = self.inc.fixed_tf(r)
                if par is not None and fixes:
                    parents[par]["child_fixed"] = True
                if len(g) == 1:
                    continue
                tests += 1
                if not fixes:
                    self.eliminated.update(_skey(m) for m in g)
                    continue
                parents.append({"group": g, "child_fixed": False})
                me = len(parents) - 1
                if len(g) <= 4:
                    nxt.extend(([m], me) for m in g)
                else:
                    h = len(g) // 2
                    nxt.extend([(g[:h], me), (g[h:], me)])
            level = nxt
        for p in parents:
            if not p["child_fixed"]:
                self.combinations.append([iv.describe() for m in p["group"] for iv in m])
        self.group_tests += tests
        self.step("search", self.state["best_metric"], 1)
        self.rounds.append({"round": name, "sites": len(members), "group_tests": tests,
                            "evaluated": len(self.evaluated) - e0, "fixing_teacher_forced": len(self._pending) - n0,
                            "rows": self.budget.rows - r0, "passes": self.budget.passes})

    def position_blocks(self, est) -> tuple[list[tuple[str, list[int]]], str]:
        """Candidate indices grouped by prompt position, in the order the search visits them.

        With CF: ``CFResult.order_candidates`` (most anomalous position first, then the site's own token score;
        ties in attribution order), one block per position. Without CF: positions by their strongest attribution
        estimate, sites within a position by attribution. Without a ranking: positions and sites in listed order.
        A multi-position candidate belongs to the block of its first position in that order."""
        cands = self.cands
        n = self.inc.n_prompt
        base = list(range(len(cands)))
        if est is not None:
            score = est * (1.0 + np.array([self.prior.get((c.layer, c.component), 0.0) for c in cands]))
            base = [int(i) for i in np.argsort(score, kind="stable")]
        if self.cf is not None and hasattr(self.cf, "order_candidates"):
            sub = self.cf.order_candidates([cands[i] for i in base])
            order = [base[j] for j in sub]
            how = "CF position anomaly (CFResult.order_candidates), attribution within ties"
        else:
            order = base
            how = "attribution estimate" if est is not None else "listed order"
        pos_rank: dict[int, int] = {}
        for multi in (False, True):  # a position's rank: where its first single-position site comes in the order
            for i in order:
                ps = range(n) if cands[i].positions == "all" else cands[i].positions
                if (len(ps) > 1) == multi:
                    for p in ps:
                        pos_rank.setdefault(int(p), len(pos_rank))
        blocks: dict[int, list[int]] = {}
        for i in order:
            ps = range(n) if cands[i].positions == "all" else cands[i].positions
            p = min(ps, key=lambda q: pos_rank.get(int(q), n))
            blocks.setdefault(int(p), []).append(i)
        return [(f"position {p}", blocks[p]) for p in sorted(blocks, key=lambda q: pos_rank.get(q, n))], how

    def size1(self) -> None:
        """Single sites. (1) Token ablations: ``resid_pre`` of block 0 at every prompt position (which input tokens
        carry the failure), screened by adaptive group testing like the blocks below (a union of positions whose
        ablation does not fix clears them all in one row; every position called fixing was evaluated on its own),
        so their cost grows with the log of the prompt length where few tokens fix. (2) The rest, one prompt
        position at a time in the order of :meth:`position_blocks` (CF's position anomaly by default), each block
        screened by adaptive group testing (:meth:`group_test`). The chooser's checks run after the first position
        block and after every later one; the search stops after the first block that leaves a *clean* fix. When the
        chosen fix is then the residual stream only (a token ablation), the blocks of its positions are screened too:
        an attn / mlp output there that fixes as cleanly wins on the component order."""
        inc, cands = self.inc, self.cands
        if self.ranking == "exhaustive":
            self._round("every candidate", [(c,) for c in cands])
            return
        est = None
        if self.ranking == "attribution":
            _, est = self._score((), cands)
        self.group_test("token ablations (L0 resid_pre at every position, group-tested)", self._token_sites())
        blocks, how = self.position_blocks(est)
        self.info["order"] = how
        if self.ranking == "attribution":  # what actually orders the exact screening
            self.info["method"] = (f"exact group-tested screening, positions by {how}; attribution patching "
                                   "(grad x (replacement - activation)) estimate")
        self.info["position_order"] = [name for name, _ in blocks]
        visited = set()
        for name, idx in blocks:
            self.group_test(f"{name} ({len(idx)} sites, group-tested)", [(cands[i],) for i in idx])
            visited.add(name)
            if self._check():
                break
        # the search stops at the first clean fix; when that is the residual stream (a token ablation, found before
        # any block), the attn / mlp outputs at its position may fix as cleanly and are a narrower edit (the
        # chooser's component order): that position's block is screened too
        best = self.chooser.best()
        if best is not None and all(iv.component in ("resid_pre", "resid_post") for iv in best["set"]):
            want = {f"position {p}" for iv in best["set"] if iv.positions != "all" for p in iv.positions}
            for name, idx in blocks:
                if name in want and name not in visited:
                    self.group_test(f"{name} ({len(idx)} sites, group-tested: the position of the residual-stream "
                                    "fix)", [(cands[i],) for i in idx])
                    visited.add(name)
                    self._check()
        self.info["group_tests"] = self.group_tests
        self.info["combinations"] = self.combinations[:20]
        self.info["candidates_resolved"] = len({k for k in self.evaluated if len(k) == 1} | self.eliminated)
        if est is not None:
            ex = [(float(est[i]), self.evaluated[_skey((c,))][1] - inc.baseline_metric)
                  for i, c in enumerate(cands) if _skey((c,)) in self.evaluated]
            self.info["spearman_vs_exact"] = stats.spearman([a for a, _ in ex], [b for _, b in ex])
            self.info["spearman_n"] = len(ex)
            self.info["spearman_scope"] = "every single site evaluated on its own during the search"

    def _token_sites(self) -> list[tuple[Intervention, ...]]:
        """Token ablations: ``resid_pre`` of block 0 at each single prompt position, in position order."""
        return [(c,) for c in self.cands if c.layer == 0 and c.component == "resid_pre" and c.positions != "all"
                and len(c.positions) == 1]

    def singles_for_beam(self) -> None:
        """Before sets of two: every single site not yet evaluated on its own (group tests cleared it), so that the
        beam starts from exact single-site metrics; then the *hot* positions: the (at most 3) non-decision
        positions whose token ablation lowers the metric by at least the margin, strongest first."""
        rest = [(c,) for c in self.cands if _skey((c,)) not in self.evaluated]
        if rest:
            self._round("remaining single sites (exact metrics for the beam)", rest, check=False)
        inc = self.inc
        drops = sorted((self.evaluated[_skey(s)][1], s[0].positions[0]) for s in self._token_sites()
                       if s[0].positions[0] != self.dec and _skey(s) in self.evaluated)
        self.hot = [p for m, p in drops if m <= inc.baseline_metric - inc.margin][:3]

    def best_singles(self, beam: int) -> list[tuple[tuple[Intervention, ...], float]]:
        """Beam start: the ``beam`` single sites with the lowest metric that do not fix on their own (a superset of
        a fixing set is never 1-minimal)."""
        return sorted((t for t in self.evaluated.values() if t[1] > -self.inc.margin),
                      key=lambda t: t[1])[:beam]

    def extend(self, beams, beam: int):
        """One beam step: each state extended by its ``top_m`` ranked candidates and the decision / hot position
        sites, every extension evaluated exactly."""
        ext: list[tuple[Intervention, ...]] = []
        seen = set()
        for base, _ in beams:
            pool = [c for c in self.cands if not any(_overlaps(c, b) for b in base)]
            if self.ranking == "exhaustive":
                chosen = pool
            else:
                chosen = [c for c in pool if c.positions != "all" and len(c.positions) == 1 and
                          c.positions[0] in [self.dec] + self.hot]
                if self.ranking == "attribution":
                    score, _ = self._score(base, pool)
                    chosen += [pool[i] for i in np.argsort(score, kind="stable")[:self.top_m]]
            for c in chosen:
                s = tuple(sorted(base + (c,), key=_key))
                if s not in seen:
                    seen.add(s)
                    ext.append(s)
        self._round(f"size {len(beams[0][0]) + 1} extensions", ext)
        return sorted((t for t in (self.evaluated[_skey(s)] for s in ext) if t[1] > -self.inc.margin),
                      key=lambda t: t[1])[:beam]

    def sublayer_unions(self, max_size: int) -> None:
        """Sets the beam misses: sublayer outputs that fix only all together (the same fault written redundantly by
        three blocks: removing one or two leaves the rest writing it, so no single site or pair lowers the metric and
        greedy / beam extension has nothing to follow). At each position whose residual stream alone fixes the
        incident (strongest first; the decision position when none does), at most three positions: the union of
        every ``attn`` and ``mlp`` site at that position is evaluated as one set; when it fixes teacher-forced it is
        shrunk the way a fix set is pruned (all drop-one sets in one batch, the one that keeps the lowest metric
        dropped, until no element can go), and the 1-minimal set, when it has 2 to ``max_size`` elements, goes to
        the chooser. Stops after the first position that leaves a clean fix."""
        inc = self.inc
        resid = sorted((r["metric"], r["set"][0].positions[0]) for r in self.chooser.rows.values()
                       if len(r["set"]) == 1 and r["set"][0].component in ("resid_pre", "resid_post")
                       and r["set"][0].positions != "all" and len(r["set"][0].positions) == 1)
        positions = list(dict.fromkeys([p for _, p in resid] or [self.dec]))[:3]
        for p in positions:
            members = sorted((c for c in self.cands if c.component in ("attn", "mlp") and c.positions == (p,)),
                             key=_key)
            if len(members) < 2:
                continue
            self.budget.stage = "search"
            n0, r0 = len(self._pending), self.budget.rows
            cur = list(members)
            r = inc.evaluate_tf([InterventionSet(tuple(cur))])[0]
            self.evaluated[_skey(cur)] = (tuple(cur), r.metric)
            evaluated = 1

            def check(sets: list[InterventionSet]):  # teacher-forced: the chooser confirms by generation
                nonlocal evaluated
                tfs = inc.evaluate_tf(sets)
                evaluated += len(sets)
                for d, t in zip(sets, tfs):
                    self.evaluated[_skey(d.interventions)] = (tuple(d.interventions), t.metric)
                return [inc.fixed_tf(t) for t in tfs], tfs

            if inc.fixed_tf(r):
                metric = _prune(cur, check, lambda rest, m: self.step("search", self.state["best_metric"],
                                                                       len(rest)))
                metric = r.metric if metric is None else metric
                if 2 <= len(cur) <= max_size:
                    self._pending.append((tuple(cur), metric))
                    if metric < self.state["best_metric"] or not self.state["best"]:
                        self.state["best"], self.state["best_metric"] = tuple(cur), metric
                elif len(cur) > max_size:  # said in the result: the user can search again with a larger max_size
                    self.info.setdefault("beyond_max_size", []).append(
                        {"set": [iv.describe() for iv in cur], "metric": metric, "max_size": max_size})
            self.rounds.append({"round": f"sublayer union at position {p} ({len(members)} attn / mlp sites, pruned)",
                                "sites": len(members), "group_tests": 0, "evaluated": evaluated,
                                "fixing_teacher_forced": len(self._pending) - n0, "passes": self.budget.passes,
                                "rows": self.budget.rows - r0,
                                # the pruned union when it fixes teacher-forced (None: the union does not fix)
                                "set": [iv.describe() for iv in cur] if inc.fixed_tf(r) else None})
            if self._check():
                break


def _prune(fix: list[Intervention], check, dropped) -> float | None:
    """Make ``fix`` 1-minimal in place: every drop-one set in one batch (``check(sets) -> (fixes, tf results)``),
    the element whose removal keeps the lowest metric dropped (``dropped(rest, metric)``), until none can go.
    Returns the metric of the last set kept after a drop (``None``: nothing was dropped)."""
    metric = None
    while len(fix) > 1:
        ok, tf = check([InterventionSet(tuple(fix[:i] + fix[i + 1:])) for i in range(len(fix))])
        keep = [i for i, v in enumerate(ok) if v]
        if not keep:
            break
        j = min(keep, key=lambda i: tf[i].metric)
        fix.pop(j)
        metric = tf[j].metric
        dropped(fix, metric)
    return metric


def _refine(inc: _Incident, fix: list[Intervention], step, state) -> list[Intervention]:
    """Shrink position groups: replace a multi-position element by the smallest fixing subset of its positions
    (each single position, then each pair), evaluated exactly; keeps the element when no subset fixes."""
    fix = list(fix)
    for i in range(len(fix)):
        iv = fix[i]
        if iv.positions == "all" or len(iv.positions) < 2:
            continue
        pos = iv.positions
        for size in (1, 2):
            if size >= len(pos):
                break
            subs = list(itertools.combinations(pos, size))
            trial = [Intervention(iv.layer, iv.component, c, iv.op, iv.indices, iv.value, iv.values) for c in subs]
            sets = [InterventionSet(tuple(fix[:i] + [t] + fix[i + 1:])) for t in trial]
            ok, tf = inc.fixed(sets)
            good = [k for k, v in enumerate(ok) if v]
            if good:
                k = min(good, key=lambda k: tf[k].metric)
                fix[i] = trial[k]
                state["best"] = tuple(fix)
                step("refine", tf[k].metric, len(fix))
                break
    return fix


def _refine_units(inc: _Incident, fix: list[Intervention], step, state, info: dict) -> list[Intervention]:
    """Refine each whole ``attn`` element to attention heads and each whole ``mlp`` element to MLP neurons: the
    fewest units (taken in order of their exact single-head effect / attribution estimate) whose mean-ablation still
    fixes the incident (generated) with a metric at most half the whole set's (so at least half its effect
    remains), pruned to 1-minimal for heads. An element is kept whole when no proper subset qualifies."""
    if inc.op != "mean":
        return fix
    h = inc.handle
    fix = list(fix)
    notes = []
    for i in range(len(fix)):
        iv = fix[i]
        if iv.indices or iv.component not in ("attn", "mlp") or iv.positions == "all":
            continue
        rest = fix[:i] + fix[i + 1:]
        whole = inc.evaluate_tf([InterventionSet(tuple(fix))])[0].metric
        bar = min(-inc.margin, 0.5 * whole)
        unit = "head" if iv.component == "attn" else "neuron"
        inc.means.ensure(unit)
        n_units = h.n_heads if unit == "head" else h.d_mlp
        if unit == "head":
            singles = [Intervention(iv.layer, "head", iv.positions, "mean", (u,)) for u in range(n_units)]
            tf = inc.evaluate_tf([InterventionSet(tuple(rest + [s])) for s in singles])
            order = sorted(range(n_units), key=lambda u: tf[u].metric)
            sizes = list(range(1, n_units))
        else:
            probe = Intervention(iv.layer, "neuron", iv.positions, "mean", tuple(range(n_units)))
            est = inc.unit_attribution(rest, probe)
            order = [int(u) for u in np.argsort(est, kind="stable")]
            sizes = []
            k = 1
            while k < min(n_units // 2, h.d_model):  # fewer values than the whole element's d_model
                sizes.append(k)
                k *= 2
        trial = [Intervention(iv.layer, unit, iv.positions, "mean", tuple(order[:k])) for k in sizes]
        if not trial:
            continue
        sets = [InterventionSet(tuple(rest + [t])) for t in trial]
        tf = inc.evaluate_tf(sets)
        cand = [k for k in range(len(trial)) if tf[k].metric <= bar]
        chosen = None
        for start in range(0, len(cand), 4):  # confirm the smallest ones first, a few per generation batch
            part = cand[start:start + 4]
            ok, _ = inc.fixed([sets[k] for k in part], [tf[k] for k in part])
            good = [k for k, v in zip(part, ok) if v]
            if good:
                chosen = min(good)
                break
        if chosen is None:
            notes.append({"element": iv.describe(), "refined": None, "tried_sizes": sizes, "bar": bar})
            continue
        new = trial[chosen]
        if unit == "head" and len(new.indices) > 1:  # 1-minimal within the element
            units = list(new.indices)
            while len(units) > 1:
                drops = [Intervention(iv.layer, unit, iv.positions, "mean", tuple(units[:j] + units[j + 1:]))
                         for j in range(len(units))]
                ok, tf2 = inc.fixed([InterventionSet(tuple(rest + [d])) for d in drops])
                keep = [j for j, v in enumerate(ok) if v and tf2[j].metric <= bar]
                if not keep:
                    break
                units.pop(min(keep, key=lambda j: tf2[j].metric))
            new = Intervention(iv.layer, unit, iv.positions, "mean", tuple(units))
        fix[i] = new
        state["best"] = tuple(fix)
        m = inc.evaluate_tf([InterventionSet(tuple(fix))])[0].metric
        step("refine_units", m, len(fix))
        notes.append({"element": iv.describe(), "refined": new.describe(), "tried_sizes": sizes, "bar": bar,
                      "whole_metric": whole, "refined_metric": m})
    if notes:
        info["unit_refinement"] = notes
    return fix


def _partial(bundle, handle, inc, fix, best_metric, budget, trace, rank_info, op) -> CCAResult:
    nan = float("nan")
    res = CCAResult(
        fix_set=[FixElement(iv, nan, False, nan) for iv in fix], flipped=False,
        baseline_metric=inc.baseline_metric if inc is not None else nan, fixed_metric=float(best_metric),
        flip_rate=nan, flip_rate_ci=(nan, nan), n_variants=0, sufficiency_rate=nan, side_effect_rate=nan,
        side_effect_kl=nan, side_effects=[], n_benign=0,
        fraction_of_activations=fraction_touched(bundle, handle, fix), one_minimal=False, p_value=nan,
        control_flip_rates=[], n_controls=0, fdr={}, criteria={}, forward_passes=budget.passes,
        seconds=time.perf_counter() - budget.t0, partial=True, trace=trace, ranking=rank_info,
        bundle_uuid=getattr(bundle, "uuid", ""), rows=budget.rows, op=op)
    res.criteria = _criteria(res)
    return res


# ----------------------------------------------------------------------------------------------------------------
# Evidence
# ----------------------------------------------------------------------------------------------------------------
def evaluate_fix_set(bundle, handle: ModelHandle | None, interventions: Sequence[Intervention], *,
                     n_controls: int = 200, seed: int = 0, margin: float = FIX_MARGIN, progress: Progress | None = None,
                     cancel: threading.Event | None = None, threads: int | None = 1) -> CCAResult:
    """All the evidence for a given set (the GUI's accept/reject re-evaluation; certificate verification).

    Returns a :class:`CCAResult`; when cancelled, ``partial=True`` with what was measured before. ``threads``: as
    in :func:`run_cca`.
    """
    ivs = [iv if isinstance(iv, Intervention) else Intervention.from_dict(iv) for iv in interventions]
    if not ivs:
        raise CCAError("the fix set is empty")
    if handle is None:
        from .replay import load_bundle_model

        handle = load_bundle_model(bundle)
    ops = {iv.op for iv in ivs}
    op = ops.pop() if len(ops) == 1 else "mixed"
    budget = _Budget(cancel)
    inc = None
    trace: list[dict] = []
    try:
        with torch_threads(threads):
            inc = _Incident(bundle, handle, op if op in ("mean", "patch") else "mean", budget, margin)
            return _evidence(bundle, handle, inc, ivs, budget, n_controls=n_controls, seed=seed, evidence=True,
                             progress=(lambda k, what: progress(k, 4, what)) if progress else None, trace=trace,
                             ranking={"method": "given set", "metric": _METRIC_DOC})
    except _Cancelled:
        return _partial(bundle, handle, inc, ivs, float("nan") if inc is None else inc.baseline_metric, budget,
                        trace, {"method": "given set"}, op)


def _evidence(bundle, handle: ModelHandle, inc: _Incident, fix: list[Intervention], budget: _Budget, *,
              n_controls: int, seed: int, evidence: bool, progress, trace: list, ranking: dict) -> CCAResult:
    nan = float("nan")
    S = InterventionSet(tuple(fix))
    # -- the set on the incident: fixed?, drop-one, singles -------------------------------------------------------
    budget.stage = "minimality"
    drops = [InterventionSet(tuple(fix[:i] + fix[i + 1:])) for i in range(len(fix))]
    singles = [InterventionSet((iv,)) for iv in fix] if len(fix) > 1 else []
    all_sets = [S] + drops + singles
    ok, tf = inc.fixed(all_sets)
    flipped = ok[0]
    elements = []
    for i, iv in enumerate(fix):
        d_ok, d_tf = ok[1 + i], tf[1 + i]
        single = tf[1 + len(fix) + i].metric if singles else tf[0].metric
        elements.append(FixElement(iv, d_tf.metric, not d_ok, single))
    one_minimal = bool(flipped and all(e.drop_one_failing for e in elements))
    fraction = fraction_touched(bundle, handle, fix)
    ev: dict = {"incident": {"baseline_metric": inc.baseline_metric, "fixed_metric": tf[0].metric,
                             "metric": _METRIC_DOC, "margin": inc.margin,
                             "recorded_failure_metric": _num(getattr(bundle, "failure_metric", None))}}
    if inc.gen_kind:
        g = inc.generate([InterventionSet(), S])
        ev["incident"].update(baseline_output=g[0]["output"], fixed_output=g[1]["output"])
    else:  # label / token incidents: the label (next token) without and with the set, one forward of two rows
        tt = inc.ctx.token_type_ids
        item = _Item(inc.tf_ids.clone(), [InterventionSet(), S], inc.ctx.sources,
                     None if tt is None else tt[:inc.tf_ids.shape[0]])
        o = _run_items(handle, [item], bundle.failure, generate=False, max_new_tokens=bundle.max_new_tokens,
                       budget=budget, target_index=inc.ctx.target_index, id2label=inc.id2label)[0]
        ev["incident"].update(baseline_output=o[0]["output"], fixed_output=o[1]["output"])
    res = CCAResult(
        fix_set=elements, flipped=bool(flipped), baseline_metric=inc.baseline_metric, fixed_metric=tf[0].metric,
        flip_rate=nan, flip_rate_ci=(nan, nan), n_variants=0, sufficiency_rate=nan, side_effect_rate=nan,
        side_effect_kl=nan, side_effects=[], n_benign=0, fraction_of_activations=fraction, one_minimal=one_minimal,
        p_value=nan, control_flip_rates=[], n_controls=0, fdr={}, criteria={}, forward_passes=0, seconds=0.0,
        partial=False, trace=trace, ranking=ranking, bundle_uuid=getattr(bundle, "uuid", ""),
        op=fix[0].op if fix else "mean", evidence=ev)
    try:
        res.bundle_sha256 = bundle_sha256(bundle.path)
    except (OSError, AttributeError, TypeError):
        res.bundle_sha256 = ""
    try:
        if evidence:
            _variant_evidence(bundle, handle, inc, fix, budget, res, progress)
            _sufficiency_evidence(bundle, handle, inc, fix, budget, res, progress)
            _side_effect_evidence(bundle, handle, inc, fix, budget, res, progress)
            _control_evidence(bundle, handle, inc, fix, budget, res, n_controls, seed, progress)
            _fdr(res)
    except _Cancelled:
        res.partial = True
    res.forward_passes = budget.passes
    res.rows = budget.rows
    res.seconds = time.perf_counter() - budget.t0
    budget.stage = "end"
    res.evidence["passes_by_stage"] = dict(budget.by_stage)
    res.evidence["rows_by_stage"] = dict(budget.rows_by_stage)
    res.evidence["seconds_by_stage"] = {k: round(v, 3) for k, v in budget.sec_by_stage.items() if k}
    res.criteria = _criteria(res)
    return res


def _sources_for(bundle, handle, inc: _Incident, fix, donor: str | None, n: int, cache: dict, shared):
    if shared is not None and not any(iv.op == "patch" for iv in fix):
        return shared
    return _prompt_sources(bundle, handle, donor, n, cache, inc.means)


def _variant_evidence(bundle, handle, inc: _Incident, fix, budget, res: CCAResult, progress) -> None:
    budget.stage = "variants"
    if progress:
        progress(0, "flip rate on held-out variants")
    variants = bundle.prompt_sets.get("variants") or []
    vcps = bundle.prompt_sets.get("variant_counterparts") or []
    cp = (bundle.prompt_sets.get("counterpart") or [None])[0]
    cache: dict = {}
    shared = _prompt_sources(bundle, handle, None, 0, cache, inc.means)
    items = []
    for i, v in enumerate(variants):
        enc = _encode(handle, v)
        ids = enc["input_ids"][0]
        mapped = _map_set(fix, inc.prompt_ids, inc.n_prompt, ids.tolist())
        src = _sources_for(bundle, handle, inc, fix, vcps[i] if i < len(vcps) else cp, int(ids.shape[0]), cache,
                           shared)
        items.append(_Item(ids, [InterventionSet(), InterventionSet(tuple(mapped))], src, _tti(enc),
                           guess=inc.guess(v, bundle.continuation_text),
                           alt=inc.guess(vcps[i]) if i < len(vcps) else None))
    out = _run_items(handle, items, bundle.failure, generate=True, max_new_tokens=bundle.max_new_tokens,
                     budget=budget, target_index=bundle.target_index, id2label=inc.id2label)
    fail_idx = [i for i, o in enumerate(out) if o[0]["failing"]]
    flips = {i: not out[i][1]["failing"] for i in fail_idx}
    n = len(fail_idx)
    k = sum(flips.values())
    res.n_variants = n
    res.flip_rate = k / n if n else float("nan")
    # no failing variant: no interval (the Wilson interval of 0/0 would be [0, 1], a number for "not measured")
    res.flip_rate_ci = stats.wilson_interval(k, n) if n else (float("nan"), float("nan"))
    for it, o in zip(items, out):
        if it.baseline is None:
            it.baseline = o[0]
    inc.cache["variants"] = {"items": items, "fail_idx": fail_idx, "flips": flips}
    res.evidence["variants"] = {
        "n_prompts": len(variants), "n_failing_baseline": n, "n_flipped": k, "failing_indices": fail_idx,
        "not_flipped": [{"index": i, "prompt": variants[i], "output": out[i][1]["output"]}
                        for i in fail_idx if not flips[i]],
        "position_rule": "same token nearest to the end-aligned position, else end-aligned"}


@torch.no_grad()
def _capture_batched(handle: ModelHandle, texts: Sequence[str], keys, budget: _Budget) -> list[tuple[list[int], dict]]:
    """Per text: (its token ids, ``{site: activation [n, *shape]}``), prompts of equal length run as one batch."""
    from .hooks import forward_captured

    encs = [_encode(handle, t) for t in texts]
    out: list = [None] * len(texts)
    groups: dict = {}
    for i, e in enumerate(encs):
        groups.setdefault(int(e["input_ids"].shape[1]), []).append(i)
    for members in groups.values():
        for c0 in range(0, len(members), MAX_ROWS):
            part = members[c0:c0 + MAX_ROWS]
            enc = {k: torch.cat([encs[i][k] for i in part]) for k in encs[part[0]]}
            budget.check()
            _, cap = forward_captured(handle, list(keys), **enc)
            budget.add(1, len(part))
            for r, i in enumerate(part):
                out[i] = (encs[i]["input_ids"][0].tolist(), {k: v[r] for k, v in cap.items()})
    return out


def _sufficiency_evidence(bundle, handle, inc: _Incident, fix, budget, res: CCAResult, progress) -> None:
    """Transplant the failing run's activations at the set's sites into its benign counterpart (op ``set``)."""
    budget.stage = "sufficiency"
    if progress:
        progress(1, "sufficiency: failing activations into benign counterparts")
    pairs = []
    cps = bundle.prompt_sets.get("counterpart") or []
    if cps:
        pairs.append((bundle.prompt, cps[0], True))
    for v, c in zip(bundle.prompt_sets.get("variants") or [], bundle.prompt_sets.get("variant_counterparts") or []):
        pairs.append((v, c, False))
    keys = sorted({(iv.layer, iv.component) for iv in fix})
    caps = _capture_batched(handle, [f for f, _, inc_pair in pairs if not inc_pair], keys, budget)
    items = []
    var_items = (inc.cache.get("variants") or {}).get("items") or []
    for n_pair, (fail_text, benign_text, is_incident) in enumerate(pairs):
        vi = n_pair - (1 if cps else 0)
        fb = var_items[vi].baseline if not is_incident and 0 <= vi < len(var_items) else None
        alt = inc.guess(bundle.prompt) if is_incident else (list(fb["tokens"]) if fb and fb.get("eos") else None)
        if is_incident:
            f_ids = inc.prompt_ids
            acts = {k: _recorded(bundle, handle, k, inc.n_prompt) for k in keys}
        else:
            f_ids, acts = caps[vi]
        enc_b = _encode(handle, benign_text)
        b_ids = enc_b["input_ids"][0]
        f_fix = _map_set(fix, inc.prompt_ids, inc.n_prompt, f_ids)  # the set's sites in the failing prompt
        tr = _transplant(f_fix, f_ids, len(f_ids), acts, b_ids.tolist(), handle)
        items.append(_Item(b_ids, [InterventionSet(), InterventionSet(tuple(tr))], None, _tti(enc_b),
                           guess=inc.guess(benign_text), alt=alt))
    out = _run_items(handle, items, bundle.failure, generate=True, max_new_tokens=bundle.max_new_tokens,
                     budget=budget, target_index=bundle.target_index, id2label=inc.id2label)
    benign = [o for o in out if not o[0]["failing"]]
    recreated = [o for o in benign if o[1]["failing"]]
    res.n_sufficiency = len(benign)
    res.sufficiency_rate = len(recreated) / len(benign) if benign else float("nan")
    res.evidence["sufficiency"] = {"n_pairs": len(pairs), "n_benign_baseline": len(benign),
                                   "n_recreated": len(recreated),
                                   "incident_pair_recreated": bool(out and not out[0][0]["failing"] and
                                                                   out[0][1]["failing"]) if cps else None,
                                   # counted in n_sufficiency (its counterpart behaves benign unintervened)
                                   "incident_pair_counted": bool(out and not out[0][0]["failing"]) if cps else None}


def _side_effect_evidence(bundle, handle, inc: _Incident, fix, budget, res: CCAResult, progress) -> None:
    budget.stage = "side_effects"
    if progress:
        progress(2, "side effects on held-out benign prompts")
    prompts = bundle.prompt_sets.get("benign_heldout") or []
    expected = bundle.prompt_sets.get("benign_expected") or []
    cache: dict = {}
    cp = (bundle.prompt_sets.get("counterpart") or [None])[0]
    shared = _prompt_sources(bundle, handle, None, 0, cache, inc.means)
    items = []
    for p in prompts:
        enc = _encode(handle, p)
        ids = enc["input_ids"][0]
        mapped = _map_set(fix, inc.prompt_ids, inc.n_prompt, ids.tolist())
        src = _sources_for(bundle, handle, inc, fix, cp, int(ids.shape[0]), cache, shared)
        items.append(_Item(ids, [InterventionSet(), InterventionSet(tuple(mapped))], src, _tti(enc),
                           guess=inc.guess(p)))
    out = _run_items(handle, items, bundle.failure, generate=True, max_new_tokens=bundle.max_new_tokens,
                     budget=budget, target_index=bundle.target_index, id2label=inc.id2label)
    rows = []
    kls = []
    for i, (p, o) in enumerate(zip(prompts, out)):
        lp0, lp1 = o[0]["logp"], o[1]["logp"]
        kl = float((lp0.exp() * (lp0 - lp1)).sum().clamp_min(0.0))
        kls.append(kl)
        rows.append({"prompt": p, "expected": expected[i] if i < len(expected) else None, "baseline": o[0]["output"],
                     "got": o[1]["output"], "changed": o[0]["output"] != o[1]["output"], "kl": kl,
                     "failing": bool(o[1]["failing"])})
    rows.sort(key=lambda r: (not r["changed"], -r["kl"]))
    n = len(rows)
    res.n_benign = n
    res.side_effect_rate = sum(r["changed"] for r in rows) / n if n else float("nan")
    res.side_effect_kl = float(np.mean(kls)) if kls else float("nan")
    res.side_effects = rows
    res.evidence["side_effects"] = {"n_changed": sum(r["changed"] for r in rows),
                                    "n_differs_from_expected": sum(
                                        1 for r in rows if r["expected"] is not None and
                                        r["got"].strip() != str(r["expected"]).strip()),
                                    "kl": "KL(baseline || intervened) of the label distribution, or of the next-"
                                          "token distribution after the prompt (the first generated token), nats"}


def control_sets(fix: Sequence[Intervention], n_layers: int, n_prompt: int, n: int, seed: int, *,
                 n_units: Mapping[str, int] | None = None) -> list[InterventionSet]:
    """``n`` random sets of the same size and components as ``fix`` (random layers, random prompt positions of the
    same count, for heads / neurons random units of the same count out of ``n_units[component]``), each different
    from ``fix`` itself. Every component, ``resid_post`` included, gets a random block out of all ``n_layers``
    (``resid_post`` of block ``L < n_layers - 1`` is the same stream as ``resid_pre`` of ``L + 1``: a control of the
    same shape all the same)."""
    rng = random.Random(seed)
    out = []
    own = sorted(_key(iv) for iv in fix)
    tries = 0
    while len(out) < n:
        tries += 1
        ivs = []
        for iv in fix:
            L = rng.randrange(n_layers)
            k = n_prompt if iv.positions == "all" else min(len(iv.positions), n_prompt)
            pos = tuple(sorted(rng.sample(range(n_prompt), k)))
            idx = iv.indices
            if idx and n_units and iv.component in n_units:
                idx = tuple(sorted(rng.sample(range(n_units[iv.component]), len(idx))))
            ivs.append(Intervention(L, iv.component, pos, iv.op, idx, iv.value, iv.values))
        if sorted(_key(iv) for iv in ivs) == own and tries < 100 * n:
            continue  # a control must differ from the tested set
        out.append(InterventionSet(tuple(ivs), name="control"))
    return out


def _control_evidence(bundle, handle, inc: _Incident, fix, budget, res: CCAResult, n_controls, seed,
                      progress) -> None:
    """Significance: the set's flip rate on the held-out failing variants (the incident alone when there are none)
    against the same flip rate of ``n_controls`` random sets of equal size and components.

    Controls run over the test prompts in a seeded order, in blocks of 2, 4, 8, …; a control stops as soon as its
    outcome relative to the set is decided (``k`` = the set's flips among ``n`` prompts: reached once it has ``k``
    flips; out of reach once it has more than ``n − k`` non-flips). That decides ``control >= set`` exactly, which is
    all the empirical p-value ``(1 + #{control >= set}) / (1 + n_controls)`` needs."""
    budget.stage = "controls"
    if progress:
        progress(3, f"significance: {n_controls} random control sets")
    if n_controls <= 0:
        return
    rng = random.Random(seed)
    var = inc.cache.get("variants") or {}
    if var.get("fail_idx"):
        order = list(var["fail_idx"])
        rng.shuffle(order)
        prompts = [var["items"][i] for i in order]
        own = [bool(var["flips"][i]) for i in order]
        what = "flip rate on the held-out failing variants (same position rule)"
    else:
        it = _Item(torch.as_tensor(inc.prompt_ids, dtype=torch.long), [InterventionSet()], inc.ctx.sources,
                   None if inc.ctx.token_type_ids is None else inc.ctx.token_type_ids[:inc.n_prompt])
        prompts, own, order = [it], [bool(res.flipped)], []
        what = "flip of the incident (the bundle has no failing variants)"
    n = len(prompts)
    k = sum(own)
    n_units = {"head": handle.n_heads, "neuron": handle.d_mlp}
    ctrl = control_sets(fix, handle.n_layers, inc.n_prompt, n_controls, seed, n_units=n_units)
    if any(iv.component in ("head", "neuron") for iv in fix) and fix[0].op == "mean":
        for c in {iv.component for iv in fix if iv.component in ("head", "neuron")}:
            inc.means.ensure(c)
    N = len(ctrl)
    flips = [0] * N
    runs = [0] * N
    status: list[bool | None] = [True if k == 0 else None for _ in range(N)]  # True: control >= set
    first_rows = first_flips = 0
    pos, blk = 0, max(2, n - k + 1)  # the first block can already put a control that never flips out of reach
    while pos < n and any(s is None for s in status):
        block = prompts[pos:pos + blk]
        live = [c for c in range(N) if status[c] is None]
        items = [_Item(it.ids, [InterventionSet(tuple(_map_set(ctrl[c].interventions, inc.prompt_ids, inc.n_prompt,
                                                                it.ids.tolist()))) for c in live],
                       it.sources, it.token_type_ids, it.baseline, alt=it.alt) for it in block]
        out = _run_items(handle, items, bundle.failure, generate=True, max_new_tokens=bundle.max_new_tokens,
                         budget=budget, target_index=bundle.target_index, id2label=inc.id2label)
        for o in out:
            for j, c in enumerate(live):
                f = not o[j]["failing"]
                flips[c] += f
                runs[c] += 1
                if pos == 0:
                    first_rows += 1
                    first_flips += f
        for c in live:
            if flips[c] >= k:
                status[c] = True
            elif runs[c] - flips[c] > n - k:
                status[c] = False
        pos += len(block)
        blk *= 2
        if progress:
            progress(3, f"significance: {sum(s is not None for s in status)}/{N} control sets decided")
    status = [s if s is not None else flips[c] >= k for c, s in enumerate(status)]
    observed = k / n
    hits = sum(1 for s in status if s)
    res.control_flip_rates = [flips[c] / runs[c] if runs[c] else 0.0 for c in range(N)]
    res.n_controls = N
    res.p_value = (1 + hits) / (1 + N)
    res.evidence["controls"] = {
        "statistic": what, "n_prompts": n, "variant_order": order, "observed_flip_rate": observed,
        "n_at_least_as_extreme": hits, "prompts_run": runs,
        "stopping": "a control stops once it reaches the set's flip count or can no longer reach it; "
                    "control_flip_rates are over the prompts each control ran",
        "first_block_flip_rate": first_flips / first_rows if first_rows else None,
        "first_block_flips": first_flips, "first_block_rows": first_rows,
        "control_flip_rate_mean": float(np.mean(res.control_flip_rates)) if N else None,
        "rows": int(budget.rows_by_stage.get("controls", 0)), "seed": seed, "held_out": bool(order),
        "examples": [ctrl[c].to_dict()["interventions"] for c in range(min(3, N))],
        "reaching": [ctrl[c].to_dict()["interventions"] for c in range(N) if status[c]][:10]}


def _fdr(res: CCAResult) -> None:
    ps: dict[str, float] = {}
    cev = res.evidence.get("controls") or {}
    # every claim is on prompts the set was not chosen on: controls that fell back to the incident itself
    # (no failing variants) make no claim, and the incident's own counterpart pair (which the search checked) is
    # left out of the sufficiency claim
    if math.isfinite(res.p_value) and bool(cev.get("held_out", True)):
        ps["flip_rate_vs_controls"] = res.p_value
    # the controls' per-prompt flip rate, smoothed, from the first block (every control ran it); with no control
    # prompt run there is no measured rate, and the two claims against it are not made (no assumed rate stands in)
    c_rows = int(cev.get("first_block_rows") or 0)
    c_rate = (1 + int(cev.get("first_block_flips") or 0)) / (1 + c_rows) if c_rows else None
    if res.n_variants and c_rate is not None:
        k = round(res.flip_rate * res.n_variants)
        ps["variant_flip_rate_above_control_rate"] = stats.binomial_p_value(k, res.n_variants, c_rate, "greater")
    if res.n_sufficiency and c_rate is not None:
        k, n = round(res.sufficiency_rate * res.n_sufficiency), res.n_sufficiency
        sev = res.evidence.get("sufficiency") or {}
        if sev.get("incident_pair_counted"):   # results written before the key existed keep their claim as it was
            n -= 1
            k -= 1 if sev.get("incident_pair_recreated") else 0
        if n > 0:
            ps["sufficiency_above_control_rate"] = stats.binomial_p_value(k, n, c_rate, "greater")
    if res.n_benign:
        k = round(res.side_effect_rate * res.n_benign)
        ps["side_effects_below_5pct"] = stats.binomial_p_value(k, res.n_benign, TARGETS["side_effect_rate"], "less")
    res.evidence["claim_p_values"] = dict(ps)
    res.fdr = stats.bh_adjust(ps)


#: Why a piece of evidence is missing, and how to get it: the bundle lacks the prompts it is measured on.
NOT_MEASURED_WHY = {
    "flip_rate": "the bundle has no held-out failing variants; record them with --variants-file",
    "side_effect_rate": "the bundle has no held-out benign prompts; record them with --heldout-file",
    "sufficiency_rate": "the bundle has no benign counterpart; record one with --counterpart",
}


def not_measured(key: str, res: "CCAResult") -> str:
    """``"not measured: <why>"`` for an evidence number of ``res`` that is missing."""
    if res.partial:
        return "not measured: the run was cancelled before this evidence"
    if key == "p_value":
        return "not measured: no random control sets were run" if not res.n_controls else "not measured"
    if key == "flip_rate" and res.n_variants == 0:
        nv = int((res.evidence.get("variants") or {}).get("n_prompts") or 0)
        if nv:
            return f"not measured: none of the bundle's {nv} held-out variants fails unintervened"
        return "not measured: " + NOT_MEASURED_WHY[key]
    if key == "sufficiency_rate" and res.n_sufficiency == 0:
        npairs = int((res.evidence.get("sufficiency") or {}).get("n_pairs") or 0)
        if npairs:
            return f"not measured: none of the {npairs} benign counterparts behaves benign unintervened"
    if key == "side_effect_rate" and res.n_benign == 0 or key == "sufficiency_rate" and res.n_sufficiency == 0:
        return "not measured: " + NOT_MEASURED_WHY[key]
    return "not measured"


#: Why a cancelled search's set has no verdict on the incident.
UNCHECKED = "not measured: the run was cancelled before the set was checked on the incident"


def _criteria(res: CCAResult) -> dict[str, dict]:
    """The issue's "Done when" targets, each with the measured value and whether it holds."""
    def finite(x):
        return x is not None and math.isfinite(x)

    out: dict[str, dict] = {}
    fr = res.flip_rate
    lo, hi = res.flip_rate_ci
    out["flip_rate"] = {
        "target": ">= 80% of held-out failing variants", "value": _num(fr), "ok": bool(finite(fr) and fr >= 0.80),
        "detail": (f"{round(fr * res.n_variants)}/{res.n_variants} flipped = {fr:.1%} (Wilson 95% {lo:.1%}–{hi:.1%})"
                   + ("" if fr >= 0.80 else f"; {0.80 - fr:.1%} below target")) if finite(fr) else
        not_measured("flip_rate", res)}
    se = res.side_effect_rate
    out["side_effect_rate"] = {
        "target": "<= 5% of held-out benign prompts change", "value": _num(se),
        "ok": bool(finite(se) and se <= 0.05),
        "detail": (f"{round(se * res.n_benign)}/{res.n_benign} changed = {se:.1%}, mean KL {res.side_effect_kl:.4f}"
                   + ("" if se <= 0.05 else f"; {se - 0.05:.1%} above target")) if finite(se) else
        not_measured("side_effect_rate", res)}
    fa = res.fraction_of_activations
    out["fraction_of_activations"] = {
        "target": "<= 5% of recorded activation values", "value": _num(fa), "ok": bool(finite(fa) and fa <= 0.05),
        "detail": (f"{fa:.3%} of recorded values touched by {len(res.fix_set)} intervention(s)"
                   + ("" if fa <= 0.05 else f"; {fa - 0.05:.2%} above target")) if finite(fa) else "not measured"}
    checked = res.checked
    out["one_minimal"] = {
        "target": "dropping any one element un-fixes the incident",
        "value": float(res.one_minimal) if checked else None,
        "ok": bool(res.one_minimal),
        "detail": (UNCHECKED if not checked else "every element necessary" if res.one_minimal else
                   ("the set does not fix the incident" if not res.flipped else
                    "not 1-minimal: " + ", ".join(e.intervention.describe() for e in res.fix_set
                                                  if not e.drop_one_failing) + " can be dropped"))}
    p = res.p_value
    cev = res.evidence.get("controls") or {}
    held_out = bool(cev.get("held_out", True))  # results written before the key existed ran on the variants
    out["p_value"] = {
        "target": "p < 0.01 against >= 200 random controls", "value": _num(p),
        "ok": bool(finite(p) and p < 0.01 and res.n_controls >= 200 and held_out),
        "detail": (f"p = {p:.4f} from {res.n_controls} controls "
                   f"({cev.get('n_at_least_as_extreme', '?')} at least as extreme)"
                   + ("" if res.n_controls >= 200 else "; fewer than 200 controls")
                   + ("" if p < 0.01 else f"; {p - 0.01:.4f} above 0.01")
                   + ("" if held_out else "; measured on the incident itself, which the set was chosen on, so it is "
                      "not a held-out test (" + NOT_MEASURED_WHY["flip_rate"] + ")"))
        if finite(p) else not_measured("p_value", res)}
    out["incident_flipped"] = {"target": "the incident no longer fails under the set",
                               "value": float(res.flipped) if checked else None, "ok": bool(res.flipped),
                               "detail": (f"metric {res.baseline_metric:.3f} -> {res.fixed_metric:.3f}" if checked
                                          else f"{UNCHECKED} (best search metric {res.baseline_metric:.3f} -> "
                                               f"{res.fixed_metric:.3f}, teacher-forced)")}
    return out
