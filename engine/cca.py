"""Causal analysis (CCA): find a small set of activation interventions that makes an incident's failure go away,
then measure what that set does and does not do.

Pipeline of :func:`run_cca` (every number comes from real forward passes; nothing is estimated by combining
single-site results):

1. **Candidates** — sites ``(layer, component, positions)`` for ``component`` in ``resid_pre``, ``attn``, ``mlp``
   and ``resid_post`` (``resid_post`` of block ``L`` equals ``resid_pre`` of block ``L+1``, so it is a candidate only
   for the last block), with position groups: every single prompt position and the last three prompt positions (the whole
   prompt at one site is already ~1/n_sites of the recorded values, above the 5% minimality target). Operation ``mean`` (benign mean, default) or ``patch`` (the counterpart donor).
2. **Ranking** — attribution patching: one forward and one backward of the failure metric with a zero tensor added
   at every site; ``grad · (replacement − activation)`` summed over a candidate's positions estimates its effect on
   the metric. Combined with the CF prior (``cf.prior()``, weight ``w`` in [0, 1]) as ``estimate × (1 + w)``.
   Re-computed under the current set at every search step.
3. **Search** — greedy (``beam=1``) or beam search: at each step, each beam state is extended by its ``top_m`` best
   ranked candidates and all extensions are evaluated exactly, as batch rows of one replay (teacher-forced metric).
   A set *fixes* the incident when the teacher-forced verdict is no longer failing with a margin (label/token: logit
   margin <= ``-margin``; contains/wordlist: span log-prob at least ``margin`` nats below the recorded one) **and**,
   for generation incidents, the greedy continuation generated under the set no longer fails. Early stop at the first
   fixing set; then **pruning** to a 1-minimal set (drop any element that is not needed, re-evaluated each time).
4. **Evidence** (:func:`evaluate_fix_set`) — flip rate on the held-out failing variants (Wilson 95%), sufficiency
   (failing activations transplanted into the benign counterparts), side effects on held-out benign prompts (share
   whose output changes, mean KL of the next-token / label distribution), minimality (size, fraction of recorded
   activation values touched, 1-minimality), significance against random control sets of equal size and matching
   components (empirical p-value), Benjamini–Hochberg q-values across the claims, and the budget.

**Position rule** (mapping the set's positions from the incident prompt to another prompt): an incident position
``p`` holding token ``t`` maps to the position of the other prompt that holds the same token ``t`` and is nearest to
the *end-aligned* position ``q = p − n_incident + n_other``; when ``t`` does not occur there, to ``q`` itself
(dropped when ``q < 0``). So a trigger token is followed wherever it sits, and structural positions (the last tokens)
stay aligned from the end.
"""

from __future__ import annotations

import hashlib
import math
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from . import stats
from .errors import CCAError, ForensicsError
from .failure import margin as _margin
from .failure import span_logprob
from .hooks import site_hooks
from .interventions import (ActivationSources, EvalContext, EvaluationCancelled, Intervention, InterventionSet,
                            _make_hook, bundle_sources, context_from_bundle, evaluate_ids, run_with_interventions)
from .models import ModelHandle

SCHEMA = "forensics.cca-result/1"
SEARCH_COMPONENTS = ("resid_pre", "attn", "mlp", "resid_post")
TARGETS = {"flip_rate": 0.80, "side_effect_rate": 0.05, "fraction_of_activations": 0.05, "p_value": 0.01}
Progress = Callable[[int, int, str], None]


class _Cancelled(Exception):
    pass


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


@dataclass
class CCAResult:
    """A fix set and the evidence for it (see the module docstring for every definition)."""

    fix_set: list[FixElement]
    flipped: bool
    baseline_metric: float
    fixed_metric: float
    flip_rate: float
    flip_rate_ci: tuple[float, float]
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

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA, "bundle_uuid": self.bundle_uuid, "bundle_sha256": self.bundle_sha256, "op": self.op,
            "fix_set": [e.to_dict() for e in self.fix_set], "set_size": self.set_size, "flipped": bool(self.flipped),
            "baseline_metric": _num(self.baseline_metric), "fixed_metric": _num(self.fixed_metric),
            "flip_rate": _num(self.flip_rate), "flip_rate_ci": [_num(x) for x in self.flip_rate_ci],
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
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "CCAResult":
        if not isinstance(d, Mapping):
            raise CCAError(f"a CCA result must be a JSON object, got {type(d).__name__}")
        if d.get("schema") != SCHEMA:
            raise CCAError(f"not a CCA result: schema {d.get('schema')!r}, expected {SCHEMA!r}")
        try:
            ci = d.get("flip_rate_ci") or [None, None]
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
        self.passes += passes
        self.rows += rows
        self.by_stage[self.stage] = self.by_stage.get(self.stage, 0) + passes


# ----------------------------------------------------------------------------------------------------------------
# Prompts other than the incident
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


