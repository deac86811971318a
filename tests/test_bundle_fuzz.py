"""Fuzzing the bundle reader: hundreds of malformed bundles derived from one valid tiny GPT-2 bundle.

Every malformed bundle must either raise a :class:`BundleError` (from ``open_bundle`` or ``validate(deep=True)``)
or, when the mutation is harmless, open and validate. Never another exception, never a hang (an alarm guards each
example), never code execution (a pickled payload would create a sentinel file if it were ever unpickled).

Mutations that the schema makes fatal (a required group/dataset/attribute deleted, a validated dataset of the
wrong dtype kind or rank, NaN in logits/activations/float attributes, an unknown version or format name, a
truncated file) are asserted to raise.
"""

from __future__ import annotations

import atexit
import os
import pickle
import shutil
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import TINY_PROMPT, make_tiny_gpt2
from engine.bundle import open_bundle, write_bundle
from engine.bundle.schema import FORMAT_NAME
from engine.errors import BundleError, BundleFormatError, BundleVersionError
from engine.recorder import record_incident

FUZZ = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))

_WORK = Path(tempfile.mkdtemp(prefix="bundle-fuzz-"))
atexit.register(shutil.rmtree, _WORK, ignore_errors=True)  # also when this module is collected but not run
SENTINEL = _WORK / "PWNED"
BASE = _WORK / "base.h5"
TARGET = _WORK / "mutant.h5"


class _Exploit:
    """Unpickling this runs a shell command that creates ``target`` (default :data:`SENTINEL`)."""

    def __init__(self, target: Path = SENTINEL):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch '{self.target}'",))


PAYLOAD = pickle.dumps(_Exploit())
#: protocol 0 is ASCII without NUL bytes, so it fits an HDF5 variable-length string
PAYLOAD_TEXT = pickle.dumps(_Exploit(), protocol=0).decode("ascii")
assert b"system" in PAYLOAD and "system" in PAYLOAD_TEXT and "\0" not in PAYLOAD_TEXT


def _walk(group: h5py.Group, out: dict) -> None:
    """Every link (hard links included, so both names of the resid_pre/resid_post dataset appear)."""
    for name in group:
        obj = group[name]
        path = f"{group.name.rstrip('/')}/{name}"
        out[path] = obj
        if isinstance(obj, h5py.Group):
            _walk(obj, out)


def _build_base():
    inc = record_incident(make_tiny_gpt2(), TINY_PROMPT, "contains:HACKED", max_new_tokens=4, embed_weights=True,
                          benign_prompts=["the cat sat on the mat", "hello world"],
                          prompt_sets={"counterpart": ["the cat sat on the mat"]})
    write_bundle(BASE, inc)
    groups, datasets, attrs = [], {}, []
    with h5py.File(BASE, "r") as f:
        objs: dict = {}
        _walk(f, objs)
        attrs += [("/", k) for k in f.attrs]
        for path, obj in sorted(objs.items()):
            if isinstance(obj, h5py.Group):
                groups.append(path)
            else:
                datasets[path] = (obj.dtype.kind if h5py.check_string_dtype(obj.dtype) is None else "str",
                                  obj.ndim)
            attrs += [(path, k) for k in obj.attrs]
    return groups, datasets, sorted(attrs)


GROUPS, DATASETS, ATTRS = _build_base()
ALL_OBJECTS = sorted([*GROUPS, *DATASETS])
FLOAT_DATASETS = sorted(p for p, (k, _) in DATASETS.items() if k == "f")
#: hard links: layer_i/resid_pre is layer_{i-1}/resid_post (one dataset, two names)
ALIASES = {f"/activations/layer_{i:03d}/resid_pre": f"/activations/layer_{i - 1:03d}/resid_post" for i in range(1, 64)}
ALIASES.update({v: k for k, v in list(ALIASES.items())})
LAYERS = sorted(p for p in GROUPS if p.startswith("/activations/layer_"))

REQUIRED_GROUPS = {"/model", "/tokenizer", "/input", "/output", "/failure", "/activations", "/environment", "/benign",
                   *LAYERS}
REQUIRED_DATASETS = {"/input/prompt", "/input/input_ids", "/input/attention_mask", "/input/tokens", "/output/logits",
                     "/output/decision_positions", "/output/continuation_ids", "/output/continuation_text",
                     "/benign/prompts", "/benign/outputs",
                     *(p for p in DATASETS if p.startswith("/activations/"))}
