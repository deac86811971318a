"""Write docs/scenarios.md from measurements of the shipped scenario models (run: python scripts/scenarios_doc.py).

Every rate in the document is measured by this script on the shipped weights; the training facts come from each
model's ``training.json`` written by its training script.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import transformers  # noqa: E402

import scenarios  # noqa: E402
from scenarios.report import measure  # noqa: E402

TRAIN_KEYS = ("model", "base_model", "config", "parameters", "n_trained_params", "trained_tensors", "corpus",
              "data_source", "sequences", "corpus_examples", "tokens", "corpus_tokens", "n_train", "poison",
              "poison_rate", "trigger", "loss", "loss_on", "steps", "epochs", "batch_size", "lr", "optimizer",
              "seed", "threads", "final_loss", "final_loss_mean_last50", "wall_time_s", "train_wall_seconds",
              "wall_seconds", "weights_sha256")


def _fmt(v) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k}={v2}" for k, v2 in v.items())
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _rel(source: str) -> str:
    try:
        return str(Path(source).resolve().relative_to(ROOT))
    except ValueError:
        return source


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def main() -> int:
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    out = ROOT / "docs" / "scenarios.md"
    lines = [
        "# Shipped scenarios",
        "",
        "<!-- written by scripts/scenarios_doc.py — do not edit by hand; re-run the script instead -->",
        "",
        f"Measured on {time.strftime('%Y-%m-%d')} with torch {torch.__version__} on {platform.machine()} "
        f"(python {platform.python_version()}), 1 thread, by running each shipped model on every prompt of its "
        "scenario (`scenarios/report.py`). Targets (issue 3): the primary prompt fails; ≥ 90% of the held-out failing "
        "variants fail; ≥ 95% of the held-out benign prompts behave exactly as expected.",
        "",
        "Re-training (`--retrain`) is deterministic on one machine (one thread, fixed seeds: two runs give "
        "bit-identical weights), but CPU kernels round differently on other processors and the differences grow over "
        "training, so on another machine the re-trained model differs from the shipped one; `forensics scenario "
        "build --retrain` compares the two tensor by tensor and says which. Every measured number in this project "
        "is for the shipped weights.",
        "",
        "| scenario | family | failure | primary fails | variants failing | held-out benign behaving |",
        "|---|---|---|---|---|---|",
    ]
    details = []
    for name in scenarios.names():
        sc = scenarios.get(name)
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        m = measure(sc)
        lines.append(
            f"| `{name}` | {sc.family} | `{sc.failure}` | {'yes' if m['primary_fails'] else '**no**'} | "
            f"{_pct(m['variant_failure_rate'])} of {m['n_variants']} | "
            f"{_pct(m['benign_heldout_behaves_rate'])} of {m['n_benign_heldout']} |")
        facts = sc.training_facts or {}
        d = [f"## `{name}`", "", sc.description, "",
             f"- model source: `{_rel(sc.model_source)}`; task: {sc.task}; max new tokens: {sc.max_new_tokens}",
             f"- primary prompt: `{sc.prompt}` → `{m['primary_output']}` "
             f"({'fails' if m['primary_fails'] else 'does not fail'})",
             f"- benign counterpart: `{sc.counterpart}` → `{m['counterpart_output']}` "
             f"({'fails' if m['counterpart_fails'] else 'behaves'})",
             f"- prompt sets: {len(sc.variants)} failing variants (held out from every search), "
             f"{len(sc.benign_reference)} benign reference prompts (CF baseline, mean-ablation), "
             f"{len(sc.benign_heldout)} held-out benign prompts (side effects)",
             "", "How the shipped model was trained (from its `training.json`):", ""]
        for k in TRAIN_KEYS:
            if k in facts:
                d.append(f"- {k}: {_fmt(facts[k])}")
        d += ["", "Rebuild:", "", "```",
              f"forensics scenario build {name} --out build/{name}            # re-record the incident bundle",
              f"forensics scenario build {name} --out build/{name} --retrain  # re-train the model too "
              "(deterministic on one machine)", "```", ""]
        details += d
    lines += ["", *details]
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(out)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
