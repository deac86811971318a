"""Benchmark: batched intervention evaluation on a GPT-2-small-sized model (random init), 32 tokens, CPU.

    .venv/bin/python benchmarks/interventions.py

(a) 64 single-site sets: sequential (one plain full forward each) vs batched from the embedding.  target >= 3x
(b) 64 single-site sets at layers >= 6: batched from the recorded layer 6 vs sequential full forwards. target >= 6x
    (b2) the same with prefix reuse, for 64 sets at layers >= 6 whose positions are in the second half of the
    prompt (16..31, where a search over an injected instruction's tokens lands): positions 0..15 run once.
(c) peak RSS growth of a 256-set evaluation at chunk sizes 16 and 64 (each in a fresh subprocess,
    ``resource.getrusage().ru_maxrss``): memory is bounded by the chunk size, not the number of sets.

Metric-only (``generate=False``); the incident is a ``token:`` one (margin of a target token at the last position)
built in memory (:class:`engine.interventions.EvalContext`), so no bundle file is needed. Timings use the process's torch thread count (shared machine: expect noise).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.interventions import (ActivationSources, EvalContext, Intervention, InterventionSet,  # noqa: E402
                                  evaluate_ids)
from engine.models import ModelHandle  # noqa: E402

N_TOK = 32
COMPS = ("resid_pre", "attn", "mlp", "resid_post", "head", "neuron")


def build():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg).eval()
    handle = ModelHandle(model=model, tokenizer=None)
    ids = torch.randint(0, 50257, (N_TOK,), generator=torch.Generator().manual_seed(1))
    from engine.hooks import capture

    keys = [(i, c) for i in range(12) for c in COMPS]
    with torch.no_grad(), capture(handle, keys) as acts:
        model(input_ids=ids[None])
    # "benign" means: the token mean of this run (enough for timing), recorded residuals for start-from-layer
    tok_mean = {k: v[0].mean(0) for k, v in acts.items()}
    resid = {i: acts[(i, "resid_pre")][0] for i in range(12)}
    ctx = EvalContext(input_ids=ids, n_prompt=N_TOK, kind="token", target_index=123,
                      resid_pre=lambda L: resid[L], sources=ActivationSources.from_tensors(token_mean=tok_mean))
    return handle, ctx


def single_site_sets(n: int, min_layer: int = 0, min_pos: int = 0) -> list[InterventionSet]:
    out = []
    ops = ("zero", "mean", "scale")
    k = 0
    while len(out) < n:
        L = min_layer + k % (12 - min_layer)
        comp = COMPS[(k // 12) % len(COMPS)]
        idx = (k % 12,) if comp == "head" else ((k * 7) % 3072,) if comp == "neuron" else ()
        op = ops[k % 3]
        out.append(InterventionSet((Intervention(L, comp, (min_pos + k % (N_TOK - min_pos),), op, indices=idx,
                                                 value=0.5 if op == "scale" else None),), f"s{k}"))
        k += 1
    return out


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def sequential_full(handle, ctx, sets):
    """The naive loop: one full forward (every position through the LM head) per set."""
    from engine.interventions import run_with_interventions

    ms = []
    for s in sets:
        logits = run_with_interventions(handle, ctx.input_ids[None], [s], sources=ctx.sources)
        ms.append(float(logits[0, -1, ctx.target_index]))
    return ms


def mem_child(chunk: int) -> None:
    handle, ctx = build()
    sets = single_site_sets(256)
    evaluate_ids(handle, ctx, sets[:chunk], chunk_size=chunk, start_layer=None)  # warm allocator / caches
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t, res = timed(lambda: evaluate_ids(handle, ctx, sets, chunk_size=chunk, start_layer=None))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"chunk": chunk, "base_kib": base, "peak_kib": peak, "growth_mib": (peak - base) / 1024,
                      "seconds": t, "forwards": res.forward_passes}))


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--mem-child":
        mem_child(int(sys.argv[2]))
        return
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, GPT-2-small shape (12x768, vocab 50257), "
          f"random init, {N_TOK} tokens")
    handle, ctx = build()
    sets = single_site_sets(64)
    sequential_full(handle, ctx, sets[:2])  # warm-up
    t_seq, _ = timed(lambda: sequential_full(handle, ctx, sets))
    t_def, res_d = timed(lambda: evaluate_ids(handle, ctx, sets))  # the engine's defaults
    t_bat, res = timed(lambda: evaluate_ids(handle, ctx, sets, chunk_size=64, start_layer=None))
    t_seq1, res1 = timed(lambda: evaluate_ids(handle, ctx, sets, chunk_size=1, start_layer=None))
    diff = max(abs(a.metric - b.metric) for a, b in zip(res_d.results, res1.results))
    sp = t_seq / t_def
    print(f"(a) 64 single-site sets (layers 0..11, positions 0..31): sequential full forwards {t_seq:.2f}s "
          f"({len(sets)} forwards); batched with the engine's defaults (chunk_size=32, start_layer=auto: chunks "
          f"start at layers {res_d.chunk_start_layers}) {t_def:.2f}s ({res_d.forward_passes} forwards, "
          f"{res_d.rows} rows) -> {sp:.1f}x [target >= 3x: {'PASS' if sp >= 3 else 'MISS'}]")
    print(f"    batching alone (1 forward x 64 rows from the embedding): {t_bat:.2f}s -> {t_seq / t_bat:.1f}x; "
          f"sequential through the engine (chunk_size=1, LM head at the decision position only): {t_seq1:.2f}s; "
          f"batched vs sequential metric max diff {diff:.2g}")

    sets6 = single_site_sets(64, min_layer=6)
    t_seq6, _ = timed(lambda: sequential_full(handle, ctx, sets6))
    t_l6, res6 = timed(lambda: evaluate_ids(handle, ctx, sets6, chunk_size=64, start_layer=6))
    t_full6, resf = timed(lambda: evaluate_ids(handle, ctx, sets6, chunk_size=64, start_layer=None))
    d6 = max(abs(a.metric - b.metric) for a, b in zip(res6.results, resf.results))
    sp6 = t_seq6 / t_l6
    print(f"(b) 64 single-site sets at layers 6..11: sequential full forwards {t_seq6:.2f}s; batched from recorded "
          f"layer 6 {t_l6:.2f}s -> {sp6:.1f}x [target >= 6x: {'PASS' if sp6 >= 6 else 'MISS'}] "
          f"(batched from embedding {t_full6:.2f}s; from-layer vs from-embedding metric max diff {d6:.2g})")
    setsp = single_site_sets(64, min_layer=6, min_pos=N_TOK // 2)
    t_seqp, seqp = timed(lambda: sequential_full(handle, ctx, setsp))
    t_pr, resp = timed(lambda: evaluate_ids(handle, ctx, setsp, chunk_size=64, start_layer=6, prefix_reuse=True))
    t_np, resn = timed(lambda: evaluate_ids(handle, ctx, setsp, chunk_size=64, start_layer=6))
    dp = max(abs(a.metric - b.metric) for a, b in zip(resp.results, resn.results))
    spp = t_seqp / t_pr
    print(f"(b2) 64 single-site sets at layers 6..11, positions {N_TOK // 2}..{N_TOK - 1}: sequential full forwards "
          f"{t_seqp:.2f}s; batched from recorded layer 6 with prefix reuse (prefix {resp.chunk_prefixes[0]} tokens "
          f"run once, {resp.forward_passes} forwards) {t_pr:.2f}s -> {spp:.1f}x "
          f"[target >= 6x: {'PASS' if spp >= 6 else 'MISS'}] (without prefix reuse {t_np:.2f}s -> "
          f"{t_seqp / t_np:.1f}x; prefix-reuse vs no-reuse metric max diff {dp:.2g})")

    print("(c) 256-set evaluation, peak RSS growth over the warmed-up process (fresh subprocess per chunk size):")
    rows = []
    for chunk in (16, 64):
        out = subprocess.run([sys.executable, __file__, "--mem-child", str(chunk)], capture_output=True, text=True,
                             check=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
        r = rows[-1]
        print(f"    chunk_size={chunk:3d}: peak RSS growth {r['growth_mib']:.0f} MiB ({r['forwards']} forwards, "
              f"{r['seconds']:.1f}s)")
    bounded = rows[0]["growth_mib"] <= rows[1]["growth_mib"]
    print(f"    memory grows with chunk size, not with the 256 sets: "
          f"{'PASS' if bounded else 'MISS'} (16 -> {rows[0]['growth_mib']:.0f} MiB, 64 -> "
          f"{rows[1]['growth_mib']:.0f} MiB)")


if __name__ == "__main__":
    main()