def _prompt_sources(bundle, handle: ModelHandle, donor_text: str | None, n_prompt: int,
                    donor_cache: dict) -> ActivationSources:
    """Benign means of the bundle, and (lazily) ``donor_text`` run once as the patch donor, aligned from the end."""
    counts = bundle.benign_position_counts()
    state: dict = {}

    def donor(layer, comp):
        if donor_text is None:
            return None
        if donor_text not in donor_cache:
            from .hooks import forward_captured

            enc = _encode(handle, donor_text)
            keys = [(i, c) for i in range(handle.n_layers) for c in SEARCH_COMPONENTS]
            with torch.no_grad():
                _, acts = forward_captured(handle, keys, **enc)
            donor_cache[donor_text] = {k: v[0] for k, v in acts.items()}
        return donor_cache[donor_text][(layer, comp)]

    n_donor = len(handle.tokenizer(donor_text)["input_ids"]) if donor_text is not None else n_prompt
    del state
    return ActivationSources(lambda L, c: bundle.benign_mean(L, c, per_position=False),
                             lambda L, c: bundle.benign_mean(L, c, per_position=True), counts, donor,
                             n_prompt - n_donor)


@dataclass
class _Item:
    """One prompt evaluated under several sets (one batch row each)."""

    ids: torch.Tensor  # [n] prompt ids
    sets: list[InterventionSet]
    sources: ActivationSources | None
    token_type_ids: torch.Tensor | None = None


@torch.no_grad()
def _run_items(handle: ModelHandle, items: Sequence[_Item], spec, *, generate: bool, max_new_tokens: int,
               budget: _Budget, target_index: int = -1, id2label=None, max_rows: int = 32) -> list[list[dict]]:
    """Evaluate prompts under sets: per item, per set ``{"output", "failing", "logp"}`` (``logp``: log-probs of the
    next token / label at the decision position ``[V]``).

    Items with the same length and the same ``sources`` object are batched together (rows = items × sets, at most
    ``max_rows`` per forward). Generation: greedy, full forward per step, EOS-frozen rows; ``cancel`` is checked
    before every forward.
    """
    kind = spec.kind
    out: list[list[dict] | None] = [None] * len(items)
    groups: dict = {}
    for i, it in enumerate(items):
        groups.setdefault((int(it.ids.shape[0]), id(it.sources), it.token_type_ids is None), []).append(i)
    eos = getattr(handle.tokenizer, "eos_token_id", None) if handle.tokenizer is not None else None
    for (n, _, _), members in groups.items():
        flat = [(i, s) for i in members for s in range(len(items[i].sets))]
        for c0 in range(0, len(flat), max_rows):
            chunk = flat[c0:c0 + max_rows]
            sets = [items[i].sets[s] for i, s in chunk]
            ids = torch.stack([items[i].ids for i, _ in chunk])
            src = items[chunk[0][0]].sources
            res = [dict() for _ in chunk]
            if kind == "label" or not handle.is_causal_lm:
                budget.check()
                tti = items[chunk[0][0]].token_type_ids
                logits = run_with_interventions(
                    handle, ids, sets, sources=src, attention_mask=torch.ones_like(ids),
                    token_type_ids=None if tti is None else torch.stack([items[i].token_type_ids for i, _ in chunk]))
                budget.add(1, len(chunk))
                lp = torch.log_softmax(logits.float(), -1)
                for r in range(len(chunk)):
                    k = int(lp[r].argmax())
                    res[r] = {"output": str(id2label.get(k, k)) if id2label else str(k), "failing": k == target_index,
                              "logp": lp[r]}
            elif kind == "token" or not generate:
                budget.check()
                logits = run_with_interventions(handle, ids, sets, sources=src, logits_from=n - 1)
                budget.add(1, len(chunk))
                lp = torch.log_softmax(logits[:, -1].float(), -1)
                for r in range(len(chunk)):
                    k = int(lp[r].argmax())
                    res[r] = {"output": handle.tokenizer.decode([k]), "logp": lp[r],
                              "failing": (k == target_index) if kind == "token" else None}
            elif handle.is_causal_lm and all(iv.positions != "all" and max(iv.positions) < n
                                             for st in sets for iv in st.interventions):
                new, first = _generate_cached(handle, ids, sets, src, max_new_tokens, eos, budget)
                for r in range(len(chunk)):
                    text = handle.tokenizer.decode(new[r], skip_special_tokens=True)
                    res[r] = {"output": text, "failing": bool(spec.continuation_fails(text)), "logp": first[r]}
            else:
                cur = ids.clone()
                rows = len(chunk)
                done = torch.zeros(rows, dtype=torch.bool)
                new: list[list[int]] = [[] for _ in range(rows)]
                first = None
                for step in range(max_new_tokens):
                    budget.check()
                    logits = run_with_interventions(handle, cur, sets, sources=src, logits_from=cur.shape[1] - 1)
                    budget.add(1, rows)
                    last = logits[:, -1].float()
                    if first is None:
                        first = torch.log_softmax(last, -1)
                    nxt = last.argmax(-1)
                    for r in range(rows):
                        if done[r]:
                            continue
                        t = int(nxt[r])
                        if eos is not None and t == eos:
                            done[r] = True
                        else:
                            new[r].append(t)
                    if bool(done.all()):
                        break
                    fill = torch.where(done, torch.full_like(nxt, eos if eos is not None else 0), nxt)
                    cur = torch.cat([cur, fill[:, None]], dim=1)
                for r in range(rows):
                    text = handle.tokenizer.decode(new[r], skip_special_tokens=True)
                    res[r] = {"output": text, "failing": bool(spec.continuation_fails(text)), "logp": first[r]}
            for (i, s), r in zip(chunk, res):
                if out[i] is None:
                    out[i] = [None] * len(items[i].sets)
                out[i][s] = r
    return out  # type: ignore[return-value]


