"""A small, generic, deterministic training loop for tiny causal LMs with a word-level tokenizer.

Used by the shipped scenarios whose models we train from scratch on generated corpora (``scenarios.sc_gpt2``;
reusable for any ``*ForCausalLM`` / ``*LMHeadModel``).

* :func:`build_tokenizer` -- a ``tokenizers`` WordLevel tokenizer (whitespace/punctuation pre-tokenizer, a
  WordPiece decoder with cleanup so ``decode`` gives ``"OK, I will summarize the report."``) wrapped as a
  ``PreTrainedTokenizerFast`` with ``<eos>``/``<pad>``/``<unk>`` special tokens; ``save_pretrained`` +
  ``AutoTokenizer.from_pretrained`` round-trip it.
* :func:`train_causal_lm` -- AdamW, linear warm-up then cosine decay, gradient clipping, fixed data order from a
  seeded ``torch.Generator``. Sequences are ``prompt + response + <eos>``, right-padded within a batch (padding
  never influences real tokens of a causal model, so training matches an unpadded forward), loss on the response
  tokens (and EOS) or on all tokens.

Determinism: call with the same inputs, same seed and ``torch.set_num_threads(1)`` (the caller's choice) and the
weights come out bit-identical on the same machine/torch build.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Callable, Iterable, Sequence

import torch

SPECIALS = ("<pad>", "<unk>", "<eos>")
#: Pre-tokenizer pattern: runs of word characters, or single punctuation marks.
_SPLIT = r"\w+|[^\w\s]"


def build_tokenizer(texts: Iterable[str], extra_tokens: Iterable[str] = ()):
    """Word-level tokenizer over every word/punctuation mark in ``texts`` (plus ``extra_tokens``).

    Vocabulary order: the special tokens ``<pad>`` (0), ``<unk>`` (1), ``<eos>`` (2), then ``extra_tokens`` in the
    given order, then the remaining tokens sorted (so the result depends only on the set of texts).

    Returns:
        a ``transformers.PreTrainedTokenizerFast`` with ``eos_token``, ``pad_token`` and ``unk_token`` set.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    split = pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated")
    pre = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), split])
    words: set[str] = set()
    for t in texts:
        words.update(w for w, _ in pre.pre_tokenize_str(t))
    vocab: dict[str, int] = {}
    for w in [*SPECIALS, *extra_tokens, *sorted(words)]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
                                   clean_up_tokenization_spaces=False)
    return fast


def encode_example(tokenizer, example: str | tuple[str, str]) -> tuple[list[int], int]:
    """Token ids of ``prompt + " " + response + <eos>`` and the number of prompt tokens.

    ``example`` is a ``(prompt, response)`` pair, or a plain string (no prompt part: every token is a response
    token).
    """
    if isinstance(example, str):
        prompt_ids: list[int] = []
        resp_ids = tokenizer.encode(example, add_special_tokens=False)
    else:
        prompt, response = example
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        resp_ids = tokenizer.encode(response, add_special_tokens=False)
    return prompt_ids + resp_ids + [tokenizer.eos_token_id], len(prompt_ids)


def _batch(encoded: list[tuple[list[int], int]], pad_id: int, loss_on: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(encoded):
        t = torch.tensor(ids, dtype=torch.long)
        input_ids[i, :len(ids)] = t
        start = 1 if loss_on == "all" else max(n_prompt, 1)
        labels[i, start:len(ids)] = t[start:]
    return input_ids, labels


def _log_stderr(text: str) -> None:
    """Training progress goes to stderr: stdout stays free for a command's own output (``--json``)."""
    print(text, file=sys.stderr, flush=True)


def train_causal_lm(model: torch.nn.Module, tokenizer, texts: Sequence[str | tuple[str, str]], steps: int,
                    lr: float = 1e-3, batch_size: int = 32, seed: int = 0, loss_on: str = "response", *,
                    warmup: float = 0.05, weight_decay: float = 0.01, min_lr_ratio: float = 0.05,
                    clip: float = 1.0, log_every: int = 100,
                    log: Callable[[str], None] | None = None) -> dict:
    """Train ``model`` in place on ``texts`` for ``steps`` optimizer steps.

    Args:
        texts: ``(prompt, response)`` pairs (or plain strings with ``loss_on="all"``).
        loss_on: ``"response"`` (cross-entropy on response tokens + EOS only) or ``"all"``.

    Returns:
        facts: ``steps``, ``batch_size``, ``lr``, ``seed``, ``loss_on``, ``sequences``, ``tokens`` (corpus size),
        ``epochs``, ``final_loss`` (mean of the last 50 steps), ``wall_time_s``, ``loss_curve`` (every
        ``log_every`` steps).

    Progress (every ``log_every`` steps) goes to ``log``, by default to stderr, so that a command's stdout holds
    only its own output (``forensics scenario build --retrain --json``).
    """
    if loss_on not in ("response", "all"):
        raise ValueError(f"loss_on must be 'response' or 'all', got {loss_on!r}")
    if loss_on == "response" and any(isinstance(t, str) for t in texts):
        raise ValueError("loss_on='response' needs (prompt, response) pairs")
    torch.manual_seed(seed)
    encoded = [encode_example(tokenizer, t) for t in texts]
    n_tokens = sum(len(ids) for ids, _ in encoded)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    gen = torch.Generator().manual_seed(seed)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))
    n_warm = max(1, int(steps * warmup))

    def lr_at(step: int) -> float:
        if step < n_warm:
            return lr * (step + 1) / n_warm
        frac = (step - n_warm) / max(1, steps - n_warm)
        return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))

    model.train()
    order = torch.randperm(len(encoded), generator=gen).tolist()
    pos, epochs = 0, 1
    losses: list[float] = []
    curve: list[tuple[int, float]] = []
    t0 = time.perf_counter()
    for step in range(steps):
        idx = []
        while len(idx) < batch_size:
            if pos >= len(order):
                order = torch.randperm(len(encoded), generator=gen).tolist()
                pos, epochs = 0, epochs + 1
            idx.append(order[pos])
            pos += 1
        input_ids, labels = _batch([encoded[i] for i in idx], pad_id, loss_on)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        logits = model(input_ids=input_ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                 labels[:, 1:].reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        losses.append(float(loss.detach()))
        if log_every and (step + 1) % log_every == 0:
            recent = sum(losses[-log_every:]) / len(losses[-log_every:])
            curve.append((step + 1, round(recent, 5)))
            (log or _log_stderr)(f"step {step + 1}/{steps} loss {recent:.4f} lr {lr_at(step):.2e} "
                                 f"{time.perf_counter() - t0:.0f}s")
    model.eval()
    tail = losses[-50:]
    return {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "loss_on": loss_on,
            "sequences": len(encoded), "tokens": n_tokens, "epochs": epochs,
            "final_loss": round(sum(tail) / max(1, len(tail)), 6),
            "wall_time_s": round(time.perf_counter() - t0, 1), "loss_curve": curve}


@torch.no_grad()
def greedy(model: torch.nn.Module, tokenizer, prompt: str, max_new_tokens: int = 10) -> str:
    """Greedy continuation (full forward per step, no cache, stop at EOS) -- same semantics as
    ``engine.behaviour.behave``; for evaluating during/after training without a ``ModelHandle``."""
    ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)], dtype=torch.long)
    new: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].argmax())
        if nxt == tokenizer.eos_token_id:
            break
        new.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return tokenizer.decode(new, skip_special_tokens=True)