# datasets the reader checks (dtype kind and rank) when they are present
VALIDATED_DATASETS = REQUIRED_DATASETS | {p for p in DATASETS if p.startswith(("/prompts/", "/tokenizer/files/"))} \
    | {"/model/weights"}
REQUIRED_ATTRS = {
    "/": {"format", "schema_version", "uuid", "created", "program"},
    "/model": {"source", "class_name", "family", "task", "dtype", "config_json", "weights_sha256",
               "attn_implementation", "n_layers", "d_model", "n_heads", "d_head", "d_mlp"},
    "/tokenizer": {"sha256", "class_name"},
    "/input": {"n_prompt_tokens", "mode"},
    "/output": {"label"},
    "/failure": {"spec", "failing", "metric", "expected", "max_new_tokens", "target_start", "target_length",
                 "target_index"},
    "/activations": {"sites"},
}
# "/benign" is required only in the sense that deleting the group is harmless but deleting its parts is not:
REQUIRED_GROUPS.discard("/benign")


def _required_attr(path: str, name: str) -> bool:
    return name in REQUIRED_ATTRS.get(path, ())


def _attr_category(path: str, name: str) -> str:
    with h5py.File(BASE, "r") as f:
        v = f[path].attrs[name]
    if isinstance(v, np.ndarray):
        return "array"
    if isinstance(v, (bool, np.bool_)):
        return "bool"
    if isinstance(v, (int, np.integer)):
        return "int"
    if isinstance(v, (float, np.floating)):
        return "float"
    return "str"


ATTR_CATEGORY = {a: _attr_category(*a) for a in ATTRS}


@contextmanager
def _alarm(seconds: int = 20):
    def boom(signum, frame):
        raise TimeoutError(f"bundle reader hung for more than {seconds} s")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _mutant(edit) -> Path:
    shutil.copyfile(BASE, TARGET)
    with h5py.File(TARGET, "r+") as f:
        edit(f)
    return TARGET


def _outcome(path: Path) -> BundleError | None:
    """Open and deep-validate; return the BundleError raised, or None when the bundle is accepted."""
    with _alarm():
        try:
            b = open_bundle(path)
        except BundleError as exc:
            assert str(exc).strip(), "a BundleError must name the problem"
            return exc
        try:
            b.validate(deep=True)
        except BundleError as exc:
            assert str(exc).strip()
            return exc
        finally:
            b.close()
    return None


def _check(path: Path, must_fail: bool, why: str = "") -> BundleError | None:
    err = _outcome(path)  # any exception other than BundleError propagates and fails the test
    assert not SENTINEL.exists(), "a pickled payload was executed"
    if must_fail:
        assert err is not None, f"malformed bundle accepted: {why}"
    return err


def _replace(f: h5py.File, path: str, data, dtype=None) -> None:
    parent, name = path.rsplit("/", 1)
    grp = f[parent or "/"]
    del grp[name]
    if dtype is not None:
        grp.create_dataset(name, data=data, dtype=dtype)
    else:
        grp.create_dataset(name, data=data)


@pytest.fixture(autouse=True, scope="module")
def _no_code_ran():
    yield
    assert not SENTINEL.exists(), "a pickled payload was executed"


def test_sentinel_detects_unpickling(tmp_path):
    """The detector works: unpickling the same kind of payload (aimed elsewhere) does create its file."""
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(_Exploit(proof)))
    assert proof.exists() and not SENTINEL.exists()


def test_base_bundle_is_valid():
    assert _outcome(BASE) is None
    assert len(ALL_OBJECTS) > 40 and len(ATTRS) > 80
    # the hard-linked resid_pre appears under both names
    assert "/activations/layer_001/resid_pre" in DATASETS and "/activations/layer_000/resid_post" in DATASETS


# ----- truncation ----------------------------------------------------------------------------------------------
@FUZZ
@given(frac=st.floats(min_value=0.0, max_value=1.0, exclude_max=True))
def test_truncated(frac):
    size = BASE.stat().st_size
    cut = int(frac * size)
    shutil.copyfile(BASE, TARGET)
    with open(TARGET, "r+b") as fh:
        fh.truncate(cut)
    err = _check(TARGET, must_fail=True, why=f"cut at {cut}/{size}")
    assert isinstance(err, BundleError)


# ----- deleted groups / datasets / attributes -----------------------------------------------------------------
@FUZZ
@given(path=st.sampled_from(ALL_OBJECTS))
def test_deleted_object(path):
    def edit(f):
        del f[path]

    required = path in REQUIRED_GROUPS or path in REQUIRED_DATASETS  # (/benign as a whole is optional)
    _check(_mutant(edit), must_fail=required, why=f"deleted {path}")


