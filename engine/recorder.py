"""The recorder: run a model on a failing prompt with hooks on every site and build an :class:`Incident`.

Modes:

``generate`` (``contains:`` / ``wordlist:`` specs on a causal LM)
    greedy continuation first (no hooks), then ONE recorded forward over prompt + continuation; the bundle holds
    the activations of that forward for every token.
``prompt`` (``token:`` specs)
    one recorded forward over the prompt.
``classify`` (``label:`` specs on a sequence classifier)
    one recorded forward; the logits are the class logits.

Every forward runs with batch size 1 and no padding, under ``torch.no_grad()``, with the thread count pinned
(:func:`engine.layout.pinned_threads`: OpenMP = MKL threads, MKL dynamic off, exactly as a replay runs) and the
count and deterministic flags written to the bundle's environment so a replay can use the same layout.
"""

from __future__ import annotations

import io
import json
import platform
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .behaviour import decode, encode, greedy_continuation
from .bundle import (BenignRecord, FailureRecord, Incident, ModelInfo, RunRecord, TokenizerInfo)
from .bundle.schema import ACTIVATION_SITES, PROMPT_SETS, STAT_SITES
from .errors import FailureSpecError, ForensicsError, RecordError
from .failure import FailureSpec, margin, span_logprob
from .hooks import forward_captured
from .layout import THREADING, pinned_threads
from .models import ModelHandle, tokenizer_sha256

Progress = Callable[[int, int, str], None]
#: Models whose weights are at most this many bytes are embedded in the bundle by default.
EMBED_LIMIT_BYTES = 64 * 2**20
SEED = 0


class RecordingCancelled(ForensicsError):
    """The recording was cancelled before the bundle was complete (nothing is written)."""


#: how the recorder lays out its forwards, by incident mode (``/environment`` attribute ``batch_layout``)
BATCH_LAYOUTS = {"generate": "batch_size=1, no padding, full forward per generated token (no KV cache)",
                 "prompt": "batch_size=1, no padding, one forward of the prompt",
                 "classify": "batch_size=1, no padding, one forward of the input"}


def environment(handle: ModelHandle, threads: int | None = None, mode: str = "generate") -> dict:
    """Facts a replay needs to reproduce the computation bit for bit (``threads``: the pinned count recorded under;
    ``mode``: the incident's mode, which decides the forward layout)."""
    import h5py
    import transformers

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "h5py": h5py.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "device": "cpu",
        "torch_num_threads": int(threads or torch.get_num_threads()),
        "threading": THREADING,
        "deterministic_algorithms": bool(torch.are_deterministic_algorithms_enabled()),
        "seed": SEED,
        "batch_layout": BATCH_LAYOUTS[mode],
        "batch_size": 1,
        "grad_enabled": False,
        "attn_implementation": str(getattr(handle.model.config, "_attn_implementation", "") or ""),
        "dtype": str(next(handle.model.parameters()).dtype).replace("torch.", ""),
    }


def model_info(handle: ModelHandle, embed_weights: bool | str = "auto") -> ModelInfo:
    from safetensors.torch import save

    model = handle.model
    n_bytes = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    embed = (n_bytes <= EMBED_LIMIT_BYTES) if embed_weights == "auto" else bool(embed_weights)
    blob = None
    if embed:
        seen: dict[tuple, str] = {}
        tensors, tied = {}, {}
        for name, t in model.state_dict().items():
            key = (t.data_ptr(), t.numel(), t.dtype)
            if t.numel() and key in seen:  # tied weights: stored once, re-tied on load
                tied[name] = seen[key]
                continue
            seen[key] = name
            tensors[name] = t.detach().cpu().contiguous()
        # the header names each dropped tensor and the one it is tied to, so that weights_sha256 can be checked
        # from the file alone (docs/bundle-format.md §3.1.1)
        blob = save(tensors, metadata={"tied_weights": json.dumps(tied, sort_keys=True)})
    id2label = getattr(model.config, "id2label", None) if handle.is_classifier else None
    return ModelInfo(
        source=handle.source, class_name=type(model).__name__, family=handle.family,
        task="classification" if handle.is_classifier else ("causal-lm" if handle.is_causal_lm else "encoder"),
        dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
        config_json=model.config.to_json_string(use_diff=False), weights_sha256=handle.weights_sha256(),
        attn_implementation=str(getattr(model.config, "_attn_implementation", "") or ""),
        n_layers=handle.n_layers, d_model=handle.d_model, n_heads=handle.n_heads, d_head=handle.d_head,
        d_mlp=handle.d_mlp, weights_safetensors=blob,
        id2label={int(k): str(v) for k, v in id2label.items()} if id2label else None)


