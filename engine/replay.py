"""The replayer: load a bundle's model, re-run the recorded computation under the recorded layout, and prove it.

The report compares, and names what differs:

* the model weights' sha256 with the recorded one (a changed weight is named ``weights``);
* the tokenizer's identity hash, and the re-tokenised prompt with the recorded input ids (``tokenizer``);
* the logits at every decision position (``logits``), bit for bit;
* every recorded activation, site by site, bit for bit, with the max absolute difference (``activation L.site``);
* for ``generate`` incidents, the greedy continuation re-generated from the prompt (``continuation``).

``bit_identical`` holds iff every check passes.
"""

from __future__ import annotations

import json
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .behaviour import greedy_continuation
from .bundle import IncidentBundle, open_bundle
from .errors import BundleError, ModelLoadError, ReplayError
from .hooks import forward_captured
from .layout import pinned_threads
from .models import ModelHandle, load_model, tokenizer_sha256

Progress = Callable[[int, int, str], None]


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""


@dataclass
class ReplayReport:
    bundle: str
    bit_identical: bool
    checks: list[Check]
    site_max_abs_diff: dict[str, float] = field(default_factory=dict)
    logits_max_abs_diff: float = 0.0
    threads: int = 1
    seconds: float = 0.0
    model_loaded_from: str = ""

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["failed"] = [c.name for c in self.failed]
        return d


def _tokenizer_from_bundle(bundle: IncidentBundle):
    import transformers

    if not bundle.tokenizer_files:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        for name in bundle.tokenizer_files:
            (Path(tmp) / name).write_bytes(bundle.tokenizer_file(name))
        try:
            return transformers.AutoTokenizer.from_pretrained(tmp)
        except Exception as exc:
            raise BundleError(f"embedded tokenizer cannot be loaded: {str(exc).splitlines()[0][:200]}") from None


