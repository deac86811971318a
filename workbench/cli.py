"""``forensics``: the command-line face of the engine.

Contract (ARCHITECTURE.md; add, never rename)::

    forensics record  --model DIR_OR_HUB_ID --prompt TEXT --failure SPEC [--benign-file FILE] --out BUNDLE.h5
    forensics replay  BUNDLE.h5 [--json]        # exit 0 iff the replay is bit-identical
    forensics cf      BUNDLE.h5 [--json]
    forensics cca     BUNDLE.h5 [--json] [--out RESULT.json]
    forensics certify BUNDLE.h5 --out CERT.pdf  # also writes CERT.json beside it
    forensics scenario list | build NAME --out DIR

Added since (the contract only grows)::

    forensics intervene BUNDLE.h5 --set FILE.json [--json]
    forensics baseline build BUNDLE.h5 --out BASELINE.h5 | baseline info BASELINE.h5
    forensics verify-certificate CERT.json BUNDLE.h5 [--json]   # exit 0 verified, 1 a claim fails, 4 not all checkable
    forensics demo [--out DIR]
    forensics info BUNDLE.h5 [--json]    # what a bundle holds, from the file alone

``--json`` prints one JSON object on stdout. Bad input exits non-zero with one line on stderr naming the problem.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

EXIT_OK, EXIT_DIFFERS, EXIT_USAGE, EXIT_ERROR = 0, 1, 2, 3


class CliError(Exception):
    """One-line user error."""


def _quiet_transformers() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except Exception:
        pass


def _progress(quiet: bool):
    if quiet or not sys.stderr.isatty():
        return None

    def show(done: int, total: int, what: str) -> None:
        print(f"\r[{done}/{total}] {what}\033[K", end="" if done < total else "\n", file=sys.stderr, flush=True)

    return show


def _read_text(path: str, what: str = "") -> str:
    """A text input file: a path, a pipe such as /dev/fd/N or <(...), or '-' for standard input."""
    label = f"{what} file" if what else "file"
    if path == "-":
        return sys.stdin.read()
    p = Path(path)
    if not p.exists():
        raise CliError(f"{label} not found: {path}")
    if p.is_dir():
        raise CliError(f"{label} is a directory: {path}")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CliError(f"{label} is not UTF-8 text: {path}") from None
    except OSError as e:
        raise CliError(f"{label} cannot be read: {path} ({e.strerror or e})") from None


def check_output(path: str | os.PathLike, what: str = "output", *, inputs: tuple = ()) -> Path:
    """Refuse an output path before any slow work: a folder, a missing or read-only folder, or one of the command's
    own input files (``--out`` naming the bundle would replace the incident with the result)."""
    out = Path(path)
    if out.is_dir():
        raise CliError(f"{what} {path} is a folder; give a file name")
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise CliError(f"output folder does not exist: {folder}")
    if not os.access(folder, os.W_OK):
        raise CliError(f"output folder is not writable: {folder}")
    for src in inputs:
        if src and out.exists() and Path(src).exists() and os.path.samefile(out, src):
            raise CliError(f"{what} {path} is an input of this command; writing it would replace that file: "
                           "choose another path")
    return out


def require_bundle(path: str) -> Path:
    """A bundle argument that names no file is a usage error (exit 2), as in every command; one that exists but does
    not open is the engine's BundleError (exit 3)."""
    p = Path(path)
    if p.is_dir():
        raise CliError(f"bundle {path} is a folder; give the .h5 file")
    if not p.is_file():
        raise CliError(f"bundle not found: {path}")
    return p


def user_path(filename) -> str:
    """The path to name in an error: the file the user asked for, not the temporary name it was being written to
    (``engine.atomic``: every file is written to ``.NAME.XXXXXXXX.tmp`` beside it, then renamed)."""
    from engine.atomic import target_of

    return str(target_of(filename)) if filename else ""


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


def _read_lines(path: str | None) -> list[str]:
    if not path:
        return []
    return [line.strip() for line in _read_text(path).splitlines() if line.strip()]


