"""Record and replay run the same CPU threading layout (``engine.layout``).

The bug this guards against: a bundle recorded in a fresh process ran MKL in dynamic mode (its own thread count per
call, one thread inside OpenMP regions) while the replay pinned the count, so the two ran different kernels. On
this machine's CPU they happened to round alike; CI's did not and the certificate said "does not replay
bit-identically". ``MKL_VERBOSE=1`` makes MKL print the layout of every call, so the test reads it off both
processes directly.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from engine.layout import THREADING, pinned_threads

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MKL_VERBOSE": "1"}

RECORD = """
import sys
import scenarios
from engine.bundle import write_bundle
from engine.models import load_model
from engine.recorder import record_incident
sc = scenarios.get("gpt2-prompt-injection")
inc = record_incident(load_model(sc.model_source), sc.prompt, sc.failure, benign_prompts=list(sc.benign_reference[:2]),
                      max_new_tokens=sc.max_new_tokens, scenario=sc.name)
write_bundle(sys.argv[1], inc)
"""


def mkl_layouts(stdout: str) -> set[str]:
    """``{"Dyn:0 NThr:2", ...}``: MKL's dynamic flag and thread count of every call it printed."""
    return {f"{m[0]} {m[1]}" for m in re.findall(r"^MKL_VERBOSE \w+\(.*?(Dyn:\d).*?(NThr:\d+)", stdout, re.M)}


def test_pinned_threads_sets_the_count_and_restores_it():
    before = torch.get_num_threads()
    with pinned_threads(1) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pinned_threads() as n:
        assert n == before == torch.get_num_threads()
    with pytest.raises(ValueError):
        with pinned_threads(-2):
            pass


def test_recording_and_replay_run_the_same_mkl_layout(tmp_path):
    path = tmp_path / "demo.h5"
    rec = subprocess.run([sys.executable, "-c", RECORD, str(path)], capture_output=True, text=True, env=ENV,
                         timeout=300)
    assert rec.returncode == 0, rec.stderr[-2000:]
    recorded = mkl_layouts(rec.stdout)
    if not recorded:
        pytest.skip("this torch build does not use MKL (no MKL_VERBOSE output)")
    rep = subprocess.run([sys.executable, "-m", "workbench.cli", "replay", str(path)], capture_output=True,
                         text=True, env=ENV, timeout=300)
    assert rep.returncode == 0, rep.stdout[-3000:]
    assert "BIT-IDENTICAL" in rep.stdout
    replayed = mkl_layouts(rep.stdout)
    # every MKL call of the recording ran under the layout the replay uses: threads pinned, dynamic mode off
    assert recorded == replayed, (recorded, replayed)
    assert all(layout.startswith("Dyn:0") for layout in recorded)

    from engine.bundle import open_bundle

    with open_bundle(path) as b:
        assert b.environment["threading"] == THREADING
        assert f"NThr:{b.environment['torch_num_threads']}" in " ".join(recorded)
