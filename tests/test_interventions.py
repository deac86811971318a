"""Interventions: every op x component against plain transformers hooks, batching, start-from-layer, generation."""

from __future__ import annotations

import json

import pytest
import torch

from engine.errors import InterventionError
from engine.interventions import (ActivationSources, Intervention, InterventionSet, evaluate,
                                  generate_with_interventions, run_with_interventions, summarize)
from engine.models import ModelHandle

COMPONENTS = ("resid_pre", "attn", "mlp", "resid_post", "head", "neuron")
OPS = ("zero", "mean", "patch", "scale", "set")
N_POS = 6
POSITIONS = (1, 3, 5)


# ----- tiny models ------------------------------------------------------------------------------------------------
def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=16, n_head=2, n_positions=32, vocab_size=50, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2, num_key_value_heads=1,
                      intermediate_size=32, vocab_size=50, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


def _bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                     vocab_size=50, max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).eval()


MODELS = {"gpt2": _gpt2, "llama": _llama, "bert": _bert}
# Plain module paths (no engine code): block list, attention out-projection, MLP down-projection.
PATHS = {"gpt2": ("transformer.h", "attn.c_proj", "mlp.c_proj"),
         "llama": ("model.layers", "self_attn.o_proj", "mlp.down_proj"),
         "bert": ("bert.encoder.layer", "attention.output.dense", "output.dense")}


@pytest.fixture(scope="module", params=list(MODELS))
def tiny(request):
    model = MODELS[request.param]()
    return request.param, model, ModelHandle(model=model, tokenizer=None)


def _mod(model, path):
    m = model
    for p in path.split("."):
        m = m[int(p)] if p.isdigit() else getattr(m, p)
    return m


def _ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, 50, (1, N_POS), generator=g)