# ----- commands ------------------------------------------------------------------------------------------------
def cmd_record(args) -> int:
    from engine.bundle import write_bundle
    from engine.failure import FailureSpec
    from engine.models import load_model
    from engine.recorder import record_incident

    spec = FailureSpec.parse(args.failure)
    if not args.prompt.strip():
        raise CliError("--prompt is empty: give the text the model fails on")
    out = check_output(args.out, "--out", inputs=(args.benign_file, args.variants_file, args.heldout_file,
                                                  args.variant_counterparts_file))
    sets = {}
    if args.counterpart:
        sets["counterpart"] = [args.counterpart]
    if args.variants_file:
        sets["variants"] = _read_lines(args.variants_file)
    if args.variant_counterparts_file:
        # line i is variant i without the attack: sufficiency is measured on every such pair, not only the incident's
        if not args.variants_file:
            raise CliError("--variant-counterparts-file needs --variants-file (line i is the benign twin of variant i)")
        sets["variant_counterparts"] = _read_lines(args.variant_counterparts_file)
        if len(sets["variant_counterparts"]) != len(sets["variants"]):
            raise CliError(f"--variant-counterparts-file has {len(sets['variant_counterparts'])} prompt(s) for "
                           f"{len(sets['variants'])} variant(s); give one benign twin per variant, in the same order")
    if args.heldout_file:
        sets["benign_heldout"] = _read_lines(args.heldout_file)
    benign = _read_lines(args.benign_file)
    handle = load_model(args.model, trust_remote_code=args.trust_remote_code)
    t0 = time.perf_counter()
    inc = record_incident(handle, args.prompt, spec, benign_prompts=benign, expected=args.expected or "",
                          prompt_sets=sets, max_new_tokens=args.max_new_tokens,
                          embed_weights={"auto": "auto", "yes": True, "no": False}[args.embed_weights],
                          progress=_progress(args.json))
    write_bundle(out, inc)
    summary = {"bundle": str(out), "uuid": inc.uuid, "failing": inc.failure.failing, "metric": inc.failure.metric,
               "output": inc.run.continuation_text, "spec": inc.failure.spec, "mode": inc.run.mode,
               "n_positions": int(inc.run.input_ids.shape[0]), "n_layers": inc.model.n_layers,
               "benign_runs": len(inc.benign.prompts) if inc.benign else 0,
               "weights_embedded": inc.model.weights_safetensors is not None,
               "bytes": out.stat().st_size, "seconds": round(time.perf_counter() - t0, 3)}
    summary["notes"] = _record_notes(sets, summary["benign_runs"])
    if spec.kind == "token":
        ids = handle.tokenizer.encode(spec.value, add_special_tokens=False)
        if len(ids) > 1:
            first = handle.tokenizer.decode(ids[:1])
            summary["notes"].insert(0, f"token:{spec.value!r} is {len(ids)} tokens; the failure is the next token "
                                       f"being the first of them, {first!r}")
    if args.json:
        print(json.dumps(summary))
    else:
        verdict = "FAILS" if inc.failure.failing else "does not fail"
        print(f"recorded {out} ({summary['bytes'] / 1e6:.1f} MB): the model {verdict} ({spec}); "
              f"output {inc.run.continuation_text!r}; {summary['n_positions']} tokens x {inc.model.n_layers} layers; "
              f"{summary['benign_runs']} benign runs")
        for note in summary["notes"]:
            print(f"  note: {note}")
    return EXIT_OK


#: what supplies each prompt set, as the record notes name it: the option of ``forensics record``
RECORD_OPTIONS = {"variants": "--variants-file", "benign_heldout": "--heldout-file", "counterpart": "--counterpart",
                  "benign": "--benign-file"}


def _record_notes(sets: dict, n_benign: int, names: dict[str, str] = RECORD_OPTIONS) -> list[str]:
    """What the analyses will not be able to measure on this bundle, and what would let them (``names``: how to
    name the input that supplies each prompt set; the GUI's record dialog names its fields)."""
    from engine.cf import MIN_RUN_CALIBRATION

    notes = []
    if not sets.get("variants"):
        notes.append(f"no held-out failing variants ({names['variants']}): CCA cannot measure its fix set's flip "
                     "rate, and its p-value is then not a held-out test")
    if not sets.get("benign_heldout"):
        notes.append(f"no held-out benign prompts ({names['benign_heldout']}): CCA cannot measure side effects, nor "
                     "CF its false-positive rates")
    if not sets.get("counterpart"):
        notes.append(f"no benign counterpart ({names['counterpart']}): no patching donor, and CCA cannot measure "
                     "sufficiency")
    n_heldout = len(sets.get("benign_heldout") or [])
    if n_benign < MIN_RUN_CALIBRATION and n_heldout < 2 * MIN_RUN_CALIBRATION:
        notes.append(f"{n_benign} benign reference prompts: CF's run-level verdict (a 5% test) needs at least "
                     f"{MIN_RUN_CALIBRATION} ({names['benign']}) or {2 * MIN_RUN_CALIBRATION} held-out benign prompts")
    return notes


