"""Writing incident bundles: everything goes to a temporary file beside the target, renamed when complete."""

from __future__ import annotations

import json
import os
import uuid as uuidlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np

from .. import __version__
from ..atomic import written_to_temp
from ..errors import BundleError
from .schema import (ACTIVATION_COMPRESSION, CHUNK_POSITIONS, FORMAT_NAME, SCHEMA_VERSION, layer_group)

STR = h5py.string_dtype("utf-8")


@dataclass
class ModelInfo:
    source: str
    class_name: str
    family: str
    task: str
    dtype: str
    config_json: str
    weights_sha256: str
    attn_implementation: str
    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    d_mlp: int
    weights_safetensors: bytes | None = None  # embedded weights (small models)
    id2label: dict | None = None


@dataclass
class TokenizerInfo:
    sha256: str
    class_name: str
    files: dict[str, bytes] = field(default_factory=dict)  # embedded tokenizer files (json / txt only)


@dataclass
class RunRecord:
    """The recorded failing run.

    Arrays: ``input_ids``/``attention_mask`` ``[pos]`` int64 (the recorded forward's input: prompt, plus the
    greedy continuation in ``generate`` mode); ``logits`` ``[n_decision, vocab_or_labels]`` float32;
    ``activations[(layer, site)]`` ``[pos, d_model]`` in the model dtype.
    """

    prompt: str
    mode: str
    input_ids: np.ndarray
    attention_mask: np.ndarray
    n_prompt_tokens: int
    tokens: list[str]
    logits: np.ndarray
    decision_positions: np.ndarray
    continuation_ids: np.ndarray
    continuation_text: str
    label: str | None
    activations: dict[tuple[int, str], np.ndarray]
    token_type_ids: np.ndarray | None = None


@dataclass
class FailureRecord:
    spec: str
    failing: bool
    metric: float
    expected: str
    max_new_tokens: int
    span_chars: tuple[int, int] | None = None  # in the continuation text
    target_start: int = -1  # token index (in input_ids) where the failing span starts
    target_length: int = 0
    target_index: int = -1  # vocab / class index for token:/label:
    words: tuple[str, ...] = ()


@dataclass
class BenignRecord:
    prompts: list[str]
    outputs: list[str]
    failing: list[bool]
    #: per (layer, site): (sum over tokens [*shape] float64, per-position sum [max_pos, *shape], per-position count)
    sums: dict[tuple[int, str], np.ndarray]
    pos_sums: dict[tuple[int, str], np.ndarray]
    pos_counts: np.ndarray
    token_count: int


@dataclass
class Incident:
    model: ModelInfo
    tokenizer: TokenizerInfo
    run: RunRecord
    failure: FailureRecord
    environment: dict
    benign: BenignRecord | None = None
    prompts: dict[str, list[str]] = field(default_factory=dict)
    scenario: str = ""
    uuid: str = field(default_factory=lambda: str(uuidlib.uuid4()))
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))


def _text(group: h5py.Group, name: str, value: str) -> None:
    group.create_dataset(name, data=value, dtype=STR)


def _texts(group: h5py.Group, name: str, values: list[str]) -> None:
    group.create_dataset(name, data=np.array(list(values), dtype=object), dtype=STR, shape=(len(values),))


def _enc(obj: h5py.HLObject, kind: str) -> None:
    obj.attrs["encoding-type"] = kind
    obj.attrs["encoding-version"] = "1"


def write_bundle(path: str | os.PathLike, incident: Incident) -> Path:
    """Write ``incident`` to ``path`` atomically (temporary file in the same folder, then ``os.replace``).

    On any exception (``KeyboardInterrupt`` included) the temporary file is deleted and a file already under
    ``path`` is left untouched.

    Raises:
        BundleError: the target folder does not exist, or the file cannot be created, written or renamed there
            (not writable, disk full, ``path`` is a folder).
    """
    path = Path(path)
    if not path.parent.exists():
        raise BundleError(f"folder does not exist: {path.parent}")
    try:
        with written_to_temp(path) as tmp, h5py.File(tmp, "w", libver="latest") as f:
            _write(f, incident)
    except OSError as exc:
        raise BundleError(f"cannot write bundle {path}: {exc.strerror or str(exc).splitlines()[0][:200]}") from None
    return path