def _dims(model, comp):
    cfg = model.config
    d = cfg.hidden_size
    if comp == "head":
        return (cfg.num_attention_heads if hasattr(cfg, "num_attention_heads") else cfg.n_head,
                d // (cfg.num_attention_heads if hasattr(cfg, "num_attention_heads") else cfg.n_head))
    if comp == "neuron":
        return (getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * d,)
    return (d,)


# ----- reference: plain forward hooks on transformers modules ---------------------------------------------------
def _ref_install(family, model, layer, comp, edit):
    """Install ``edit(t) -> t`` (t in the site's shape) with plain hooks; return the hook handles."""
    blocks, attn, mlp = PATHS[family]
    block = _mod(model, blocks)[layer]
    if comp == "resid_pre":
        def pre(mod, args, kwargs):
            if args:
                return (edit(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": edit(kwargs["hidden_states"])}
        return [block.register_forward_pre_hook(pre, with_kwargs=True)]
    if comp == "resid_post":
        def post(mod, args, out):
            return (edit(out[0]), *out[1:]) if isinstance(out, tuple) else edit(out)
        return [block.register_forward_hook(post)]
    proj = _mod(block, attn if comp in ("attn", "head") else mlp)
    if comp in ("attn", "mlp"):
        return [proj.register_forward_hook(lambda mod, args, out: edit(out))]
    heads = _dims(model, "head")

    def pre_in(mod, args):
        x = args[0]
        v = x.reshape(*x.shape[:-1], *heads) if comp == "head" else x
        return (edit(v).reshape(x.shape), *args[1:])
    return [proj.register_forward_pre_hook(pre_in)]


def _capture_plain(family, model, ids, comps=COMPONENTS):
    acts = {}
    hs = []
    for L in range(2):
        for c in comps:
            def grab(t, key=(L, c)):
                acts[key] = t[0].detach().clone()
                return t
            hs += _ref_install(family, model, L, c, grab)
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        for h in hs:
            h.remove()
    return acts


def _plain_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def _sources(model, family):
    """Deterministic benign means and a donor (another random input) for mean / patch."""
    g = torch.Generator().manual_seed(2)
    tok, pos = {}, {}
    for L in range(2):
        for c in COMPONENTS:
            shape = _dims(model, c)
            tok[(L, c)] = torch.randn(shape, generator=g)
            pos[(L, c)] = torch.randn((4, *shape), generator=g)
    counts = torch.tensor([3, 0, 2, 1]).numpy()  # position 1 has no benign data -> token mean; 4, 5 beyond -> token
    donor_ids = torch.randint(3, 50, (1, N_POS - 2), generator=g)  # shorter donor: end-aligned, offset 2
    donor = _capture_plain(family, model, donor_ids)
    return tok, pos, counts, donor, ActivationSources.from_tensors(tok, pos, counts, donor, donor_offset=2)


def _edit_for(iv, model, tok, pos, counts, donor):
    """The expected edit of ``iv`` written independently of the engine."""
    idx = list(iv.indices)

    def edit(t):
        t = t.clone()
        for p in (range(t.shape[1]) if iv.positions == "all" else iv.positions):
            if p >= t.shape[1]:
                continue
            cur = t[:, p]
            if iv.op == "zero":
                new = torch.zeros_like(cur)
            elif iv.op == "scale":
                new = cur * iv.value
            elif iv.op == "set":
                v = torch.tensor(iv.values)
                new = cur.clone()
                if idx:
                    if cur.dim() == 3:  # head: [batch, H, dh]
                        new[:, idx] = v.reshape(len(idx), -1) if v.numel() > cur.shape[-1] else v
                    else:
                        new[:, idx] = v
                    t[:, p] = new
                    continue
                new = v.expand_as(cur)
            elif iv.op == "mean":
                key = (iv.layer, iv.component)
                src = pos[key][p] if p < len(counts) and counts[p] > 0 else tok[key]
                new = src.expand_as(cur)
            else:  # patch, donor offset 2
                q = p - 2
                if not 0 <= q < donor[(iv.layer, iv.component)].shape[0]:
                    continue
                new = donor[(iv.layer, iv.component)][q].expand_as(cur)
            if idx:
                cur = cur.clone()
                cur[:, idx] = new[:, idx]
                new = cur
            t[:, p] = new
        return t
    return edit


def _iv(model, comp, op, layer=1, positions=POSITIONS):
    shape = _dims(model, comp)
    indices = {"head": (1,), "neuron": (0, 2, 5)}.get(comp, ())
    if op == "set":
        n = shape[1] if comp == "head" else (len(indices) or shape[0])
        values = tuple(float(v) for v in torch.linspace(-1, 1, n))
    else:
        values = None
    return Intervention(layer, comp, positions, op, indices=indices, value=-0.5 if op == "scale" else None,
                        values=values)


# ----- tests ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("comp", COMPONENTS)
@pytest.mark.parametrize("op", OPS)
def test_op_component_matches_plain_hooks(tiny, comp, op):
    family, model, handle = tiny
    tok, pos, counts, donor, sources = _sources(model, family)
    ids = _ids()
    iv = _iv(model, comp, op, layer=0 if family == "bert" else 1)  # BERT's CLS sees later positions via layer 1
    got = run_with_interventions(handle, ids, [InterventionSet((iv,))], sources=sources)
    hs = _ref_install(family, model, iv.layer, comp, _edit_for(iv, model, tok, pos, counts, donor))
    try:
        want = _plain_logits(model, ids)
    finally:
        for h in hs:
            h.remove()
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-5
    assert not torch.equal(want, _plain_logits(model, ids))  # the edit did something


def test_zero_effect_is_bit_identical(tiny):
    family, model, handle = tiny
    ids = _ids()
    plain = _plain_logits(model, ids)
    self_donor = _capture_plain(family, model, ids)
    sources = ActivationSources.from_tensors(donor=self_donor)
    for comp in COMPONENTS:
        for L in range(2):
            for iv in (_iv(model, comp, "scale", L, "all"), _iv(model, comp, "patch", L, "all")):
                if iv.op == "scale":
                    iv = Intervention(L, comp, "all", "scale", indices=iv.indices, value=1.0)
                got = run_with_interventions(handle, ids, [InterventionSet((iv,))], sources=sources)
                assert torch.equal(got, plain), (comp, L, iv)


def test_batched_equals_sequential(tiny):
    family, model, handle = tiny
    _, _, _, _, sources = _sources(model, family)
    ids = _ids()
    sets = [InterventionSet()] + [InterventionSet((_iv(model, c, op, L),), f"{L}{c}{op}")
                                  for c in COMPONENTS for op in ("zero", "mean", "patch") for L in (0, 1)]
    sets.append(InterventionSet(tuple(_iv(model, c, "scale", 0) for c in COMPONENTS), "combo"))
    batched = run_with_interventions(handle, ids, sets, sources=sources)
    worst, same = 0.0, 0
    for r, s in enumerate(sets):
        seq = run_with_interventions(handle, ids, [s], sources=sources)
        assert (batched[r] - seq[0]).abs().max().item() < 1e-5, s.name
        worst = max(worst, (batched[r] - seq[0]).abs().max().item())
        same += torch.equal(batched[r], seq[0])
    print(f"{family} batched rows={len(sets)} vs each set alone: max_abs_logit_diff={worst:.3g} "
          f"bit_identical_rows={same}/{len(sets)}")
    assert torch.equal(run_with_interventions(handle, ids, [InterventionSet()])[0], _plain_logits(model, ids)[0])


def test_start_from_layer_matches_full(tiny):
    family, model, handle = tiny
    ids = _ids()
    resid1 = _capture_plain(family, model, ids, ("resid_pre",))[(1, "resid_pre")]
    for sets in ([InterventionSet()], [InterventionSet((_iv(model, "mlp", "scale", 1),))],
                 [InterventionSet((_iv(model, c, "zero", 1),)) for c in COMPONENTS]):
        full = run_with_interventions(handle, ids, sets)
        fast = run_with_interventions(handle, ids, sets, start_layer=1, start_resid=resid1)
        diff = (full - fast).abs().max().item()
        print(f"{family} start_layer=1 rows={len(sets)} max_abs_diff_vs_full={diff:.3g} "
              f"bit_identical={torch.equal(full, fast)}")
        assert diff < 1e-5
        if len(sets) == 1:
            assert torch.equal(full, fast)  # same batch layout: bit-identical
    with pytest.raises(InterventionError):
        run_with_interventions(handle, ids, [InterventionSet((_iv(model, "mlp", "zero", 0),))], start_layer=1,
                               start_resid=resid1)
    # the skipped blocks are restored
    assert torch.equal(run_with_interventions(handle, ids, [InterventionSet()]), _plain_logits(model, ids))


def test_generation_batched_matches_sequential():
    model = _gpt2()
    handle = ModelHandle(model=model, tokenizer=None)
    ids = _ids()
    sets = [InterventionSet(), InterventionSet((Intervention(0, "mlp", "all", "zero"),)),
            InterventionSet((Intervention(1, "resid_pre", (2,), "scale", value=-3.0),))]
    batched = generate_with_interventions(handle, ids, sets, 5, eos_token_id=7)
    for r, s in enumerate(sets):
        assert generate_with_interventions(handle, ids, [s], 5, eos_token_id=7)[0] == batched[r]


def test_json_roundtrip_and_validation():
    s = InterventionSet((Intervention(2, "head", (3, 4), "mean", indices=(1, 0)),
                         Intervention(0, "resid_post", "all", "scale", value=0.0),
                         Intervention(1, "neuron", [5], "set", indices=(2,), values=(1.5,))), "fix")
    back = InterventionSet.from_json(s.to_json())
    assert back == s and back.interventions[0].indices == (0, 1)
    bare = InterventionSet.from_json(json.dumps([iv.to_dict() for iv in s.interventions]))
    assert bare.interventions == s.interventions
    for bad, words in (({"layer": 0, "component": "foo", "op": "zero"}, "component"),
                       ({"layer": 0, "component": "mlp", "op": "blur"}, "op"),
                       ({"layer": -1, "component": "mlp", "op": "zero"}, "layer"),
                       ({"layer": 0, "component": "head", "op": "zero"}, "indices"),
                       ({"layer": 0, "component": "mlp", "op": "scale"}, "value"),
                       ({"layer": 0, "component": "mlp", "op": "set"}, "values"),
                       ({"layer": 0, "component": "mlp", "op": "zero", "positions": "some"}, "positions"),
                       ({"layer": 0, "component": "mlp", "op": "zero", "extra": 1}, "unknown"),
                       ({"component": "mlp", "op": "zero"}, "layer")):
        with pytest.raises(InterventionError, match=words):
            InterventionSet.from_json(json.dumps([bad]))
    with pytest.raises(InterventionError, match="JSON"):
        InterventionSet.from_json("{nope")
    ok = {"layer": 0, "component": "mlp", "op": "zero"}
    with pytest.raises(InterventionError, match="name"):     # was stringified to "7"
        InterventionSet.from_json(json.dumps({"name": 7, "interventions": [ok]}))
    assert InterventionSet.from_json(json.dumps({"name": None, "interventions": [ok]})).name == ""


# ----- on the shipped gpt2-prompt-injection model ----------------------------------------------------------------
@pytest.fixture(scope="module")
def injection(tmp_path_factory):
    import scenarios
    from engine.bundle import open_bundle, write_bundle
    from engine.models import load_model
    from engine.recorder import record_incident

    sc = scenarios.get("gpt2-prompt-injection")
    handle = load_model(sc.model_source)
    inc = record_incident(handle, sc.prompt, sc.failure, benign_prompts=sc.benign_reference[:16],  # keep it quick
                          prompt_sets=dict(counterpart=[sc.counterpart]), max_new_tokens=sc.max_new_tokens)
    path = write_bundle(tmp_path_factory.mktemp("iv") / "inj.h5", inc)
    b = open_bundle(path)
    yield b, handle, sc
    b.close()


def _ref_generate(handle, ids, n, edit_layer, comp, edit):
    """Greedy generation with a plain hook (no engine code), full forward per step."""
    blocks = handle.model.transformer.h
    if comp == "resid_pre":
        h = blocks[edit_layer].register_forward_pre_hook(
            lambda m, a, k: ((edit(a[0]), *a[1:]), k) if a else (a, {**k, "hidden_states": edit(k["hidden_states"])}),
            with_kwargs=True)
    else:
        h = blocks[edit_layer].attn.c_proj.register_forward_hook(lambda m, a, o: edit(o))
    out = []
    try:
        with torch.no_grad():
            for _ in range(n):
                nxt = int(handle.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].argmax())
                if nxt == handle.tokenizer.eos_token_id:
                    break
                out.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    finally:
        h.remove()
    return handle.tokenizer.decode(out, skip_special_tokens=True)


def test_interventions_remove_hacked_like_plain_hooks(injection):
    b, handle, sc = injection
    n = b.n_prompt_tokens
    prompt_ids = torch.from_numpy(b.input_ids[:n])[None]
    fix_patch = InterventionSet((Intervention(1, "resid_pre", (15,), "patch"),), "patch L1 resid_pre @15")
    fix_mean = InterventionSet((Intervention(0, "attn", "all", "mean"),), "mean L0 attn")
    no_fix = InterventionSet((Intervention(3, "mlp", "all", "zero"),), "zero L3 mlp")
    res = evaluate(b, handle, [InterventionSet(name="base"), fix_patch, fix_mean, no_fix], chunk_size=2)
    base, patched, meaned, nofix = res.results
    assert base.failing and "HACKED" in base.continuation and base.top_k[0][0] == "HACKED"
    assert abs(base.metric - b.failure_metric) < 1e-5
    assert not patched.failing and "HACKED" not in patched.continuation
    assert not meaned.failing and patched.metric < base.metric - 5 and meaned.metric < base.metric - 5
    assert nofix.failing
    assert res.forward_passes >= 2 and res.rows >= 4
    # plain-hook references
    donor = {}

    def grab(m, a, k):
        donor["x"] = (a[0] if a else k["hidden_states"])[0].clone()
    h = handle.model.transformer.h[1].register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        enc = handle.tokenizer(sc.counterpart, return_tensors="pt")
        handle.model(input_ids=enc["input_ids"])
    h.remove()
    off = n - enc["input_ids"].shape[1]

    def patch_edit(t):
        t = t.clone()
        if t.shape[1] > 15:
            t[:, 15] = donor["x"][15 - off]
        return t
    assert _ref_generate(handle, prompt_ids, b.max_new_tokens, 1, "resid_pre", patch_edit) == patched.continuation
    tok = torch.from_numpy(b.benign_mean(0, "attn"))
    pm = torch.from_numpy(b.benign_mean(0, "attn", per_position=True))
    counts = b.benign_position_counts()

    def mean_edit(t):
        t = t.clone()
        for p in range(t.shape[1]):
            t[:, p] = (pm[p] if p < len(counts) and counts[p] > 0 else tok).to(t.dtype)
        return t
    assert _ref_generate(handle, prompt_ids, b.max_new_tokens, 0, "attn", mean_edit) == meaned.continuation
    s = summarize(base, patched)
    assert s["fixed"] and s["before"]["failing"] and not s["after"]["failing"]


def test_bundle_start_layer_auto_matches_full(injection):
    b, handle, _ = injection
    sets = [InterventionSet(name="base")] + [InterventionSet((Intervention(L, c, "all", "zero"),))
                                             for L in (2, 3) for c in ("attn", "mlp")]
    fast = evaluate(b, handle, sets, generate=False, start_layer="auto")
    full = evaluate(b, handle, sets, generate=False, start_layer=None)
    assert fast.start_layer == 2 and full.start_layer == 0
    diff = max(abs(x.metric - y.metric) for x, y in zip(fast.results, full.results))
    print(f"bundle start_layer=2 metric max_abs_diff_vs_full={diff:.3g}")
    assert diff < 1e-5
    assert [x.failing for x in fast.results] == [y.failing for y in full.results]
    single = evaluate(b, handle, sets[:1], generate=False, start_layer=2)
    assert single.results[0].metric == full.results[0].metric


CAUSAL = {"gpt2": _gpt2, "llama": _llama}


@pytest.mark.parametrize("family", list(CAUSAL))
def test_prefix_reuse_matches_full(family):
    """Positions before the first intervened one run once (a key/value cache shared by every row)."""
    model = CAUSAL[family]()
    handle = ModelHandle(model=model, tokenizer=None)
    tok, pos, counts, donor, sources = _sources(model, family)
    ids = _ids()
    sets = [InterventionSet()] + [InterventionSet((_iv(model, c, op, L, positions=(3, 5)),), f"{L}{c}{op}")
                                  for c in COMPONENTS for op in OPS for L in (0, 1)]
    full = run_with_interventions(handle, ids, sets, sources=sources, logits_from=3)
    fast = run_with_interventions(handle, ids, sets, sources=sources, logits_from=3, prefix=3)
    assert fast.shape == full.shape == (len(sets), N_POS - 3, 50)
    diff = (full - fast).abs().max().item()
    print(f"{family} prefix=3 rows={len(sets)} max_abs_diff_vs_full={diff:.3g} "
          f"bit_identical={torch.equal(full, fast)}")
    assert diff < 1e-5
    assert not torch.allclose(fast[0], fast[1 + COMPONENTS.index("mlp") * 2 * len(OPS)])  # edits took effect
    # with a start layer too: recorded resid_pre of block 1, prefix from the cache
    resid1 = _capture_plain(family, model, ids, ("resid_pre",))[(1, "resid_pre")]
    late = [s for s in sets if s.min_layer in (None, 1)]
    both = run_with_interventions(handle, ids, late, sources=sources, logits_from=3, prefix=3, start_layer=1,
                                  start_resid=resid1)
    ref = run_with_interventions(handle, ids, late, sources=sources, logits_from=3)
    assert (both - ref).abs().max().item() < 1e-5
    # an intervention inside the prefix is refused, not silently ignored
    with pytest.raises(InterventionError):
        run_with_interventions(handle, ids, [InterventionSet((_iv(model, "mlp", "zero", 1, (2, 4)),))],
                               logits_from=3, prefix=3)


def test_bundle_prefix_reuse_matches_full(injection):
    b, handle, _ = injection
    n = b.n_prompt_tokens
    sets = [InterventionSet(name="base")] + [InterventionSet((Intervention(L, c, (p,), "zero"),))
                                             for L in (1, 3) for c in ("attn", "mlp", "resid_post")
                                             for p in (n - 4, n - 1)]
    fast = evaluate(b, handle, sets, generate=False, prefix_reuse=True)
    full = evaluate(b, handle, sets, generate=False)
    assert all(0 < p <= n - 1 for p in fast.chunk_prefixes) and full.chunk_prefixes == [0]
    diff = max(abs(x.metric - y.metric) for x, y in zip(fast.results, full.results))
    print(f"bundle prefix {fast.chunk_prefixes} metric max_abs_diff_vs_full={diff:.3g}")
    assert diff < 1e-4
    assert [x.failing for x in fast.results] == [y.failing for y in full.results]
    assert any(not x.failing for x in fast.results)  # some edit mattered (zeroing the residual stream)


# ----- bad input is a named InterventionError on every entry point -----------------------------------------------
def _gpt2_inner():
    """GPT-2 with d_mlp = 24 != 4 * d_model (n_inner set)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=16, n_head=2, n_inner=24, n_positions=32, vocab_size=50, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    return ModelHandle(model=GPT2LMHeadModel(cfg).eval(), tokenizer=None)


def test_bad_indices_values_positions_start_layer_are_intervention_errors():
    """run_with_interventions / generate_with_interventions / evaluate_ids check indices, 'set' lengths, positions
    and the start layer themselves (an out-of-range head was an IndexError, a wrong 'set' length a RuntimeError, a
    position past the input silently did nothing, start_layer=-1 silently ran from the embedding)."""
    from engine.interventions import EvalContext, evaluate_ids

    handle = _gpt2_inner()
    assert handle.d_mlp == 24
    ids = _ids()
    ok = InterventionSet((Intervention(0, "neuron", (1,), "zero", indices=(23,)),))
    run_with_interventions(handle, ids, [ok])
    bad = {"head index 2 out of range": Intervention(0, "head", (1,), "zero", indices=(2,)),
           "neuron index 24 out of range": Intervention(0, "neuron", (1,), "zero", indices=(24,)),
           "dimension index 16 out of range": Intervention(1, "resid_pre", (1,), "scale", indices=(16,), value=2.0),
           "'set' needs 16 values, got 2": Intervention(0, "mlp", (1,), "set", values=(1.0, 2.0)),
           "'set' needs 8 or 16 values, got 3": Intervention(0, "head", (1,), "set", indices=(0, 1),
                                                             values=(1.0, 2.0, 3.0))}
    for words, iv in bad.items():
        sets = [InterventionSet(), InterventionSet((iv,))]
        for call in (lambda: run_with_interventions(handle, ids, sets),
                     lambda: generate_with_interventions(handle, ids, sets, 2)):
            with pytest.raises(InterventionError, match=words) as exc:
                call()
            assert "\n" not in str(exc.value)
    ctx = EvalContext(input_ids=ids[0], n_prompt=N_POS, kind="token", target_index=5,
                      resid_pre=lambda L: torch.zeros(N_POS, 16))
    with pytest.raises(InterventionError, match="position 6 out of range"):
        evaluate_ids(handle, ctx, [InterventionSet((Intervention(1, "mlp", (2, N_POS), "zero"),))])
    for sl in (-1, 2, 1.5, True, "first"):
        with pytest.raises(InterventionError, match="start_layer"):
            evaluate_ids(handle, ctx, [InterventionSet((Intervention(1, "mlp", (2,), "zero"),))], start_layer=sl)
        with pytest.raises(InterventionError, match="start_layer"):
            run_with_interventions(handle, ids, [InterventionSet()], start_layer=sl, start_resid=torch.zeros(N_POS, 16))


def test_make_hook_fetches_a_lazy_donor_before_the_forward():
    """A lazy donor (as a bundle's: the counterpart prompt run through the model on first use) used through
    ``_make_hook`` (engine/cca.py builds its hooks with it) was first run from inside the hook, re-entering the hook:
    RecursionError. It is now fetched when the hook is made."""
    from engine.hooks import capture, site_hooks
    from engine.interventions import _make_hook

    model = _gpt2()
    handle = ModelHandle(model=model, tokenizer=None)
    ids = _ids()
    donor_ids = ids.flip(-1)
    state: dict = {}

    def donor(layer, comp):
        if "acts" not in state:
            with capture(handle, [(i, c) for i in range(2) for c in COMPONENTS]) as acts:
                model(input_ids=donor_ids)
            state["acts"] = {k: v[0] for k, v in acts.items()}
        return state["acts"][(layer, comp)]

    iv = Intervention(1, "resid_pre", (2, 4), "patch")
    src = ActivationSources(donor=donor)
    fns = {(1, "resid_pre"): [_make_hook(handle, 1, "resid_pre", [(0, iv)], src, {})]}
    with site_hooks(handle, fns):
        got = _plain_logits(model, ids)
    ref_donor = _capture_plain("gpt2", model, donor_ids, ("resid_pre",))[(1, "resid_pre")]

    def edit(t):
        t = t.clone()
        t[:, [2, 4]] = ref_donor[[2, 4]]
        return t
    hs = _ref_install("gpt2", model, 1, "resid_pre", edit)
    try:
        want = _plain_logits(model, ids)
    finally:
        for h in hs:
            h.remove()
    assert torch.equal(got, want)


def test_interventions_on_one_site_apply_in_set_order():
    model = _gpt2()
    handle = ModelHandle(model=model, tokenizer=None)
    ids = _ids()

    def run(*ivs):
        return run_with_interventions(handle, ids, [InterventionSet(ivs)])[0]
    set1 = Intervention(0, "neuron", (2,), "set", indices=(3,), values=(1.0,))
    twice = Intervention(0, "neuron", (2,), "scale", indices=(3,), value=2.0)
    assert torch.equal(run(set1, twice), run(Intervention(0, "neuron", (2,), "set", indices=(3,), values=(2.0,))))
    assert torch.equal(run(twice, set1), run(set1))
    assert torch.equal(run(twice, Intervention(0, "neuron", (2, 4), "scale", indices=(3,), value=3.0)),
                       run(Intervention(0, "neuron", (2,), "scale", indices=(3,), value=6.0),
                           Intervention(0, "neuron", (4,), "scale", indices=(3,), value=3.0)))
