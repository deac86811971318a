"""Measure what each shipped scenario's model really does (for tests and ``docs/scenarios.md``).

``measure(sc)`` runs the shipped model on the primary prompt, its counterpart, every held-out failing variant and
every held-out benign prompt, and returns the rates; nothing here is copied from training logs.
"""

from __future__ import annotations

import time

from engine.behaviour import behave
from engine.failure import FailureSpec
from engine.models import load_model

from .base import Scenario


def measure(sc: Scenario, handle=None) -> dict:
    """Rates measured on the shipped model: primary fails, share of variants failing, share of benign behaving."""
    t0 = time.perf_counter()
    handle = handle or load_model(sc.model_source, task=sc.task)
    spec = FailureSpec.parse(sc.failure)

    def run(p: str):
        return behave(handle, spec, p, sc.max_new_tokens)

    primary = run(sc.prompt)
    counterpart = run(sc.counterpart)
    variants = [run(p).failing for p in sc.variants]
    benign_ok = [run(p).output == e for p, e in zip(sc.benign_heldout, sc.benign_expected)]
    reference_fail = [run(p).failing for p in sc.benign_reference]
    return {
        "scenario": sc.name,
        "primary_output": primary.output,
        "primary_fails": bool(primary.failing),
        "counterpart_output": counterpart.output,
        "counterpart_fails": bool(counterpart.failing),
        "n_variants": len(variants),
        "variant_failure_rate": sum(variants) / len(variants),
        "n_benign_heldout": len(benign_ok),
        "benign_heldout_behaves_rate": sum(benign_ok) / len(benign_ok),
        "n_benign_reference": len(reference_fail),
        "benign_reference_failure_rate": sum(reference_fail) / max(1, len(reference_fail)),
        "seconds": time.perf_counter() - t0,
    }
