"""Reading incident bundles: lazy, validating, never unpickling.

Opening a bundle reads attributes and the small datasets (inputs, outputs, prompts) and checks them; activation
data is read only when asked for, and only the requested slice. Anything malformed raises a subclass of
:class:`~engine.errors.BundleError` that names the problem.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from ..errors import BundleContentError, BundleError, BundleFormatError, BundleVersionError
from .schema import (ACTIVATION_SITES, ATTN_IMPLEMENTATIONS, FORMAT_NAME, MAX_THREADS, PROMPT_SETS, RECORD_MODES,
                     STAT_SITES, SUPPORTED_VERSIONS, layer_group)

_INT_KINDS = "iu"
_FLOAT_KINDS = "f"


class IncidentBundle:
    """An open incident bundle (read-only). Use as a context manager or call :meth:`close`.

    Example:
        >>> with IncidentBundle("incident.h5") as b:  # doctest: +SKIP
        ...     b.prompt, b.failure_spec, b.activation(2, "mlp", slice(0, 4)).shape
        ('User: ...', 'contains:HACKED', (4, 256))
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise BundleFormatError(f"bundle not found: {self.path}")
        if self.path.is_dir():
            raise BundleFormatError(f"bundle path is a folder, not a file: {self.path}")
        try:
            self._f = h5py.File(self.path, "r")
        except (OSError, ValueError) as exc:
            raise BundleFormatError(f"{self.path.name} is not a readable HDF5 file ({_short(exc)})") from None
        try:
            self._validate()
        except BundleError:
            self.close()
            raise
        except Exception as exc:  # h5py raises many types on corrupt metadata; name it, never crash
            self.close()
            raise BundleContentError(f"{self.path.name}: corrupt bundle structure ({type(exc).__name__}: "
                                     f"{_short(exc)})") from None

    # ----- lifecycle -------------------------------------------------------------------------------------------
    def close(self) -> None:
        f = getattr(self, "_f", None)
        if f is not None:
            try:
                f.close()
            except Exception:
                pass
            self._f = None

    def __enter__(self) -> "IncidentBundle":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----- validation ------------------------------------------------------------------------------------------
    def _attr(self, obj, name: str, kind: type | tuple, where: str):
        if name not in obj.attrs:
            raise BundleContentError(f"{where}: missing attribute {name!r}")
        value = obj.attrs[name]
        if isinstance(value, bytes):
            value = _utf8(value, f"{where}: attribute {name!r}")
        if isinstance(value, np.generic):
            value = value.item()
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind is int and isinstance(value, (bool, np.bool_)):
            raise BundleContentError(f"{where}: attribute {name!r} must be an integer")
        if not isinstance(value, kind):
            raise BundleContentError(f"{where}: attribute {name!r} has type {type(value).__name__}")
        if isinstance(value, float) and not np.isfinite(value):
            raise BundleContentError(f"{where}: attribute {name!r} is not finite ({value})")
        return value

    def _group(self, name: str) -> h5py.Group:
        obj = self._f.get(name)
        if obj is None:
            raise BundleContentError(f"missing group /{name}")
        if not isinstance(obj, h5py.Group):
            raise BundleContentError(f"/{name} must be a group")
        return obj

    def _dataset(self, group: h5py.Group, name: str, kinds: str, ndim: int | None, where: str) -> h5py.Dataset:
        obj = group.get(name)
        if obj is None:
            raise BundleContentError(f"{where}: missing dataset {name!r}")
        if not isinstance(obj, h5py.Dataset):
            raise BundleContentError(f"{where}/{name} must be a dataset")
        if kinds == "str":
            if h5py.check_string_dtype(obj.dtype) is None:
                raise BundleContentError(f"{where}/{name} must hold UTF-8 strings, has dtype {obj.dtype}")
        elif obj.dtype.kind not in kinds:
            raise BundleContentError(f"{where}/{name} has dtype {obj.dtype}; expected kind {kinds!r}")
        if ndim is not None and obj.ndim != ndim:
            raise BundleContentError(f"{where}/{name} has {obj.ndim} dimensions; expected {ndim}")
        return obj

    def _read_text(self, group, name, where) -> str:
        ds = self._dataset(group, name, "str", 0, where)
        v = ds[()]
        return _utf8(v, f"{where}/{name}") if isinstance(v, bytes) else str(v)

    def _read_texts(self, group, name, where) -> list[str]:
        ds = self._dataset(group, name, "str", 1, where)
        return [_utf8(v, f"{where}/{name}") if isinstance(v, bytes) else str(v) for v in ds[()]]

    def _finite(self, arr: np.ndarray, where: str) -> np.ndarray:
        if arr.dtype.kind == "f" and arr.size and not np.isfinite(arr).all():
            raise BundleContentError(f"{where} holds NaN or infinite values")
        return arr

    def _validate(self) -> None:
        f = self._f
        fmt = f.attrs.get("format")
        if isinstance(fmt, bytes):
            fmt = fmt.decode("utf-8", "replace")  # only compared with FORMAT_NAME; a bad byte cannot match
        if fmt != FORMAT_NAME:
            raise BundleFormatError(f"{self.path.name} is HDF5 but not an incident bundle (format={fmt!r})")
        version = f.attrs.get("schema_version")
        if isinstance(version, np.generic):
            version = version.item()
        if not isinstance(version, int) or isinstance(version, bool) or version not in SUPPORTED_VERSIONS:
            raise BundleVersionError(f"{self.path.name}: schema version {version!r} is not supported "
                                     f"(this program reads {', '.join(map(str, SUPPORTED_VERSIONS))})")
        self.schema_version = version
        self.uuid = self._attr(f, "uuid", str, "/")
        self.created = self._attr(f, "created", str, "/")
        self.program = self._attr(f, "program", str, "/")
        self.scenario = self._attr(f, "scenario", str, "/") if "scenario" in f.attrs else ""

        m = self._group("model")
        self.model_info = {k: self._attr(m, k, str, "/model") for k in (
            "source", "class_name", "family", "task", "dtype", "config_json", "weights_sha256",
            "attn_implementation")}
        for k in ("n_layers", "d_model", "n_heads", "d_head", "d_mlp"):
            v = self._attr(m, k, int, "/model")
            if v <= 0:
                raise BundleContentError(f"/model: attribute {k!r} must be positive, is {v}")
            self.model_info[k] = v
        try:
            config = json.loads(self.model_info["config_json"])
        except ValueError:
            raise BundleContentError("/model: config_json is not valid JSON") from None
        if not isinstance(config, dict):
            raise BundleContentError(f"/model: config_json must be a JSON object, is a {type(config).__name__}")
        if self.model_info["attn_implementation"] not in ATTN_IMPLEMENTATIONS:
            raise BundleContentError(f"/model: unknown attn_implementation {self.model_info['attn_implementation']!r} "
                                     f"(expected one of {', '.join(map(repr, ATTN_IMPLEMENTATIONS))})")
        self.id2label = None
        if "id2label_json" in m.attrs:
            try:
                self.id2label = {int(k): str(v) for k, v in
                                 json.loads(self._attr(m, "id2label_json", str, "/model")).items()}
            except (ValueError, AttributeError):
                raise BundleContentError("/model: id2label_json is not a JSON object of labels") from None
        self.has_embedded_weights = "weights" in m
        if self.has_embedded_weights:
            self._bytes_dataset(m, "weights", "/model")

        t = self._group("tokenizer")
        self.tokenizer_sha256 = self._attr(t, "sha256", str, "/tokenizer")
        self.tokenizer_class = self._attr(t, "class_name", str, "/tokenizer")
        files = t.get("files")
        if files is not None and not isinstance(files, h5py.Group):
            raise BundleContentError("/tokenizer/files must be a group")
        self.tokenizer_files = sorted(files) if files is not None else []
        for name in self.tokenizer_files:
            self._bytes_dataset(files, name, "/tokenizer/files")

        g = self._group("input")
        self.prompt = self._read_text(g, "prompt", "/input")
        self.input_ids = self._dataset(g, "input_ids", _INT_KINDS, 1, "/input")[()].astype(np.int64)
        self.attention_mask = self._dataset(g, "attention_mask", _INT_KINDS, 1, "/input")[()].astype(np.int64)
        self.token_type_ids = (self._dataset(g, "token_type_ids", _INT_KINDS, 1, "/input")[()].astype(np.int64)
                               if "token_type_ids" in g else None)
        self.tokens = self._read_texts(g, "tokens", "/input")
        n = self.input_ids.shape[0]
        if n == 0:
            raise BundleContentError("/input/input_ids is empty")
        for name, arr in (("attention_mask", self.attention_mask), ("token_type_ids", self.token_type_ids)):
            if arr is not None and arr.shape != (n,):
                raise BundleContentError(f"/input/{name} has shape {arr.shape}; expected ({n},)")
        if len(self.tokens) != n:
            raise BundleContentError(f"/input/tokens has {len(self.tokens)} entries; expected {n}")
        if self.input_ids.min() < 0:
            raise BundleContentError("/input/input_ids holds negative token ids")
        vocab = config.get("vocab_size")
        if isinstance(vocab, int) and not isinstance(vocab, bool) and vocab > 0 and self.input_ids.max() >= vocab:
            raise BundleContentError(f"/input/input_ids holds token id {int(self.input_ids.max())}, outside the "
                                     f"model's vocabulary (vocab_size {vocab} in /model config_json)")
        self.n_prompt_tokens = self._attr(g, "n_prompt_tokens", int, "/input")
        if not 0 < self.n_prompt_tokens <= n:
            raise BundleContentError(f"/input: n_prompt_tokens={self.n_prompt_tokens} outside 1..{n}")
        self.mode = self._attr(g, "mode", str, "/input")
        if self.mode not in RECORD_MODES:
            raise BundleContentError(f"/input: unknown record mode {self.mode!r}")

        o = self._group("output")
        self.logits = self._finite(self._dataset(o, "logits", _FLOAT_KINDS, 2, "/output")[()], "/output/logits")
        self.decision_positions = self._dataset(o, "decision_positions", _INT_KINDS, 1, "/output")[()]
        if self.decision_positions.shape[0] != self.logits.shape[0]:
            raise BundleContentError("/output: decision_positions and logits disagree in length")
        if self.decision_positions.size and (self.decision_positions.min() < 0 or
                                             self.decision_positions.max() >= n):
            raise BundleContentError("/output/decision_positions point outside the input")
        self.continuation_ids = self._dataset(o, "continuation_ids", _INT_KINDS, 1, "/output")[()]
        k = self.continuation_ids.shape[0]
        if self.mode == "generate":
            if self.n_prompt_tokens + k != n or not np.array_equal(self.continuation_ids,
                                                                   self.input_ids[self.n_prompt_tokens:]):
                raise BundleContentError("/output/continuation_ids must be the input_ids after the prompt "
                                         f"(generate mode: {k} ids, {n - self.n_prompt_tokens} input ids after "
                                         "the prompt)")
        elif k:
            raise BundleContentError(f"/output/continuation_ids must be empty in {self.mode} mode, has {k} ids")
        self.continuation_text = self._read_text(o, "continuation_text", "/output")
        self.label = self._attr(o, "label", str, "/output") or None

        fg = self._group("failure")
        self.failure_spec = self._attr(fg, "spec", str, "/failure")
        self.failing = bool(self._attr(fg, "failing", (bool, np.bool_), "/failure"))
        self.failure_metric = self._attr(fg, "metric", float, "/failure")
        self.expected = self._attr(fg, "expected", str, "/failure")
        self.max_new_tokens = self._attr(fg, "max_new_tokens", int, "/failure")
        if not k <= self.max_new_tokens:
            raise BundleContentError(f"/failure: max_new_tokens={self.max_new_tokens} is less than the "
                                     f"{k} recorded continuation ids")
        self.target_start = self._attr(fg, "target_start", int, "/failure")
        self.target_length = self._attr(fg, "target_length", int, "/failure")
        self.target_index = self._attr(fg, "target_index", int, "/failure")
        self.failure_words = tuple(self._read_texts(fg, "wordlist", "/failure")) if "wordlist" in fg else ()
        from ..failure import FailureSpec, FailureSpecError

        try:
            self.failure = FailureSpec.parse(self.failure_spec, words=self.failure_words or None)
        except FailureSpecError as exc:
            raise BundleContentError(f"/failure: {exc}") from None
        if self.target_start >= 0 and self.target_start + self.target_length > n:
            raise BundleContentError("/failure: failing span lies outside the input")

        a = self._group("activations")
        self.n_layers = self.model_info["n_layers"]
        sites = a.attrs.get("sites")
        if sites is None:
            raise BundleContentError("/activations: missing attribute 'sites'")
        try:
            self.sites = tuple(s.decode() if isinstance(s, bytes) else str(s) for s in np.atleast_1d(sites))
        except Exception:
            raise BundleContentError("/activations: attribute 'sites' must be an array of strings") from None
        if not set(self.sites) <= set(ACTIVATION_SITES):
            raise BundleContentError(f"/activations: unknown sites {sorted(set(self.sites) - set(ACTIVATION_SITES))}")
        if list(self.sites) != [s for s in ACTIVATION_SITES if s in self.sites]:
            raise BundleContentError(f"/activations: sites {list(self.sites)} must be distinct and in the order "
                                     f"{', '.join(ACTIVATION_SITES)}")
        self._activations = a
        d = self.model_info["d_model"]
        for i in range(self.n_layers):
            grp = a.get(layer_group(i))
            if not isinstance(grp, h5py.Group):
                raise BundleContentError(f"/activations/{layer_group(i)} missing")
            for site in self.sites:
                ds = self._dataset(grp, site, _FLOAT_KINDS, 2, f"/activations/{layer_group(i)}")
                if ds.shape != (n, d):
                    raise BundleContentError(f"/activations/{layer_group(i)}/{site} has shape {ds.shape}; "
                                             f"expected ({n}, {d})")

        p = self._f.get("prompts")
        self.prompt_sets: dict[str, list[str]] = {}
        if p is not None:
            if not isinstance(p, h5py.Group):
                raise BundleContentError("/prompts must be a group")
            for name in p:
                if name not in PROMPT_SETS:
                    raise BundleContentError(f"/prompts: unknown prompt set {name!r}")
                self.prompt_sets[name] = self._read_texts(p, name, "/prompts")

        self.has_benign = "benign" in self._f
        if self.has_benign:
            bg = self._group("benign")
            self.benign_prompts = self._read_texts(bg, "prompts", "/benign")
            self.benign_outputs = self._read_texts(bg, "outputs", "/benign")
            if len(self.benign_outputs) != len(self.benign_prompts):
                raise BundleContentError("/benign: prompts and outputs differ in length")
            self._benign = bg
            self._validate_benign(bg, len(self.benign_prompts))

        e = self._group("environment")
        self.environment = {}
        for k, v in e.attrs.items():
            if isinstance(v, np.generic):
                v = v.item()
            if isinstance(v, bytes):
                v = v.decode("utf-8", "replace")
            self.environment[k] = v.tolist() if isinstance(v, np.ndarray) else v
        if "torch_num_threads" in e.attrs:
            t = self._attr(e, "torch_num_threads", int, "/environment")
            if not 1 <= t <= MAX_THREADS:
                raise BundleContentError(f"/environment: torch_num_threads={t} outside 1..{MAX_THREADS}")
            self.environment["torch_num_threads"] = t

    def _bytes_dataset(self, group: h5py.Group, name: str, where: str) -> h5py.Dataset:
        """A 1-D uint8 dataset holding a file's raw bytes (embedded weights, tokenizer files)."""
        ds = self._dataset(group, name, "u", 1, where)
        if ds.dtype.itemsize != 1:
            raise BundleContentError(f"{where}/{name} has dtype {ds.dtype}; expected uint8 (raw bytes)")
        return ds

    def _validate_benign(self, bg: h5py.Group, r: int) -> None:
        """Metadata of the optional benign items (kinds and shapes; values are checked when read)."""
        if "failing" in bg:
            ds = self._dataset(bg, "failing", "b", 1, "/benign")
            if ds.shape != (r,):
                raise BundleContentError(f"/benign/failing has shape {ds.shape}; expected ({r},)")
        n_pos = None
        if "pos_counts" in bg:
            ds = self._dataset(bg, "pos_counts", _INT_KINDS, 1, "/benign")
            n_pos = ds.shape[0]
            if n_pos and ds[()].min() < 0:
                raise BundleContentError("/benign/pos_counts holds negative counts")
        stats = bg.get("stats")
        if stats is None:
            return
        if not isinstance(stats, h5py.Group):
            raise BundleContentError("/benign/stats must be a group")
        mi = self.model_info
        shapes = {s: (mi["d_model"],) for s in ACTIVATION_SITES}
        shapes.update(head=(mi["n_heads"], mi["d_head"]), neuron=(mi["d_mlp"],))
        for i in range(self.n_layers):
            grp = stats.get(layer_group(i))
            if grp is None:
                continue
            where = f"/benign/stats/{layer_group(i)}"
            if not isinstance(grp, h5py.Group):
                raise BundleContentError(f"{where} must be a group")
            for site in STAT_SITES:
                for name, per_pos in ((f"{site}_mean", False), (f"{site}_pos_mean", True)):
                    if name not in grp:
                        continue
                    want = shapes[site]
                    ds = self._dataset(grp, name, _FLOAT_KINDS, len(want) + per_pos, where)
                    if per_pos and (n_pos is None or ds.shape != (n_pos, *want)):
                        raise BundleContentError(f"{where}/{name} has shape {ds.shape}; expected "
                                                 f"{('P', *want) if n_pos is None else (n_pos, *want)} "
                                                 "(P = length of /benign/pos_counts)")
                    if not per_pos and ds.shape != want:
                        raise BundleContentError(f"{where}/{name} has shape {ds.shape}; expected {want}")

    # ----- data access ------------------------------------------------------------------------------------------
    @property
    def n_positions(self) -> int:
        return int(self.input_ids.shape[0])

    def activation_dataset(self, layer: int, site: str) -> h5py.Dataset:
        """The lazy HDF5 dataset ``[pos, d_model]`` of a recorded site (for views that slice it themselves)."""
        if site not in self.sites:
            raise BundleContentError(f"site {site!r} was not recorded (recorded: {', '.join(self.sites)})")
        if not 0 <= layer < self.n_layers:
            raise BundleContentError(f"layer {layer} outside 0..{self.n_layers - 1}")
        return self._activations[layer_group(layer)][site]

    def activation(self, layer: int, site: str, positions=slice(None), dims=slice(None)) -> np.ndarray:
        """Read only ``[positions, dims]`` of a recorded activation; raises on NaN/inf in what was read."""
        try:
            arr = self.activation_dataset(layer, site)[positions, dims]
        except BundleError:
            raise
        except Exception as exc:
            raise BundleContentError(f"cannot read /activations/{layer_group(layer)}/{site}: {_short(exc)}") \
                from None
        return self._finite(np.asarray(arr), f"/activations/{layer_group(layer)}/{site}")

    def benign_mean(self, layer: int, site: str, per_position: bool = False) -> np.ndarray | None:
        """Mean of a site over the benign reference runs (``[*shape]``, or ``[max_pos, *shape]`` per position)."""
        if not self.has_benign:
            return None
        grp = self._benign.get("stats/" + layer_group(layer))
        name = f"{site}_pos_mean" if per_position else f"{site}_mean"
        if grp is None or name not in grp:
            return None
        return self._finite(np.asarray(grp[name][()]), f"/benign/stats/{layer_group(layer)}/{name}")

    def benign_position_counts(self) -> np.ndarray | None:
        if not self.has_benign or "pos_counts" not in self._benign:
            return None
        return np.asarray(self._benign["pos_counts"][()])

    def weights_bytes(self) -> bytes | None:
        if not self.has_embedded_weights:
            return None
        return self._f["model/weights"][()].tobytes()

    def tokenizer_file(self, name: str) -> bytes:
        return self._f["tokenizer/files"][name][()].tobytes()

    def config(self) -> dict:
        return json.loads(self.model_info["config_json"])

    def validate(self, deep: bool = True) -> None:
        """Full check: with ``deep`` every activation dataset is read and checked for NaN/inf."""
        if deep:
            for i in range(self.n_layers):
                for site in self.sites:
                    self.activation(i, site)
            if self.has_embedded_weights:
                try:
                    self.weights_bytes()
                except Exception as exc:
                    raise BundleContentError(f"/model/weights unreadable: {_short(exc)}") from None


def _utf8(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BundleContentError(f"{where} is not valid UTF-8") from None


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def open_bundle(path: str | Path) -> IncidentBundle:
    """Open and validate a bundle (lazy: no activation data is read)."""
    return IncidentBundle(path)