def _model_from_embedded(bundle: IncidentBundle) -> torch.nn.Module:
    import transformers
    from safetensors.torch import load

    cfg = bundle.config()
    model_type = cfg.get("model_type")
    if model_type not in transformers.CONFIG_MAPPING:
        raise BundleError(f"/model: unknown model_type {model_type!r} in config")
    config = transformers.CONFIG_MAPPING[model_type].from_dict(cfg)
    if bundle.model_info["attn_implementation"]:
        config._attn_implementation = bundle.model_info["attn_implementation"]
    cls = getattr(transformers, bundle.model_info["class_name"], None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise BundleError(f"/model: class {bundle.model_info['class_name']!r} is not a transformers model class")
    try:
        state = load(bundle.weights_bytes())
    except Exception as exc:
        raise BundleError(f"/model/weights are not valid safetensors ({str(exc)[:120]})") from None
    dtype = getattr(torch, bundle.model_info["dtype"], None)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise BundleError(f"/model: dtype {bundle.model_info['dtype']!r} is not a torch floating-point dtype")
    with torch.device("cpu"):
        model = cls(config).to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise BundleError(f"/model/weights hold tensors the model does not have: {unexpected[:3]}")
    model.tie_weights()
    still = [k for k in missing if not _is_tied(model, k, state)]
    if still:
        raise BundleError(f"/model/weights miss tensors: {still[:3]}")
    return model.eval()


def _is_tied(model, key, state) -> bool:
    sd = model.state_dict()
    t = sd[key]
    return any(sd[k].data_ptr() == t.data_ptr() for k in state if k in sd and k != key)


def load_bundle_model(bundle: IncidentBundle, model_source: str | None = None) -> ModelHandle:
    """The bundle's model: from ``model_source`` if given, else its embedded weights, else its recorded source.

    The tokenizer is the one embedded in the bundle when there is one (the incident's identity), else the
    source's.
    """
    if model_source is None and bundle.has_embedded_weights:
        tokenizer = _tokenizer_from_bundle(bundle)
        if tokenizer is None:
            raise BundleError("the bundle embeds the model's weights but no tokenizer (/tokenizer/files is empty); "
                              "replay it with --model DIR, a folder holding the model and its tokenizer")
        handle = ModelHandle(model=_model_from_embedded(bundle), tokenizer=tokenizer, source="embedded")
    else:
        src = model_source or bundle.model_info["source"]
        if not src or src == "embedded":
            raise ReplayError("the bundle embeds no weights and names no model source; pass --model DIR")
        try:
            handle = load_model(src, task=bundle.model_info["task"] if bundle.model_info["task"] != "encoder"
                                else None)
        except ModelLoadError as exc:
            raise ReplayError(f"cannot load the bundle's model: {exc}") from None
        embedded_tok = _tokenizer_from_bundle(bundle)
        if embedded_tok is not None:
            handle.tokenizer = embedded_tok
    if bundle.model_info["attn_implementation"]:
        handle.model.config._attn_implementation = bundle.model_info["attn_implementation"]
    return handle


@contextmanager
def recorded_layout(bundle: IncidentBundle):
    """The recorded thread count, pinned as the recorder pinned it (:mod:`engine.layout`); restored afterwards."""
    want = int(bundle.environment.get("torch_num_threads", 0) or 0) or None
    with pinned_threads(want) as n:
        yield n


def bundle_inputs(bundle: IncidentBundle) -> dict[str, torch.Tensor]:
    enc = {"input_ids": torch.from_numpy(bundle.input_ids)[None],
           "attention_mask": torch.from_numpy(bundle.attention_mask)[None]}
    if bundle.token_type_ids is not None:
        enc["token_type_ids"] = torch.from_numpy(bundle.token_type_ids)[None]
    return enc


@torch.no_grad()
def replay(bundle: IncidentBundle | str | Path, *, model_source: str | None = None,
           progress: Progress | None = None, handle: ModelHandle | None = None) -> ReplayReport:
    """Replay a bundle and compare everything it recorded. See the module docstring."""
    own = not isinstance(bundle, IncidentBundle)
    b = open_bundle(bundle) if own else bundle
    try:
        t0 = time.perf_counter()
        checks: list[Check] = []
        if handle is None:
            handle = load_bundle_model(b, model_source)
        loaded_from = handle.source
        sha = handle.weights_sha256()
        checks.append(Check("weights", sha == b.model_info["weights_sha256"],
                            "sha256 matches" if sha == b.model_info["weights_sha256"] else
                            f"model weights differ from the recorded sha256 ({sha[:12]}… vs "
                            f"{b.model_info['weights_sha256'][:12]}…)"))
        tok_sha = tokenizer_sha256(handle.tokenizer)
        checks.append(Check("tokenizer", tok_sha == b.tokenizer_sha256,
                            "identity hash matches" if tok_sha == b.tokenizer_sha256 else
                            f"tokenizer differs from the recorded one ({tok_sha[:12]}… vs {b.tokenizer_sha256[:12]}…)"))
        ids = handle.tokenizer(b.prompt, return_tensors="pt")["input_ids"][0].numpy()
        same_ids = np.array_equal(ids, b.input_ids[: b.n_prompt_tokens])
        checks.append(Check("input_ids", same_ids, "prompt re-tokenises to the recorded ids" if same_ids else
                            "prompt re-tokenises to different ids than recorded"))
        enc = bundle_inputs(b)
        keys = [(i, s) for i in range(b.n_layers) for s in b.sites]
        report = ReplayReport(bundle=str(b.path), bit_identical=False, checks=checks, model_loaded_from=loaded_from)
        rec_d = int(b.model_info.get("d_model", handle.d_model))
        if handle.n_layers != b.n_layers or handle.d_model != rec_d:
            # another model altogether (``--model`` pointing elsewhere): nothing recorded can be compared
            checks.append(Check("architecture", False, f"the model has {handle.n_layers} blocks of width "
                                f"{handle.d_model}; the bundle recorded {b.n_layers} of width {rec_d}"))
            report.seconds = time.perf_counter() - t0
            return report
        with recorded_layout(b) as threads:
            report.threads = threads
            if progress:
                progress(0, len(keys) + 1, "replaying the recorded forward")
            out, acts = forward_captured(handle, keys, **enc)
            logits = out.logits
            dec = b.decision_positions
            got = (logits[0:1] if b.mode == "classify" else logits[0, dec]).float().numpy()
            if got.shape != b.logits.shape:
                checks.append(Check("logits", False, f"logits shape {got.shape} vs recorded {b.logits.shape}"))
            else:
                diff = float(np.abs(got - b.logits).max()) if got.size else 0.0
                report.logits_max_abs_diff = diff
                same = np.array_equal(got, b.logits)
                checks.append(Check("logits", same, "bit-identical" if same else f"max abs diff {diff:.3g}"))
            bad_sites = []
            for n, key in enumerate(keys):
                rec = b.activation(*key)
                now = acts[key][0].numpy()
                name = f"{key[0]}.{key[1]}"
                if rec.shape != now.shape:
                    report.site_max_abs_diff[name] = float("inf")
                    bad_sites.append(f"{name} (shape {rec.shape} vs {now.shape})")
                    continue
                d = float(np.abs(rec.astype(np.float64) - now.astype(np.float64)).max()) if rec.size else 0.0
                report.site_max_abs_diff[name] = d
                if not np.array_equal(rec, now):
                    bad_sites.append(f"{name} (max abs diff {d:.3g})")
                if progress:
                    progress(n + 1, len(keys) + 1, f"compared {name}")
            checks.append(Check("activations", not bad_sites,
                                f"all {len(keys)} recorded sites bit-identical" if not bad_sites else
                                "recorded activations differ at " + ", ".join(bad_sites[:6]) +
                                (f" and {len(bad_sites) - 6} more" if len(bad_sites) > 6 else "")))
            if b.mode == "generate":
                # one token past the recorded continuation is enough to see a difference (and keeps a bundle whose
                # max_new_tokens is absurd from generating past the model's position limit)
                n_gen = min(b.max_new_tokens, len(b.continuation_ids) + 1)
                cont = greedy_continuation(handle, enc["input_ids"][:, : b.n_prompt_tokens], n_gen)
                same = cont == b.continuation_ids.tolist()
                checks.append(Check("continuation", same, "greedy continuation re-generated identically" if same
                                    else f"continuation differs: {handle.tokenizer.decode(cont)!r}"))
        report.bit_identical = all(c.ok for c in checks)
        report.seconds = time.perf_counter() - t0
        if progress:
            progress(len(keys) + 1, len(keys) + 1, "replay verified" if report.bit_identical else "replay differs")
        return report
    finally:
        if own:
            b.close()


def report_json(report: ReplayReport) -> str:
    return json.dumps(report.to_dict(), indent=None, sort_keys=True)