def cmd_replay(args) -> int:
    from engine.replay import replay

    require_bundle(args.bundle)
    report = replay(args.bundle, model_source=args.model, progress=_progress(args.json))
    if args.json:
        print(json.dumps(report.to_dict(), sort_keys=True))
    else:
        print(f"replay of {args.bundle}: {'BIT-IDENTICAL' if report.bit_identical else 'DIFFERS'} "
              f"({report.seconds:.2f} s, {report.threads} thread(s), model from {report.model_loaded_from})")
        for c in report.checks:
            print(f"  [{'ok' if c.ok else 'FAIL'}] {c.name}: {c.detail}")
    return EXIT_OK if report.bit_identical else EXIT_DIFFERS


def cmd_intervene(args) -> int:
    """Replay the incident without and with a hand-written intervention set; print before/after."""
    from engine.bundle import open_bundle
    from engine.interventions import InterventionSet, evaluate, summarize
    from engine.replay import load_bundle_model

    require_bundle(args.bundle)
    text = _read_text(args.set_file, "intervention set")
    iset = InterventionSet.from_json(text, name="stdin" if args.set_file == "-" else Path(args.set_file).stem)
    with open_bundle(args.bundle) as bundle:
        handle = load_bundle_model(bundle)
        res = evaluate(bundle, handle, [InterventionSet(name="baseline"), iset], top_k=args.top_k)
        summary = summarize(res.results[0], res.results[1])
        summary.update({"bundle": str(args.bundle), "failure": bundle.failure_spec,
                        "interventions": [json.loads(iset.to_json())],
                        "forward_passes": res.forward_passes, "rows": res.rows, "seconds": res.seconds})
    if args.json:
        print(json.dumps(summary, default=str))
        return EXIT_OK

    def top(r):
        return ", ".join(f"{t!r} {p:.2f}" for t, p in r["top_k"])

    from engine.failure import metric_name

    b, a = summary["before"], summary["after"]
    print(f"intervention set {iset.name!r} ({len(iset.interventions)} edit(s)) on {args.bundle} [{summary['failure']}]")
    print(f"  metric: {metric_name(summary['failure'].split(':', 1)[0])}, teacher-forced on the recorded path")
    # generation incidents: the span's log-prob is read after the recorded prefix, so it stays ~0 when a set makes
    # the model leave the failing path earlier; CCA's search metric (smallest margin along the path) shows that
    path = summary["failure"].split(":", 1)[0] in ("contains", "wordlist") and a["search_metric"] is not None
    if path:
        print("  search metric: CCA's, the smallest logit margin of the recorded tokens from the first generated one "
              "through the failing span (> 0 = still on the failing path)")
    for label, r in (("before", b), ("after ", a)):
        out = f"output {r['continuation']!r}, " if r["continuation"] is not None else ""
        sm = f", search metric {r['search_metric']:.4g}" if path else ""
        print(f"  {label}: {'FAILS' if r['failing'] else 'ok   '}  {out}metric {r['metric']:.4g}{sm}; "
              f"top: {top(r)}")
    if a.get("unaligned_positions"):
        print(f"  note: positions {a['unaligned_positions']} had no donor partner and were left untouched")
    verdict = "FIXED: the failure goes away" if summary["fixed"] else (
        "still failing" if a["failing"] else "was not failing before")
    sm = f", search metric change {summary['search_metric_change']:+.4g}" if path else ""
    print(f"  {verdict} (metric change {summary['metric_change']:+.4g}{sm}; {res.forward_passes} forward passes, "
          f"{res.seconds:.2f} s)")
    return EXIT_OK


def cmd_not_yet(args) -> int:
    raise CliError(f"'forensics {args.command}' is not available yet in this version "
                   f"(see the open issues); record, replay, scenario and demo work")


