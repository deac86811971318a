"""Recording benchmark on a GPT-2-small-sized model (random init, seed 0), CPU.

Measures, in one run:

* recording overhead: forward under ``engine.hooks.forward_captured`` (what the recorder runs) of all 4 residual sites x 12 layers, divided by the
  plain forward (median of several interleaved repetitions), at 32 and 1024 tokens (target <= 1.05);
* bundle size at 1024 tokens: ``record_incident(..., embed_weights=False)`` written with ``write_bundle``
  (target <= 100 MB);
* time to open that bundle and read one full site (target <= 0.2 s).

Usage::

    .venv/bin/python benchmarks/record.py [--reps N]

Prints a table with targets and PASS/MISS; numbers are measured, never adjusted.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from engine.bundle import open_bundle, write_bundle  # noqa: E402
from engine.hooks import all_sites, forward_captured  # noqa: E402
from engine.models import ModelHandle  # noqa: E402
from engine.recorder import record_incident  # noqa: E402

VOCAB = 50257
LENGTHS = (32, 1024)
TARGET_RATIO = 1.05
TARGET_MB = 100.0
TARGET_OPEN_S = 0.2


def build_tokenizer():
    """Word-level tokenizer with one word per id (``w0`` .. ``w50254`` + 2 specials): any id sequence is the
    tokenisation of the text ``"w<id> w<id> ..."``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1}
    for i in range(2, VOCAB):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>",
                                   clean_up_tokenization_spaces=False)


def build_model() -> ModelHandle:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=VOCAB, n_positions=1024,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, eos_token_id=1, bos_token_id=1)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg).eval()
    return ModelHandle(model=model, tokenizer=build_tokenizer(), source="")


@torch.no_grad()
def forward_ratio(handle: ModelHandle, n_tokens: int, reps: int) -> tuple[float, float, float]:
    """(median plain s, median recorded s, median over repetitions of recorded/plain).

    Each repetition runs a plain and a recorded forward back to back (order alternating) and contributes the ratio
    of the two: on a shared machine whose load changes over seconds, the ratio of adjacent runs is far more stable
    than the ratio of two medians taken over different moments."""
    gen = torch.Generator().manual_seed(n_tokens)
    ids = torch.randint(2, VOCAB, (1, n_tokens), generator=gen)
    enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    keys = all_sites(handle)
    assert len(keys) == 48

    def plain():
        handle.model(**enc)

    def recorded():
        _, acts = forward_captured(handle, keys, **enc)
        assert len(acts) == 48

    for fn in (plain, recorded):  # warm-up
        fn()
    t_plain, t_rec = [], []
    for r in range(reps):
        order = (plain, recorded) if r % 2 == 0 else (recorded, plain)
        for fn in order:
            gc.collect()
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            (t_plain if fn is plain else t_rec).append(dt)
    ratios = [q / p for p, q in zip(t_plain, t_rec)]
    return statistics.median(t_plain), statistics.median(t_rec), statistics.median(ratios)


def bundle_numbers(handle: ModelHandle, folder: Path) -> dict:
    gen = np.random.default_rng(0)
    ids = gen.integers(2, VOCAB, size=1024)
    prompt = " ".join(f"w{i}" for i in ids)
    assert handle.tokenizer(prompt)["input_ids"] == ids.tolist()
    t0 = time.perf_counter()
    inc = record_incident(handle, prompt, f"token:w{int(ids[0])}", embed_weights=False)
    t_record = time.perf_counter() - t0
    assert inc.run.input_ids.shape == (1024,) and len(inc.run.activations) == 48
    path = folder / "gpt2-small-1024.h5"
    t0 = time.perf_counter()
    write_bundle(path, inc)
    t_write = time.perf_counter() - t0
    size = path.stat().st_size
    raw = sum(a.nbytes for a in inc.run.activations.values())
    del inc
    gc.collect()

    opens = []
    for _ in range(5):
        t0 = time.perf_counter()
        with open_bundle(path) as b:
            site = b.activation(6, "mlp")
        opens.append(time.perf_counter() - t0)
    assert site.shape == (1024, 768)
    t0 = time.perf_counter()
    with open_bundle(path) as b:
        t_open_only = time.perf_counter() - t0
    return dict(size_mb=size / 1e6, raw_mb=raw / 1e6, t_record=t_record, t_write=t_write,
                t_open_first=opens[0], t_open_median=statistics.median(opens), t_open_only=t_open_only)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=0, help="repetitions per length (default: 31 at 32, 13 at 1024)")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; GPT-2 small shape "
          f"(12 layers, 768 wide, 12 heads, vocab {VOCAB}), random init seed 0", flush=True)
    handle = build_model()
    rows = []
    for n in LENGTHS:
        reps = args.reps or (31 if n <= 64 else 13)
        p, q, ratio = forward_ratio(handle, n, reps)
        print(f"  {n:5d} tokens: plain {p * 1e3:8.1f} ms, recorded {q * 1e3:8.1f} ms (medians of {reps}); "
              f"median of per-repetition ratios {ratio:.3f}", flush=True)
        rows.append((f"recorded/plain forward, {n} tokens", f"{ratio:.3f}", f"<= {TARGET_RATIO}",
                     ratio <= TARGET_RATIO))
    with tempfile.TemporaryDirectory() as tmp:
        nb = bundle_numbers(handle, Path(tmp))
    print(f"  bundle: activations {nb['raw_mb']:.1f} MB raw (incl. hard-linked resid_pre), file "
          f"{nb['size_mb']:.1f} MB; record_incident {nb['t_record']:.2f} s, write_bundle {nb['t_write']:.2f} s; "
          f"open only {nb['t_open_only'] * 1e3:.1f} ms, open+read first {nb['t_open_first'] * 1e3:.1f} ms",
          flush=True)
    rows.append((f"bundle size at 1024 tokens (MB = 1e6 B; {nb['size_mb'] * 1e6 / 2**20:.1f} MiB)",
                 f"{nb['size_mb']:.1f}", f"<= {TARGET_MB:.0f}",
                 nb["size_mb"] <= TARGET_MB))
    rows.append(("open bundle + read one site (s, median of 5)", f"{nb['t_open_median']:.3f}",
                 f"<= {TARGET_OPEN_S}", nb["t_open_median"] <= TARGET_OPEN_S))

    w = max(len(r[0]) for r in rows)
    print()
    print(f"{'measure':<{w}}  {'value':>8}  {'target':>8}  result")
    print(f"{'-' * w}  {'-' * 8}  {'-' * 8}  ------")
    for name, value, target, ok in rows:
        print(f"{name:<{w}}  {value:>8}  {target:>8}  {'PASS' if ok else 'MISS'}")
    print(f"\n(total benchmark time {time.perf_counter() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
