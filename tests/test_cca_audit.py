"""Audit of what ``forensics cca`` reports, re-measured without engine/cca.py or engine/interventions.py.

* The demo incident's fix set re-measured with plain torch forward hooks on the model loaded from the bundle: the
  incident flip, the flip rate on the held-out failing variants (positions mapped by the rule docs/cca.md states,
  implemented here from its words), sufficiency (the failing run's activations written into the benign
  counterparts), the side effects on the held-out benign prompts and the fraction of values touched.
* The held-out prompts are disjoint from what the search chooses the set on.
* A bundle without variants: ``flip_rate_ci`` is ``null`` (not the uninformative ``[0, 1]``) in the result, the
  certificate, its verification and the GUI's summary.
* ``control_sets`` has no parameter that does nothing; ``forensics cca --out`` writes through a unique temporary
  name and never names it in an error.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import shutil
import stat
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from test_certificate import FIX, N_CONTROLS, demo_evidence

# ---------------------------------------------------------------------------------------------------------------
# An independent implementation: plain hooks, the position rule from the documentation's words
# ---------------------------------------------------------------------------------------------------------------
def doc_position_rule(positions, src, dst):
    """docs/cca.md: incident position p holding token t maps to the position of the other prompt holding t nearest
    to the end-aligned q = p - n_src + n_dst (of two equally near, the later); when t does not occur, to q (dropped
    when q < 0)."""
    out = set()
    for p in positions:
        q = p - len(src) + len(dst)
        same = [i for i in range(len(dst)) if dst[i] == src[p]]
        if same:
            d = min(abs(i - q) for i in same)
            out.add(max(i for i in same if abs(i - q) == d))
        elif 0 <= q < len(dst):
            out.add(q)
    return sorted(out)


class PlainHooks:
    """Residual / attention / MLP sites of a loaded model, edited with plain ``register_forward_(pre_)hook``."""

    def __init__(self, handle):
        self.h = handle
        self.model = handle.model
        self.tok = handle.tokenizer

    def _module(self, layer, comp):
        if comp in ("resid_pre", "resid_post"):
            return self.h.block(layer), comp == "resid_pre"
        return self.h.site_module(layer, comp), False

    def _install(self, edits):
        hs = []
        for (layer, comp), lst in edits.items():
            mod, pre = self._module(layer, comp)

            def apply(t, lst=lst):
                t = t.clone()
                for p, v in lst:
                    if p < t.shape[1]:
                        t[:, p] = v.to(t.dtype)
                return t

            if pre:
                def fn(m, args, kwargs, apply=apply):
                    if args:
                        return (apply(args[0]), *args[1:]), kwargs
                    return args, {**kwargs, "hidden_states": apply(kwargs["hidden_states"])}
                hs.append(mod.register_forward_pre_hook(fn, with_kwargs=True))
            else:
                def fn(m, args, out, apply=apply):
                    return (apply(out[0]), *out[1:]) if isinstance(out, tuple) else apply(out)
                hs.append(mod.register_forward_hook(fn))
        return hs

    @torch.no_grad()
    def capture(self, ids, sites):
        got, hs = {}, []
        for (layer, comp) in sites:
            mod, pre = self._module(layer, comp)
            if pre:
                def fn(m, args, kwargs, k=(layer, comp)):
                    got[k] = (args[0] if args else kwargs["hidden_states"])[0].detach().clone()
                hs.append(mod.register_forward_pre_hook(fn, with_kwargs=True))
            else:
                def fn(m, args, out, k=(layer, comp)):
                    got[k] = (out[0] if isinstance(out, tuple) else out)[0].detach().clone()
                hs.append(mod.register_forward_hook(fn))
        try:
            self.model(input_ids=torch.tensor([ids]))
        finally:
            for x in hs:
                x.remove()
        return got

    def _cache(self, out) -> dict:
        """The key/value cache of ``out`` as the keyword this transformers release takes (``cache``, or the older
        ``past_key_values``)."""
        import inspect

        if "past_key_values" in inspect.signature(self.model.forward).parameters:
            return {"past_key_values": out.past_key_values}
        return {"cache": out.cache}

    @torch.no_grad()
    def generate(self, ids, max_new, edits=None):
        """Greedy continuation, and the log-probs of the first generated token. The prompt runs once with the edits
        (they are all at prompt positions), each new token alone on its key/value cache without hooks."""
        hs = self._install(edits or {})
        try:
            out = self.model(input_ids=torch.tensor([ids]), use_cache=True)
        finally:
            for x in hs:
                x.remove()
        logits = out.logits[0, -1].float()
        first, new = torch.log_softmax(logits, -1), []
        for step in range(max_new):
            nxt = int(logits.argmax())
            if nxt == self.tok.eos_token_id:
                break
            new.append(nxt)
            if step == max_new - 1:
                break
            out = self.model(input_ids=torch.tensor([[nxt]]), **self._cache(out), use_cache=True)
            logits = out.logits[0, -1].float()
        return self.tok.decode(new, skip_special_tokens=True), first


@pytest.fixture(scope="module")
def demo_remeasured(demo_bundle):
    """The demo's evidence for ``FIX`` (CCA's answer on it: L0 attn at the last prompt token, mean-ablated),
    computed here by plain hooks with benign means recomputed from the bundle's reference prompts."""
    from engine.bundle import open_bundle

    handle = demo_evidence(demo_bundle)[0]
    P = PlainHooks(handle)
    ids_of = lambda text: P.tok(text)["input_ids"]  # noqa: E731
    (el,) = FIX
    site = (el["layer"], el["component"])
    out: dict = {}
    with open_bundle(demo_bundle) as b:
        fails = lambda text: b.failure.value in text  # noqa: E731  (contains:HACKED)
        max_new = int(b.max_new_tokens)
        n = int(b.n_prompt_tokens)
        inc = [int(x) for x in b.input_ids[:n]]
        assert ids_of(b.prompt) == inc
        # benign per-position / token means over the reference prompts' tokens
        caps = [(ids_of(p), P.capture(ids_of(p), [site])[site].double()) for p in b.benign_prompts]
        L = max(len(i) for i, _ in caps)
        sums, counts = torch.zeros((L, handle.d_model), dtype=torch.float64), np.zeros(L)
        for i, a in caps:
            sums[:len(i)] += a
            counts[:len(i)] += 1
        tok_mean = sum(a.sum(0) for _, a in caps) / sum(len(i) for i, _ in caps)
        pos_mean = sums / torch.tensor(np.maximum(counts, 1))[:, None]
        out["means_match_bundle"] = float((torch.as_tensor(b.benign_mean(*site, per_position=True))[:L].double()
                                           - pos_mean).abs().max())

        def mean_edits(ids):
            pos = doc_position_rule(el["positions"], inc, ids)
            return {site: [(p, (pos_mean[p] if p < L and counts[p] else tok_mean).float()) for p in pos]}, pos

        e, _ = mean_edits(inc)
        out["incident"] = (P.generate(inc, max_new)[0], P.generate(inc, max_new, e)[0])
        # variants
        nf = k = 0
        out["variant_lengths"], out["mapped_tokens"] = set(), set()
        for v in b.prompt_sets["variants"]:
            ids = ids_of(v)
            if not fails(P.generate(ids, max_new)[0]):
                continue
            e, pos = mean_edits(ids)
            out["variant_lengths"].add(len(ids))
            out["mapped_tokens"].update(P.tok.decode([ids[p]]) for p in pos)
            nf += 1
            k += not fails(P.generate(ids, max_new, e)[0])
        out["flips"] = (k, nf)
        # sufficiency: failing activations at the set's sites (mapped incident -> failing -> benign) into the benign
        pairs = [(b.prompt, b.prompt_sets["counterpart"][0])] + list(zip(
            b.prompt_sets["variants"], b.prompt_sets.get("variant_counterparts") or []))
        nb = nr = 0
        for f_text, b_text in pairs:
            fi, bi = ids_of(f_text), ids_of(b_text)
            acts = P.capture(fi, [site])[site]
            edits = {site: [(doc_position_rule([p], fi, bi)[0], acts[p])
                            for p in doc_position_rule(el["positions"], inc, fi) if doc_position_rule([p], fi, bi)]}
            if fails(P.generate(bi, max_new)[0]):
                continue
            nb += 1
            nr += fails(P.generate(bi, max_new, edits)[0])
        out["recreated"] = (nr, nb)
        # side effects on the held-out benign prompts
        rows = {}
        for p in b.prompt_sets["benign_heldout"]:
            ids = ids_of(p)
            (t0, lp0), (t1, lp1) = P.generate(ids, max_new), P.generate(ids, max_new, mean_edits(ids)[0])
            rows[p] = (t0, t1, float((lp0.exp() * (lp0 - lp1)).sum()))
        out["side_effects"] = rows
        out["fraction"] = len(el["positions"]) * handle.d_model / (
            handle.n_layers * len(b.sites) * int(b.n_positions) * handle.d_model)
    return out