@FUZZ
@given(attr=st.sampled_from(ATTRS))
def test_deleted_attribute(attr):
    path, name = attr

    def edit(f):
        del f[path].attrs[name]

    _check(_mutant(edit), must_fail=_required_attr(path, name), why=f"deleted attribute {name} of {path}")


# ----- wrong dtypes / shapes -----------------------------------------------------------------------------------
_WRONG_KIND = {"f": ("int64", np.int64), "i": ("float32", np.float32), "u": ("float64", np.float64),
               "str": ("int32", np.int32), "b": ("float32", np.float32)}


@FUZZ
@given(path=st.sampled_from(sorted(DATASETS)), how=st.sampled_from(["kind", "rank+1", "scalar", "empty"]),
       n=st.integers(1, 40))
def test_wrong_dtype_or_shape(path, how, n):
    kind, ndim = DATASETS[path]
    if how == "kind":
        with h5py.File(BASE, "r") as f:
            shape = f[path].shape
        data = np.ones(shape, dtype=_WRONG_KIND[kind][1])
        fatal = path in VALIDATED_DATASETS
    elif how == "rank+1":
        data = np.zeros((n,) * (ndim + 1), dtype=np.float32 if kind == "f" else np.int64)
        fatal = path in VALIDATED_DATASETS
    elif how == "scalar":
        data = np.float32(n) if kind == "f" else np.int64(n)
        fatal = path in VALIDATED_DATASETS and ndim != 0
    else:  # right kind and rank, wrong (empty or different) shape
        shape = (0,) + (n,) * (ndim - 1) if ndim else ()
        data = (np.zeros(shape, dtype=np.float32 if kind == "f" else np.uint8 if kind == "u" else np.int64)
                if kind != "str" else np.array([], dtype=object))
        if kind == "str" and ndim == 0:
            data = "x" * n
        fatal = path in {"/input/input_ids", "/input/tokens", "/output/logits"} or path.startswith("/activations/")

    def edit(f):
        if kind == "str" and how == "empty":
            _replace(f, path, data, dtype=h5py.string_dtype("utf-8"))
        else:
            _replace(f, path, data)

    _check(_mutant(edit), must_fail=fatal, why=f"{path} replaced ({how})")


_WRONG_ATTR = {"str": np.int64(7), "int": "seven", "float": "seven point five", "bool": "yes", "array": np.int64(3)}


@FUZZ
@given(attr=st.sampled_from(ATTRS))
def test_wrong_attribute_type(attr):
    path, name = attr

    def edit(f):
        f[path].attrs[name] = _WRONG_ATTR[ATTR_CATEGORY[attr]]

    _check(_mutant(edit), must_fail=_required_attr(path, name), why=f"attribute {name} of {path} retyped")


# ----- versions and format names -------------------------------------------------------------------------------
_TEXT = st.characters(exclude_characters="\x00")  # HDF5 strings cannot hold NUL
_BAD_VERSION = st.one_of(
    st.integers(min_value=-2**63, max_value=2**63 - 1).filter(lambda v: v != 1),
    st.floats(allow_nan=True), st.booleans(), st.text(_TEXT, max_size=8),
    st.just(np.array([1, 1])), st.just(np.uint8(2)))
_BAD_FORMAT = st.one_of(st.text(_TEXT, max_size=40).filter(lambda s: s != FORMAT_NAME), st.integers(-2**63, 2**63 - 1), st.floats(),
                        st.just(FORMAT_NAME.upper()), st.just(FORMAT_NAME + " "), st.none())


@FUZZ
@given(version=st.one_of(st.none(), _BAD_VERSION), fmt=st.one_of(st.just(FORMAT_NAME), _BAD_FORMAT))
def test_unknown_version_or_format(version, fmt):
    def edit(f):
        for key, value in (("schema_version", version), ("format", fmt)):
            if value is None:
                del f.attrs[key]
            else:
                f.attrs[key] = value

    err = _check(_mutant(edit), must_fail=True, why=f"version={version!r} format={fmt!r}")
    if fmt != FORMAT_NAME:
        assert isinstance(err, BundleFormatError)
    else:
        assert isinstance(err, BundleVersionError) and "schema version" in str(err)