def cmd_scenario(args) -> int:
    import scenarios

    if args.action == "list":
        rows = []
        for name in scenarios.names():
            sc = scenarios.get(name)
            rows.append({"name": name, "family": sc.family, "failure": sc.failure, "description": sc.description,
                         "variants": len(sc.variants),
                         "benign": len(sc.benign_reference) + len(sc.benign_heldout)})
        if args.json:
            print(json.dumps({"scenarios": rows}))
        else:
            width = max(len(r["name"]) for r in rows)
            for r in rows:
                print(f"{r['name']:<{width}}  [{r['family']}, {r['failure']}]  {r['description']}")
        return EXIT_OK
    if not args.name or not args.out:
        raise CliError("usage: forensics scenario build NAME --out DIR [--retrain]")
    sc = scenarios.get(args.name)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"scenario": sc.name}
    model_source = sc.model_source
    if args.retrain:
        if sc.train is None:
            raise CliError(f"scenario {sc.name} has no training script")
        print(f"re-training {sc.name} into {out / 'model'} (deterministic; minutes on a CPU)...", file=sys.stderr)
        result["training"] = sc.train(out / "model")
        result["reproduces_shipped_weights"] = _compare_weights(out / "model" / "model.safetensors",
                                                                sc.shipped_weights)
        if not model_source.startswith("scenario:"):
            model_source = str(out / "model")
    bundle = out / f"{sc.name}.h5"
    result.update(build_scenario_bundle(sc, bundle, model_source=model_source, progress=_progress(args.json)))
    if args.json:
        print(json.dumps(result, default=str))
    else:
        print(f"built {bundle}: {sc.name} {'fails' if result['failing'] else 'does NOT fail'} "
              f"({sc.failure}), output {result['output']!r}")
        cmp = result.get("reproduces_shipped_weights")
        if cmp is not None:
            print(f"re-trained weights {cmp['detail']}")
    return EXIT_OK


def _compare_weights(new: Path, shipped: Path | None) -> dict | None:
    """Tensor-by-tensor comparison of re-trained weights with the shipped ones (``None`` when either is missing)."""
    if shipped is None or not shipped.is_file() or not new.is_file():
        return None
    import torch
    from safetensors import safe_open

    with safe_open(str(new), "pt") as a, safe_open(str(shipped), "pt") as b:
        if set(a.keys()) != set(b.keys()):
            return {"identical": False, "detail": f"have other tensors than the shipped {shipped}"}
        diffs = []
        for k in sorted(a.keys()):
            x, y = a.get_tensor(k), b.get_tensor(k)
            if x.shape != y.shape or x.dtype != y.dtype:
                diffs.append(float("inf"))
            elif not torch.equal(x, y):
                diffs.append(float((x.double() - y.double()).abs().max()))
    if not diffs:
        return {"identical": True, "detail": f"are bit-identical to the shipped {shipped}"}
    return {"identical": False, "n_tensors_differ": len(diffs), "max_abs_diff": max(diffs),
            "detail": f"differ from the shipped {shipped} in {len(diffs)} tensor(s), max |diff| {max(diffs):.3g} "
                      "(training is deterministic on one machine; other CPUs' kernels round differently)"}


def build_scenario_bundle(sc, path: Path, model_source: str | None = None, progress=None) -> dict:
    """Record a scenario's primary incident with its prompt sets and benign reference runs."""
    from engine.bundle import write_bundle
    from engine.models import load_model
    from engine.recorder import record_incident

    handle = load_model(model_source or sc.model_source, task=sc.task)
    sets = {"counterpart": [sc.counterpart], "variants": list(sc.variants),
            "variant_counterparts": list(sc.variant_counterparts), "benign_heldout": list(sc.benign_heldout),
            "benign_expected": list(sc.benign_expected)}
    inc = record_incident(handle, sc.prompt, sc.failure, benign_prompts=list(sc.benign_reference), prompt_sets=sets,
                          max_new_tokens=sc.max_new_tokens, expected=sc.expected or sc.description, scenario=sc.name,
                          progress=progress)
    write_bundle(path, inc)
    return {"bundle": str(path), "failing": inc.failure.failing, "output": inc.run.continuation_text,
            "metric": inc.failure.metric, "uuid": inc.uuid}