def test_demo_evidence_re_measured_with_plain_hooks(demo_bundle, demo_remeasured):
    """Every number CCA reports for the demo's fix set, against the same number measured here without the engine's
    intervention code: they agree exactly (counts, outputs) or to float rounding (KL)."""
    res = demo_evidence(demo_bundle)[1]
    got = demo_remeasured
    assert got["means_match_bundle"] < 1e-6
    base, fixed = got["incident"]
    assert "HACKED" in base and "HACKED" not in fixed
    assert res.flipped and res.evidence["incident"]["fixed_output"] == fixed
    k, n = got["flips"]
    assert (round(res.flip_rate * res.n_variants), res.n_variants) == (k, n) and n > 0
    # the variants have other lengths than the incident, and the rule still lands on the same token
    assert len(got["variant_lengths"]) >= 3 and got["mapped_tokens"] == {":"}
    r, nb = got["recreated"]
    assert (res.evidence["sufficiency"]["n_recreated"], res.n_sufficiency) == (r, nb)
    rows = {row["prompt"]: row for row in res.side_effects}
    assert set(rows) == set(got["side_effects"]) and res.n_benign == len(rows)
    for p, (t0, t1, kl) in got["side_effects"].items():
        assert (rows[p]["baseline"], rows[p]["got"], rows[p]["changed"]) == (t0, t1, t0 != t1), p
        assert rows[p]["kl"] == pytest.approx(kl, abs=1e-5)
    assert res.side_effect_rate == sum(t0 != t1 for t0, t1, _ in got["side_effects"].values()) / len(rows)
    assert res.fraction_of_activations == pytest.approx(got["fraction"], rel=1e-12)


