"""The model a run trains: SE added (or not, for a plain baseline), the trained classifier kept where it fits.

What starts untrained is recorded, because what trains when depends on it: the SE blocks just inserted and a new
classifier are warmed up first with the rest frozen, and a model with random weights trains everything at once.
An adapter run (``--adapter``) trains seify's blocks and the classifier alone; its recipe names what trains, the
tensors its files hold and the base they belong to.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from ..api import convert_loaded
from ..errors import SeifyError, shown
from ..gates import find_gates
from ..models import LoadedModel, classifier_keys, num_classes_of, reorder_classifier, reset_classifier, resolve
from ..models.adapters import identity
from ..options import SEOptions
from ..se import SiteBlock
from ..surgery import convertible_scope


@dataclass
class Prepared:
    model: nn.Module
    recipe: dict
    fresh: set[str]  # names of the parameters that start untrained
    notes: list[str] = field(default_factory=list)
    head_kept: bool = False  # the trained classifier fits the data: the starting accuracy means something

    @property
    def trains(self) -> set[str] | None:
        """What an adapter run trains (parameter names); None for any other run."""
        adapter = self.recipe.get("adapter")
        return set(adapter["trains"]) if adapter else None


def prepare(spec: str, classes: list[str], options: SEOptions | None, *, weights: str | None = None,
            pretrained: bool = False, new_head: bool = False, given: set[str] | frozenset[str] = frozenset(),
            adapter: bool = False, own_gates: bool = False) -> Prepared:
    """The model to fine-tune on ``classes``; ``options`` None gives the plain model (``--no-se``); ``adapter``
    plans an adapter run (``own_gates``: the network's own gates train too).

    ``given`` names the SE options the user set: on a model that already has SE they must agree with its blocks.
    """
    loaded = resolve(spec, weights=weights, pretrained=pretrained)
    if convertible_scope(loaded.model):
        raise SeifyError(f"{spec} is a detection or segmentation model; seify finetune trains image classifiers "
                         "(convert it with seify convert and train it in your detection pipeline)")
    base = identity(loaded.model, spec, weights, pretrained) if adapter else None  # before the head changes
    if adapter and options is not None:
        options = _for_adapter(options, given)
    if options is None:
        prepared = _plain(loaded)
    else:
        prepared = _with_se(loaded, options, given)
    _fit_head(prepared, loaded, classes, new_head)
    if base is not None:
        _plan_adapter(prepared, loaded, base, own_gates)
    return prepared


ADAPTER_PLACEMENT = "module"  # measured best for adapters (benchmarks/adapters.py, placement)


def _for_adapter(options: SEOptions, given: set[str] | frozenset[str]) -> SEOptions:
    """An adapter's blocks where the user did not say otherwise: at the output of each block (``module``: it
    beat the residual placement by 2.2-6.4 points on three networks, benchmarks/adapters.py), the fresh gate's x2
    kept in the gate so that the base's tensors stay as they are (``identity-gate``)."""
    if options.at == "auto" and "at" not in given and options.variant == "standard":
        options = dataclasses.replace(options, at=ADAPTER_PLACEMENT)
    if options.block == "se" and options.init == "identity" and "init" not in given:
        options = dataclasses.replace(options, init="identity-gate")
    return options


def _plan_adapter(prepared: Prepared, loaded: LoadedModel, base: dict, own_gates: bool) -> None:
    """Record in the recipe what an adapter run trains (seify's blocks, the classifier, the network's own gates
    with ``own_gates``), the tensors its files hold (those, and what the conversion changed in the base) and the
    base."""
    if not loaded.trained:
        raise SeifyError(f"{{adapter}} trains on a frozen base, and {loaded.spec} has random weights; give it "
                         "{weights} or {pretrained}", "adapter", "weights", "pretrained")
    if (loaded.recipe or {}).get("adapter_base"):
        raise SeifyError(f"{loaded.spec} is an adapter; to train another on it, merge it into a whole model first "
                         "(seify export MODEL --weights BASE --format safetensors -o merged.safetensors)", "adapter")
    model = prepared.model
    owners = [path for path, m in model.named_modules() if isinstance(m, SiteBlock)]
    head = set(classifier_keys(model))
    if own_gates:
        native = [path for path, gate in find_gates(model).items() if not gate.ours]
        if not native:
            raise SeifyError(f"{{own_gates}}: {loaded.spec} has no channel gates of its own", "own_gates")
        owners += native
    trains = {name for name, _ in model.named_parameters()
              if name in head or any(name.startswith(f"{o}.") for o in owners)}
    frozen = loaded.model.state_dict()
    changed = {k for k, t in model.state_dict().items() if k not in frozen or t.shape != frozen[k].shape or
               not torch.equal(t, frozen[k])}
    prepared.recipe["adapter"] = {"base": base, "trains": sorted(trains), "tensors": sorted(trains | changed)}
    count = sum(p.numel() for n, p in model.named_parameters() if n in trains)
    frozen_count = sum(p.numel() for n, p in model.named_parameters() if n not in trains)
    what = ", ".join(filter(None, ["seify's blocks" if any(isinstance(model.get_submodule(o), SiteBlock)
                                                           for o in owners) else "",
                                   "its own gates" if own_gates else "", "the classifier" if head else ""]))
    prepared.notes.append(f"adapter: {what} train ({count:,} parameters); the base ({frozen_count:,} parameters "
                          "and its BatchNorm statistics) stays frozen")