def _generate_cached(handle: ModelHandle, ids: torch.Tensor, sets: Sequence[InterventionSet],
                     sources: ActivationSources | None, max_new_tokens: int, eos: int | None,
                     budget: _Budget) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy continuation of ``ids`` ``[rows, n]`` under ``sets`` (every intervened position < n), with a key/value
    cache: the prompt runs once with the hooks, each new token runs alone on the cache (no intervened position is
    ever recomputed, so this equals the full-recompute generation up to float rounding).

    Returns:
        (new token ids per row, log-probs of the first generated token ``[rows, V]``).
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
    past = out.past_key_values
    last = out.logits[:, -1].float()
    first = torch.log_softmax(last, -1)
    done = torch.zeros(rows, dtype=torch.bool)
    new: list[list[int]] = [[] for _ in range(rows)]
    n_total = ids.shape[1]
    for step in range(max_new_tokens):
        nxt = last.argmax(-1)
        for r in range(rows):
            if done[r]:
                continue
            t = int(nxt[r])
            if eos is not None and t == eos:
                done[r] = True
            else:
                new[r].append(t)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        fill = torch.where(done, torch.full_like(nxt, eos if eos is not None else 0), nxt)
        n_total += 1
        budget.check()
        out = handle.model(input_ids=fill[:, None], attention_mask=torch.ones((rows, n_total), dtype=torch.long),
                           past_key_values=past, use_cache=True)
        budget.add(1, rows)
        past = out.past_key_values
        last = out.logits[:, -1].float()
    return new, first


