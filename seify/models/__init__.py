"""Turning a model spec and weights into an nn.Module: the one way every command gets its model.

Specs: timm names (``resnet50``), pretrained tags (``resnet50.a1_in1k``), ``hf-hub:`` ids, torchvision names
as ``torchvision:resnet50`` (``spec``), and files written by seify, rebuilt from their recipe with or without SE
(``files``). ``classifier`` finds, sizes and reorders a model's head.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import make_recipe, read_recipe, read_state_dict, without_adapter
from ..errors import SeifyError
from ..limits import MAX_CLASSES, check_whole
from ..se import SiteBlock
from . import adapters
from .classifier import classifier_keys, classifier_name, num_classes_of, reorder_classifier, reset_classifier
from .files import freeze_batchnorm, from_recipe, has_frozen_batchnorm, load_strict, model_of, rebuild
from .folders import build_folder
from .spec import Spec, build, check_known, data_config, files_read, seify_file

__all__ = ["HELD", "LoadedModel", "resolve", "name_of", "load", "build", "check_known", "data_config", "files_read",
           "from_recipe",
           "model_of",
           "freeze_batchnorm", "has_frozen_batchnorm", "classifier_keys", "classifier_name", "num_classes_of",
           "reorder_classifier", "reset_classifier"]
RANDOM, PRETRAINED, HELD = "random", "pretrained", "held in memory"


@dataclass
class LoadedModel:
    """A model and what is known about it: where its weights came from, its classes, its data config."""
    model: nn.Module
    spec: str
    data_config: dict
    notes: list[str] = field(default_factory=list)
    recipe: dict | None = None  # set when the spec was a seify file
    weights: str = RANDOM  # RANDOM, PRETRAINED or the weights file's name
    base: nn.Module | None = None  # a seify file with SE: the model it was converted from, fresh weights
    architecture: str | None = None  # a timm folder's: what rebuilds it (with model_args), never the folder's path
    model_args: dict | None = None

    def plain_recipe(self) -> dict:
        """The recipe of this model as it is (no SE): what rebuilds it without the files it came from."""
        return make_recipe(self.architecture or self.spec, self.num_classes, None, self.data_config["input_size"],
                           self.data_config, [], weights=self.weights, **self.rebuilt_with())

    def rebuilt_with(self) -> dict:
        """What a recipe records beside the architecture's name to rebuild it (a timm folder's model_args)."""
        return {"model_args": self.model_args} if self.model_args else {}

    @property
    def num_classes(self) -> int:
        return self.recipe["num_classes"] if self.recipe else num_classes_of(self.model)

    @property
    def classes(self) -> list[str] | None:
        """Class names in classifier order, where a seify run recorded them."""
        return (self.recipe or {}).get("classes")

    @property
    def has_se(self) -> bool:
        """Whether seify's blocks (SE, or their scale-and-shift control) are in it."""
        return any(isinstance(m, SiteBlock) for m in self.model.modules())

    @property
    def trained(self) -> bool:
        """False for random weights: then there is nothing to preserve and nothing to warm up."""
        return self.weights != RANDOM or bool((self.recipe or {}).get("finetune"))


def resolve(spec: str | nn.Module, *, weights: str | None = None, pretrained: bool = False,
            num_classes: int | None = None, device: str | torch.device | None = None) -> LoadedModel:
    """Build the model ``spec`` names, with ``weights`` from a file or the hub's ``pretrained`` ones; or take a
    module you hold as it is (a copy on ``device`` where one is given).

    On the ``meta`` device only the architecture is built (for counting): no weights are read.
    """
    if isinstance(spec, nn.Module):
        return _held(spec, weights, pretrained, num_classes, device)
    if num_classes is not None:
        check_whole(num_classes, "num_classes", 1, MAX_CLASSES)
    meta = torch.device(device).type == "meta" if device is not None else False
    file = seify_file(spec)
    recipe = read_recipe(file) if file is not None else None
    with torch.device(device) if device is not None else contextlib.nullcontext():
        if file is not None and recipe is not None and recipe.get("adapter") is not None:
            return _adapter(spec, file, recipe, weights, pretrained, meta)
        if file is not None and recipe is not None:
            if pretrained or weights:
                raise SeifyError(f"{spec} is a seify file and carries its own weights; drop {{pretrained}}/"
                                 "{weights}", "pretrained", "weights")
            model, base = rebuild(file, recipe, meta)
            return LoadedModel(model, spec, recipe["data_config"], [], recipe,
                               weights=recipe.get("weights") or Path(file).name, base=base)
        if pretrained and weights:
            raise SeifyError("pass either {pretrained} or {weights}, not both", "pretrained", "weights")
        folder = Spec.parse(spec).folder
        if folder is not None:
            if pretrained or weights:
                raise SeifyError(f"{spec} carries its own weights; drop {{pretrained}}/{{weights}}", "pretrained",
                                 "weights")
            model, config = build_folder(folder, meta)
            return LoadedModel(model, spec, data_config(model, spec), [], weights=f"{folder.name}/model.safetensors",
                               architecture=config["architecture"], model_args=config.get("model_args") or None)
        if ":" not in spec and (Path(spec).suffix in (".safetensors", ".pth", ".pt", ".bin") or Path(spec).exists()):
            raise SeifyError(f"{spec} is not a seify file; to load a checkpoint pass the architecture and the "
                             f"file as {{weights}} (resnet50 --weights {spec})", "weights")
        check_known(spec)
        model = build(spec, pretrained and not meta, num_classes)
        notes: list[str] = []
        if weights and not meta:
            model = _with_weights(model, spec, weights, num_classes, notes)
        source = Path(weights).name if weights else PRETRAINED if pretrained else RANDOM
        if source == RANDOM:
            notes.append("random weights: pass --weights or --pretrained to start from a trained model")
    return LoadedModel(model.eval(), spec, data_config(model, spec), notes, weights=source)