def tokenizer_info(handle: ModelHandle) -> TokenizerInfo:
    tok = handle.tokenizer
    files: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        for p in sorted(Path(tmp).iterdir()):
            if p.is_file() and p.suffix in (".json", ".txt", ".model"):
                files[p.name] = p.read_bytes()
    return TokenizerInfo(sha256=tokenizer_sha256(tok), class_name=type(tok).__name__, files=files)


def _mode_for(handle: ModelHandle, spec: FailureSpec) -> str:
    if spec.kind == "label":
        if not handle.is_classifier:
            raise FailureSpecError(f"{spec} needs a sequence classifier; {type(handle.model).__name__} is not one")
        return "classify"
    if not handle.is_causal_lm:
        raise FailureSpecError(f"{spec} needs a causal language model; {type(handle.model).__name__} is not one")
    return "generate" if spec.needs_generation else "prompt"


def _token_span(handle: ModelHandle, cont_ids: list[int], span: tuple[int, int]) -> tuple[int, int]:
    """Tokens ``[k0, k1)`` of the continuation whose decoded text covers the character span."""
    start, end = span
    k0 = 0
    for k in range(len(cont_ids) + 1):
        if len(decode(handle, cont_ids[:k])) <= start:
            k0 = k
    k1 = k0 + 1
    while k1 < len(cont_ids) and len(decode(handle, cont_ids[:k1])) < end:
        k1 += 1
    return k0, max(k1, k0 + 1)


@torch.no_grad()
def record_run(handle: ModelHandle, spec: FailureSpec, prompt: str, max_new_tokens: int = 8,
               sites: Sequence[str] = ACTIVATION_SITES) -> tuple[RunRecord, FailureRecord]:
    """Record one run of ``prompt``: outputs, every site's activations, and the failure judgement."""
    mode = _mode_for(handle, spec)
    enc = encode(handle, prompt)
    n_prompt = int(enc["input_ids"].shape[1])
    cont: list[int] = []
    if mode == "generate":
        cont = greedy_continuation(handle, enc["input_ids"], max_new_tokens)
        full = torch.cat([enc["input_ids"], torch.tensor([cont], dtype=torch.long)], dim=1)
        enc = {"input_ids": full, "attention_mask": torch.ones_like(full)}
    keys = [(i, s) for i in range(handle.n_layers) for s in sites]
    out, acts = forward_captured(handle, keys, **enc)
    logits = out.logits
    ids = enc["input_ids"]
    text = decode(handle, cont)
    label = None
    target_start, target_length, target_index, span = -1, 0, -1, None
    if mode == "classify":
        dec_logits = logits[0:1].float()
        decision = np.array([0])
        target_index = spec.target_index(id2label=handle.model.config.id2label)
        label = str(handle.model.config.id2label[int(logits[0].argmax())])
        failing = label == spec.value
        metric = float(margin(logits[0], target_index))
        text = label
    elif mode == "prompt":
        dec_logits = logits[0, -1:].float()
        decision = np.array([n_prompt - 1])
        target_index = spec.target_index(tokenizer=handle.tokenizer)
        failing = int(logits[0, -1].argmax()) == target_index
        metric = float(margin(logits[0, -1], target_index))
        text = decode(handle, [int(logits[0, -1].argmax())])
    else:
        dec_logits = logits[0, n_prompt - 1:].float()
        decision = np.arange(n_prompt - 1, ids.shape[1])
        span = spec.find(text)
        failing = span is not None
        if failing:
            k0, k1 = _token_span(handle, cont, span)
            target_start, target_length = n_prompt + k0, k1 - k0
            metric = float(span_logprob(logits, ids, target_start, target_length)[0])
        else:  # not failing: log-prob of the failing text right after the prompt (one extra forward)
            want = spec.value if spec.kind == "contains" else spec.words[0]
            tgt = handle.tokenizer(" " + want if not want.startswith(" ") else want, add_special_tokens=False,
                                   return_tensors="pt")["input_ids"]
            probe = torch.cat([enc["input_ids"][:, :n_prompt], tgt], dim=1)
            metric = float(span_logprob(handle.model(input_ids=probe).logits, probe, n_prompt, tgt.shape[1])[0])
    tokens = [handle.tokenizer.decode([int(t)]) for t in ids[0]]
    run = RunRecord(
        prompt=prompt, mode=mode, input_ids=ids[0].numpy(), attention_mask=enc["attention_mask"][0].numpy(),
        token_type_ids=enc["token_type_ids"][0].numpy() if "token_type_ids" in enc else None,
        n_prompt_tokens=n_prompt, tokens=tokens, logits=dec_logits.numpy(), decision_positions=decision,
        continuation_ids=np.array(cont, dtype=np.int64), continuation_text=text, label=label,
        activations={k: v[0].numpy() for k, v in acts.items()})
    fail = FailureRecord(spec=str(spec), failing=failing, metric=metric, expected="", max_new_tokens=max_new_tokens,
                         span_chars=span, target_start=target_start, target_length=target_length,
                         target_index=target_index, words=spec.words)
    return run, fail


