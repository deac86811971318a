"""The incident bundle: round trip record -> write -> open -> replay (bit-identical) for every family, lazy
opening, named tamper detection, atomic writes, and named errors for files that are not bundles."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import TINY_PROMPT
from engine.bundle import open_bundle, write_bundle
from engine.bundle.schema import ACTIVATION_SITES, FORMAT_NAME, SCHEMA_VERSION
from engine.errors import BundleError, BundleFormatError
from engine.recorder import record_incident
from engine.replay import replay

ROOT = Path(__file__).resolve().parents[1]


def _check(report, name):
    found = [c for c in report.checks if c.name == name]
    assert found, f"no check named {name!r} in {[c.name for c in report.checks]}"
    return found[0]


# ----- round trip ---------------------------------------------------------------------------------------------
CASES = {
    "gpt2": ("tiny_gpt2", TINY_PROMPT, "contains:HACKED", "generate"),
    "llama": ("tiny_llama", TINY_PROMPT, "contains:HACKED", "generate"),
    "gpt_neox": ("tiny_neox", TINY_PROMPT, "token:HACKED", "prompt"),
    "bert": ("minilm", "this movie was great , i loved it", "label:LABEL_1", "classify"),
}


@pytest.mark.parametrize("family", list(CASES))
def test_round_trip_bit_identical(family, request, tmp_path):
    fixture, prompt, spec, mode = CASES[family]
    handle = request.getfixturevalue(fixture)
    # MiniLM (~90 MB) is above the auto-embed limit; embed it anyway so the bundle stands alone
    inc = record_incident(handle, prompt, spec, max_new_tokens=4, embed_weights=True,
                          prompt_sets={"counterpart": ["the cat sat on the mat"]})
    path = write_bundle(tmp_path / f"{family}.h5", inc)
    assert path.exists() and not list(tmp_path.glob(".*.tmp"))
    with open_bundle(path) as b:
        assert b.schema_version == SCHEMA_VERSION
        assert b.model_info["family"] == family
        assert b.mode == mode
        assert b.uuid == inc.uuid and b.prompt == prompt and b.failure_spec == spec
        assert np.array_equal(b.input_ids, inc.run.input_ids)
        assert np.array_equal(b.logits, inc.run.logits)
        assert b.sites == ACTIVATION_SITES
        assert b.has_embedded_weights
        assert b.prompt_sets == {"counterpart": ["the cat sat on the mat"]}
        for (i, site), arr in inc.run.activations.items():
            got = b.activation(i, site)
            assert got.dtype == arr.dtype and np.array_equal(got, arr), (i, site)
        b.validate(deep=True)
        report = replay(b)
    assert report.bit_identical, [(c.name, c.detail) for c in report.failed]
    names = {c.name for c in report.checks}
    assert {"weights", "tokenizer", "input_ids", "logits", "activations"} <= names
    assert ("continuation" in names) == (mode == "generate")
    assert report.model_loaded_from == "embedded"


def test_resid_pre_is_hard_link_to_previous_resid_post(gpt2_bundle):
    with h5py.File(gpt2_bundle, "r") as f:
        a = f["activations"]
        assert a["layer_001/resid_pre"].id == a["layer_000/resid_post"].id
        assert h5py.h5o.get_info(a["layer_001/resid_pre"].id).rc == 2
        ds = a["layer_000/mlp"]
        assert ds.compression == "gzip" and ds.shuffle and ds.chunks[0] == min(64, ds.shape[0])


def test_demo_bundle(demo_bundle):
    with open_bundle(demo_bundle) as b:
        assert b.scenario == "gpt2-prompt-injection" and b.failing
        assert b.has_benign and len(b.benign_prompts) == 16
        assert {"counterpart", "variants", "benign_heldout", "benign_expected"} <= set(b.prompt_sets)
        b.validate(deep=True)


# ----- lazy opening -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpt2_bundle(tiny_gpt2, tmp_path_factory) -> Path:
    inc = record_incident(tiny_gpt2, TINY_PROMPT, "contains:HACKED", max_new_tokens=4, embed_weights=True)
    return write_bundle(tmp_path_factory.mktemp("gpt2") / "tiny.h5", inc)


def test_open_is_lazy(gpt2_bundle, monkeypatch):
    reads: list[str] = []
    orig_getitem = h5py.Dataset.__getitem__
    orig_read_direct = h5py.Dataset.read_direct

    def counting_getitem(self, *args, **kwargs):
        reads.append(self.name)
        return orig_getitem(self, *args, **kwargs)

    def counting_read_direct(self, *args, **kwargs):
        reads.append(self.name)
        return orig_read_direct(self, *args, **kwargs)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", counting_getitem)
    monkeypatch.setattr(h5py.Dataset, "read_direct", counting_read_direct)
    b = open_bundle(gpt2_bundle)
    try:
        assert reads, "the counter saw no read at all (monkeypatch ineffective?)"
        assert not [r for r in reads if r.startswith("/activations")], reads
        assert "/model/weights" not in reads
        reads.clear()
        part = b.activation(1, "mlp", slice(0, 2))
        assert part.shape == (2, b.model_info["d_model"])
        assert reads == ["/activations/layer_001/mlp"]
    finally:
        b.close()


# ----- tampering is detected and named ------------------------------------------------------------------------
def _tampered_copy(src: Path, dst: Path, edit) -> Path:
    shutil.copyfile(src, dst)
    with h5py.File(dst, "r+") as f:
        edit(f)
    return dst


def test_tampered_weight_is_named(gpt2_bundle, tmp_path):
    def edit(f):
        ds = f["model/weights"]
        blob = ds[()]
        header_len = int(np.frombuffer(blob[:8].tobytes(), dtype="<u8")[0])
        header = json.loads(blob[8:8 + header_len].tobytes())
        name = sorted(k for k in header if k != "__metadata__")[0]
        start = 8 + header_len + header[name]["data_offsets"][0]
        assert header[name]["dtype"] == "F32"
        ds[start + 1] = blob[start + 1] ^ 0x01  # one bit of one byte of the first float of one tensor

    path = _tampered_copy(gpt2_bundle, tmp_path / "weights.h5", edit)
    report = replay(path)
    assert not report.bit_identical
    chk = _check(report, "weights")
    assert not chk.ok and "sha256" in chk.detail


def test_tampered_activation_is_named(gpt2_bundle, tmp_path):
    def edit(f):
        ds = f["activations/layer_001/mlp"]
        ds[2, 3] = ds[2, 3] + np.float32(0.5)

    path = _tampered_copy(gpt2_bundle, tmp_path / "act.h5", edit)
    report = replay(path)
    assert not report.bit_identical
    chk = _check(report, "activations")
    assert not chk.ok and "1.mlp" in chk.detail
    assert "0.mlp" not in chk.detail and "1.attn" not in chk.detail
    assert _check(report, "weights").ok and _check(report, "logits").ok
    assert report.site_max_abs_diff["1.mlp"] == pytest.approx(0.5, rel=1e-3)


def test_a_recorded_logit_one_ulp_off_is_not_bit_identical(gpt2_bundle, tmp_path):
    """Replay proves bit identity, not closeness: one logit moved by one float32 ulp fails the logits check."""
    def edit(f):
        ds = f["output/logits"]
        v = ds[0, 0]
        ds[0, 0] = np.nextafter(v, np.float32(np.inf), dtype=np.float32)

    path = _tampered_copy(gpt2_bundle, tmp_path / "logit.h5", edit)
    report = replay(path)
    assert not report.bit_identical
    chk = _check(report, "logits")
    assert not chk.ok and "max abs diff" in chk.detail and 0 < report.logits_max_abs_diff < 1e-4
    assert _check(report, "weights").ok and _check(report, "activations").ok


def test_tampered_tokenizer_is_named(gpt2_bundle, tmp_path):
    def edit(f):
        files = f["tokenizer/files"]
        spec = json.loads(files["tokenizer.json"][()].tobytes())
        vocab = spec["model"]["vocab"]
        a, b = "cat", "dog"
        vocab[a], vocab[b] = vocab[b], vocab[a]
        del files["tokenizer.json"]
        files.create_dataset("tokenizer.json", data=np.frombuffer(json.dumps(spec).encode(), dtype=np.uint8))

    path = _tampered_copy(gpt2_bundle, tmp_path / "tok.h5", edit)
    report = replay(path)
    assert not report.bit_identical
    chk = _check(report, "tokenizer")
    assert not chk.ok and "tokenizer differs" in chk.detail
    assert _check(report, "weights").ok


# ----- atomic write ------------------------------------------------------------------------------------------
_WRITER_SCRIPT = r"""
import sys, time
sys.path.insert(0, {tests!r})
import h5py
from conftest import TINY_PROMPT, make_tiny_gpt2
from engine.bundle import write_bundle
from engine.recorder import record_incident