def _plain(loaded: LoadedModel) -> Prepared:
    if loaded.has_se:
        raise SeifyError(f"{loaded.spec} already has SE blocks, so it cannot be the plain baseline; pass the model "
                         "it was converted from (name and weights)")
    recipe = copy.deepcopy(loaded.recipe) if loaded.recipe else loaded.plain_recipe()
    fresh = set() if loaded.trained else parameter_names(loaded.model)
    return Prepared(loaded.model, recipe, fresh)


def _with_se(loaded: LoadedModel, options: SEOptions, given: set[str] | frozenset[str]) -> Prepared:
    if loaded.has_se:
        assert loaded.recipe is not None  # SE blocks come from a seify file, which has one
        _check_same_blocks(loaded, options, given)
        model, recipe = loaded.model, copy.deepcopy(loaded.recipe)
        se_fresh = not recipe.get("finetune")  # converted but never trained
    else:
        if not loaded.trained and options.init == "identity" and options.block == "se":
            options = SEOptions.from_dict({**options.to_dict(), "init": "paper"})  # nothing to preserve
        result = convert_loaded(loaded, options)
        model, recipe, se_fresh = result.model, result.recipe(), True
    chosen = " (auto)" if options.at == "auto" else " (--adapter's default)" if options.at == ADAPTER_PLACEMENT \
        and "at" not in given else ""
    notes = [f"{'SE' if options.block == 'se' else 'scale'} blocks: {len(recipe['sites'])} at the "
             f"{recipe.get('placement')} placement{chosen}"]
    if not loaded.trained:
        return Prepared(model, recipe, parameter_names(model), notes)
    fresh = {name for name, _ in model.named_parameters() if _in_se(model, name)} if se_fresh else set()
    return Prepared(model, recipe, fresh, notes)


def _check_same_blocks(loaded: LoadedModel, options: SEOptions, given: set[str] | frozenset[str]) -> None:
    """SE options given with a model that has SE describe its blocks, or are refused: they cannot change them."""
    assert loaded.recipe is not None
    recorded = SEOptions.from_dict(loaded.recipe["options"])
    for name in sorted(given):
        new, old = getattr(options, name), getattr(recorded, name)
        if new != old and not (name == "at" and new == loaded.recipe.get("placement")):
            raise SeifyError(f"{loaded.spec} already has SE blocks, made with {{{name}}} {shown(old)}; "
                             f"{{{name}}} {shown(new)} cannot change them. Drop it, or convert the model they were "
                             f"added to again with {{{name}}} {shown(new)}", name)


def _fit_head(prepared: Prepared, loaded: LoadedModel, classes: list[str], new_head: bool) -> None:
    """Keep the trained classifier when it has one output per class, else give a new one."""
    model, outputs = prepared.model, num_classes_of(prepared.model)
    if loaded.trained and not new_head and outputs == len(classes):
        prepared.head_kept = True
        prepared.notes.append(_keep_head(model, loaded.classes, classes))
    else:
        reset_classifier(model, len(classes))
        prepared.fresh |= set(classifier_keys(model))
        if loaded.trained:
            why = "as asked" if new_head else f"the model has {outputs} outputs, the data {len(classes)} classes"
            prepared.notes.append(f"classifier: a new {len(classes)}-way head ({why})")
    prepared.recipe.update(num_classes=len(classes), classes=classes)


def _keep_head(model: nn.Module, recorded: list[str] | None, classes: list[str]) -> str:
    """Line the trained head's rows up with the data's classes (by name where the model records them)."""
    if recorded is None:
        listed = ", ".join(classes[:4]) + (", ..." if len(classes) > 4 else "")
        return (f"classifier: keeping the trained {len(classes)}-way head; the model records no class names, so its "
                f"outputs are taken to be the data's folders in sorted order ({listed}); pass --new-head if they "
                "are not")
    if recorded == classes:
        return f"classifier: keeping the trained {len(classes)}-way head (same classes)"
    if sorted(recorded) != sorted(classes):
        unknown = sorted(set(classes) - set(recorded))
        raise SeifyError(f"the model was trained on other classes than the data holds ({len(unknown)} of the "
                         f"data's are unknown to it, e.g. {unknown[0]!r}); pass {{new_head}} to train a new "
                         "classifier", "new_head")
    reorder_classifier(model, [recorded.index(name) for name in classes])
    return "classifier: keeping the trained head, its rows reordered to the data's class order"


def parameter_names(model: nn.Module) -> set[str]:
    """Every parameter's name: what trains when the weights are random."""
    return {name for name, _ in model.named_parameters()}


def _in_se(model: nn.Module, name: str) -> bool:
    parts = name.split(".")
    return any(isinstance(model.get_submodule(".".join(parts[:i])), SiteBlock) for i in range(1, len(parts)))