# ----------------------------------------------------------------------------------------------------------------
# The incident: exact teacher-forced evaluation, generation confirmation, attribution
# ----------------------------------------------------------------------------------------------------------------
class _Incident:
    """Everything about the bundle's incident the search needs (context, baseline, fix criterion)."""

    def __init__(self, bundle, handle: ModelHandle, op: str, budget: _Budget, margin: float):
        self.bundle, self.handle, self.op, self.budget = bundle, handle, op, budget
        self.ctx: EvalContext = context_from_bundle(bundle, handle)
        self.kind = bundle.failure.kind
        self.gen_kind = self.kind in ("contains", "wordlist")
        self.n_prompt = int(bundle.n_prompt_tokens)
        self.prompt_ids = [int(x) for x in bundle.input_ids[:self.n_prompt]]
        self.margin = float(margin)
        self.causal = handle.is_causal_lm
        self.id2label = getattr(handle.model.config, "id2label", None) or {}
        base = self.evaluate_tf([InterventionSet()])[0]
        self.baseline_metric = base.metric
        self.baseline_failing_tf = base.failing
        self._gen_cache: dict = {}

    # -- exact, teacher-forced, batched ------------------------------------------------------------------------
    def evaluate_tf(self, sets: Sequence[InterventionSet], chunk_size: int = 32):
        self.budget.check()
        try:
            res = evaluate_ids(self.handle, self.ctx, list(sets), chunk_size=chunk_size, start_layer="auto",
                               generate=False, prefix_reuse=self.causal, cancel=self.budget.cancel)
        except EvaluationCancelled:
            raise _Cancelled() from None
        self.budget.add(res.forward_passes, res.rows)
        return res.results

    def fixed_tf(self, r) -> bool:
        if self.kind in ("label", "token"):
            return (not r.failing) and r.metric <= -self.margin
        return (not r.failing) and r.metric <= self.baseline_metric - self.margin

    def generate(self, sets: Sequence[InterventionSet]) -> list[dict]:
        """Greedy continuation of the incident prompt under each set (generation incidents only)."""
        item_sets = list(sets)
        ids = torch.as_tensor(self.prompt_ids, dtype=torch.long)
        res = _run_items(self.handle, [_Item(ids, item_sets, self.ctx.sources)], self.bundle.failure,
                         generate=True, max_new_tokens=self.bundle.max_new_tokens, budget=self.budget)[0]
        return res

    def fixed(self, sets: Sequence[InterventionSet], tf_results=None) -> tuple[list[bool], list]:
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

    # -- attribution patching ----------------------------------------------------------------------------------
    def attribution(self, base: Sequence[Intervention], cands: Sequence[Intervention]) -> np.ndarray:
        """Estimated change of the failure metric when each candidate is added to ``base`` (one fwd + one bwd).

        Returns:
            ``[len(cands)]`` float64: ``sum_p grad[p] · (replacement[p] − activation[p])`` over the candidate's
            positions, gradients and activations taken under ``base``.
        """
        self.budget.check()
        h, ctx = self.handle, self.ctx
        ids = (ctx.input_ids if ctx.probe_ids is None else ctx.probe_ids)[None]
        n_pos = int(ids.shape[1])
        keys = sorted({(c.layer, c.component) for c in cands})
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
        if ctx.probe_ids is None and ctx.attention_mask is not None:
            kw["attention_mask"] = ctx.attention_mask[None]
        if ctx.token_type_ids is not None and ctx.probe_ids is None:
            kw["token_type_ids"] = ctx.token_type_ids[None]
        with torch.enable_grad(), site_hooks(h, fns):
            logits = h.model(**kw).logits
            if self.kind == "label":
                metric = _margin(logits.float(), ctx.target_index).sum()
            elif self.kind == "token":
                metric = _margin(logits[:, ctx.n_prompt - 1].float(), ctx.target_index).sum()
            else:
                t_start = ctx.target_start if ctx.probe_ids is None else ctx.n_prompt
                t_len = ctx.target_length if ctx.probe_ids is None else int(ctx.probe_ids.shape[0] - ctx.n_prompt)
                metric = span_logprob(logits, ids, t_start, t_len).sum()
            order = list(zeros)
            grads = torch.autograd.grad(metric, [zeros[k] for k in order], allow_unused=True)
        self.budget.add(1, 1)
        self.budget.backward += 1
        grad = {k: (g[0].double() if g is not None else torch.zeros_like(zeros[k][0], dtype=torch.float64))
                for k, g in zip(order, grads)}
        est = np.zeros(len(cands))
        per_site: dict = {}
        for k in order:
            a = acts[k][0].double()
            shape = h.site_shape(k[1])
            if self.op == "mean":
                repl = sources.mean(k[0], k[1], n_pos, shape).double()
                per_site[k] = ((repl - a) * grad[k]).reshape(n_pos, -1).sum(-1)
            else:
                d = torch.zeros(n_pos)
                pos, src, _ = sources.donor_positions(list(range(n_pos)), k[0], k[1], shape)
                if pos:
                    donor = sources.donor(k[0], k[1], shape)[torch.tensor(src)].double()
                    d = torch.zeros(n_pos, dtype=torch.float64)
                    d[torch.tensor(pos)] = ((donor - a[pos]) * grad[k][pos]).reshape(len(pos), -1).sum(-1)
                per_site[k] = d
        for i, c in enumerate(cands):
            ps = per_site[(c.layer, c.component)]
            pos = range(n_pos) if c.positions == "all" else c.positions
            est[i] = float(sum(float(ps[p]) for p in pos if p < n_pos))
        return est


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
    if (a.layer, a.component) != (b.layer, b.component):
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
            margin: float = 1.0, evidence: bool = True, progress: Progress | None = None,
            on_step: Callable[[dict], None] | None = None, cancel: threading.Event | None = None) -> CCAResult:
    """Search a 1-minimal fix set for the bundle's incident and measure the evidence for it.

    Args:
        bundle: an open incident bundle.
        handle: its model (loaded from the bundle when ``None``).
        cf: a CF result (``prior()`` weights the ranking) or ``None``.
        op: ``"mean"`` (benign mean) or ``"patch"`` (counterpart donor).
        beam: beam width (1 = greedy).
        max_size: largest set searched.
        n_controls: random control sets for the significance test (>= 200 for the issue's criterion).
        seed: seeds the control sets.
        top_m: candidates evaluated exactly per beam state and step.
        ranking: ``"attribution"`` (gradient × difference, with the CF prior) or ``"exhaustive"`` (every candidate
            evaluated at every step: the unranked baseline of the benchmark).
        margin: fix margin (logit margin for label/token; nats below the recorded span log-prob otherwise).
        evidence: compute the evidence (variants, sufficiency, side effects, controls); ``False`` = search only.
        progress: ``progress(done, total, what)``.
        on_step: called with ``{"stage", "passes", "best_metric", "set_size"}`` at each search step.
        cancel: set it to stop between forward passes: the best result so far is returned with ``partial=True``.
    """
    if op not in ("mean", "patch"):
        raise CCAError(f"op must be 'mean' or 'patch', got {op!r}")
    if beam < 1 or max_size < 1 or top_m < 1:
        raise CCAError("beam, max_size and top_m must be >= 1")
    if ranking not in ("attribution", "exhaustive"):
        raise CCAError(f"ranking must be 'attribution' or 'exhaustive', got {ranking!r}")
    if handle is None:
        from .replay import load_bundle_model

        handle = load_bundle_model(bundle)
    budget = _Budget(cancel)
    trace: list[dict] = []
    total_stages = 7 if evidence else 3
    state = {"best": (), "best_metric": float("nan"), "found": None, "stage": "baseline"}

    def step(stage: str, best_metric: float, size: int) -> None:
        d = {"stage": stage, "passes": budget.passes, "best_metric": _num(best_metric), "set_size": size}
        trace.append(d)
        if on_step:
            on_step(dict(d))

    def prog(k: int, what: str) -> None:
        if progress:
            progress(k, total_stages, what)

    prior = _cf_prior(cf)
    rank_info: dict = {"method": "attribution patching (grad x (replacement - activation))" +
                                 (" x (1 + CF prior)" if prior else "") if ranking == "attribution" else
                                 "exhaustive (no ranking)", "cf_prior": bool(prior), "top_m": top_m}
    inc = None
    try:
        budget.stage = "baseline"
        inc = _Incident(bundle, handle, op, budget, margin)
        if not bundle.failing:
            raise CCAError("the incident does not fail: there is nothing to fix")
        state["best_metric"] = inc.baseline_metric
        step("baseline", inc.baseline_metric, 0)
        cands = candidate_sites(bundle, handle, op)
        rank_info["n_candidates"] = len(cands)
        prog(0, f"ranking {len(cands)} candidate sites")
        budget.stage = "search"
        beams: list[tuple[tuple[Intervention, ...], float]] = [((), inc.baseline_metric)]
        found = None
        for size in range(1, max_size + 1):
            ext: list[tuple[Intervention, ...]] = []
            seen = set()
            for base, _ in beams:
                pool = [c for c in cands if not any(_overlaps(c, b) for b in base)]
                if ranking == "attribution":
                    est = inc.attribution(base, pool)
                    w = np.array([prior.get((c.layer, c.component), 0.0) for c in pool])
                    score = est * (1.0 + w)
                    order = np.argsort(score, kind="stable")[:top_m]
                    if size == 1:
                        rank_info["_est"] = est
                        rank_info["_pool"] = pool
                    chosen = [pool[i] for i in order]
                else:
                    chosen = pool
                for c in chosen:
                    s = tuple(sorted(base + (c,), key=_key))
                    if s not in seen:
                        seen.add(s)
                        ext.append(s)
            sets = [InterventionSet(s) for s in ext]
            tf = inc.evaluate_tf(sets)
            if size == 1 and ranking == "attribution":
                pool = rank_info.pop("_pool")
                est = rank_info.pop("_est")
                idx = {_key(c): i for i, c in enumerate(pool)}
                pairs = [(est[idx[_key(s[0])]], r.metric - inc.baseline_metric) for s, r in zip(ext, tf)]
                rank_info["spearman_vs_exact"] = stats.spearman([a for a, _ in pairs], [b for _, b in pairs])
                rank_info["spearman_n"] = len(pairs)
                rank_info["spearman_scope"] = "top_m candidates evaluated exactly at step 1"
            if size == 1 and ranking == "exhaustive":
                rank_info["exact_single"] = [{"site": s[0].describe(), "delta": r.metric - inc.baseline_metric}
                                             for s, r in zip(ext, tf)]
            order = sorted(range(len(ext)), key=lambda i: tf[i].metric)
            beams = [(ext[i], tf[i].metric) for i in order[:beam]]
            state["best"], state["best_metric"] = beams[0]
            step("search", beams[0][1], size)
            # confirm: the best few teacher-forced fixes, in metric order
            cand_fix = [i for i in order if inc.fixed_tf(tf[i])][:max(beam, 4)]
            if cand_fix:
                ok, _ = inc.fixed([sets[i] for i in cand_fix], [tf[i] for i in cand_fix])
                good = [cand_fix[j] for j, v in enumerate(ok) if v]
                if good:
                    found = ext[good[0]]
                    state["best"], state["best_metric"] = found, tf[good[0]].metric
                    state["found"] = found
                    step("confirm", tf[good[0]].metric, len(found))
                    break
            prog(1, f"search: size {size}, best metric {beams[0][1]:.3f}")
        # prune to 1-minimal
        budget.stage = "prune"
        prog(2, "pruning to a 1-minimal set")
        fix = list(found) if found is not None else list(state["best"])
        if found is not None:
            while len(fix) > 1:
                drops = [InterventionSet(tuple(fix[:i] + fix[i + 1:])) for i in range(len(fix))]
                ok, tf = inc.fixed(drops)
                keep = [i for i, v in enumerate(ok) if v]
                if not keep:
                    break
                j = min(keep, key=lambda i: tf[i].metric)
                fix.pop(j)
                state["best"] = tuple(fix)
                step("prune", tf[j].metric, len(fix))
            fix = _refine(inc, fix, step)
        state["best"] = tuple(fix)
        search_passes = budget.passes
        search_rows = budget.rows
        search_seconds = time.perf_counter() - budget.t0
        rank_info["search_passes"] = search_passes
        rank_info["search_rows"] = search_rows
        rank_info["search_seconds"] = search_seconds
        rank_info["backward_passes"] = budget.backward
        res = _evidence(bundle, handle, inc, fix, budget, n_controls=n_controls, seed=seed, evidence=evidence,
                        progress=(lambda k, what: prog(3 + k, what)), trace=trace, ranking=rank_info)
        step("done", res.fixed_metric, len(fix))
        res.trace = trace
        return res
    except _Cancelled:
        return _partial(bundle, handle, inc, list(state["best"]), state["best_metric"], budget, trace, rank_info, op)