def _adapter(spec: str, file: str, recipe: dict, weights: str | None, pretrained: bool, meta: bool) -> LoadedModel:
    """An adapter file on the base it was trained on (given as ``weights`` or ``pretrained``), checked by its
    digest; the whole model, whose recipe no longer says adapter. On the meta device the architecture only."""
    base_id = recipe["adapter"]["base"]
    merged, source = without_adapter(recipe), base_id.get("weights") or base_id["model"]
    model, arch_base = rebuild(file, merged, meta=True)  # its weights come from the base and the file
    if meta:
        return LoadedModel(model, spec, recipe["data_config"], [], merged, weights=source, base=arch_base)
    if not weights and not pretrained:
        raise adapters.no_base(spec, base_id)
    base = _base_of(spec, base_id, weights, pretrained)
    adapters.check_base(spec, base_id, base.model, weights or "the pretrained weights")
    tensors, _ = read_state_dict(file)
    adapters.assemble(model, base.model, tensors, spec)
    trained = sum(t.numel() for k, t in tensors.items() if k in set(recipe["adapter"]["trains"]))
    note = f"adapter: {len(tensors)} tensors ({trained:,} trained parameters) on {adapters.named(base_id)}, checked"
    return LoadedModel(model.eval(), spec, recipe["data_config"], [note], merged, weights=source, base=arch_base)


def _base_of(spec: str, base_id: dict, weights: str | None, pretrained: bool) -> LoadedModel:
    """The base an adapter is given: a whole model (a seify file, a folder) or the weights of its architecture."""
    whole = seify_file(weights) if weights else None
    recipe = read_recipe(whole) if whole else None
    if weights and (recipe is not None or Spec.parse(weights).folder is not None):
        if recipe is not None and recipe.get("adapter") is not None:
            raise SeifyError(f"{weights} is an adapter itself, not a base: give {spec} the base it was trained on "
                             f"with {adapters.how_to_give(base_id)}", "weights")
        return resolve(weights)
    if base_id.get("whole") or (pretrained and not base_id.get("pretrained")):
        raise adapters.no_base(spec, base_id)
    return resolve(base_id["model"], weights=weights, pretrained=pretrained)


def _held(model: nn.Module, weights, pretrained: bool, num_classes, device) -> LoadedModel:
    """A module the caller holds: its own weights and head; named as timm names it, else by its class."""
    if weights or pretrained or num_classes is not None:
        raise SeifyError("a module you hold brings its own weights and head; drop {weights}/{pretrained}/"
                         "{num_classes}", "weights", "pretrained", "num_classes")
    if device is not None:
        model = copy.deepcopy(model).to(device)
    name = name_of(model)
    return LoadedModel(model.eval(), name, data_config(model, name), [], weights=HELD)


def name_of(model: str | nn.Module) -> str:
    """A spec as given; a module by the architecture timm records in it, else by its class."""
    if isinstance(model, str):
        return model
    return (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__


def load(path: str | Path, base: str | None = None, pretrained: bool = False) -> nn.Module:
    """The model a seify file holds, ready in eval mode; an adapter file on its ``base`` (the weights file or whole
    model it was trained on, or ``pretrained``)."""
    loaded = resolve(str(path), weights=base, pretrained=pretrained)
    if loaded.recipe is None:
        raise SeifyError(f"{path} was not written by seify (no recipe in its metadata); load it with "
                         "{weights} and a model name instead", "weights")
    return loaded.model


def _with_weights(model: nn.Module, spec: str, path: str, num_classes: int | None, notes: list[str]) -> nn.Module:
    """The model with the file's weights; the classifier's size follows the file unless ``num_classes`` says."""
    state_dict, note = read_state_dict(path)
    notes.append(note)
    head = classifier_keys(model)
    fresh: tuple[str, ...] = ()
    file_classes = int(state_dict[head[0]].shape[0]) if head and head[0] in state_dict else None
    if file_classes is not None and file_classes != num_classes_of(model):
        if num_classes is None:
            model = build(spec, False, file_classes)
        else:
            state_dict, fresh = {k: v for k, v in state_dict.items() if k not in head}, head
            notes.append(f"classifier re-initialised for {num_classes} classes (the weights have {file_classes})")
    load_strict(model, state_dict, f"weights in {path} do not match {spec}",
                "check the model name matches the checkpoint", fresh=fresh)
    return model
