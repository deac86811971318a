"""``forensics info``: what an incident bundle holds, read from the file alone (no model is loaded, nothing runs).

    forensics info BUNDLE.h5 [--json]

Prints the incident (prompt, output, failure and whether it fails), the model and tokenizer with their hashes, what
was recorded (layers × sites × positions, dtype, size), the prompt sets the analyses will use, the environment the
recording ran in, and the analysis files found beside the bundle. Exit status: 0; 2 = a missing file; 3 = a file
that is not a valid bundle.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

#: prompt sets in the order a user reads them, with the words for each (docs/bundle-format.md §prompts)
_SETS = (("benign_reference", "benign reference prompts"), ("benign_heldout", "held-out benign prompts"),
         ("variants", "held-out failing variants"), ("variant_counterparts", "variant counterparts"),
         ("counterpart", "benign counterpart"), ("benign_expected", "expected behaviours of the held-out benign prompts"))


def register(sub) -> None:
    i = sub.add_parser("info", help="what an incident bundle holds (incident, model, recording, prompt sets)",
                       description="Summarise an incident bundle from the file alone: the incident, the model and "
                                   "tokenizer hashes, what was recorded, the prompt sets, the environment, and the "
                                   "CF/CCA/certificate files found beside it. Loads no model.")
    i.add_argument("bundle", help="incident bundle (.h5)")
    i.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    i.set_defaults(func=cmd_info)


def bundle_summary(path: str | os.PathLike) -> dict:
    """The facts ``forensics info`` prints, as a JSON-ready dict (raises ``BundleError`` on a bad bundle)."""
    from engine.bundle import open_bundle

    with open_bundle(path) as b:
        return open_bundle_summary(b, path)


def open_bundle_summary(b, path: str | os.PathLike) -> dict:
    """:func:`bundle_summary` of a bundle that is already open (``IncidentBundle``; reads no activation data)."""
    from engine.failure import metric_name

    p = Path(path)
    mi = b.model_info
    n_pos, d = b.n_positions, int(mi["d_model"])
    dtype = str(b.activation_dataset(0, b.sites[0]).dtype) if b.sites and b.n_layers else None
    values = b.n_layers * len(b.sites) * n_pos * d
    counts = {name: len(v) for name, v in b.prompt_sets.items() if v}
    if b.has_benign and "benign_reference" not in counts:  # the recorded benign runs (/benign) are the reference
        counts["benign_reference"] = len(b.benign_prompts)
    sets = {name: counts[name] for name, _ in _SETS if name in counts}
    kind = b.failure_spec.split(":", 1)[0]
    stem = p.name[:-3] if p.name.endswith(".h5") else p.stem
    beside = sorted(str(q) for q in p.parent.glob(f"{stem}.*") if q != p and q.is_file()
                    and not q.name.startswith("."))
    return {
        "bundle": str(p), "bytes": p.stat().st_size, "schema_version": b.schema_version, "uuid": b.uuid,
        "created": b.created, "program": b.program, "scenario": b.scenario or None,
        "incident": {"prompt": b.prompt, "n_tokens": n_pos, "n_prompt_tokens": b.n_prompt_tokens, "mode": b.mode,
                     "output": b.continuation_text, "label": b.label,
                     "failure": {"spec": b.failure_spec, "failing": bool(b.failing),
                                 "metric": b.failure_metric, "metric_is": metric_name(kind),
                                 "expected": b.expected}},
        "model": {"class_name": mi["class_name"], "family": mi["family"], "task": mi["task"],
                  "source": mi["source"], "dtype": mi["dtype"], "weights_sha256": mi["weights_sha256"],
                  "weights_embedded": bool(b.has_embedded_weights), "n_layers": b.n_layers, "d_model": d,
                  "n_heads": mi.get("n_heads"), "d_mlp": mi.get("d_mlp")},
        "tokenizer": {"class_name": b.tokenizer_class, "sha256": b.tokenizer_sha256},
        "recorded": {"layers": b.n_layers, "sites": list(b.sites), "positions": n_pos, "d_model": d,
                     "dtype": dtype, "values": values},
        "prompt_sets": sets,
        "environment": {k: b.environment.get(k) for k in ("torch", "transformers", "python", "device",
                                                          "torch_num_threads", "batch_layout", "platform")
                        if k in b.environment},
        "beside": beside,
    }


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def cmd_info(args) -> int:
    from workbench.cli import require_bundle

    require_bundle(args.bundle)
    s = bundle_summary(args.bundle)
    if args.json:
        print(json.dumps(s, sort_keys=True))
        return 0
    print(summary_text(s))
    return 0


def summary_text(s: dict) -> str:
    """The summary as ``forensics info`` prints it (and the workbench's File ▸ Bundle properties shows it)."""
    lines: list[str] = []
    out = lines.append
    inc, f, m, r = s["incident"], s["incident"]["failure"], s["model"], s["recorded"]
    out(f"incident bundle {s['bundle']} ({_size(s['bytes'])}, schema v{s['schema_version']}, recorded "
        f"{s['created']} by {s['program']})")
    out(f"  uuid: {s['uuid']}" + (f"; scenario {s['scenario']}" if s["scenario"] else ""))
    out(f"  prompt ({inc['n_tokens']} tokens): {inc['prompt']!r}")
    said = f"label {inc['label']!r}" if inc["label"] else f"output {inc['output']!r}"
    out(f"  {said}")
    out(f"  failure {f['spec']} — {'FAILS' if f['failing'] else 'does not fail'} (metric {f['metric']:.4g}, "
        f"{f['metric_is']})" + (f"; expected: {f['expected']}" if f["expected"] else ""))
    emb = "embedded in the bundle" if m["weights_embedded"] else f"not embedded; loads from {m['source']}"
    out(f"  model: {m['class_name']} ({m['family']}, {m['task']}), {m['n_layers']} layers, d_model {m['d_model']}, "
        f"{m['dtype']}; weights sha256 {m['weights_sha256'][:16]}…, {emb}")
    out(f"  tokenizer: {s['tokenizer']['class_name']}, sha256 {s['tokenizer']['sha256'][:16]}…")
    out(f"  recorded: {r['layers']} layers × {len(r['sites'])} sites ({', '.join(r['sites'])}) × {r['positions']} "
        f"positions × {r['d_model']} = {r['values']:,} values ({r['dtype']})")
    words = dict(_SETS)
    sets = ", ".join(f"{n} {words[k]}" for k, n in s["prompt_sets"].items()) or "none"
    out(f"  prompt sets: {sets}")
    env = s["environment"]
    out(f"  environment: torch {env.get('torch', '?')}, transformers {env.get('transformers', '?')}, "
        f"{env.get('device', '?')}, {env.get('torch_num_threads', '?')} thread(s); {env.get('batch_layout', '')}"
        .rstrip("; "))
    if s["beside"]:
        out(f"  beside it: {', '.join(Path(q).name for q in s['beside'])}")
    return "\n".join(lines)