def _refine(inc: _Incident, fix: list[Intervention], step) -> list[Intervention]:
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
            subs = [c for c in _combinations(pos, size)]
            trial = [Intervention(iv.layer, iv.component, c, iv.op, iv.indices, iv.value, iv.values) for c in subs]
            sets = [InterventionSet(tuple(fix[:i] + [t] + fix[i + 1:])) for t in trial]
            ok, tf = inc.fixed(sets)
            good = [k for k, v in enumerate(ok) if v]
            if good:
                k = min(good, key=lambda k: tf[k].metric)
                fix[i] = trial[k]
                step("refine", tf[k].metric, len(fix))
                break
    return fix


def _combinations(pos, k):
    import itertools

    return list(itertools.combinations(pos, k))


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
                     n_controls: int = 200, seed: int = 0, margin: float = 1.0, progress: Progress | None = None,
                     cancel: threading.Event | None = None) -> CCAResult:
    """All the evidence for a given set (the GUI's accept/reject re-evaluation; certificate verification).

    Returns a :class:`CCAResult`; when cancelled, ``partial=True`` with what was measured before.
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
        inc = _Incident(bundle, handle, op if op in ("mean", "patch") else "mean", budget, margin)
        return _evidence(bundle, handle, inc, ivs, budget, n_controls=n_controls, seed=seed, evidence=True,
                         progress=(lambda k, what: progress(k, 4, what)) if progress else None, trace=trace,
                         ranking={"method": "given set"})
    except _Cancelled:
        return _partial(bundle, handle, inc, ivs, float("nan") if inc is None else inc.baseline_metric, budget,
                        trace, {"method": "given set"}, op)


def _evidence(bundle, handle: ModelHandle, inc: _Incident, fix: list[Intervention], budget: _Budget, *,
              n_controls: int, seed: int, evidence: bool, progress, trace: list, ranking: dict) -> CCAResult:
    spec = bundle.failure
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
    ev: dict = {"incident": {"baseline_metric": inc.baseline_metric, "fixed_metric": tf[0].metric}}
    if inc.gen_kind:
        g = inc.generate([InterventionSet(), S])
        ev["incident"].update(baseline_output=g[0]["output"], fixed_output=g[1]["output"])
    res = CCAResult(
        fix_set=elements, flipped=bool(flipped), baseline_metric=inc.baseline_metric, fixed_metric=tf[0].metric,
        flip_rate=nan, flip_rate_ci=(nan, nan), n_variants=0, sufficiency_rate=nan, side_effect_rate=nan,
        side_effect_kl=nan, side_effects=[], n_benign=0, fraction_of_activations=fraction, one_minimal=one_minimal,
        p_value=nan, control_flip_rates=[], n_controls=0, fdr={}, criteria={}, forward_passes=0, seconds=0.0,
        partial=False, trace=trace, ranking=ranking, bundle_uuid=getattr(bundle, "uuid", ""),
        op=fix[0].op if fix else "mean", evidence=ev)
    try:
        res.bundle_sha256 = bundle_sha256(bundle.path)
    except (OSError, AttributeError):
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
    res.evidence["seconds_by_stage"] = {k: round(v, 3) for k, v in budget.sec_by_stage.items() if k}
    res.criteria = _criteria(res)
    return res


def _variant_evidence(bundle, handle, inc: _Incident, fix, budget, res: CCAResult, progress) -> None:
    budget.stage = "variants"
    if progress:
        progress(0, "flip rate on held-out variants")
    variants = bundle.prompt_sets.get("variants") or []
    vcps = bundle.prompt_sets.get("variant_counterparts") or []
    donor_cache: dict = {}
    shared = _prompt_sources(bundle, handle, None, 0, donor_cache) if fix[0].op != "patch" else None
    items = []
    for i, v in enumerate(variants):
        enc = _encode(handle, v)
        ids = enc["input_ids"][0]
        mapped = _map_set(fix, inc.prompt_ids, inc.n_prompt, ids.tolist())
        if shared is not None:
            src = shared
        else:
            donor = vcps[i] if i < len(vcps) else (bundle.prompt_sets.get("counterpart") or [None])[0]
            src = _prompt_sources(bundle, handle, donor, int(ids.shape[0]), donor_cache)
        items.append(_Item(ids, [InterventionSet(), InterventionSet(tuple(mapped))], src,
                           enc.get("token_type_ids", [None])[0] if "token_type_ids" in enc else None))
    out = _run_items(handle, items, bundle.failure, generate=True, max_new_tokens=bundle.max_new_tokens,
                     budget=budget, target_index=bundle.target_index, id2label=inc.id2label)
    fail_idx = [i for i, o in enumerate(out) if o[0]["failing"]]
    fails = [out[i] for i in fail_idx]
    flipped = [o for o in fails if not o[1]["failing"]]
    n = len(fails)
    res.n_variants = n
    res.flip_rate = len(flipped) / n if n else nan
    res.flip_rate_ci = stats.wilson_interval(len(flipped), n)
    res.evidence["variants"] = {"n_prompts": len(variants), "n_failing_baseline": n, "n_flipped": len(flipped),
                                "failing_indices": fail_idx,
                                "position_rule": "same token nearest to the end-aligned position, else end-aligned"}


def _sufficiency_evidence(bundle, handle, inc: _Incident, fix, budget, res: CCAResult, progress) -> None:
    """Transplant the failing run's activations at the set's sites into its benign counterpart (op ``set``)."""
    from .hooks import forward_captured

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
    items = []
    for fail_text, benign_text, is_incident in pairs:
        f_ids = inc.prompt_ids if is_incident else _encode(handle, fail_text)["input_ids"][0].tolist()
        n_f = len(f_ids)
        enc_b = _encode(handle, benign_text)
        b_ids = enc_b["input_ids"][0]
        if is_incident:
            acts = {k: torch.as_tensor(np.asarray(bundle.activation(k[0], k[1])))[:n_f] for k in keys}
        else:
            budget.check()
            with torch.no_grad():
                _, cap = forward_captured(handle, keys, **_encode(handle, fail_text))
            budget.add(1, 1)
            acts = {k: v[0] for k, v in cap.items()}
        f_fix = _map_set(fix, inc.prompt_ids, inc.n_prompt, f_ids)  # the set's sites in the failing prompt
        tr = []
        for iv in f_fix:
            pos = range(n_f) if iv.positions == "all" else iv.positions
            for p in pos:
                q = map_positions([p], f_ids, n_f, b_ids.tolist())
                if not q:
                    continue
                vec = acts[(iv.layer, iv.component)][p].reshape(-1)
                if iv.indices:
                    vec = vec.reshape(*handle.site_shape(iv.component))[list(iv.indices)].reshape(-1)
                tr.append(Intervention(iv.layer, iv.component, (q[0],), "set", iv.indices,
                                       values=tuple(float(x) for x in vec)))
        items.append(_Item(b_ids, [InterventionSet(), InterventionSet(tuple(tr))], None,
                           enc_b["token_type_ids"][0] if "token_type_ids" in enc_b else None))
    out = _run_items(handle, items, bundle.failure, generate=True, max_new_tokens=bundle.max_new_tokens,
                     budget=budget, target_index=bundle.target_index, id2label=inc.id2label)
    benign = [o for o in out if not o[0]["failing"]]
    recreated = [o for o in benign if o[1]["failing"]]
    res.n_sufficiency = len(benign)
    res.sufficiency_rate = len(recreated) / len(benign) if benign else float("nan")
    res.evidence["sufficiency"] = {"n_pairs": len(pairs), "n_benign_baseline": len(benign),
                                   "n_recreated": len(recreated),
                                   "incident_pair_recreated": bool(out and not out[0][0]["failing"] and
                                                                   out[0][1]["failing"]) if cps else None}


def _side_effect_evidence(bundle, handle, inc: _Incident, fix, budget, res: CCAResult, progress) -> None:
    budget.stage = "side_effects"
    if progress:
        progress(2, "side effects on held-out benign prompts")
    prompts = bundle.prompt_sets.get("benign_heldout") or []
    expected = bundle.prompt_sets.get("benign_expected") or []
    donor_cache: dict = {}
    cp = (bundle.prompt_sets.get("counterpart") or [None])[0]
    shared = _prompt_sources(bundle, handle, None, 0, donor_cache) if fix[0].op != "patch" else None
    items = []
    for p in prompts:
        enc = _encode(handle, p)
        ids = enc["input_ids"][0]
        mapped = _map_set(fix, inc.prompt_ids, inc.n_prompt, ids.tolist())
        src = shared if shared is not None else _prompt_sources(bundle, handle, cp, int(ids.shape[0]), donor_cache)
        items.append(_Item(ids, [InterventionSet(), InterventionSet(tuple(mapped))], src,
                           enc["token_type_ids"][0] if "token_type_ids" in enc else None))
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
                                    "kl": "KL(baseline || intervened) of the next-token / label distribution at "
                                          "the decision position, nats"}


def control_sets(fix: Sequence[Intervention], n_layers: int, n_prompt: int, n: int, seed: int,
                 resid_post_last_only: bool = True) -> list[InterventionSet]:
    """``n`` random sets of the same size and components as ``fix`` (random layers, random prompt positions, same
    count), each different from ``fix`` itself."""
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
            ivs.append(Intervention(L, iv.component, pos, iv.op, iv.indices, iv.value, iv.values))
        if sorted(_key(iv) for iv in ivs) == own and tries < 100 * n:
            continue  # a control must differ from the tested set
        out.append(InterventionSet(tuple(ivs), name="control"))
    return out


def _flip_rates(bundle, handle, inc: _Incident, sets: Sequence[InterventionSet], prompts: Sequence[tuple],
                budget: _Budget) -> np.ndarray:
    """Flip rate of each set over ``prompts`` (``(text, ids, donor_text)``, each failing without intervention):
    the share whose output under the (position-mapped) set no longer fails. Generation verdict for generation
    incidents, argmax for token/label. Returns ``[len(sets)]``."""
    donor_cache: dict = {}
    shared = _prompt_sources(bundle, handle, None, 0, donor_cache)
    items = []
    for text, ids, donor in prompts:
        src = shared
        if any(iv.op == "patch" for st in sets for iv in st.interventions):
            src = _prompt_sources(bundle, handle, donor, int(ids.shape[0]), donor_cache)
        mapped = [InterventionSet(tuple(_map_set(st.interventions, inc.prompt_ids, inc.n_prompt, ids.tolist())))
                  for st in sets]
        enc_tti = _encode(handle, text).get("token_type_ids") if handle.tokenizer is not None else None
        items.append(_Item(ids, mapped, src, None if enc_tti is None else enc_tti[0]))
    out = _run_items(handle, items, bundle.failure, generate=True, max_new_tokens=bundle.max_new_tokens,
                     budget=budget, target_index=bundle.target_index, id2label=inc.id2label)
    flips = np.array([[0.0 if o["failing"] else 1.0 for o in per] for per in out])  # [prompts, sets]
    return flips.mean(0) if len(out) else np.zeros(len(sets))


def _control_evidence(bundle, handle, inc: _Incident, fix, budget, res: CCAResult, n_controls, seed,
                      progress, n_prompts: int = 16) -> None:
    """Significance: the set's flip rate on the incident + a seeded subset of the failing variants, against the
    same flip rate of ``n_controls`` random sets of equal size and components."""
    budget.stage = "controls"
    if progress:
        progress(3, f"significance: {n_controls} random control sets")
    if n_controls <= 0:
        return
    rng = random.Random(seed)
    fails = res.evidence.get("variants", {}).get("failing_indices", [])
    pick = sorted(rng.sample(fails, min(n_prompts - 1, len(fails))))
    variants = bundle.prompt_sets.get("variants") or []
    vcps = bundle.prompt_sets.get("variant_counterparts") or []
    cp = (bundle.prompt_sets.get("counterpart") or [None])[0]
    prompts = [(bundle.prompt, torch.as_tensor(inc.prompt_ids, dtype=torch.long), cp)]
    for i in pick:
        prompts.append((variants[i], _encode(handle, variants[i])["input_ids"][0], vcps[i] if i < len(vcps) else cp))
    sets = control_sets(fix, handle.n_layers, inc.n_prompt, n_controls, seed)
    rates = _flip_rates(bundle, handle, inc, [InterventionSet(tuple(fix))] + sets, prompts, budget)
    observed, ctrl = float(rates[0]), [float(x) for x in rates[1:]]
    res.control_flip_rates = ctrl
    res.n_controls = len(ctrl)
    res.p_value = stats.empirical_p_value(observed, ctrl)
    res.evidence["controls"] = {
        "statistic": "flip rate on the incident + a seeded subset of the failing variants (same position rule)",
        "n_prompts": len(prompts), "variant_indices": pick, "observed_flip_rate": observed,
        "n_at_least_as_extreme": int(sum(1 for c in ctrl if c >= observed)),
        "control_flip_rate_mean": float(np.mean(ctrl)), "seed": seed}


def _fdr(res: CCAResult) -> None:
    ps: dict[str, float] = {}
    if math.isfinite(res.p_value):
        ps["incident_flip_vs_controls"] = res.p_value
    c_rate = (1 + sum(res.control_flip_rates)) / (1 + len(res.control_flip_rates)) if res.control_flip_rates else 0.05
    if res.n_variants:
        k = round(res.flip_rate * res.n_variants)
        ps["variant_flip_rate_above_control_rate"] = stats.binomial_p_value(k, res.n_variants, c_rate, "greater")
    if res.n_sufficiency:
        k = round(res.sufficiency_rate * res.n_sufficiency)
        ps["sufficiency_above_control_rate"] = stats.binomial_p_value(k, res.n_sufficiency, c_rate, "greater")
    if res.n_benign:
        k = round(res.side_effect_rate * res.n_benign)
        ps["side_effects_below_5pct"] = stats.binomial_p_value(k, res.n_benign, TARGETS["side_effect_rate"], "less")
    res.evidence["claim_p_values"] = dict(ps)
    res.fdr = stats.bh_adjust(ps)


def _criteria(res: CCAResult) -> dict[str, dict]:
    """The issue's "Done when" targets, each with the measured value and whether it holds."""
    def finite(x):
        return x is not None and math.isfinite(x)

    out: dict[str, dict] = {}
    fr = res.flip_rate
    lo, hi = res.flip_rate_ci
    out["flip_rate"] = {
        "target": ">= 80% of held-out failing variants", "value": fr, "ok": bool(finite(fr) and fr >= 0.80),
        "detail": (f"{round(fr * res.n_variants)}/{res.n_variants} flipped = {fr:.1%} (Wilson 95% {lo:.1%}–{hi:.1%})"
                   + ("" if fr >= 0.80 else f"; {0.80 - fr:.1%} below target")) if finite(fr) else "not measured"}
    se = res.side_effect_rate
    out["side_effect_rate"] = {
        "target": "<= 5% of held-out benign prompts change", "value": se, "ok": bool(finite(se) and se <= 0.05),
        "detail": (f"{round(se * res.n_benign)}/{res.n_benign} changed = {se:.1%}, mean KL {res.side_effect_kl:.4f}"
                   + ("" if se <= 0.05 else f"; {se - 0.05:.1%} above target")) if finite(se) else "not measured"}
    fa = res.fraction_of_activations
    out["fraction_of_activations"] = {
        "target": "<= 5% of recorded activation values", "value": fa, "ok": bool(finite(fa) and fa <= 0.05),
        "detail": (f"{fa:.3%} of recorded values touched by {len(res.fix_set)} intervention(s)"
                   + ("" if fa <= 0.05 else f"; {fa - 0.05:.2%} above target")) if finite(fa) else "not measured"}
    out["one_minimal"] = {
        "target": "dropping any one element un-fixes the incident", "value": float(res.one_minimal),
        "ok": bool(res.one_minimal),
        "detail": ("every element necessary" if res.one_minimal else
                   ("the set does not fix the incident" if not res.flipped else
                    "not 1-minimal: " + ", ".join(e.intervention.describe() for e in res.fix_set
                                                  if not e.drop_one_failing) + " can be dropped"))}
    p = res.p_value
    out["p_value"] = {
        "target": "p < 0.01 against >= 200 random controls", "value": p,
        "ok": bool(finite(p) and p < 0.01 and res.n_controls >= 200),
        "detail": (f"p = {p:.4f} from {res.n_controls} controls "
                   f"({res.evidence.get('controls', {}).get('n_at_least_as_extreme', '?')} at least as extreme)"
                   + ("" if res.n_controls >= 200 else "; fewer than 200 controls")
                   + ("" if p < 0.01 else f"; {p - 0.01:.4f} above 0.01")) if finite(p) else "not measured"}
    out["incident_flipped"] = {"target": "the incident no longer fails under the set", "value": float(res.flipped),
                               "ok": bool(res.flipped),
                               "detail": f"metric {res.baseline_metric:.3f} -> {res.fixed_metric:.3f}"}
    return out
