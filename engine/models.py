"""Model loading and the architecture table.

Our site names are stable across architectures (TransformerLens / pyvene style). One small table per family maps
them to transformers modules, relative to the model's *base model* (``model.base_model``):

==========  =========================================================================================
site        meaning (block ``i``)                                   tensor shape
==========  =========================================================================================
resid_pre   input of block ``i`` (the residual stream before it)    ``[batch, pos, d_model]``
attn        the attention sublayer's contribution (output of its    ``[batch, pos, d_model]``
            output projection, before the residual add / norm)
mlp         the MLP sublayer's contribution (output of its down     ``[batch, pos, d_model]``
            projection, before the residual add / norm)
resid_post  output of block ``i`` (== ``resid_pre`` of ``i+1``)     ``[batch, pos, d_model]``
head        input of the attention output projection, split by     ``[batch, pos, n_heads, d_head]``
            head (component of ``attn`` granularity)
neuron      input of the MLP down projection (post-activation)      ``[batch, pos, d_mlp]``
==========  =========================================================================================

Loading: a hub id or a local directory, ``safetensors`` only, ``trust_remote_code`` off unless the caller asks.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ModelLoadError, UnknownArchitectureError

#: Sites recorded and addressed per block, in forward order.
RESIDUAL_SITES = ("resid_pre", "attn", "mlp", "resid_post")


@dataclass(frozen=True)
class ArchSpec:
    """Where a family keeps its blocks and sublayer projections (paths relative to ``model.base_model``)."""

    family: str
    blocks: str  # ModuleList of blocks
    attn_out: str  # within a block: the attention output projection (Linear / Conv1D)
    mlp_out: str  # within a block: the MLP down projection
    n_heads_attr: str  # config attribute giving the number of attention heads
    causal: bool  # decoder (causal LM) or encoder
    post_ln: bool = False  # BERT-style: sublayer output is added then layer-normed
    # within a block: the module whose output is added to the residual stream, where that is not the projection
    # (Gemma 2: a norm after each sublayer); the ``attn`` / ``mlp`` sites live there, ``head`` / ``neuron`` stay
    # on the projection's input
    attn_add: str = ""
    mlp_add: str = ""


ARCHITECTURES: dict[str, ArchSpec] = {
    "gpt2": ArchSpec("gpt2", "h", "attn.c_proj", "mlp.c_proj", "n_head", causal=True),
    "bert": ArchSpec("bert", "encoder.layer", "attention.output.dense", "output.dense",
                     "num_attention_heads", causal=False, post_ln=True),
    "llama": ArchSpec("llama", "layers", "self_attn.o_proj", "mlp.down_proj", "num_attention_heads", causal=True),
    "gpt_neox": ArchSpec("gpt_neox", "layers", "attention.dense", "mlp.dense_4h_to_h", "num_attention_heads",
                         causal=True),
    "gemma2": ArchSpec("gemma2", "layers", "self_attn.o_proj", "mlp.down_proj", "num_attention_heads", causal=True,
                       attn_add="post_attention_layernorm", mlp_add="post_feedforward_layernorm"),
    "phi": ArchSpec("phi", "layers", "self_attn.dense", "mlp.fc2", "num_attention_heads", causal=True),
    "gptj": ArchSpec("gptj", "h", "attn.out_proj", "mlp.fc_out", "num_attention_heads", causal=True),
    "falcon": ArchSpec("falcon", "h", "self_attention.dense", "mlp.dense_4h_to_h", "num_attention_heads", causal=True),
}
# Families (``config.model_type``) whose blocks have the module layout of a table entry: the Llama one
# (``self_attn.o_proj`` / ``mlp.down_proj``, each sublayer's output added to the residual stream, in sequence or in
# parallel as in Cohere), the Gemma 2 one (the same with a norm after each sublayer) or the BERT one (post-norm
# encoder). A family whose block differs (a mixture of experts has no single MLP projection) is not listed: it gets
# UnknownArchitectureError rather than sites that mean something else. tests/test_models.py records, replays and
# intervenes on a small model of each.
_ALIASES = {**{k: "llama" for k in ("mistral", "qwen2", "qwen3", "gemma", "phi3", "olmo", "smollm3", "cohere",
                                    "stablelm")},
            **{k: "gemma2" for k in ("gemma3_text", "olmo2")},
            **{k: "bert" for k in ("roberta", "xlm-roberta", "electra")}}


def arch_for(model: nn.Module) -> ArchSpec:
    """Return the architecture entry for ``model`` (found from ``model.config.model_type``).

    Raises:
        UnknownArchitectureError: the family has no entry in :data:`ARCHITECTURES`.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    key = _ALIASES.get(model_type, model_type)
    if key not in ARCHITECTURES:
        known = ", ".join(sorted([*ARCHITECTURES, *_ALIASES]))
        raise UnknownArchitectureError(
            f"model family {model_type!r} ({type(model).__name__}) is not in the architecture table; known: {known}")
    return ARCHITECTURES[key]