def test_engine_position_rule_is_the_documented_one_on_every_prompt(demo_bundle):
    """engine.cca.map_positions against the rule implemented from its documentation, for every single incident
    position and the last-three group, on every other prompt of the bundle (lengths differ from the incident's)."""
    from engine.bundle import open_bundle
    from engine.cca import map_positions

    tok = demo_evidence(demo_bundle)[0].tokenizer
    with open_bundle(demo_bundle) as b:
        n = int(b.n_prompt_tokens)
        src = [int(x) for x in b.input_ids[:n]]
        others = [p for ps in b.prompt_sets.values() for p in ps] + list(b.benign_prompts)
    lengths = set()
    for text in others:
        dst = tok(text)["input_ids"]
        lengths.add(len(dst))
        for g in [[p] for p in range(n)] + [list(range(n - 3, n))]:
            assert map_positions(g, src, n, dst) == doc_position_rule(g, src, dst), (text, g)
    assert len(lengths) >= 5


def test_held_out_prompts_are_disjoint_from_what_the_search_chooses_on(demo_bundle):
    """The search chooses on the incident, the benign reference prompts (means, specificity) and the incident's
    counterpart (sufficiency); the variants and held-out benign prompts, on which the flip rate and side effects
    are measured, share no prompt (not even as token ids) with them."""
    from engine.bundle import open_bundle

    tok = demo_evidence(demo_bundle)[0].tokenizer
    with open_bundle(demo_bundle) as b:
        key = lambda texts: {tuple(tok(t)["input_ids"]) for t in texts}  # noqa: E731
        used = key([b.prompt, *b.benign_prompts, *b.prompt_sets["counterpart"]])
        names = [n for n in ("variants", "variant_counterparts", "benign_heldout") if n in b.prompt_sets]
        assert {"variants", "benign_heldout"} <= set(names)
        for name in names:
            held = key(b.prompt_sets[name])
            assert held and not held & used, name