inc = record_incident(make_tiny_gpt2(), TINY_PROMPT, "contains:HACKED", max_new_tokens=4, embed_weights=True)
orig = h5py.Group.create_dataset

def slow(self, name, *args, **kwargs):
    if self.name.startswith("/activations/layer_001"):
        print("WRITING", flush=True)
        time.sleep(120)  # killed here, mid-write
    return orig(self, name, *args, **kwargs)

h5py.Group.create_dataset = slow
write_bundle({target!r}, inc)
print("DONE", flush=True)
"""


@pytest.mark.parametrize("existing", [False, True], ids=["new", "overwrite"])
def test_write_is_atomic_under_sigkill(tmp_path, gpt2_bundle, existing):
    target = tmp_path / "incident.h5"
    old_uuid = None
    if existing:
        shutil.copyfile(gpt2_bundle, target)
        with open_bundle(target) as b:
            old_uuid = b.uuid
    script = _WRITER_SCRIPT.format(tests=str(ROOT / "tests"), target=str(target))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "WRITING", (line, proc.stderr.read() if proc.poll() is not None else "")
        tmps = list(tmp_path.glob(".incident.h5.*.tmp"))
        assert len(tmps) == 1 and tmps[0].stat().st_size > 0  # really mid-write: the temporary file exists
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    if existing:
        with open_bundle(target) as b:  # the previous bundle is untouched
            assert b.uuid == old_uuid
            b.validate(deep=True)
    else:
        assert not target.exists()
    # a leftover hidden temporary file is acceptable; it never carries the final name
    assert all(p.name.startswith(".incident.h5.") for p in tmp_path.iterdir() if p.name != "incident.h5")


@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()], ids=["exception", "ctrl-c"])
@pytest.mark.parametrize("existing", [False, True], ids=["new", "overwrite"])
def test_write_interrupted_mid_write_leaves_nothing(tmp_path, gpt2_bundle, tiny_gpt2, monkeypatch, exc, existing):
    """An exception (or Ctrl-C) half way through the activations: it propagates unchanged, no temporary file is
    left, and the final name holds nothing new (absent, or the previous bundle untouched)."""
    target = tmp_path / "incident.h5"
    old = None
    if existing:
        shutil.copyfile(gpt2_bundle, target)
        old = target.read_bytes()
    inc = record_incident(tiny_gpt2, TINY_PROMPT, "contains:HACKED", max_new_tokens=4, embed_weights=True)
    orig = h5py.Group.create_dataset
    seen = []

    def failing(self, name, *args, **kwargs):
        if self.name.startswith("/activations/layer_001"):
            seen.append(list(tmp_path.glob(".incident.h5.*.tmp")))
            raise exc
        return orig(self, name, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", failing)
    with pytest.raises(type(exc)):
        write_bundle(target, inc)
    assert seen and len(seen[0]) == 1  # it really failed mid-write, with the temporary file open
    assert not list(tmp_path.glob(".*.tmp"))
    if existing:
        assert target.read_bytes() == old
    else:
        assert not target.exists()


def test_write_failure_is_a_bundle_error(tmp_path, tiny_gpt2):
    """An OS error at the rename (the target is a folder) is a named BundleError, and the temporary file goes."""
    target = tmp_path / "incident.h5"
    target.mkdir()
    inc = record_incident(tiny_gpt2, TINY_PROMPT, "token:HACKED")
    with pytest.raises(BundleError, match="cannot write bundle .*incident.h5"):
        write_bundle(target, inc)
    assert target.is_dir() and not list(tmp_path.glob(".*.tmp"))


def test_write_into_missing_folder_raises(tmp_path, tiny_gpt2):
    inc = record_incident(tiny_gpt2, TINY_PROMPT, "token:HACKED")
    with pytest.raises(BundleError, match="folder does not exist"):
        write_bundle(tmp_path / "nope" / "x.h5", inc)


# ----- not a bundle ------------------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(BundleFormatError, match="not found"):
        open_bundle(tmp_path / "missing.h5")


def test_directory(tmp_path):
    with pytest.raises(BundleFormatError, match="folder"):
        open_bundle(tmp_path)


@pytest.mark.parametrize("content", [b"", b"hello, I am a text file\n" * 10, b"\x89HDF\r\n\x1a\n" + b"\0" * 100],
                         ids=["empty", "text", "fake-signature"])
def test_not_hdf5(tmp_path, content):
    p = tmp_path / "x.h5"
    p.write_bytes(content)
    with pytest.raises(BundleError, match="not a readable HDF5 file"):
        open_bundle(p)


def test_hdf5_but_not_a_bundle(tmp_path):
    p = tmp_path / "other.h5"
    with h5py.File(p, "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(BundleFormatError, match="not an incident bundle"):
        open_bundle(p)
    with h5py.File(p, "a") as f:
        f.attrs["format"] = FORMAT_NAME
        f.attrs["schema_version"] = 99
    with pytest.raises(BundleError, match="schema version 99 is not supported"):
        open_bundle(p)


def test_weights_hash_checks_from_the_file_alone_as_the_format_says(gpt2_bundle):
    """docs/bundle-format.md §3.1.1, with h5py, json and hashlib only: parse the embedded safetensors, add the tied
    names its header lists, hash; the result is the recorded weights_sha256 (GPT-2 ties lm_head to wte)."""
    import hashlib
    import json
    import struct

    torch_name = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                  "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
    with h5py.File(gpt2_bundle, "r") as f:
        blob = f["model/weights"][()].tobytes()
        want = f["model"].attrs["weights_sha256"]
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    data = blob[8 + n:]
    tied = json.loads(header.pop("__metadata__")["tied_weights"])
    assert tied == {"lm_head.weight": "transformer.wte.weight"}
    entries = {**header, **{name: header[to] for name, to in tied.items()}}
    h = hashlib.sha256()
    for name in sorted(entries):
        e = entries[name]
        begin, end = e["data_offsets"]
        h.update(name.encode())
        h.update(f"torch.{torch_name[e['dtype']]}".encode())
        h.update(str(tuple(e["shape"])).encode())
        h.update(data[begin:end])
    assert h.hexdigest() == want
