"""Every model family the architecture table accepts, on a small random model of it (built from a config, nothing
downloaded): the sites mean what the browser says they mean, interventions are exact, and a recorded incident
replays bit for bit from the bundle's embedded weights.

A user brings a Mistral, Qwen or Gemma checkpoint, or a RoBERTa classifier: these are the guarantees the shipped
GPT-2 / Llama / MiniLM scenarios give, checked on each family the engine says it can take.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from conftest import TINY_PROMPT, build_tiny_tokenizer
from engine.bundle import open_bundle, write_bundle
from engine.errors import UnknownArchitectureError
from engine.hooks import forward_captured
from engine.interventions import Intervention, InterventionSet, run_with_interventions
from engine.models import _ALIASES, ARCHITECTURES, ModelHandle, arch_for
from engine.recorder import record_incident
from engine.replay import replay

# model_type -> (config class, causal LM or classifier class, extra config); head_dim != hidden / heads on two
DECODERS = {
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 12}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 12}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", {}),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", {}),
    # a norm after each sublayer: the attn / mlp sites are the norms' outputs (what the block adds)
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8, "sliding_window": 4}),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 8, "sliding_window": 4}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    # attention and MLP side by side on the block's input (and Phi-2, GPT-J, Falcon's own module names)
    "cohere": ("CohereConfig", "CohereForCausalLM", {}),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", {"use_parallel_residual": True}),
    "phi": ("PhiConfig", "PhiForCausalLM", {}),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", {"rotary_dim": 4}),
    "falcon": ("FalconConfig", "FalconForCausalLM", {}),
}
TESTED_ELSEWHERE = {"gpt2", "llama", "gpt_neox", "bert"}   # the shipped scenarios' families (test_bundle, ...)
POST_NORM = {"gemma2", "gemma3_text", "olmo2"}
ENCODERS = {
    "roberta": ("RobertaConfig", "RobertaForSequenceClassification", {}),
    "xlm-roberta": ("XLMRobertaConfig", "XLMRobertaForSequenceClassification", {}),
    "electra": ("ElectraConfig", "ElectraForSequenceClassification", {}),
}
SITES = ("resid_pre", "attn", "mlp", "resid_post", "head", "neuron")


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def _build(model_type: str, tok) -> ModelHandle:
    cfg_name, model_name, extra = {**DECODERS, **ENCODERS}[model_type]
    common = dict(num_hidden_layers=2, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                  vocab_size=len(tok), max_position_embeddings=80, pad_token_id=tok.pad_token_id)
    if model_type in DECODERS:
        common.update(num_key_value_heads=1, eos_token_id=tok.eos_token_id, bos_token_id=None)
    else:
        common.update(num_labels=2)
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_name)(**common, **extra)
    return ModelHandle(model=getattr(transformers, model_name)(cfg).eval(), tokenizer=tok, source="")


def _family(model_type: str) -> str:
    return _ALIASES.get(model_type, model_type)


def test_the_table_lists_exactly_the_families_tested_here():
    assert set(_ALIASES) | set(ARCHITECTURES) == set(DECODERS) | set(ENCODERS) | TESTED_ELSEWHERE
    assert {_family(k) for k in ENCODERS} == {"bert"}
    assert {k for k in DECODERS if _family(k) == "gemma2"} == POST_NORM


@pytest.mark.parametrize("model_type", list(DECODERS))
def test_decoder_family_sites_interventions_and_replay(model_type, tok, tmp_path):
    handle = _build(model_type, tok)
    assert handle.model.config.model_type == model_type and handle.arch is ARCHITECTURES[_family(model_type)]
    if model_type in POST_NORM:   # the site is the norm after the sublayer, the head / neuron the projection's input
        assert handle.module_path(0, "attn").endswith("post_attention_layernorm")
        assert handle.module_path(0, "mlp").endswith("post_feedforward_layernorm")
        assert handle.module_path(0, "head").endswith("self_attn.o_proj")
    enc = tok(TINY_PROMPT, return_tensors="pt")
    ids = enc["input_ids"]
    n = ids.shape[1]
    keys = [(layer, c) for layer in range(handle.n_layers) for c in SITES]
    _, acts = forward_captured(handle, keys, input_ids=ids, attention_mask=enc["attention_mask"])
    for layer in range(handle.n_layers):
        # pre-norm blocks: the attention and MLP sites are exactly what each adds to the residual stream
        step = acts[(layer, "resid_post")] - acts[(layer, "resid_pre")]
        assert torch.allclose(step, acts[(layer, "attn")] + acts[(layer, "mlp")], atol=1e-6, rtol=1e-5), layer
        assert tuple(acts[(layer, "head")].shape[-2:]) == (handle.n_heads, handle.d_head)
        assert acts[(layer, "neuron")].shape[-1] == handle.d_mlp
    # every component edited after a shared prefix: the same logits as recomputing the whole prompt
    sets = [InterventionSet()] + [
        InterventionSet((Intervention(layer, c, (n - 3, n - 1), "zero",
                                      indices={"head": (1,), "neuron": (0, 2)}.get(c, ())),))
        for layer in range(handle.n_layers) for c in ("resid_pre", "attn", "mlp", "head", "neuron")]
    full = run_with_interventions(handle, ids, sets, logits_from=n - 4)
    fast = run_with_interventions(handle, ids, sets, logits_from=n - 4, prefix=n - 4)
    assert (full - fast).abs().max().item() < 1e-5
    assert all(not torch.equal(full[0], full[i]) for i in range(1, len(sets)))   # every edit took effect
    # a next-token incident and a generation incident, each replayed bit for bit from the embedded weights
    for spec in ("token:HACKED", "contains:HACKED"):
        inc = record_incident(handle, TINY_PROMPT, spec, max_new_tokens=4, embed_weights=True,
                              prompt_sets={"counterpart": ["the cat sat on the mat"]})
        path = write_bundle(tmp_path / f"{spec.split(':')[0]}.h5", inc)
        with open_bundle(path) as b:
            assert b.model_info["family"] == _family(model_type)
            report = replay(b)
        assert report.bit_identical, (spec, [(c.name, c.detail) for c in report.failed])
        assert report.model_loaded_from == "embedded"


@pytest.mark.parametrize("model_type", list(ENCODERS))
def test_encoder_family_interventions_and_replay(model_type, tok, tmp_path):
    handle = _build(model_type, tok)
    assert handle.arch is ARCHITECTURES["bert"] and handle.is_classifier
    prompt = "the cat sat on the mat"
    enc = tok(prompt, return_tensors="pt")
    label = int(handle.model(**enc).logits.argmax(-1))
    sets = [InterventionSet(), InterventionSet((Intervention(1, "mlp", (0,), "zero"),)),
            InterventionSet((Intervention(1, "mlp", (2,), "zero"),))]
    out = run_with_interventions(handle, enc["input_ids"], sets)
    assert not torch.equal(out[0], out[1])         # the last block's MLP at the classified token moves the logits
    assert torch.equal(out[0], out[2])             # ... at another token of the last block it cannot
    inc = record_incident(handle, prompt, f"label:LABEL_{label}", embed_weights=True)
    with open_bundle(write_bundle(tmp_path / "incident.h5", inc)) as b:
        assert b.model_info["family"] == "bert"
        report = replay(b)
    assert report.bit_identical, [(c.name, c.detail) for c in report.failed]


def test_a_family_with_another_block_layout_is_refused_by_name(tok):
    """A mixture of experts has no single MLP down projection: refused, naming the family and the known ones."""
    cfg = transformers.MixtralConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2,
                                     num_key_value_heads=1, intermediate_size=32, vocab_size=len(tok),
                                     num_local_experts=2, num_experts_per_tok=1)
    with pytest.raises(UnknownArchitectureError, match="'mixtral'.*not in the architecture table; known: .*qwen3"):
        arch_for(transformers.MixtralForCausalLM(cfg))