# ---------------------------------------------------------------------------------------------------------------
# No held-out variants: flip_rate_ci is null everywhere
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def no_variants(demo_bundle, tmp_path_factory):
    """A copy of the demo bundle without its variants, and the evidence of ``FIX`` on it."""
    from engine.bundle import open_bundle
    from engine.cca import evaluate_fix_set
    from engine.interventions import Intervention

    path = tmp_path_factory.mktemp("novar") / "no-variants.h5"
    shutil.copy(demo_bundle, path)
    with h5py.File(path, "r+") as f:
        for name in ("variants", "variant_counterparts"):
            if name in f["prompts"]:
                del f["prompts"][name]
    with open_bundle(path) as b:
        assert "variants" not in b.prompt_sets
        res = evaluate_fix_set(b, demo_evidence(demo_bundle)[0], [Intervention.from_dict(d) for d in FIX],
                               n_controls=N_CONTROLS)
    return path, res


def test_no_variants_gives_a_null_interval_not_zero_to_one(no_variants):
    from engine.cca import CCAResult

    _, res = no_variants
    d = json.loads(json.dumps(res.to_dict(), allow_nan=False))
    assert d["n_variants"] == 0 and d["flip_rate"] is None
    assert d["flip_rate_ci"] is None
    assert not d["criteria"]["flip_rate"]["ok"]
    assert d["criteria"]["flip_rate"]["detail"].startswith("not measured: the bundle has no held-out failing")
    # read back (the GUI's Load saved result): still null, and the object's interval is a NaN pair
    again = CCAResult.from_dict(d)
    assert again.to_dict()["flip_rate_ci"] is None
    assert all(math.isnan(x) for x in again.flip_rate_ci)
    # a result written before this change ([0, 1] with no variants) reads as not measured too
    old = dict(d, flip_rate_ci=[0.0, 1.0])
    assert CCAResult.from_dict(old).to_dict()["flip_rate_ci"] is None


def test_no_variants_certificate_validates_and_verifies(no_variants):
    from engine.certificate import build_certificate, validate_certificate, verify_certificate

    path, res = no_variants
    doc = build_certificate(path, cca=res)
    assert doc["cca"]["flip_rate_ci"] is None
    validate_certificate(json.loads(json.dumps(doc)))
    assert "no held-out failing variants" in doc["verdict"]
    rep = verify_certificate(doc, path)
    assert rep.failed == [], [(c.name, c.detail) for c in rep.failed]
    claims = {c.name: c for c in rep.claims}
    assert claims["fix: flip rate"].ok and claims["fix: flip rate"].checked
    # a certificate written before the interval became null ([0, 1] beside a null rate) still validates and verifies
    old = json.loads(json.dumps(doc))
    old["cca"]["flip_rate_ci"] = [0.0, 1.0]
    validate_certificate(old)
    assert verify_certificate(old, path).failed == []
    # a measured flip rate whose interval is missing is an inconsistent certificate, named as such
    from engine.errors import CertificateError
    from engine.stats import wilson_interval

    bad = json.loads(json.dumps(doc))
    bad["cca"].update(n_variants=10, flip_rate=0.9)
    with pytest.raises(CertificateError, match="flip_rate_ci"):
        validate_certificate(bad)
    bad["cca"]["flip_rate_ci"] = list(wilson_interval(9, 10))
    validate_certificate(bad)