def _write(f: h5py.File, inc: Incident) -> None:
    f.attrs["format"] = FORMAT_NAME
    f.attrs["schema_version"] = SCHEMA_VERSION
    f.attrs["created"] = inc.created
    f.attrs["uuid"] = inc.uuid
    f.attrs["program"] = f"model-forensics-workbench {__version__}"
    f.attrs["scenario"] = inc.scenario
    _enc(f, "incident-bundle")

    m = f.create_group("model")
    _enc(m, "model")
    for key in ("source", "class_name", "family", "task", "dtype", "config_json", "weights_sha256",
                "attn_implementation"):
        m.attrs[key] = getattr(inc.model, key)
    for key in ("n_layers", "d_model", "n_heads", "d_head", "d_mlp"):
        m.attrs[key] = int(getattr(inc.model, key))
    if inc.model.id2label:
        m.attrs["id2label_json"] = json.dumps({str(k): v for k, v in inc.model.id2label.items()})
    if inc.model.weights_safetensors is not None:
        w = m.create_dataset("weights", data=np.frombuffer(inc.model.weights_safetensors, dtype=np.uint8))
        w.attrs["format"] = "safetensors"
        w.attrs["long_name"] = "embedded model weights (safetensors file bytes)"

    t = f.create_group("tokenizer")
    _enc(t, "tokenizer")
    t.attrs["sha256"] = inc.tokenizer.sha256
    t.attrs["class_name"] = inc.tokenizer.class_name
    files = t.create_group("files")
    for name, data in sorted(inc.tokenizer.files.items()):
        files.create_dataset(name, data=np.frombuffer(data, dtype=np.uint8))

    r = inc.run
    g = f.create_group("input")
    _enc(g, "input")
    _text(g, "prompt", r.prompt)
    g.create_dataset("input_ids", data=r.input_ids.astype(np.int64))
    g.create_dataset("attention_mask", data=r.attention_mask.astype(np.int64))
    if r.token_type_ids is not None:
        g.create_dataset("token_type_ids", data=r.token_type_ids.astype(np.int64))
    _texts(g, "tokens", r.tokens)
    g.attrs["n_prompt_tokens"] = int(r.n_prompt_tokens)
    g.attrs["mode"] = r.mode

    o = f.create_group("output")
    _enc(o, "output")
    lg = o.create_dataset("logits", data=r.logits.astype(np.float32))
    lg.attrs["long_name"] = "logits at the decision positions"
    lg.attrs["units"] = "logit"
    o.create_dataset("decision_positions", data=r.decision_positions.astype(np.int64))
    o.create_dataset("continuation_ids", data=r.continuation_ids.astype(np.int64))
    _text(o, "continuation_text", r.continuation_text)
    o.attrs["label"] = r.label or ""

    fl = inc.failure
    fg = f.create_group("failure")
    _enc(fg, "failure")
    fg.attrs["spec"] = fl.spec
    fg.attrs["failing"] = bool(fl.failing)
    fg.attrs["metric"] = float(fl.metric)
    fg.attrs["expected"] = fl.expected
    fg.attrs["max_new_tokens"] = int(fl.max_new_tokens)
    fg.attrs["span_chars"] = np.array(fl.span_chars if fl.span_chars else (-1, -1), dtype=np.int64)
    fg.attrs["target_start"] = int(fl.target_start)
    fg.attrs["target_length"] = int(fl.target_length)
    fg.attrs["target_index"] = int(fl.target_index)
    if fl.words:
        _texts(fg, "wordlist", list(fl.words))

    a = f.create_group("activations")
    _enc(a, "activations")
    sites = sorted({s for _, s in r.activations})
    layers = sorted({i for i, _ in r.activations})
    a.attrs["n_layers"] = len(layers)
    a.attrs["sites"] = np.array([s for s in ("resid_pre", "attn", "mlp", "resid_post") if s in sites], dtype=STR)
    a.attrs["n_positions"] = int(r.input_ids.shape[0])
    for i in layers:
        lgp = a.create_group(layer_group(i))
        for site in ("resid_pre", "attn", "mlp", "resid_post"):
            if (i, site) not in r.activations:
                continue
            arr = np.ascontiguousarray(r.activations[(i, site)])
            prev = r.activations.get((i - 1, "resid_post"))
            if site == "resid_pre" and i > 0 and prev is not None and np.array_equal(prev, arr) \
                    and prev.dtype == arr.dtype:
                # bit-identical by construction (block i-1's output is block i's input): one copy, a hard link
                lgp[site] = a[layer_group(i - 1)]["resid_post"]
                continue
            chunks = (min(CHUNK_POSITIONS, arr.shape[0]), arr.shape[1]) if arr.size else None
            ds = lgp.create_dataset(site, data=arr, chunks=chunks, **(ACTIVATION_COMPRESSION if arr.size else {}))
            _enc(ds, "activation")
            ds.attrs["long_name"] = f"block {i} {site}"
            ds.attrs["units"] = "activation (model units)"
            ds.attrs["dims"] = np.array(["position", "d_model"], dtype=STR)

    p = f.create_group("prompts")
    _enc(p, "prompts")
    for name, values in inc.prompts.items():
        _texts(p, name, list(values))

    if inc.benign is not None:
        b = inc.benign
        bg = f.create_group("benign")
        _enc(bg, "benign")
        bg.attrs["n_runs"] = len(b.prompts)
        bg.attrs["token_count"] = int(b.token_count)
        _texts(bg, "prompts", b.prompts)
        _texts(bg, "outputs", b.outputs)
        bg.create_dataset("failing", data=np.array(b.failing, dtype=bool))
        bg.create_dataset("pos_counts", data=b.pos_counts.astype(np.int64))
        st = bg.create_group("stats")
        for (i, site), total in sorted(b.sums.items()):
            lgp = st.require_group(layer_group(i))
            d = lgp.create_dataset(f"{site}_mean", data=(total / max(b.token_count, 1)).astype(np.float64))
            d.attrs["long_name"] = f"mean of block {i} {site} over benign tokens"
            pos = b.pos_sums[(i, site)]
            counts = b.pos_counts.reshape(-1, *([1] * (pos.ndim - 1)))
            lgp.create_dataset(f"{site}_pos_mean", data=(pos / np.maximum(counts, 1)).astype(np.float64))

    e = f.create_group("environment")
    _enc(e, "environment")
    for key, value in sorted(inc.environment.items()):
        e.attrs[key] = value if isinstance(value, (bool, int, float)) else str(value)