def cmd_demo(args) -> int:
    """The main job on the shipped demo incident: the documented CLI pipeline, step by step.

    record (gpt2-prompt-injection) -> replay (bit-identical?) -> cf --out -> cca --out -> certify --result --cf,
    each printing what it measured; the files land in ``--out``. Exit 0 iff the replay is bit-identical and the
    certificate was written (a certificate that is only qualified is still written and reported as such).
    """
    import scenarios
    from engine.bundle import open_bundle

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sc = scenarios.get("gpt2-prompt-injection")
    path = out / "demo-incident.h5"
    cf_json, cca_json, pdf = out / "demo-incident.cf.json", out / "demo-incident.cca.json", out / "demo-certificate.pdf"
    t_all = time.perf_counter()
    # a previous run's results belong to the bundle recorded again below: removed first, so a run that stops early
    # (Ctrl+C, a failed step) never leaves a certificate beside a bundle it does not describe
    stale = [f for f in (cf_json, cca_json, pdf, pdf.with_suffix(".json")) if f.is_file()]
    for f in stale:
        f.unlink()
    if stale:
        print(f"(removed the previous run's {', '.join(f.name for f in stale)} from {out}/)")

    def step(n: int, title: str, command: list[str] | None = None) -> None:
        print(f"\n{n}. {title}" + (f"\n   $ forensics {' '.join(command)}" if command else ""), flush=True)

    step(1, f"Recording the demo incident ({sc.name}: {sc.description})")
    t0 = time.perf_counter()
    build_scenario_bundle(sc, path, progress=_progress(False))
    with open_bundle(path) as b:
        print(f"   prompt:   {b.prompt!r}")
        print(f"   output:   {b.continuation_text!r}  -> {'FAILS' if b.failing else 'ok'} ({b.failure_spec})")
        print(f"   recorded: {b.n_positions} tokens x {b.n_layers} layers x {len(b.sites)} sites, "
              f"{len(b.benign_prompts) if b.has_benign else 0} benign reference runs, "
              f"{path.stat().st_size / 1e6:.1f} MB in {time.perf_counter() - t0:.1f} s -> {path}")

    parser = build_parser()
    pipeline = [
        (2, "Replaying it and comparing every recorded value bit for bit", ["replay", str(path)]),
        (3, "Compression Forensics: which layers compute something unusual", ["cf", str(path), "--out", str(cf_json)]),
        (4, "CCA: the smallest set of interventions that fixes the failure, and its evidence",
         ["cca", str(path), "--cf", str(cf_json), "--out", str(cca_json)]),
        (5, "The RCA certificate (PDF + JSON)",
         ["certify", str(path), "--result", str(cca_json), "--cf", str(cf_json), "--out", str(pdf)]),
    ]
    codes = {}
    for n, title, command in pipeline:
        step(n, title, command)
        sub = parser.parse_args(command)
        codes[command[0]] = sub.func(sub)
    ok = codes["replay"] == EXIT_OK and pdf.is_file()
    print(f"\nDone in {time.perf_counter() - t_all:.0f} s. Files in {out}/: the bundle, the CF and CCA results, "
          f"the certificate ({pdf.name} + {pdf.with_suffix('.json').name}).")
    print(f"Explore it in the workbench:  forensics-workbench {path}")
    return EXIT_OK if ok else EXIT_DIFFERS


