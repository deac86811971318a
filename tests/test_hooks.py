"""Capturing activations: references when safe, copies when the model edits a captured tensor in place."""

from __future__ import annotations

import torch

from conftest import TINY_PROMPT
from engine.behaviour import encode
from engine.hooks import all_sites, capture, forward_captured, site_hooks


def _copied(handle, enc):
    with torch.no_grad(), capture(handle, all_sites(handle), copy=True) as acts:
        out = handle.model(**enc)
    return out, acts


def test_references_equal_copies(tiny_gpt2):
    enc = encode(tiny_gpt2, TINY_PROMPT)
    with torch.no_grad():
        out, acts = forward_captured(tiny_gpt2, all_sites(tiny_gpt2), **enc)
    ref_out, ref = _copied(tiny_gpt2, enc)
    assert set(acts) == set(ref) and len(acts) == 4 * tiny_gpt2.n_layers
    for k in ref:
        assert torch.equal(acts[k], ref[k]), k
    assert torch.equal(out.logits, ref_out.logits)


def test_in_place_edit_after_capture_falls_back_to_copies(tiny_gpt2):
    """A model that adds to its attention output in place after the hook saw it: references would be stale."""
    enc = encode(tiny_gpt2, TINY_PROMPT)
    ref_out, ref = _copied(tiny_gpt2, enc)
    site = (0, "attn")
    # the attention module around the out-projection: its forward hook runs after the capture hook on the
    # projection's output and edits that very tensor in place
    module = tiny_gpt2.model.transformer.h[0].attn
    assert tiny_gpt2.attn_out(0) is module.c_proj

    def bump(mod, args, out):
        (out[0] if isinstance(out, tuple) else out).add_(1.0)
        return out

    calls = []
    orig = tiny_gpt2.model.forward

    def counting(*a, **kw):
        calls.append(1)
        return orig(*a, **kw)

    tiny_gpt2.model.forward = counting
    try:
        with torch.no_grad(), site_hooks(tiny_gpt2, {}):
            h = module.register_forward_hook(bump)
            try:
                out, acts = forward_captured(tiny_gpt2, all_sites(tiny_gpt2), **enc)
                naive_out, naive = None, None
                with capture(tiny_gpt2, [site], copy=False) as naive:
                    tiny_gpt2.model(**enc)
            finally:
                h.remove()
    finally:
        del tiny_gpt2.model.forward
    assert len(calls) == 3  # stale references detected -> forward run again with copies, + the naive run
    # what the capture hook saw: the output before the in-place edit (= the unedited model's value)
    assert torch.equal(acts[site], ref[site])
    assert not torch.equal(naive[site], ref[site])  # a plain reference would have recorded the edited tensor