# ----- NaN / inf in float datasets and attributes --------------------------------------------------------------
@FUZZ
@given(path=st.sampled_from(FLOAT_DATASETS), where=st.integers(0, 10**6),
       value=st.sampled_from([np.nan, np.inf, -np.inf]))
def test_nan_in_float_dataset(path, where, value):
    def edit(f):
        ds = f[path]
        flat = ds[()].reshape(-1)
        flat[where % flat.size] = value
        ds[...] = flat.reshape(ds.shape)

    fatal = path == "/output/logits" or path.startswith("/activations/")
    err = _check(_mutant(edit), must_fail=fatal, why=f"{value} in {path}")
    if err is not None and fatal:
        # the hard-linked resid_pre of layer i+1 is the resid_post of layer i: either name identifies it
        names = {path, ALIASES.get(path, path)}
        assert "NaN or infinite" in str(err) and any(n in str(err) for n in names), (str(err), names)


@FUZZ
@given(attr=st.sampled_from(ATTRS), value=st.sampled_from([np.nan, np.inf, -np.inf]))
def test_nan_in_attribute(attr, value):
    path, name = attr

    def edit(f):
        f[path].attrs[name] = value

    _check(_mutant(edit), must_fail=_required_attr(path, name), why=f"{value} in attribute {name} of {path}")


def test_nan_in_activation_is_found_lazily():
    def edit(f):
        f["/activations/layer_001/attn"][3, 4] = np.nan

    path = _mutant(edit)
    with open_bundle(path) as b:  # lazy: opening reads no activation data
        with pytest.raises(BundleError, match="layer_001/attn holds NaN"):
            b.validate(deep=True)


# ----- pickled payloads ----------------------------------------------------------------------------------------
@FUZZ
@given(path=st.sampled_from(sorted(DATASETS)), as_=st.sampled_from(["uint8", "opaque", "string", "bytes-string"]))
def test_pickle_payload_in_dataset(path, as_):
    def edit(f):
        if as_ == "uint8":
            _replace(f, path, np.frombuffer(PAYLOAD, dtype=np.uint8))
        elif as_ == "opaque":
            _replace(f, path, np.void(PAYLOAD))
        elif as_ == "string":
            _replace(f, path, PAYLOAD_TEXT, dtype=h5py.string_dtype("utf-8"))
        else:
            _replace(f, path, np.array([PAYLOAD_TEXT.encode()], dtype=object), dtype=h5py.string_dtype("ascii"))

    kind, ndim = DATASETS[path]
    fatal = path in VALIDATED_DATASETS and (as_ == "opaque" or (as_ == "uint8" and kind not in "iu")
                                            or (as_.endswith("string") and kind != "str"))
    _check(_mutant(edit), must_fail=fatal, why=f"pickle payload as {as_} in {path}")


@FUZZ
@given(attr=st.sampled_from(ATTRS), as_=st.sampled_from(["opaque", "bytes", "string"]))
def test_pickle_payload_in_attribute(attr, as_):
    path, name = attr

    def edit(f):
        value = {"opaque": np.void(PAYLOAD), "bytes": np.frombuffer(PAYLOAD, dtype=np.uint8),
                 "string": PAYLOAD_TEXT}[as_]
        f[path].attrs[name] = value

    fatal = _required_attr(path, name) and (as_ != "string" or ATTR_CATEGORY[attr] != "str")
    _check(_mutant(edit), must_fail=fatal, why=f"pickle payload as {as_} in attribute {name} of {path}")


def test_pickle_payload_as_weights_and_tokenizer_is_never_unpickled(tmp_path):
    """Replay of a bundle whose weights / tokenizer files are pickles: a named BundleError, no code run."""
    from engine.replay import replay

    for target in ("/model/weights", "/tokenizer/files/tokenizer.json"):
        path = tmp_path / "pickled.h5"
        shutil.copyfile(BASE, path)
        with h5py.File(path, "r+") as f:
            _replace(f, target, np.frombuffer(PAYLOAD, dtype=np.uint8))
        with _alarm(60):
            with pytest.raises(BundleError):
                replay(path)
        assert not SENTINEL.exists()


# ----- values the schema constrains beyond dtype and rank ------------------------------------------------------
_BAD_UTF8 = np.bytes_(b"\xff\xfe not utf-8")


def _set_attr(path, name, value):
    return lambda f: f[path].attrs.__setitem__(name, value)


def _tail_ids(f):  # continuation_ids that disagree with the input_ids after the prompt
    ds = f["/output/continuation_ids"]
    ds[...] = ds[()] + 1