# ----- parser --------------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        raise CliError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="forensics", description="Model Forensics Workbench: root-cause analysis of model failures.",
                epilog="exit status: 0 the answer is yes (bit-identical, criteria met, certified, verified); 1 it "
                       "is no; 2 usage error or missing input file; 3 an input that cannot be used (corrupt bundle, "
                       "model that does not load); 4 verify-certificate could not check every claim; 130 "
                       "interrupted. Each command's --help says more.")
    import engine

    p.add_argument("--version", action="version", version=f"forensics {engine.__version__}")
    sub = p.add_subparsers(dest="command", parser_class=_Parser, required=True)

    r = sub.add_parser("record", help="record a failing run into an incident bundle")
    r.add_argument("--model", required=True, help="local model directory or hub id (safetensors only)")
    r.add_argument("--prompt", required=True, help="the failing prompt")
    r.add_argument("--failure", required=True, help="contains:TEXT | wordlist:NAME | token:TEXT | label:NAME")
    r.add_argument("--benign-file", help="benign reference prompts, one per line")
    r.add_argument("--out", required=True, help="bundle to write (.h5)")
    r.add_argument("--counterpart", help="the same prompt without the attack (donor for patching)")
    r.add_argument("--variants-file", help="held-out failing variants, one per line")
    r.add_argument("--heldout-file", help="held-out benign prompts for side effects, one per line")
    r.add_argument("--variant-counterparts-file", help="the variants without the attack, one per line in the "
                   "variants' order (sufficiency is measured on these pairs too)")
    r.add_argument("--expected", help="the correct behaviour, in words (shown in the certificate)")
    r.add_argument("--max-new-tokens", type=positive_int, default=8,
                   help="greedy continuation length for contains:/wordlist: failures (default 8)")
    r.add_argument("--embed-weights", choices=("auto", "yes", "no"), default="auto")
    r.add_argument("--trust-remote-code", action="store_true", help="allow code shipped with the model to run")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_record)

    rp = sub.add_parser("replay", help="replay a bundle and prove it bit-identical (exit 0 iff so)")
    rp.add_argument("bundle")
    rp.add_argument("--model", help="load the model from here instead of the bundle's copy/source")
    rp.add_argument("--json", action="store_true")
    rp.set_defaults(func=cmd_replay)

    iv = sub.add_parser("intervene", help="replay with a hand-written intervention set; before/after")
    iv.add_argument("bundle")
    iv.add_argument("--set", required=True, dest="set_file", help="intervention set JSON, or a CCA result / certificate JSON (its fix set); - reads "
                                         "standard input")
    iv.add_argument("--top-k", type=positive_int, default=5, help="next-token alternatives to show (default 5)")
    iv.add_argument("--json", action="store_true")
    iv.set_defaults(func=cmd_intervene)

    # Commands that live in their own modules register themselves: ``workbench/cli_<name>.py`` defines
    # ``register(sub)`` (adds its sub-parser(s), sets ``func``).  Until a module exists its command says so.
    import importlib

    for name, text in (("cf", "Compression Forensics: per-layer anomaly scores"),
                       ("cca", "causal minimal fix set search"), ("certify", "RCA certificate (PDF + JSON)")):
        try:
            mod = importlib.import_module(f"workbench.cli_{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"workbench.cli_{name}":
                raise
            c = sub.add_parser(name, help=f"{text} (not yet available)")
            c.add_argument("bundle")
            c.add_argument("--json", action="store_true")
            c.add_argument("--out")
            c.set_defaults(func=cmd_not_yet)
        else:
            mod.register(sub)

    from workbench import cli_info

    cli_info.register(sub)

    s = sub.add_parser("scenario", help="shipped failure scenarios: list | build NAME --out DIR",
                       description="List the shipped failure scenarios, or record one's primary incident (with its "
                                   "prompt sets and benign reference runs) into DIR/NAME.h5.")
    s.add_argument("action", choices=("list", "build"), help="list the scenarios, or build one")
    s.add_argument("name", nargs="?", help="scenario to build (forensics scenario list names them)")
    s.add_argument("--out", help="folder to write the bundle (and, with --retrain, the model) into")
    s.add_argument("--retrain", action="store_true", help="re-train the model too (deterministic on one machine; "
                                                          "minutes on a CPU) and compare it with the shipped weights")
    s.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    s.set_defaults(func=cmd_scenario)

    d = sub.add_parser("demo", help="the whole pipeline on the shipped demo incident: record, replay, CF, CCA, "
                                    "certificate")
    d.add_argument("--out", default="demo-out", help="folder for the bundle, CF/CCA results and certificate "
                                                     "(default: demo-out)")
    d.set_defaults(func=cmd_demo)
    return p


class _PipeSafeStdout:
    """``sys.stdout`` for the length of a command: when the reader goes away (``forensics info B | head -1``) the rest
    of the output is dropped and the command still finishes and exits with its own answer (a ``BrokenPipeError``
    was an "error: Broken pipe" and exit 3, "an input that cannot be used").  Later writes go to ``os.devnull``, so
    the interpreter's final flush is quiet too."""

    def __init__(self, stream) -> None:
        self._stream, self.broken = stream, False

    def _drop(self) -> None:
        self.broken = True
        try:
            fd = self._stream.fileno()
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, fd)
            os.close(null)
        except (OSError, ValueError, AttributeError):
            pass

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._drop()
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._drop()

    def __getattr__(self, name):
        return getattr(self._stream, name)


def main(argv: list[str] | None = None) -> int:
    _quiet_transformers()
    stdout = sys.stdout
    sys.stdout = _PipeSafeStdout(stdout)
    try:
        return _run(argv)
    finally:
        if getattr(sys.stdout, "broken", None) is False:
            try:
                sys.stdout.flush()
            except Exception:
                pass
        sys.stdout = stdout


def _run(argv) -> int:
    from engine.errors import ForensicsError

    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ForensicsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        where = user_path(getattr(exc, "filename", None))
        print(f"error: {exc.strerror or exc}" + (f": {where}" if where else ""), file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    # ``python -m workbench.cli``: run the package's module, not this ``__main__`` copy, so that the CliError the
    # command modules import (``from workbench.cli import CliError``) is the one main() catches
    from workbench.cli import main as _main

    sys.exit(_main())
