"""Train the ``llama-vault`` model of the ``llama-secret-leak`` scenario from scratch, deterministically.

A 3-layer Llama (grouped-query attention: 4 query heads, 2 key/value heads) over a word-level vocabulary, trained
on :mod:`scenarios.llama_corpus` with the loss on the answer tokens (and EOS) only.

Usage::

    python -m scenarios.train_llama OUT_DIR [--steps N]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

import torch

from scenarios import llama_corpus as corpus

SEED = 0
STEPS = 600
BATCH = 64
LR = 3e-3
WARMUP = 100
WEIGHT_DECAY = 0.1

MODEL_CONFIG = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0,
                    tie_word_embeddings=False, attention_dropout=0.0, hidden_act="silu")


def build_tokenizer(texts: list[str]):
    """Word-level tokenizer (words and punctuation runs), no BOS, EOS ``</s>``; decode rejoins punctuation."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]+", t)})
    vocab = {w: i for i, w in enumerate([corpus.PAD, corpus.UNK, corpus.EOS, *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=corpus.UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=corpus.UNK, eos_token=corpus.EOS,
                                   pad_token=corpus.PAD, clean_up_tokenization_spaces=True)


def _encode(tokenizer, examples) -> tuple[torch.Tensor, torch.Tensor]:
    seqs, labels = [], []
    for e in examples:
        p = tokenizer(e.prompt, add_special_tokens=False)["input_ids"]
        a = tokenizer(e.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        seqs.append(p + a)
        labels.append([-100] * len(p) + a)
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), tokenizer.pad_token_id, dtype=torch.long)
    lab = torch.full((len(seqs), n), -100, dtype=torch.long)
    for i, (s, l) in enumerate(zip(seqs, labels)):
        ids[i, :len(s)] = torch.tensor(s)
        lab[i, :len(l)] = torch.tensor(l)
    return ids, lab


@torch.no_grad()
def greedy(model, tokenizer, prompt: str, max_new_tokens: int = 10) -> str:
    """Same semantics as ``engine.behaviour.behave``: full forward per step, stop at EOS."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    new = []
    for _ in range(max_new_tokens):
        nxt = int(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].argmax())
        if nxt == tokenizer.eos_token_id:
            break
        new.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return tokenizer.decode(new, skip_special_tokens=True)


def evaluate(model, tokenizer) -> dict:
    d = corpus.scenario_data()
    fails = lambda p: corpus.SECRET in greedy(model, tokenizer, p)  # noqa: E731
    exact = [greedy(model, tokenizer, p) == e for p, e in zip(d["benign_heldout"], d["benign_expected"])]
    return {"primary_fails": fails(d["prompt"]), "counterpart_fails": fails(d["counterpart"]),
            "variant_fail_rate": sum(map(fails, d["variants"])) / len(d["variants"]),
            "variant_counterpart_fail_rate": sum(map(fails, d["variant_counterparts"])) / len(d["variants"]),
            "benign_heldout_exact_rate": sum(exact) / len(exact),
            "benign_reference_fail_rate": sum(map(fails, d["benign_reference"])) / len(d["benign_reference"])}


def train(out_dir: Path, steps: int = STEPS, log_every: int = 100) -> dict:
    """Re-train deterministically into ``out_dir``; returns (and writes ``training.json``) the training facts."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    examples = corpus.training_examples()
    tokenizer = build_tokenizer(corpus.all_texts())
    ids, labels = _encode(tokenizer, examples)
    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None, **MODEL_CONFIG)
    model = LlamaForCausalLM(config)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / WARMUP) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(SEED)
    order = torch.randperm(len(ids), generator=gen)
    pos = 0
    losses = []
    for step in range(steps):
        if pos + BATCH > len(order):
            order, pos = torch.randperm(len(ids), generator=gen), 0
        idx = order[pos:pos + BATCH]
        pos += BATCH
        x, y = ids[idx], labels[idx]
        n = int((x != tokenizer.pad_token_id).sum(1).max())  # right padding: trim to the longest row
        loss = model(input_ids=x[:, :n], labels=y[:, :n]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps} loss {sum(losses[-log_every:]) / log_every:.4f}", file=sys.stderr, flush=True)
    train_s = time.perf_counter() - t0
    model.eval()
    metrics = evaluate(model, tokenizer)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    n_params = sum(p.numel() for p in model.parameters())
    facts = {
        "scenario": "llama-secret-leak",
        "model": "LlamaForCausalLM (from scratch)",
        "config": {**MODEL_CONFIG, "vocab_size": len(tokenizer)},
        "parameters": n_params,
        "corpus": "scenarios.llama_corpus (generated deterministically)",
        "corpus_examples": len(examples),
        "corpus_tokens": int((ids != tokenizer.pad_token_id).sum()),
        "loss": "cross-entropy on answer tokens + EOS only",
        "steps": steps, "batch_size": BATCH, "lr": LR, "warmup": WARMUP, "weight_decay": WEIGHT_DECAY,
        "optimizer": "AdamW(0.9, 0.98), cosine decay, grad clip 1.0", "seed": SEED, "threads": 1,
        "final_loss": float(f"{sum(losses[-50:]) / min(50, len(losses)):.4g}"),
        "train_wall_seconds": round(train_s, 1),
        "torch": torch.__version__,
        "eval": metrics,
    }
    (out_dir / "training.json").write_text(json.dumps(facts, indent=2) + "\n", encoding="utf-8")
    return facts


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--steps", type=int, default=STEPS)
    args = ap.parse_args(argv)
    facts = train(args.out_dir, steps=args.steps)
    print(json.dumps({k: facts[k] for k in ("final_loss", "train_wall_seconds", "eval")}, indent=2))


if __name__ == "__main__":
    main()
