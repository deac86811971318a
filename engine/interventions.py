"""Interventions: edit named sites during a replay, many fix sets at once along the batch dimension.

An :class:`Intervention` is a *site* (layer, component, token positions, optional head / neuron / dimension
indices) plus an *operation*:

``zero``   set the selected activation to 0.
``mean``   the benign reference mean from the bundle: the **per-position** mean where that position has benign data
           (``benign_position_counts()[p] > 0``), else the **token mean** (mean over every benign token).
``patch``  the donor run's activation at the aligned position. The donor is the benign counterpart prompt
           (``bundle.prompt_sets["counterpart"][0]``), run once through the model (captured, cached).
           Alignment rule: position ``p`` of the incident pairs with position ``p - (n_prompt - n_donor)`` of the
           donor, where ``n_prompt`` / ``n_donor`` are the two prompts' token counts. With equal lengths that is
           the identity (aligned from the start); otherwise the *ends of the prompts* are aligned. Positions
           without a partner (before the donor's first token, or after the prompt: continuation tokens) are left
           untouched and reported in :attr:`SetResult.unaligned`.
``scale``  multiply by ``value``.
``set``    replace by ``values`` (one vector, broadcast over positions; for ``head`` with several heads a vector
           of ``d_head`` values is broadcast over the heads too, or give ``len(indices) * d_head`` values).

Several interventions of one set on the same site apply in the set's order, each to the previous one's result.

A :class:`InterventionSet` is applied as a whole in one replay. :func:`evaluate` runs many sets as rows of one
batch (``chunk_size`` rows per forward) and reports for each the failure predicate, the continuous metric (larger =
more failing, same definition as the recorded one), the top-k next tokens at the decision position and, for
``contains:``/``wordlist:`` incidents, the greedy continuation generated under the intervention.

Start from a recorded layer: when every intervention of a chunk sits at layer >= L, the teacher-forced metric forward
feeds the bundle's recorded ``resid_pre`` of block L into block L and skips blocks 0..L-1 (they are swapped for
pass-through modules for the duration of the forward). Exactness is measured in ``tests/test_interventions.py`` and
``docs/interventions.md``. Generation always runs full forwards (no prefix reuse).

The lower-level :func:`run_with_interventions` takes ``input_ids`` and an :class:`ActivationSources` directly (no
bundle needed).
"""

from __future__ import annotations

import functools
import json
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .errors import ForensicsError, InterventionError
from .failure import margin, path_margins, span_logprob
from .hooks import COMPONENTS, capture, site_hooks
from .models import ModelHandle

OPS = ("zero", "mean", "patch", "scale", "set")
Progress = Callable[[int, int, str], None]