@torch.no_grad()
def record_benign(handle: ModelHandle, spec: FailureSpec, prompts: Sequence[str], max_new_tokens: int = 8,
                  progress: Progress | None = None, cancel: threading.Event | None = None) -> BenignRecord:
    """Run benign reference prompts: their behaviour, and per-site means (token mean and per-position mean)."""
    from .behaviour import behave

    keys = [(i, s) for i in range(handle.n_layers) for s in STAT_SITES]
    sums: dict = {}
    pos_sums: dict = {}
    max_pos = 0
    encs = [encode(handle, p) for p in prompts]
    max_pos = max((int(e["input_ids"].shape[1]) for e in encs), default=0)
    pos_counts = np.zeros(max_pos, dtype=np.int64)
    outputs, failing = [], []
    token_count = 0
    for n, (prompt, enc) in enumerate(zip(prompts, encs)):
        if cancel is not None and cancel.is_set():
            raise RecordingCancelled("recording cancelled during the benign runs")
        _, acts = forward_captured(handle, keys, **enc)
        L = int(enc["input_ids"].shape[1])
        pos_counts[:L] += 1
        token_count += L
        for key, t in acts.items():
            a = t[0].double().numpy()  # [pos, *shape]
            if key not in sums:
                sums[key] = np.zeros(a.shape[1:], dtype=np.float64)
                pos_sums[key] = np.zeros((max_pos, *a.shape[1:]), dtype=np.float64)
            sums[key] += a.sum(axis=0)
            pos_sums[key][:L] += a
        b = behave(handle, spec, prompt, max_new_tokens)
        outputs.append(b.output)
        failing.append(b.failing)
        if progress:
            progress(n + 1, len(prompts), "benign reference runs")
    return BenignRecord(prompts=list(prompts), outputs=outputs, failing=failing, sums=sums, pos_sums=pos_sums,
                        pos_counts=pos_counts, token_count=token_count)


def record_incident(handle: ModelHandle, prompt: str, failure: str | FailureSpec, *,
                    benign_prompts: Sequence[str] = (), prompt_sets: dict[str, Sequence[str]] | None = None,
                    max_new_tokens: int = 8, expected: str = "", embed_weights: bool | str = "auto",
                    scenario: str = "", progress: Progress | None = None,
                    cancel: threading.Event | None = None) -> Incident:
    """Record a failing run (plus optional benign reference runs) into an in-memory :class:`Incident`.

    Args:
        handle: the loaded model.
        prompt: the failing prompt.
        failure: failure spec (string or parsed).
        benign_prompts: benign reference prompts; their outputs and per-site means go into the bundle
            (CF baselines and mean-ablation use them).
        prompt_sets: other prompt sets to carry (``counterpart``, ``variants``, ``variant_counterparts``,
            ``benign_heldout``, ``benign_expected``).
        max_new_tokens: greedy continuation length for ``contains:``/``wordlist:`` specs.
        expected: the expected (correct) behaviour, in words.
        embed_weights: ``True``/``False``/``"auto"`` (embed when the weights are ≤ 64 MiB).

    Write it with :func:`engine.bundle.write_bundle`.
    """
    spec = failure if isinstance(failure, FailureSpec) else FailureSpec.parse(failure)
    if not str(prompt).strip():
        raise RecordError("the failing prompt is empty: give the text the model fails on")
    if spec.kind in ("contains", "wordlist") and int(max_new_tokens) < 1:
        raise RecordError(f"max_new_tokens must be at least 1 (got {max_new_tokens}): a {spec.kind}: failure is "
                          "judged on the generated continuation")
    torch.manual_seed(SEED)
    sets = {k: list(v) for k, v in (prompt_sets or {}).items() if v is not None}
    unknown = set(sets) - set(PROMPT_SETS)
    if unknown:
        raise ForensicsError(f"unknown prompt sets: {', '.join(sorted(unknown))}")
    if isinstance(sets.get("counterpart"), str):
        sets["counterpart"] = [sets["counterpart"]]
    if progress:
        progress(0, 1, "recording the failing run")
    with pinned_threads() as threads:
        run, fail = record_run(handle, spec, prompt, max_new_tokens)
        fail.expected = expected
        benign = None
        if benign_prompts:
            benign = record_benign(handle, spec, list(benign_prompts), max_new_tokens, progress, cancel)
    if progress:
        progress(1, 1, "recorded")
    return Incident(model=model_info(handle, embed_weights), tokenizer=tokenizer_info(handle), run=run,
                    failure=fail, environment=environment(handle, threads, run.mode), benign=benign, prompts=sets,
                    scenario=scenario)