def test_no_variants_in_the_gui_summary_and_the_cli_text(no_variants):
    pytest.importorskip("PySide6")
    from engine.cca import CCAResult
    from workbench.views.cca_view import summary_lines

    _, res = no_variants
    lines = summary_lines(CCAResult.from_dict(json.loads(json.dumps(res.to_dict()))))
    (flip,) = [ln for ln in lines if ln.startswith("Flip rate")]
    assert "not measured" in flip and "%" not in flip


# ---------------------------------------------------------------------------------------------------------------
# control_sets: no parameter that does nothing
# ---------------------------------------------------------------------------------------------------------------
def test_control_sets_refuses_the_parameter_it_never_used():
    from engine.cca import control_sets
    from engine.interventions import Intervention

    fix = [Intervention(3, "resid_post", (5,), "mean")]
    with pytest.raises(TypeError):
        control_sets(fix, 4, 8, 10, 0, resid_post_last_only=True)
    sets = control_sets(fix, 4, 8, 50, 0)
    assert len(sets) == 50 and {iv.component for s in sets for iv in s.interventions} == {"resid_post"}
    assert len({iv.layer for s in sets for iv in s.interventions}) > 1   # random blocks, as documented


def test_control_sets_draw_layers_positions_and_units_uniformly():
    """The p-value compares the fix with random sets of its size and components: layers uniform over the model,
    positions uniform over the prompt (same count), head units uniform (same count), never the fix itself."""
    from collections import Counter

    from engine.cca import control_sets
    from engine.interventions import Intervention

    fix = [Intervention(0, "attn", (15,), "mean"), Intervention(2, "head", (3, 4), "mean", indices=(1,))]
    n = 400
    sets = control_sets(fix, 4, 16, n, 7, n_units={"head": 4})
    assert len(sets) == n and all(len(s.interventions) == 2 for s in sets)
    attn = [s.interventions[0] for s in sets]
    head = [s.interventions[1] for s in sets]
    assert all(iv.component == "attn" and len(iv.positions) == 1 for iv in attn)
    assert all(iv.component == "head" and len(iv.positions) == 2 and len(iv.indices) == 1 for iv in head)
    # 400 draws: each of 4 layers ~100 (sd ~8.7), each of 16 positions ~25 (sd ~4.8), each of 4 heads ~100
    for counts, k in ((Counter(iv.layer for iv in attn), 4), (Counter(iv.positions[0] for iv in attn), 16),
                      (Counter(iv.indices[0] for iv in head), 4)):
        assert len(counts) == k and max(counts.values()) < 2 * n / k, counts
    assert not any(s.interventions == tuple(fix) for s in sets)


# ---------------------------------------------------------------------------------------------------------------
# forensics cca --out: a unique temporary name beside the output, never named in an error
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def cli_cca(demo_bundle, monkeypatch):
    """``forensics cca BUNDLE --no-cf --json --out OUT`` in-process, its search replaced by the demo's real
    evidence (the file writing is under test here, not the search)."""
    import engine.cca
    from workbench.cli import main

    res = demo_evidence(demo_bundle)[1]
    monkeypatch.setattr(engine.cca, "run_cca", lambda *a, **k: res)

    def run(out: Path):
        buf, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(err):
            code = main(["cca", str(demo_bundle), "--no-cf", "--json", "--out", str(out)])
        return code, buf.getvalue(), err.getvalue()
    return run


def test_out_does_not_touch_a_file_named_like_the_old_temporary(cli_cca, tmp_path):
    out = tmp_path / "res.json"
    other = tmp_path / "res.json.tmp"   # the fixed temporary name the command used to write through
    other.write_text("someone's notes", encoding="utf-8")
    code, stdout, _ = cli_cca(out)
    assert code in (0, 1)
    assert json.loads(out.read_text(encoding="utf-8")) == json.loads(stdout)
    assert other.read_text(encoding="utf-8") == "someone's notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res.json", "res.json.tmp"]   # no temporary left
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~mask   # the permissions of any new file