class EvaluationCancelled(ForensicsError):
    """The evaluation was cancelled (``cancel`` event set)."""


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------
def _int(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise InterventionError(f"{what} must be an integer, got {v!r}")
    return int(v)


def _float(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise InterventionError(f"{what} must be a number, got {v!r}")
    f = float(v)
    if not math.isfinite(f):
        raise InterventionError(f"{what} must be finite, got {v!r}")
    return f


@dataclass(frozen=True)
class Intervention:
    """One edited site.

    Attributes:
        layer: block index (0-based).
        component: ``resid_pre``, ``attn``, ``mlp``, ``resid_post``, ``head`` or ``neuron``.
        positions: token positions (tuple of ints >= 0) or ``"all"`` (every position, including tokens generated
            under the intervention).
        op: ``zero``, ``mean``, ``patch``, ``scale`` or ``set``.
        indices: heads (``head``), neurons (``neuron``) or dimensions (residual components); ``()`` = the whole
            vector. Required (non-empty) for ``head`` and ``neuron``.
        value: the factor for ``scale``.
        values: the vector for ``set``.
    """

    layer: int
    component: str
    positions: tuple[int, ...] | str = "all"
    op: str = "zero"
    indices: tuple[int, ...] = ()
    value: float | None = None
    values: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer", _int(self.layer, "layer"))
        if self.layer < 0:
            raise InterventionError(f"layer must be >= 0, got {self.layer}")
        if self.component not in COMPONENTS:
            raise InterventionError(f"unknown component {self.component!r}; expected one of {', '.join(COMPONENTS)}")
        if self.op not in OPS:
            raise InterventionError(f"unknown op {self.op!r}; expected one of {', '.join(OPS)}")
        pos = self.positions
        if isinstance(pos, str):
            if pos != "all":
                raise InterventionError(f"positions must be a list of integers or \"all\", got {pos!r}")
        else:
            if not isinstance(pos, (list, tuple)) or not pos:
                raise InterventionError(f"positions must be a non-empty list of integers or \"all\", got {pos!r}")
            pos = tuple(sorted(set(_int(p, "position") for p in pos)))
            if pos[0] < 0:
                raise InterventionError(f"positions must be >= 0, got {pos[0]}")
            object.__setattr__(self, "positions", pos)
        idx = self.indices if self.indices is not None else ()
        if not isinstance(idx, (list, tuple)):
            raise InterventionError(f"indices must be a list of integers, got {idx!r}")
        idx = tuple(sorted(set(_int(i, "index") for i in idx)))
        if idx and idx[0] < 0:
            raise InterventionError(f"indices must be >= 0, got {idx[0]}")
        if self.component in ("head", "neuron") and not idx:
            raise InterventionError(f"component {self.component!r} needs indices (which "
                                    f"{'heads' if self.component == 'head' else 'neurons'})")
        object.__setattr__(self, "indices", idx)
        if self.op == "scale":
            if self.value is None:
                raise InterventionError("op 'scale' needs a value (the factor)")
            object.__setattr__(self, "value", _float(self.value, "value"))
        elif self.value is not None:
            raise InterventionError(f"op {self.op!r} takes no value")
        if self.op == "set":
            if self.values is None or not isinstance(self.values, (list, tuple)) or not self.values:
                raise InterventionError("op 'set' needs values (a non-empty list of numbers)")
            object.__setattr__(self, "values", tuple(_float(v, "values[]") for v in self.values))
        elif self.values is not None:
            raise InterventionError(f"op {self.op!r} takes no values")

    # ----- (de)serialisation ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d: dict = {"layer": self.layer, "component": self.component,
                   "positions": self.positions if self.positions == "all" else list(self.positions), "op": self.op}
        if self.indices:
            d["indices"] = list(self.indices)
        if self.value is not None:
            d["value"] = self.value
        if self.values is not None:
            d["values"] = list(self.values)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "Intervention":
        if not isinstance(d, Mapping):
            raise InterventionError(f"an intervention must be a JSON object, got {type(d).__name__}")
        allowed = {"layer", "component", "positions", "op", "indices", "value", "values"}
        extra = set(d) - allowed
        if extra:
            raise InterventionError(f"unknown intervention keys {sorted(extra)}; allowed: {sorted(allowed)}")
        for k in ("layer", "component", "op"):
            if k not in d:
                raise InterventionError(f"intervention {dict(d)!r} misses the key {k!r}")
        pos = d.get("positions", "all")
        if isinstance(pos, list):
            pos = tuple(pos)
        idx = d.get("indices", ())
        vals = d.get("values")
        return cls(layer=d["layer"], component=d["component"], positions=pos, op=d["op"],
                   indices=tuple(idx) if isinstance(idx, list) else idx, value=d.get("value"),
                   values=tuple(vals) if isinstance(vals, list) else vals)

    def describe(self) -> str:
        where = f"L{self.layer}.{self.component}"
        if self.indices:
            where += f"[{','.join(map(str, self.indices))}]"
        pos = "all" if self.positions == "all" else ",".join(map(str, self.positions))
        op = self.op + (f"({self.value:g})" if self.value is not None else "")
        return f"{where}@{pos}:{op}"


@dataclass(frozen=True)
class InterventionSet:
    """Interventions applied together in one replay."""

    interventions: tuple[Intervention, ...] = ()
    name: str = ""

    def __post_init__(self) -> None:
        ivs = tuple(self.interventions)
        for iv in ivs:
            if not isinstance(iv, Intervention):
                raise InterventionError(f"InterventionSet holds a {type(iv).__name__}, not an Intervention")
        object.__setattr__(self, "interventions", ivs)
        if not isinstance(self.name, str):
            raise InterventionError("set name must be a string")

    def __len__(self) -> int:
        return len(self.interventions)

    @property
    def min_layer(self) -> int | None:
        return min((iv.layer for iv in self.interventions), default=None)

    def to_dict(self) -> dict:
        return {"name": self.name, "interventions": [iv.to_dict() for iv in self.interventions]}

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    @classmethod
    def from_dict(cls, obj: Any, name: str = "") -> "InterventionSet":
        if isinstance(obj, Mapping) and ("fix_set" in obj or isinstance(obj.get("cca"), Mapping)):
            return cls._from_fix_set(obj, name)
        if isinstance(obj, list):
            items, nm = obj, name
        elif isinstance(obj, Mapping):
            extra = set(obj) - {"name", "interventions"}
            if extra:
                raise InterventionError(f"unknown intervention-set keys {sorted(extra)}; allowed: name, interventions")
            if "interventions" not in obj or not isinstance(obj["interventions"], list):
                raise InterventionError("an intervention set needs \"interventions\": a list of objects")
            items, nm = obj["interventions"], obj.get("name", name)
            if nm is None:
                nm = ""
            if not isinstance(nm, str):
                raise InterventionError(f"an intervention set's \"name\" must be a string, got {type(nm).__name__}")
        else:
            raise InterventionError(f"an intervention set must be a JSON object or list, got {type(obj).__name__}")
        out = []
        for k, d in enumerate(items):
            try:
                out.append(Intervention.from_dict(d))
            except InterventionError as exc:
                raise InterventionError(f"intervention #{k}: {exc}") from None
        return cls(tuple(out), nm)

    @classmethod
    def _from_fix_set(cls, obj: Mapping, name: str) -> "InterventionSet":
        """The fix set of a CCA result (``forensics cca --out``) or of a certificate (its ``cca`` section): each
        element's intervention, without the evidence stored beside it."""
        res = obj["cca"] if "fix_set" not in obj else obj
        fix = res.get("fix_set") if isinstance(res, Mapping) else None
        if not isinstance(fix, list) or not fix:
            raise InterventionError("the CCA result holds no fix set (\"fix_set\" is missing or empty)")
        keys = ("layer", "component", "positions", "op", "indices", "value", "values")
        items = [{k: e[k] for k in keys if k in e and e[k] is not None and e[k] != []} if isinstance(e, Mapping)
                 else e for e in fix]
        return cls.from_dict({"name": name or "fix set", "interventions": items})

    @classmethod
    def from_json(cls, text: str, name: str = "") -> "InterventionSet":
        try:
            obj = json.loads(text)
        except ValueError as exc:
            raise InterventionError(f"intervention set is not valid JSON: {exc}") from None
        return cls.from_dict(obj, name)


def validate_for(handle: ModelHandle, sets: Iterable[InterventionSet], n_positions: int | None = None) -> None:
    """Check every intervention against the model's shape (layers, heads, neurons, dims, value lengths) and, with
    ``n_positions``, its positions."""
    n_layers, d_head = handle.n_layers, handle.d_head  # looked up once: this runs on every (generation) forward
    limits = {"head": (handle.n_heads, "head"), "neuron": (handle.d_mlp, "neuron")}
    dims = (handle.d_model, "dimension")
    for s in sets:
        for iv in s.interventions:
            def where() -> str:
                return f"{s.name + ': ' if s.name else ''}{iv.describe()}"
            if iv.layer >= n_layers:
                raise InterventionError(f"{where()}: layer {iv.layer} out of range (model has {n_layers} blocks)")
            limit, what = limits.get(iv.component, dims)
            if iv.indices and iv.indices[-1] >= limit:
                raise InterventionError(f"{where()}: {what} index {iv.indices[-1]} out of range (0..{limit - 1})")
            if n_positions is not None and iv.positions != "all" and iv.positions[-1] >= n_positions:
                raise InterventionError(f"{where()}: position {iv.positions[-1]} out of range (input has "
                                        f"{n_positions} tokens)")
            if iv.op == "set":
                n = len(iv.values)
                if iv.component == "head":
                    ok = (d_head, len(iv.indices) * d_head)
                else:
                    ok = (len(iv.indices) if iv.indices else limit,)
                if n not in ok:
                    raise InterventionError(f"{where()}: 'set' needs {' or '.join(map(str, sorted(set(ok))))} "
                                            f"values, got {n}")


# ----------------------------------------------------------------------------------------------------------------
# Where mean / patch values come from
# ----------------------------------------------------------------------------------------------------------------
class ActivationSources:
    """Mean and donor activations for ``mean`` / ``patch``.

    Args:
        token_mean: ``(layer, comp) -> array [*site_shape]`` (mean over all benign tokens) or ``None``.
        pos_mean: ``(layer, comp) -> array [P, *site_shape]`` (per-position benign mean) or ``None``.
        pos_counts: benign runs per position ``[P]`` (positions with 0 fall back to the token mean).
        donor: ``(layer, comp) -> array [n_donor, *site_shape]``: the donor run's activation.
        donor_offset: ``n_prompt - n_donor``; incident position ``p`` pairs with donor position ``p - offset``.
        donor_limit: donor positions usable for patching (default: all of the donor).
    Lookups are cached.
    """

    def __init__(self, token_mean=None, pos_mean=None, pos_counts=None, donor=None, donor_offset: int = 0,
                 donor_limit: int | None = None):
        self._token_mean, self._pos_mean, self._donor = token_mean, pos_mean, donor
        self.pos_counts = None if pos_counts is None else np.asarray(pos_counts)
        self.donor_offset = int(donor_offset)
        self.donor_limit = donor_limit
        self._cache: dict = {}

    @classmethod
    def from_tensors(cls, token_mean: Mapping | None = None, pos_mean: Mapping | None = None, pos_counts=None,
                     donor: Mapping | None = None, donor_offset: int = 0) -> "ActivationSources":
        """From plain dicts ``{(layer, comp): tensor}`` (tests, benchmarks)."""
        get = (lambda m: None if m is None else (lambda l, c: m.get((l, c))))
        return cls(get(token_mean), get(pos_mean), pos_counts, get(donor), donor_offset)

    def mean(self, layer: int, comp: str, n_pos: int, shape: tuple[int, ...]) -> torch.Tensor:
        """``[n_pos, *shape]``: per-position benign mean where positions have benign data, else the token mean."""
        key = ("mean", layer, comp, n_pos)
        if key not in self._cache:
            tok = self._token_mean(layer, comp) if self._token_mean else None
            pm = self._pos_mean(layer, comp) if self._pos_mean else None
            if tok is None and pm is None:
                raise InterventionError(f"no benign mean for L{layer}.{comp}: the bundle holds no benign reference "
                                        f"statistics (record with benign prompts to use 'mean')")
            out = torch.empty((n_pos, *shape), dtype=torch.float64)
            if tok is not None:
                out[:] = torch.as_tensor(np.asarray(tok), dtype=torch.float64).reshape(shape)
            if pm is not None:
                pm = torch.as_tensor(np.asarray(pm), dtype=torch.float64).reshape(-1, *shape)
                counts = self.pos_counts if self.pos_counts is not None else np.ones(pm.shape[0], dtype=np.int64)
                m = min(n_pos, pm.shape[0], len(counts))
                have = torch.as_tensor(counts[:m] > 0)
                if tok is None:
                    have[:] = True
                out[:m][have] = pm[:m][have]
                if tok is None and n_pos > m:
                    out[m:] = pm[:m].mean(0) if m else 0
            self._cache[key] = out
        return self._cache[key]

    def donor(self, layer: int, comp: str, shape: tuple[int, ...]) -> torch.Tensor:
        key = ("donor", layer, comp)
        if key not in self._cache:
            d = self._donor(layer, comp) if self._donor else None
            if d is None:
                raise InterventionError(f"no donor activation for L{layer}.{comp}: patching needs a counterpart "
                                        f"prompt (prompt set 'counterpart')")
            d = torch.as_tensor(np.asarray(d) if not isinstance(d, torch.Tensor) else d).reshape(-1, *shape)
            if self.donor_limit is not None:
                d = d[: self.donor_limit]
            self._cache[key] = d
        return self._cache[key]

    def donor_positions(self, positions: Sequence[int], layer: int, comp: str,
                        shape: tuple[int, ...]) -> tuple[list[int], list[int], list[int]]:
        """Split ``positions`` into (incident positions with a partner, their donor positions, unaligned)."""
        n = self.donor(layer, comp, shape).shape[0]
        got, src, miss = [], [], []
        for p in positions:
            q = p - self.donor_offset
            if 0 <= q < n:
                got.append(p)
                src.append(q)
            else:
                miss.append(p)
        return got, src, miss


def bundle_sources(bundle, handle: ModelHandle) -> ActivationSources:
    """Sources for a bundle: its benign means, and its counterpart prompt run once through ``handle`` (lazy)."""
    counts = bundle.benign_position_counts()
    state: dict = {}

    def token_mean(layer, comp):
        return bundle.benign_mean(layer, comp, per_position=False)

    def pos_mean(layer, comp):
        return bundle.benign_mean(layer, comp, per_position=True)

    def donor(layer, comp):
        if "acts" not in state:
            prompts = bundle.prompt_sets.get("counterpart") or []
            if not prompts:
                raise InterventionError("patching needs a donor: the bundle has no 'counterpart' prompt set")
            if handle.tokenizer is None:
                raise InterventionError("patching needs the tokenizer to encode the counterpart prompt")
            from .behaviour import encode

            enc = encode(handle, prompts[0])
            keys = [(i, c) for i in range(handle.n_layers) for c in COMPONENTS]
            with torch.no_grad(), capture(handle, keys) as acts:
                handle.model(**enc)
            state["acts"] = {k: v[0] for k, v in acts.items()}
        return state["acts"][(layer, comp)]

    n_donor = None
    prompts = bundle.prompt_sets.get("counterpart") or []
    if prompts and handle.tokenizer is not None:
        n_donor = len(handle.tokenizer(prompts[0])["input_ids"])
    offset = bundle.n_prompt_tokens - n_donor if n_donor is not None else 0
    return ActivationSources(token_mean, pos_mean, counts, donor, offset)


# ----------------------------------------------------------------------------------------------------------------
# Core: hooks for a batch of sets
# ----------------------------------------------------------------------------------------------------------------
def _site_shape(handle: ModelHandle, comp: str) -> tuple[int, ...]:
    return handle.site_shape(comp)


def _make_hook(handle: ModelHandle, layer: int, comp: str, rows: list[tuple[int, Intervention]],
               sources: ActivationSources | None, unaligned: dict, offset: int = 0):
    """The hook applying ``rows`` at one site.  ``offset``: absolute position of the tensor's first position (> 0
    when a cached prefix is reused: the hook then sees only positions ``offset..``)."""
    shape = _site_shape(handle, comp)
    if any(iv.op == "patch" for _, iv in rows):
        # Fetch the donor now, before the hook is installed: a lazy donor (a bundle's counterpart prompt) runs the
        # model, and run from inside this hook it would re-enter the hook (RecursionError) under the other hooks.
        if sources is None:
            raise InterventionError(f"L{layer}.{comp}: op 'patch' needs activation sources (a bundle)")
        sources.donor(layer, comp, shape)

    def fn(t: torch.Tensor) -> torch.Tensor:
        out = t.clone()
        n_pos = offset + t.shape[1]  # absolute length
        for row, iv in rows:
            pos = (list(range(offset, n_pos)) if iv.positions == "all" else
                   [p for p in iv.positions if offset <= p < n_pos])
            if not pos:
                continue
            idx = list(iv.indices) if iv.indices else None
            if iv.op == "patch":
                pos, src, miss = sources.donor_positions(pos, layer, comp, shape)
                if miss:
                    unaligned.setdefault(row, set()).update(miss)
                if not pos:
                    continue
            ptens = torch.tensor(pos)  # absolute positions (sources are indexed by these)
            rel = ptens - offset  # positions in this tensor
            if idx is None:
                view = out[row, rel]
            else:
                view = out[row][rel][..., idx, :] if comp == "head" else out[row][rel][..., idx]
            if iv.op == "zero":
                new = torch.zeros_like(view)
            elif iv.op == "scale":
                new = view * iv.value
            elif iv.op == "set":
                v = torch.tensor(iv.values, dtype=t.dtype)
                if comp == "head":
                    v = v.reshape(-1, handle.d_head)
                new = v.expand_as(view)
            elif iv.op == "mean":
                m = sources.mean(layer, comp, n_pos, shape)[ptens].to(t.dtype)
                new = m if idx is None else (m[..., idx, :] if comp == "head" else m[..., idx])
            else:  # patch
                d = sources.donor(layer, comp, shape)[torch.tensor(src)].to(t.dtype)
                new = d if idx is None else (d[..., idx, :] if comp == "head" else d[..., idx])
            if idx is None:
                out[row, rel] = new
            else:
                r = out[row]
                sel = r[rel]
                if comp == "head":
                    sel[..., idx, :] = new
                else:
                    sel[..., idx] = new
                r[rel] = sel
        return out

    return fn


class _PassThrough(nn.Module):
    """Stands in for a skipped block: returns its hidden-state input unchanged."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def _skip_blocks(handle: ModelHandle, n: int):
    blocks = handle.blocks
    saved = [blocks[i] for i in range(n)]
    for i in range(n):
        blocks[i] = _PassThrough()
    return saved


def _restore_blocks(handle: ModelHandle, saved: list) -> None:
    blocks = handle.blocks
    for i, m in enumerate(saved):
        blocks[i] = m


def _check_start_layer(handle: ModelHandle, start_layer: Any) -> int:
    if isinstance(start_layer, bool) or not isinstance(start_layer, (int, np.integer)) \
            or not 0 <= start_layer < handle.n_layers:
        raise InterventionError(f"start_layer must be \"auto\", None or a block index 0..{handle.n_layers - 1}, "
                                f"got {start_layer!r}")
    return int(start_layer)


def start_layer_for(sets: Sequence[InterventionSet]) -> int:
    """The lowest layer any intervention of ``sets`` touches (0 if none; a set with no interventions is free)."""
    layers = [s.min_layer for s in sets if s.min_layer is not None]
    return min(layers) if layers else 0


@torch.no_grad()
def run_with_interventions(handle: ModelHandle, input_ids: torch.Tensor, sets: Sequence[InterventionSet], *,
                           sources: ActivationSources | None = None, start_layer: int = 0,
                           start_resid: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                           token_type_ids: torch.Tensor | None = None,
                           unaligned: dict | None = None, logits_from: int = 0, prefix: int = 0) -> torch.Tensor:
    """One forward with every set applied to its own batch row; returns the logits ``[len(sets), ...]``.

    Args:
        input_ids: ``[1, pos]`` (shared by every row) or ``[len(sets), pos]``.
        sources: where ``mean`` / ``patch`` values come from (needed only by those ops).
        start_layer: when > 0, blocks ``0..start_layer-1`` are skipped and ``start_resid`` (``[pos, d_model]`` or
            ``[1, pos, d_model]``: the recorded ``resid_pre`` of block ``start_layer``) is fed into block
            ``start_layer``. Every intervention must sit at layer >= ``start_layer``.
        unaligned: filled with ``{row: {positions}}`` for ``patch`` positions without a donor partner.
        logits_from: causal LMs only: compute the LM head only for positions ``logits_from..pos-1`` (the returned
            logits then cover just those positions); 0 = every position.
        prefix: causal LMs only (prefix reuse): positions ``0..prefix-1`` are identical in every row — no
            intervention touches them and a causal model's later positions cannot change them — so they are run
            once, as one row, and only positions ``prefix..`` are run per row on top of that row's key/value
            cache.  Needs ``logits_from >= prefix``, rows sharing ``input_ids`` and every intervention at
            positions ``>= prefix``.  Exact up to float rounding (the prefix is computed in a different matmul
            shape); the tests and ``docs/interventions.md`` give the measured difference.
    """
    rows = len(sets)
    if rows == 0:
        raise InterventionError("no intervention sets to run")
    validate_for(handle, sets)  # indices and 'set' lengths (positions past the input are for generated tokens)
    _check_start_layer(handle, start_layer)
    ids = input_ids if input_ids.dim() == 2 else input_ids[None]
    if ids.shape[0] == 1 and rows > 1:
        ids = ids.expand(rows, -1)
    if ids.shape[0] != rows:
        raise InterventionError(f"input_ids has {ids.shape[0]} rows for {rows} sets")
    by_site: dict[tuple[int, str], list[tuple[int, Intervention]]] = {}
    for r, s in enumerate(sets):
        for iv in s.interventions:
            if iv.op in ("mean", "patch") and sources is None:
                raise InterventionError(f"{iv.describe()}: op {iv.op!r} needs activation sources (a bundle)")
            if iv.layer < start_layer:
                raise InterventionError(f"{iv.describe()} sits below the start layer {start_layer}")
            by_site.setdefault((iv.layer, iv.component), []).append((r, iv))
            if iv.op == "patch":  # fetch (and for a bundle: run the donor) before any hook is installed
                sources.donor(iv.layer, iv.component, handle.site_shape(iv.component))
    prefix = int(prefix)
    if prefix:
        if not handle.is_causal_lm:
            raise InterventionError("prefix reuse needs a causal language model")
        if not 0 < prefix <= logits_from or prefix >= ids.shape[1]:
            raise InterventionError(f"prefix {prefix} must be in 1..logits_from ({logits_from}) and shorter than "
                                    f"the input ({ids.shape[1]} tokens)")
        if rows > 1 and not bool((ids == ids[:1]).all()):
            raise InterventionError("prefix reuse needs every row to share its input ids")
        for s in sets:
            for iv in s.interventions:
                if iv.positions == "all" or min(iv.positions) < prefix:
                    raise InterventionError(f"{iv.describe()} touches a position below the reused prefix {prefix}")
    miss = {} if unaligned is None else unaligned
    fns: dict = {k: [_make_hook(handle, k[0], k[1], v, sources, miss, offset=prefix)] for k, v in by_site.items()}
    if start_layer > 0:
        if start_resid is None:
            raise InterventionError("start_layer > 0 needs start_resid (the recorded resid_pre of that block)")
        res = torch.as_tensor(start_resid)
        res = res if res.dim() == 3 else res[None]
        res = res[:, prefix:]

        def inject(t: torch.Tensor) -> torch.Tensor:
            return res.to(t.dtype).expand(t.shape[0], -1, -1).clone()

        fns.setdefault((start_layer, "resid_pre"), []).insert(0, inject)
    kw = {"input_ids": ids}
    kw["attention_mask"] = (torch.ones_like(ids) if attention_mask is None else
                            (attention_mask if attention_mask.dim() == 2 else attention_mask[None]).expand(rows, -1))
    if token_type_ids is not None:
        kw["token_type_ids"] = (token_type_ids if token_type_ids.dim() == 2 else token_type_ids[None]).expand(rows, -1)
    n_total = int(ids.shape[1])
    if prefix:
        # The shared prefix: one row, no hooks, all blocks; its key/value cache is repeated for every row.
        pkw = {"logits_to_keep": 1} if _accepts_logits_to_keep(handle.model) else {}
        pre = handle.model(input_ids=ids[:1, :prefix], attention_mask=kw["attention_mask"][:1, :prefix],
                           use_cache=True, **pkw)
        cache = output_cache(pre)
        if cache is None:
            raise InterventionError(f"{type(handle.model).__name__} returned no key/value cache: no prefix reuse")
        if rows > 1:
            cache.batch_repeat_interleave(rows)
        kw["input_ids"] = ids[:, prefix:]
        kw.update(cache_kwargs(handle.model, cache))
        kw.pop("token_type_ids", None)
    if logits_from > 0 and handle.is_causal_lm and _accepts_logits_to_keep(handle.model):
        kw["logits_to_keep"] = int(n_total - logits_from)
    elif logits_from > 0:
        logits_from = -(logits_from - prefix)  # not supported: slice afterwards
    saved = _skip_blocks(handle, start_layer) if start_layer > 0 else []
    try:
        with site_hooks(handle, fns):
            logits = handle.model(**kw).logits
    finally:
        _restore_blocks(handle, saved)
    return logits[:, -logits_from:] if logits_from < 0 else logits


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    return "logits_to_keep" in _forward_parameters(model)


def _forward_parameters(model: nn.Module) -> frozenset[str]:
    """The keyword names ``model.forward`` takes (looked up once per model class: it runs every generation step)."""
    return _class_forward_parameters(type(model))


@functools.lru_cache(maxsize=None)
def _class_forward_parameters(cls: type) -> frozenset[str]:
    import inspect

    try:
        return frozenset(inspect.signature(cls.forward).parameters) - {"self"}
    except (TypeError, ValueError):
        return frozenset()


def cache_kwargs(model: nn.Module, cache) -> dict:
    """The keyword that hands a key/value cache to ``model.forward``: ``cache`` in transformers releases that
    renamed it (``past_key_values`` is deprecated there, to be removed in 5.40), ``past_key_values`` before."""
    name = "past_key_values" if "past_key_values" in _forward_parameters(model) else "cache"
    return {name: cache, "use_cache": True}


def output_cache(out):
    """The key/value cache of a model output (``out.cache``, or ``out.past_key_values`` in older releases)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _take_greedy(last: torch.Tensor, new: list[list[int]], done: torch.Tensor, eos) -> torch.Tensor:
    """One greedy step for every row: append the argmax of ``last`` ``[rows, V]`` to ``new``, or mark the row done at
    EOS (rows already done are left alone). Returns the argmax ids ``[rows]``."""
    nxt = last.argmax(-1)
    for r in range(len(new)):
        if done[r]:
            continue
        t = int(nxt[r])
        if eos is not None and t == eos:
            done[r] = True
        else:
            new[r].append(t)
    return nxt


@torch.no_grad()
def generate_with_interventions(handle: ModelHandle, input_ids: torch.Tensor, sets: Sequence[InterventionSet],
                                max_new_tokens: int, *, sources: ActivationSources | None = None,
                                eos_token_id: int | None = None,
                                counter: list | None = None) -> list[list[int]]:
    """Batched greedy continuation under each set (full forward per step, no KV cache).

    Interventions apply at every step to their positions; ``positions="all"`` covers the new tokens too. Rows that
    emit EOS keep being computed (their appended token is EOS) but their output is frozen. ``counter`` (a list
    ``[forwards, rows]``) is incremented per forward.
    """
    rows = len(sets)
    ids = (input_ids if input_ids.dim() == 2 else input_ids[None]).expand(rows, -1).clone()
    done = torch.zeros(rows, dtype=torch.bool)
    new: list[list[int]] = [[] for _ in range(rows)]
    for _ in range(max_new_tokens):
        logits = run_with_interventions(handle, ids, sets, sources=sources, logits_from=ids.shape[1] - 1)
        if counter is not None:
            counter[0] += 1
            counter[1] += rows
        nxt = _take_greedy(logits[:, -1], new, done, eos_token_id)
        if bool(done.all()):
            break
        fill = torch.where(done, torch.full_like(nxt, eos_token_id if eos_token_id is not None else 0), nxt)
        ids = torch.cat([ids, fill[:, None]], dim=1)
    return new


# ----------------------------------------------------------------------------------------------------------------
# Evaluation against a bundle
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class SetResult:
    """The outcome of one intervention set."""

    name: str
    failing: bool
    metric: float
    top_k: list[tuple[str, float]]
    continuation: str | None = None
    continuation_ids: list[int] | None = None
    unaligned: list[int] = field(default_factory=list)
    failing_basis: str = ""  # "continuation", "teacher-forced", "argmax"
    # CCA's search metric (``engine.cca``): the logit margin for label / token incidents; for generation incidents
    # the smallest margin of the recorded tokens from the first generated one through the failing span (< 0 once
    # the set makes the model leave that path, where ``metric``, the span's log-prob after the recorded prefix,
    # can stay ~0).  None when the failing span is not in the sequence.
    search_metric: float | None = None

    def to_dict(self) -> dict:
        return {"name": self.name, "failing": self.failing, "metric": self.metric,
                "search_metric": self.search_metric,
                "top_k": [[t, p] for t, p in self.top_k], "continuation": self.continuation,
                "unaligned_positions": self.unaligned, "failing_basis": self.failing_basis}


@dataclass
class EvalResult:
    results: list[SetResult]
    forward_passes: int = 0
    rows: int = 0
    seconds: float = 0.0
    start_layer: int = 0  # lowest layer a chunk's metric forward started from
    chunk_start_layers: list[int] = field(default_factory=list)
    chunk_prefixes: list[int] = field(default_factory=list)  # reused prefix length per chunk (0 = none)

    def to_dict(self) -> dict:
        return {"results": [r.to_dict() for r in self.results], "forward_passes": self.forward_passes,
                "rows": self.rows, "seconds": self.seconds, "start_layer": self.start_layer,
                "chunk_start_layers": self.chunk_start_layers, "chunk_prefixes": self.chunk_prefixes}


@dataclass
class EvalContext:
    """What :func:`evaluate_ids` needs: the incident without the HDF5 file (tests and benchmarks build it directly).

    ``kind`` is the failure kind (``contains``/``wordlist``/``token``/``label``); ``resid_pre(layer)`` returns the
    recorded ``resid_pre`` ``[pos, d_model]`` of a block (or ``None`` when not recorded).
    """

    input_ids: torch.Tensor  # [pos] recorded ids (prompt + recorded continuation for generate mode)
    n_prompt: int
    kind: str
    target_start: int = -1
    target_length: int = 0
    target_index: int = -1
    max_new_tokens: int = 8
    attention_mask: torch.Tensor | None = None
    token_type_ids: torch.Tensor | None = None
    resid_pre: Callable[[int], Any] | None = None
    sources: ActivationSources | None = None
    spec: Any = None  # FailureSpec (for judging continuations)
    probe_ids: torch.Tensor | None = None  # non-failing generate incident: prompt + failing text tokens


def context_from_bundle(bundle, handle: ModelHandle) -> EvalContext:
    from .replay import bundle_inputs

    enc = bundle_inputs(bundle)
    kind = bundle.failure.kind
    probe = None
    if kind in ("contains", "wordlist") and bundle.target_start < 0:
        want = bundle.failure.value if kind == "contains" else bundle.failure.words[0]
        tgt = handle.tokenizer(" " + want if not want.startswith(" ") else want, add_special_tokens=False,
                               return_tensors="pt")["input_ids"][0]
        probe = torch.cat([enc["input_ids"][0, :bundle.n_prompt_tokens], tgt])
    return EvalContext(
        input_ids=enc["input_ids"][0], n_prompt=bundle.n_prompt_tokens, kind=kind,
        target_start=bundle.target_start, target_length=bundle.target_length, target_index=bundle.target_index,
        max_new_tokens=bundle.max_new_tokens, attention_mask=enc["attention_mask"][0],
        token_type_ids=enc["token_type_ids"][0] if "token_type_ids" in enc else None,
        resid_pre=(lambda L: bundle.activation(L, "resid_pre")) if "resid_pre" in bundle.sites else None,
        sources=bundle_sources(bundle, handle), spec=bundle.failure, probe_ids=probe)


def _label_names(handle: ModelHandle) -> Callable[[int], str]:
    if handle.is_classifier:
        names = getattr(handle.model.config, "id2label", None) or {}
        return lambda i: str(names.get(i, i))
    tok = handle.tokenizer
    return (lambda i: tok.decode([i])) if tok is not None else (lambda i: str(i))


def evaluate(bundle, handle: ModelHandle, sets: Sequence[InterventionSet], *, chunk_size: int = 32,
             start_layer: int | str | None = "auto", generate: bool = True, top_k: int = 5,
             prefix_reuse: bool = False,
             progress: Progress | None = None, cancel: threading.Event | None = None) -> EvalResult:
    """Evaluate intervention sets on a bundle's incident (see the module docstring).

    Args:
        bundle: an open :class:`~engine.bundle.IncidentBundle`.
        handle: its model (``engine.replay.load_bundle_model(bundle)``).
        sets: the sets; each becomes one batch row. Include ``InterventionSet()`` for the baseline.
        chunk_size: rows per forward (bounds memory).
        start_layer: ``"auto"`` (lowest intervened layer of each chunk, when ``resid_pre`` was recorded), an int
            (must not exceed any intervened layer) or ``None``/0 (always from the embedding).
        generate: for ``contains:``/``wordlist:`` incidents, generate the continuation under each set and judge
            ``failing`` on it; otherwise ``failing`` is teacher-forced (every recorded continuation token up to the
            end of the failing span is still the greedy choice).
        prefix_reuse: causal LMs: run the positions before the earliest intervened position once per chunk (one
            row) and only the rest per row, on its key/value cache (see :func:`run_with_interventions`); applies
            to the metric forward, not to generation.  Off by default: equal to a full replay only up to float
            rounding (measured in ``docs/interventions.md``).
    """
    validate_for(handle, sets, bundle.n_positions)
    return evaluate_ids(handle, context_from_bundle(bundle, handle), sets, chunk_size=chunk_size,
                        start_layer=start_layer, generate=generate, top_k=top_k, prefix_reuse=prefix_reuse,
                        progress=progress, cancel=cancel)


@torch.no_grad()
def evaluate_ids(handle: ModelHandle, ctx: EvalContext, sets: Sequence[InterventionSet], *, chunk_size: int = 32,
                 start_layer: int | str | None = "auto", generate: bool = True, top_k: int = 5,
                 prefix_reuse: bool = False,
                 progress: Progress | None = None, cancel: threading.Event | None = None) -> EvalResult:
    """:func:`evaluate` on an :class:`EvalContext` (no bundle file needed)."""
    t0 = time.perf_counter()
    sets = list(sets)
    validate_for(handle, sets, int(ctx.input_ids.shape[0]))
    if start_layer not in ("auto", None):
        _check_start_layer(handle, start_layer)
    if chunk_size < 1:
        raise InterventionError("chunk_size must be >= 1")
    names = _label_names(handle)
    counter = [0, 0]
    kind = ctx.kind
    gen_kind = kind in ("contains", "wordlist")
    ids = ctx.input_ids if ctx.probe_ids is None else ctx.probe_ids
    t_start = ctx.target_start if ctx.probe_ids is None else ctx.n_prompt
    t_len = ctx.target_length if ctx.probe_ids is None else int(ctx.probe_ids.shape[0] - ctx.n_prompt)
    used: list[int] = []
    prefixes: list[int] = []
    n_chunks = math.ceil(len(sets) / chunk_size) if sets else 0
    auto = start_layer == "auto" and ctx.resid_pre is not None and ctx.probe_ids is None
    # With "auto", sets are grouped by their lowest layer so each chunk starts as late as it can; results keep the
    # caller's order.
    order = list(range(len(sets)))
    if auto:
        order.sort(key=lambda i: (sets[i].min_layer if sets[i].min_layer is not None else handle.n_layers - 1))
    slots: list[SetResult | None] = [None] * len(sets)
    lf = ctx.n_prompt - 1 if kind in ("contains", "wordlist", "token") else 0
    if kind == "token":
        lf = int(ids.shape[0]) - 1
    for c in range(n_chunks):
        if cancel is not None and cancel.is_set():
            raise EvaluationCancelled("intervention evaluation cancelled")
        rows_idx = order[c * chunk_size:(c + 1) * chunk_size]
        chunk = [sets[i] for i in rows_idx]
        L = 0
        if start_layer == "auto":
            if auto:
                L = start_layer_for(chunk) if any(s.min_layer is not None for s in chunk) else handle.n_layers - 1
        elif start_layer:
            L = int(start_layer)
            low = start_layer_for(chunk)
            if any(s.min_layer is not None for s in chunk) and L > low:
                raise InterventionError(f"start_layer {L} is above an intervened layer ({low})")
            if ctx.resid_pre is None or ctx.probe_ids is not None:
                raise InterventionError("starting from a layer needs the recorded resid_pre of the failing run")
        resid = ctx.resid_pre(L) if L > 0 else None
        used.append(L)
        P = 0
        if prefix_reuse and handle.is_causal_lm and lf > 0:
            firsts = [0 if iv.positions == "all" else min(iv.positions) for s in chunk for iv in s.interventions]
            P = min(firsts + [lf])
            if P > 0:
                counter[0] += 1  # the shared prefix: one more (one-row) forward
                counter[1] += 1
        prefixes.append(P)
        unaligned: dict = {}
        path = None
        logits = run_with_interventions(
            handle, ids[None], chunk, sources=ctx.sources, start_layer=L, start_resid=resid,
            attention_mask=None if ctx.probe_ids is not None else
            (ctx.attention_mask[None] if ctx.attention_mask is not None else None),
            token_type_ids=None if ctx.token_type_ids is None else ctx.token_type_ids[None], unaligned=unaligned,
            logits_from=lf, prefix=P)
        counter[0] += 1
        counter[1] += len(chunk)
        if kind == "label":
            dec = logits.float()
            metric = margin(dec, ctx.target_index)
        elif kind == "token":
            dec = logits[:, ctx.n_prompt - 1 - lf].float()
            metric = margin(dec, ctx.target_index)
        else:
            dec = logits[:, ctx.n_prompt - 1 - lf].float()
            metric = span_logprob(logits, ids[None, lf:].expand(len(chunk), -1), t_start - lf, t_len)
            if t_start >= 0:   # from the first generated token through the failing span (CCA's search metric)
                first = ctx.n_prompt - 1 - lf
                path = path_margins(logits[:, first:], ids[ctx.n_prompt:t_start + t_len]).min(-1).values
        probs = torch.softmax(dec, dim=-1)
        if kind in ("label", "token"):
            path = metric
        pk, ik = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
        conts = None
        if gen_kind and generate:
            conts = generate_with_interventions(
                handle, ctx.input_ids[None, :ctx.n_prompt], chunk, ctx.max_new_tokens, sources=ctx.sources,
                eos_token_id=getattr(handle.tokenizer, "eos_token_id", None), counter=counter)
        for r, s in enumerate(chunk):
            if kind in ("label", "token"):
                failing, basis = int(dec[r].argmax()) == ctx.target_index, "argmax"
            elif conts is not None:
                failing, basis = None, "continuation"
            else:
                if ctx.probe_ids is not None or t_start < 0:
                    failing = False
                else:
                    pred = logits[r, ctx.n_prompt - 1 - lf:t_start + t_len - 1 - lf].argmax(-1)
                    failing = bool(torch.equal(pred, ctx.input_ids[ctx.n_prompt:t_start + t_len]))
                basis = "teacher-forced"
            text = None
            cids = None
            if conts is not None:
                cids = conts[r]
                text = handle.tokenizer.decode(cids, skip_special_tokens=True)
                failing = ctx.spec.continuation_fails(text)
            slots[rows_idx[r]] = (SetResult(
                name=s.name, failing=bool(failing), metric=float(metric[r]),
                top_k=[(names(int(i)), float(p)) for p, i in zip(pk[r], ik[r])], continuation=text,
                continuation_ids=cids, unaligned=sorted(unaligned.get(r, ())), failing_basis=basis,
                search_metric=None if path is None else float(path[r])))
        if progress:
            progress(c + 1, n_chunks, f"evaluated {min((c + 1) * chunk_size, len(sets))}/{len(sets)} "
                                      f"intervention sets")
    results = [r for r in slots if r is not None]
    return EvalResult(results, forward_passes=counter[0], rows=counter[1], seconds=time.perf_counter() - t0,
                      start_layer=min(used, default=0), chunk_start_layers=used, chunk_prefixes=prefixes)


def summarize(before: SetResult, after: SetResult) -> dict:
    """Plain dict comparing the baseline (empty set) with an intervened result, for the CLI."""
    return {
        "name": after.name,
        "before": {"failing": before.failing, "metric": before.metric, "search_metric": before.search_metric,
                   "top_k": [list(x) for x in before.top_k], "continuation": before.continuation},
        "after": {"failing": after.failing, "metric": after.metric, "search_metric": after.search_metric,
                  "top_k": [list(x) for x in after.top_k], "continuation": after.continuation,
                  "unaligned_positions": after.unaligned},
        "metric_change": after.metric - before.metric,
        "search_metric_change": (None if before.search_metric is None or after.search_metric is None else
                                 after.search_metric - before.search_metric),
        "fixed": before.failing and not after.failing,
    }