def _get(module: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module


@dataclass
class ModelHandle:
    """A loaded model with its tokenizer and the facts the recorder and replayer need.

    Attributes:
        model: the ``transformers`` model, in eval mode.
        tokenizer: its tokenizer (``PreTrainedTokenizerBase``) or ``None``.
        source: hub id or local directory it came from (``""`` for a model built in memory).
        arch: the architecture table entry.
    """

    model: nn.Module
    tokenizer: Any
    source: str = ""
    arch: ArchSpec | None = None

    def __post_init__(self) -> None:
        if self.arch is None:
            self.arch = arch_for(self.model)
        self.model.eval()
        _own_storage(self.model)

    # ----- structure -------------------------------------------------------------------------------------------
    @property
    def family(self) -> str:
        return self.arch.family

    @property
    def is_causal_lm(self) -> bool:
        return type(self.model).__name__.endswith(("LMHeadModel", "ForCausalLM"))

    @property
    def is_classifier(self) -> bool:
        return type(self.model).__name__.endswith("ForSequenceClassification")

    @property
    def base(self) -> nn.Module:
        return self.model.base_model

    @property
    def blocks(self) -> nn.ModuleList:
        return _get(self.base, self.arch.blocks)

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def n_heads(self) -> int:
        return int(getattr(self.model.config, self.arch.n_heads_attr))

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def d_head(self) -> int:
        cfg = self.model.config
        return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads)

    @property
    def d_mlp(self) -> int:
        return int(self.mlp_out(0).in_features if hasattr(self.mlp_out(0), "in_features")
                   else self.mlp_out(0).weight.shape[0])  # GPT-2 Conv1D stores [in, out]

    def block(self, i: int) -> nn.Module:
        return self.blocks[i]

    def attn_out(self, i: int) -> nn.Module:
        return _get(self.blocks[i], self.arch.attn_out)

    def mlp_out(self, i: int) -> nn.Module:
        return _get(self.blocks[i], self.arch.mlp_out)

    def site_module(self, i: int, component: str) -> nn.Module:
        """The module whose output is the ``attn`` / ``mlp`` site: what block ``i`` adds to the residual stream."""
        add = self.arch.attn_add if component == "attn" else self.arch.mlp_add
        if add:
            return _get(self.blocks[i], add)
        return self.attn_out(i) if component == "attn" else self.mlp_out(i)

    def module_path(self, layer: int, component: str) -> str:
        """The transformers module path a site lives on (for display and the bundle)."""
        base = f"{self.model.base_model_prefix}.{self.arch.blocks}.{layer}"
        return {"resid_pre": base, "resid_post": base, "attn": f"{base}.{self.arch.attn_add or self.arch.attn_out}",
                "head": f"{base}.{self.arch.attn_out}", "mlp": f"{base}.{self.arch.mlp_add or self.arch.mlp_out}",
                "neuron": f"{base}.{self.arch.mlp_out}"}[component]

    def site_shape(self, component: str) -> tuple[int, ...]:
        """Per-token shape of a component's activation."""
        if component in RESIDUAL_SITES:
            return (self.d_model,)
        if component == "head":
            return (self.n_heads, self.d_head)
        if component == "neuron":
            return (self.d_mlp,)
        raise KeyError(component)

    def weights_sha256(self) -> str:
        return weights_sha256(self.model)


def weights_sha256(model: nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, raw bytes), in name order.

    Independent of how the weights were stored on disk, so an embedded copy and the source directory agree.
    """
    h = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def tokenizer_sha256(tokenizer: Any) -> str:
    """sha256 of the tokenizer's identity: its full vocabulary and special tokens, independent of file layout."""
    if tokenizer is None:
        return ""
    h = hashlib.sha256()
    vocab = tokenizer.get_vocab()
    for tok in sorted(vocab, key=lambda t: (vocab[t], t)):
        h.update(f"{vocab[tok]}\t{tok}\n".encode())
    h.update(repr(sorted((k, str(v)) for k, v in tokenizer.special_tokens_map.items())).encode())
    h.update(type(tokenizer).__name__.encode())
    return h.hexdigest()