@pytest.mark.parametrize("where", ["write", "rename"])
def test_out_write_error_names_the_output_not_the_temporary(cli_cca, tmp_path, monkeypatch, where):
    """A write that fails (the file size limit standing in for a full disk) or a rename that fails: one line naming
    the output the user asked for, exit 3, the previous output intact and no temporary file left behind."""
    import resource

    out = tmp_path / "res.json"
    out.write_text("previous result", encoding="utf-8")
    limit = None
    if where == "rename":
        def fail(src, dst, *a, **k):
            raise OSError(errno.ENOSPC, "No space left on device", os.fspath(src), None, os.fspath(dst))
        monkeypatch.setattr(os, "replace", fail)
    else:
        import engine.cca

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)
        search = engine.cca.run_cca

        def then_limit(*a, **k):  # after the model is loaded (it may unpack weights to a file): only the write
            res = search(*a, **k)
            resource.setrlimit(resource.RLIMIT_FSIZE, (4096, limit[1]))  # Python ignores SIGXFSZ: EFBIG
            return res
        monkeypatch.setattr(engine.cca, "run_cca", then_limit)
    try:
        code, stdout, err = cli_cca(out)
    finally:
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, limit)
    assert code == 3 and stdout == ""
    (line,) = err.strip().splitlines()
    assert ("File too large" if where == "write" else "No space left on device") in line, line
    assert str(out) in line and ".tmp" not in line, line
    assert out.read_text(encoding="utf-8") == "previous result"          # nothing lost
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res.json"]   # no temporary left


# ---------------------------------------------------------------------------------------------------------------
# Label incidents: the incident's label without / with the set is in the evidence (as generation incidents' output)
# ---------------------------------------------------------------------------------------------------------------
def test_label_incident_evidence_names_the_label_before_and_after(minilm, tmp_path):
    """A classifier incident: ``evidence.incident`` carries the label without and with the set (the CLI's
    ``output:`` line and the certificate's "with the fix the model says" read it), equal to the argmax label a plain
    hooked forward gives, for sets that flip the label and sets that do not."""
    from engine.bundle import open_bundle, write_bundle
    from engine.cca import evaluate_fix_set
    from engine.interventions import Intervention
    from engine.recorder import record_incident

    h = minilm
    prompt = "this movie was great , i loved it"
    ids = h.tokenizer(prompt)["input_ids"]
    def classify():
        with torch.no_grad():
            return h.model(input_ids=torch.tensor([ids]), attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
                           token_type_ids=torch.zeros((1, len(ids)), dtype=torch.long)).logits[0]

    logits = classify()
    id2label = {int(k): v for k, v in h.model.config.id2label.items()}
    label = id2label[int(logits.argmax())]
    path = tmp_path / "label.h5"
    write_bundle(path, record_incident(h, prompt, f"label:{label}"))
    P = PlainHooks(h)
    last = h.n_layers - 1
    stream = P.capture(ids, [(last, "resid_post")])[(last, "resid_post")]
    cases = [(factor, pos) for factor in (-1.0, 0.5, 3.0) for pos in (0, len(ids) - 1)]
    flips = 0
    with open_bundle(path) as b:
        for factor, pos in cases:
            iv = Intervention(last, "resid_post", (pos,), "scale", value=factor)
            res = evaluate_fix_set(b, h, [iv], n_controls=0)
            hs = P._install({(last, "resid_post"): [(pos, factor * stream[pos])]})
            try:
                lg = classify()
            finally:
                for x in hs:
                    x.remove()
            want = id2label[int(lg.argmax())]
            ev = res.evidence["incident"]
            assert (ev["baseline_output"], ev["fixed_output"]) == (label, want), (factor, pos)
            assert res.flipped == (want != label and res.fixed_metric <= -1.0)
            flips += want != label
    assert 0 < flips < len(cases)
