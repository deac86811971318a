"""Plain (un-intervened) behaviour of a model on a prompt: greedy continuation, next token, label.

These are the reference semantics every replay and intervention result is compared with: greedy decoding with a
full forward per step (no KV cache, so a step's computation is the same whether or not an intervention hooks it),
stopping at the tokenizer's EOS token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .failure import FailureSpec
from .models import ModelHandle


def encode(handle: ModelHandle, text: str) -> dict[str, torch.Tensor]:
    """Tokenize one prompt: ``{"input_ids": [1, pos], "attention_mask": [1, pos]}`` (int64)."""
    enc = handle.tokenizer(text, return_tensors="pt")
    out = {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}
    if "token_type_ids" in enc:
        out["token_type_ids"] = enc["token_type_ids"].long()
    return out


@torch.no_grad()
def greedy_continuation(handle: ModelHandle, input_ids: torch.Tensor, max_new_tokens: int) -> list[int]:
    """Greedy continuation of ``input_ids`` ``[1, pos]`` as a list of new token ids (EOS not included)."""
    ids = input_ids
    eos = getattr(handle.tokenizer, "eos_token_id", None)
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = handle.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        nxt = int(logits[0, -1].argmax())
        if eos is not None and nxt == eos:
            break
        new.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]], dtype=ids.dtype)], dim=1)
    return new


def decode(handle: ModelHandle, ids: list[int]) -> str:
    return handle.tokenizer.decode(ids, skip_special_tokens=True)


@dataclass(frozen=True)
class Behaviour:
    """What the model did on one prompt.

    ``output`` is the greedy continuation (causal LM) or the predicted label name (classifier); ``failing`` is the
    failure spec's predicate on it.
    """

    prompt: str
    output: str
    failing: bool


@torch.no_grad()
def behave(handle: ModelHandle, spec: FailureSpec, prompt: str, max_new_tokens: int = 8) -> Behaviour:
    """Run ``prompt`` plainly and judge it with ``spec``."""
    enc = encode(handle, prompt)
    if spec.kind == "label":
        logits = handle.model(**enc).logits[0]
        label = handle.model.config.id2label[int(logits.argmax())]
        return Behaviour(prompt, str(label), str(label) == spec.value)
    if spec.kind == "token":
        logits = handle.model(**enc).logits[0, -1]
        nxt = int(logits.argmax())
        return Behaviour(prompt, decode(handle, [nxt]), nxt == spec.target_index(handle.tokenizer))
    text = decode(handle, greedy_continuation(handle, enc["input_ids"], max_new_tokens))
    return Behaviour(prompt, text, spec.continuation_fails(text))