def _benign_stat(name, data):
    return lambda f: _replace(f, f"/benign/stats/layer_000/{name}", data)


_INCONSISTENT = {
    # replay pins this thread count: 10**9 aborted the process (libgomp out of memory), 0 / -1 / an array were
    # tracebacks from torch.set_num_threads / int()
    "threads 10**9": (_set_attr("/environment", "torch_num_threads", np.int64(10**9)), "torch_num_threads"),
    "threads 0": (_set_attr("/environment", "torch_num_threads", np.int64(0)), "torch_num_threads"),
    "threads -1": (_set_attr("/environment", "torch_num_threads", np.int64(-1)), "torch_num_threads"),
    "threads array": (_set_attr("/environment", "torch_num_threads", np.array([2, 2])), "torch_num_threads"),
    "threads text": (_set_attr("/environment", "torch_num_threads", "two"), "torch_num_threads"),
    "threads bool": (_set_attr("/environment", "torch_num_threads", True), "torch_num_threads"),
    "config list": (_set_attr("/model", "config_json", "[1, 2]"), "config_json must be a JSON object"),
    "attn unknown": (_set_attr("/model", "attn_implementation", "magic"), "attn_implementation"),
    "attn bad utf-8": (_set_attr("/model", "attn_implementation", _BAD_UTF8), "attn_implementation.*UTF-8"),
    "spec bad utf-8": (_set_attr("/failure", "spec", _BAD_UTF8), "'spec' is not valid UTF-8"),
    "scenario bad utf-8": (_set_attr("/", "scenario", _BAD_UTF8), "'scenario' is not valid UTF-8"),
    "prompt bad utf-8": (lambda f: _replace(f, "/input/prompt", _BAD_UTF8, dtype=h5py.string_dtype("ascii")),
                         "/input/prompt is not valid UTF-8"),
    "id beyond vocab": (lambda f: f["/input/input_ids"].__setitem__(0, 10**6), "outside the model's vocabulary"),
    "continuation not input tail": (_tail_ids, "continuation_ids must be the input_ids after the prompt"),
    "max_new_tokens < continuation": (_set_attr("/failure", "max_new_tokens", np.int64(-1)), "max_new_tokens"),
    "sites duplicated": (_set_attr("/activations", "sites", np.array(["mlp", "mlp"], dtype=h5py.string_dtype())),
                         "distinct and in the order"),
    "sites reordered": (_set_attr("/activations", "sites", np.array(["mlp", "attn"], dtype=h5py.string_dtype())),
                        "distinct and in the order"),
    "weights uint16": (lambda f: _replace(f, "/model/weights", np.arange(8, dtype=np.uint16)), "expected uint8"),
    "tokenizer file uint32": (lambda f: _replace(f, "/tokenizer/files/tokenizer.json", np.arange(8, dtype=np.uint32)),
                              "expected uint8"),
    "benign mean shape": (_benign_stat("mlp_mean", np.zeros(7)), "mlp_mean has shape"),
    "benign mean empty": (_benign_stat("attn_mean", np.zeros(0)), "attn_mean has shape"),
    "benign mean text": (_benign_stat("mlp_mean", "x"), "mlp_mean must hold|mlp_mean has dtype"),
    "benign head shape": (_benign_stat("head_mean", np.zeros((3, 3))), "head_mean has shape"),
    "benign pos_mean rows": (_benign_stat("neuron_pos_mean", np.zeros((1, 64))), "neuron_pos_mean has shape"),
    "benign pos_counts negative": (lambda f: f["/benign/pos_counts"].__setitem__(0, -1), "negative counts"),
    "benign pos_counts 2-D": (lambda f: _replace(f, "/benign/pos_counts", np.ones((2, 2), dtype=np.int64)),
                              "pos_counts has 2 dimensions"),
    "benign failing length": (lambda f: _replace(f, "/benign/failing", np.ones(9, dtype=bool)), "failing has shape"),
}


@pytest.mark.parametrize("case", list(_INCONSISTENT))
def test_inconsistent_values_are_named(case):
    edit, match = _INCONSISTENT[case]
    err = _check(_mutant(edit), must_fail=True, why=case)
    assert "\n" not in str(err)
    assert __import__("re").search(match, str(err)), (case, str(err))