def _auto_class(config: Any, task: str | None):
    import transformers

    archs = list(getattr(config, "architectures", None) or [])
    if task == "classification" or any(a.endswith("ForSequenceClassification") for a in archs) and task is None:
        return transformers.AutoModelForSequenceClassification
    if task == "causal-lm" or any(a.endswith(("LMHeadModel", "ForCausalLM")) for a in archs):
        return transformers.AutoModelForCausalLM
    return transformers.AutoModel


def _plugin_sources() -> dict:
    """Model sources other packages add (entry point group ``forensics.model_sources``), e.g. ``scenario:``."""
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group="forensics.model_sources")}


def _own_storage(model: nn.Module) -> None:
    """Give every parameter and buffer its own freshly allocated storage.

    safetensors loads tensors as views into a memory-mapped file (or a bytes object for embedded weights), with
    whatever alignment the file gives them.  Some CPU kernels take different code paths for differently aligned
    inputs, so the same weights loaded from a directory and from a bundle gave logits differing in the last bits
    (seen on MiniLM: ~1e-10).  Copying into allocator-owned storage makes every load path compute identically.
    """
    with torch.no_grad():
        for t in (*model.parameters(), *model.buffers()):
            t.data = t.data.clone()


def load_model(source: str | os.PathLike, *, task: str | None = None, trust_remote_code: bool = False,
               dtype: torch.dtype = torch.float32) -> ModelHandle:
    """Load a model and tokenizer from a local directory or a hub id.

    Only ``safetensors`` weights are accepted (``use_safetensors=True``); remote code runs only when the caller
    opts in with ``trust_remote_code`` (``forensics record --trust-remote-code``).

    Args:
        source: a local directory holding ``config.json`` + ``*.safetensors`` (+ tokenizer files), a hub id, or
            ``PREFIX:NAME`` for a source registered under the ``forensics.model_sources`` entry point group
            (``scenario:bert-sentiment-bypass`` assembles MiniLM from its package plus our trained head).
        task: ``"causal-lm"``, ``"classification"`` or ``None`` to follow ``config.architectures``.
        trust_remote_code: allow code shipped with the model to run (off by default).
        dtype: parameter dtype.

    Raises:
        ModelLoadError: the directory is missing or unsafe, or the hub id cannot be fetched (e.g. offline).
        UnknownArchitectureError: the model loaded but its family is not in the architecture table.

    Example:
        >>> handle = load_model("resources/models/gpt2-assistant")  # doctest: +SKIP
        >>> handle.family, handle.n_layers  # doctest: +SKIP
        ('gpt2', 4)
    """
    import transformers

    src = str(source)
    if ":" in src and src.split(":", 1)[0] in _plugin_sources():
        prefix, name = src.split(":", 1)
        try:
            model, tokenizer = _plugin_sources()[prefix].load()(name)
        except ModelLoadError:
            raise
        except Exception as exc:  # a plugin's own error type: report it as a load failure, one line
            raise ModelLoadError(f"cannot load {src!r}: {exc}") from exc
        model.to(dtype).eval()
        return ModelHandle(model=model, tokenizer=tokenizer, source=src)
    path = Path(src)
    local = path.exists()
    if not local and (src.startswith((".", "/", "~")) or os.sep in src and src.count("/") > 1):
        raise ModelLoadError(f"model directory not found: {src}")
    if local:
        if not path.is_dir():
            raise ModelLoadError(f"model source must be a directory, got a file: {src}")
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{src} holds no config.json; not a transformers model directory")
        if not list(path.glob("*.safetensors")):
            unsafe = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
            why = f" (found {', '.join(unsafe)}: pickle-based weights are refused)" if unsafe else ""
            raise ModelLoadError(f"{src} holds no .safetensors weights{why}")
    kwargs = dict(trust_remote_code=trust_remote_code)
    try:
        config = transformers.AutoConfig.from_pretrained(src, **kwargs)
        cls = _auto_class(config, task)
        model = cls.from_pretrained(src, use_safetensors=True, dtype=dtype, **kwargs)
    except (OSError, ValueError, EnvironmentError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = "directory" if local else "hub id (no network or not cached?)"
        raise ModelLoadError(f"cannot load model from {where} {src!r}: {first}") from exc
    tokenizer = None
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(src, **kwargs)
    except (OSError, ValueError, EnvironmentError, TypeError):
        tokenizer = None
    model.eval()
    return ModelHandle(model=model, tokenizer=tokenizer, source=src)