def test_bytes_string_attributes_are_read_as_text():
    """Fixed-length (bytes) string attributes, as other HDF5 writers make them, read as the same text."""
    text_attrs = [(p, n) for p, n in ATTRS if ATTR_CATEGORY[(p, n)] == "str"]

    def edit(f):
        f.attrs["scenario"] = "sc\u00e9nario"
        for p, n in sorted(set(text_attrs) | {("/", "scenario")}):
            f[p].attrs[n] = np.bytes_(str(f[p].attrs[n]).encode("utf-8"))

    path = _mutant(edit)
    with h5py.File(path, "r") as f:
        assert isinstance(f.attrs["scenario"], bytes)
    with open_bundle(path) as b:
        assert b.scenario == "sc\u00e9nario"  # was "b'sc\\xc3\\xa9nario'"
        with h5py.File(BASE, "r") as f:
            assert b.failure_spec == f["failure"].attrs["spec"]
            assert b.model_info["config_json"] == f["model"].attrs["config_json"]
            assert b.mode == f["input"].attrs["mode"]


# ----- the CLI: one line on stderr, a non-zero exit, no traceback ---------------------------------------------
def _truncate(frac):
    def edit(path):
        with open(path, "r+b") as fh:
            fh.truncate(int(path.stat().st_size * frac))
    return edit


_CLI_CASES = {
    "truncated": (None, _truncate(0.5)),
    "group deleted": (lambda f: f.__delitem__("/output"), None),
    "layer deleted": (lambda f: f.__delitem__("/activations/layer_001"), None),
    "wrong dtype": (lambda f: _replace(f, "/input/input_ids", np.ones(3, dtype=np.float32)), None),
    "wrong shape": (lambda f: _replace(f, "/activations/layer_000/attn", np.ones((2, 2), dtype=np.float32)), None),
    "future version": (_set_attr("/", "schema_version", np.int64(2)), None),
    "bytes attribute not utf-8": (_set_attr("/model", "attn_implementation", _BAD_UTF8), None),
    "zero-length input": (lambda f: _replace(f, "/input/input_ids", np.zeros(0, dtype=np.int64)), None),
    "zero-length weights": (lambda f: _replace(f, "/model/weights", np.zeros(0, dtype=np.uint8)), None),
    "zero-length logits": (lambda f: _replace(f, "/output/logits", np.zeros((0, 4), dtype=np.float32)), None),
    "thread count": (_set_attr("/environment", "torch_num_threads", np.int64(10**9)), None),
    "config list": (_set_attr("/model", "config_json", "[1, 2]"), None),
    "id beyond vocab": (lambda f: f["/input/input_ids"].__setitem__(0, 10**6), None),
    "tokenizer files deleted": (lambda f: [f["/tokenizer/files"].__delitem__(k) for k in list(f["/tokenizer/files"])],
                                None),
    "unknown dtype": (_set_attr("/model", "dtype", "float99"), None),
}


@pytest.mark.parametrize("command", ["replay", "cf"])
@pytest.mark.parametrize("case", list(_CLI_CASES))
def test_cli_names_a_broken_bundle_in_one_line(case, command, tmp_path, capsys):
    from workbench.cli import main

    edit, file_edit = _CLI_CASES[case]
    path = tmp_path / "broken.h5"
    shutil.copyfile(BASE, path)
    if edit is not None:
        with h5py.File(path, "r+") as f:
            edit(f)
    if file_edit is not None:
        file_edit(path)
    capsys.readouterr()
    with _alarm(60):
        rc = main([command, str(path)])  # an exception other than the CLI's own would escape here
    err = capsys.readouterr().err.strip().splitlines()
    assert rc not in (0, 1), (case, command, rc)  # 1 is replay's "differs"
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    assert not SENTINEL.exists()


def test_replay_of_a_bundle_with_an_absurd_max_new_tokens_does_not_generate_past_the_model(tmp_path):
    # the recorded continuation decides how far a replay regenerates (one token past it), not max_new_tokens
    from engine.replay import replay

    path = tmp_path / "long.h5"
    shutil.copyfile(BASE, path)
    with h5py.File(path, "r+") as f:
        f["/failure"].attrs["max_new_tokens"] = np.int64(10**6)
        n_cont = len(f["/output/continuation_ids"])
    with _alarm(60):
        report = replay(path)
    cont = next(c for c in report.checks if c.name == "continuation")
    assert all(c.ok for c in report.checks if c.name != "continuation"), report.checks
    # stopped by EOS it regenerates the same; stopped by the old limit it sees one token more, and says so
    assert cont.ok or "continuation differs" in cont.detail, cont
    assert n_cont > 0
