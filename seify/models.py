"""Turning a model spec and weights into an nn.Module: the one way every command gets its model.

Specs: timm names (``resnet50``), pretrained tags (``resnet50.a1_in1k``), ``hf-hub:`` ids, torchvision names
as ``torchvision:resnet50``, and files written by seify (rebuilt from their recipe, with or without SE).
"""
from __future__ import annotations

import contextlib
import difflib
import inspect
import socket
import urllib.parse
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import read_recipe, read_state_dict
from .errors import SeifyError, first_line
from .limits import MAX_CLASSES, check_whole
from .options import SEOptions
from .se import SqueezeExcite
from .surgery import Conversion, convert

TORCHVISION = "torchvision:"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM, PRETRAINED = "random", "pretrained"


@dataclass
class LoadedModel:
    """A model and what is known about it: where its weights came from, its classes, its data config."""
    model: nn.Module
    spec: str
    num_classes: int
    data_config: dict
    notes: list[str] = field(default_factory=list)
    recipe: dict | None = None  # set when the spec was a seify file
    weights: str = RANDOM  # RANDOM, PRETRAINED or the weights file's name
    base: nn.Module | None = None  # a seify file with SE: the model it was converted from, fresh weights

    @property
    def classes(self) -> list[str] | None:
        """Class names in classifier order, where a seify run recorded them."""
        return (self.recipe or {}).get("classes")

    @property
    def has_se(self) -> bool:
        return any(isinstance(m, SqueezeExcite) for m in self.model.modules())

    @property
    def trained(self) -> bool:
        """False for random weights: then there is nothing to preserve and nothing to warm up."""
        return self.weights != RANDOM or bool((self.recipe or {}).get("finetune"))


def is_seify_file(spec: str) -> bool:
    return spec.endswith(".safetensors") and Path(spec).is_file() and read_recipe(spec) is not None


def resolve(spec: str, *, weights: str | None = None, pretrained: bool = False, num_classes: int | None = None,
            device: str | torch.device | None = None) -> LoadedModel:
    """Build the model ``spec`` names, with ``weights`` from a file or the hub's ``pretrained`` ones.

    On the ``meta`` device only the architecture is built (for counting): no weights are read.
    """
    if num_classes is not None:
        check_whole(num_classes, "num_classes", 1, MAX_CLASSES)
    meta = torch.device(device).type == "meta" if device is not None else False
    with torch.device(device) if device is not None else contextlib.nullcontext():
        if is_seify_file(spec):
            if pretrained or weights:
                raise SeifyError(f"{spec} is a seify file and carries its own weights; drop {{pretrained}}/"
                                 "{weights}", "pretrained", "weights")
            return _from_file(spec, meta)
        if pretrained and weights:
            raise SeifyError("pass either {pretrained} or {weights}, not both", "pretrained", "weights")
        if Path(spec).suffix in (".safetensors", ".pth", ".pt", ".bin") or Path(spec).exists():
            raise SeifyError(f"{spec} is not a seify file; to load a checkpoint pass the architecture and the "
                             f"file as {{weights}} (resnet50 --weights {spec})", "weights")
        check_known(spec)
        model = build(spec, pretrained and not meta, num_classes)
        loaded = LoadedModel(model, spec, 0, data_config(model, spec),
                             weights=PRETRAINED if pretrained else RANDOM)
        if weights and not meta:
            loaded.model = _load_weights(loaded, weights, num_classes)
            loaded.weights = Path(weights).name
        if loaded.weights == RANDOM:
            loaded.notes.append("random weights: pass --weights or --pretrained to start from a trained model")
    loaded.num_classes = num_classes_of(loaded.model)
    loaded.model.eval()
    return loaded


def _from_file(path: str, meta: bool) -> LoadedModel:
    recipe = read_recipe(path)
    if recipe is None:
        raise SeifyError(f"{path} was not written by seify (no recipe in its metadata); load it with "
                         "{weights} and a model name instead", "weights")
    base, conversion = from_recipe(recipe)
    model = conversion.model if conversion else base
    if not meta:
        state_dict, _ = read_state_dict(path)
        _load_strict(model, state_dict, f"{path}: its weights do not match its recipe", "convert the model again")
    set_pretrained_cfg(model, recipe)
    return LoadedModel(model.eval(), path, recipe["num_classes"], recipe["data_config"], [], recipe,
                       weights=recipe.get("weights") or Path(path).name, base=base if conversion else None)


_DATA_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def set_pretrained_cfg(model: nn.Module, recipe: dict) -> None:
    """timm's ``pretrained_cfg`` as the file's model is: the size it was trained at, its classes and their names,
    its normalisation and crop, so that ``timm.data.resolve_data_config(model=...)`` builds the right transforms."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    data = recipe["data_config"]
    if list(cfg.get("input_size", [])) != list(data["input_size"]):  # a test size for another training size
        cfg.pop("test_input_size", None)
        cfg.pop("test_crop_pct", None)
    cfg.update({k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in _DATA_KEYS})
    cfg["num_classes"] = recipe["num_classes"]
    if recipe.get("classes"):
        cfg["label_names"] = list(recipe["classes"])
    setattr(model, "pretrained_cfg", cfg)  # noqa: B010 (a plain attribute, which nn.Module's typing does not know)
    if hasattr(model, "default_cfg"):
        setattr(model, "default_cfg", cfg)  # noqa: B010


def from_recipe(recipe: dict) -> tuple[nn.Module, Conversion | None]:
    """(base model, its Conversion or None for a plain file) that a recipe describes, with fresh weights."""
    parent = recipe.get("parent")
    if parent:
        base = model_of(parent)
    else:
        check_known(recipe["model"])
        base = build(recipe["model"], False, recipe["num_classes"], offline=True)
        if recipe.get("frozen_batchnorm"):
            freeze_batchnorm(base)
    if recipe.get("options") is None:
        return base, None
    conversion = convert(base, SEOptions.from_dict(recipe["options"]), tuple(recipe["input_size"]))
    built = [s.path for s in conversion.sites]
    recorded = [s["path"] for s in recipe["sites"]]
    if built != recorded:
        raise SeifyError(f"this file was written by seify {recipe['seify_version']} with SE sites that this "
                         f"version places differently ({len(recorded)} recorded, {len(built)} now); convert again")
    return base, conversion


def model_of(recipe: dict) -> nn.Module:
    """The model a recipe describes (SE or plain), with fresh weights."""
    base, conversion = from_recipe(recipe)
    return conversion.model if conversion else base


def load(path: str | Path) -> nn.Module:
    """The model a seify file holds, ready in eval mode."""
    return _from_file(str(path), meta=False).model


def check_known(spec: str) -> None:
    import timm
    import torchvision
    if spec.startswith("hf-hub:"):
        return
    if spec.startswith(TORCHVISION):
        name, known = spec[len(TORCHVISION):], torchvision.models.list_models()
        prefix = TORCHVISION
    else:
        name, known, prefix = spec.split(".", 1)[0], timm.list_models(), ""
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(prefix + c for c in close)}?" if close else \
            "; see timm.list_models() or torchvision.models.list_models() (prefix those with 'torchvision:')"
        raise SeifyError(f"unknown model '{spec}'{hint}")


def build(spec: str, pretrained: bool, num_classes: int | None, offline: bool = False) -> nn.Module:
    """The architecture ``spec`` names (a timm or torchvision name), with fresh or pretrained weights.

    ``offline``: never reach the network (rebuilding a file: an ``hf-hub:`` config must be in the local cache).
    """
    try:
        if spec.startswith(TORCHVISION):
            return _build_torchvision(spec[len(TORCHVISION):], pretrained, num_classes)
        import timm
        kwargs: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
        hub = spec.startswith("hf-hub:")  # its configuration comes from the hub, weights or not
        with _hub_offline_unless_reachable(pretrained or hub, offline):
            return timm.create_model(spec, pretrained=pretrained, **kwargs)
    except SeifyError:
        raise
    except Exception as e:
        if offline and spec.startswith("hf-hub:"):
            raise SeifyError(f"{spec}: its configuration is not in the local Hugging Face cache, and seify does not "
                             "go to the network to rebuild a file; convert it again where the hub is reachable"
                             ) from e
        if spec.startswith("hf-hub:") and not pretrained:
            reason = first_line(e).split(". ")[0]
            raise SeifyError(f"could not fetch the configuration of {spec} from the Hugging Face hub ({reason}); are "
                             "you offline? Pass a timm name with {weights} instead", "weights") from e
        if not pretrained:
            raise
        reason = first_line(e).split(". ")[0]
        raise SeifyError(f"could not fetch pretrained weights for {spec} ({reason}); are you offline? "
                         "Pass a local checkpoint as {weights} instead", "weights") from e


@contextlib.contextmanager
def _hub_offline_unless_reachable(needs_hub: bool, force_offline: bool = False):
    """Without a network, let the Hugging Face hub use its cache at once instead of retrying for a minute."""
    import huggingface_hub.constants as hub
    offline = hub.HF_HUB_OFFLINE
    if force_offline:
        hub.HF_HUB_OFFLINE = True
    elif needs_hub and not offline:
        host = urllib.parse.urlparse(hub.ENDPOINT).hostname
        try:
            socket.create_connection((host, 443), timeout=3).close()
        except OSError:
            hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = offline


def _build_torchvision(name: str, pretrained: bool, num_classes: int | None) -> nn.Module:
    import torchvision
    if not pretrained:
        kwargs: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
        builder = torchvision.models.get_model_builder(name)
        if "weights_backbone" in inspect.signature(builder).parameters:
            kwargs["weights_backbone"] = None  # detectors fetch ImageNet backbone weights unless told not to
        return builder(weights=None, **kwargs)
    model = torchvision.models.get_model(name, weights="DEFAULT")
    if num_classes is not None and num_classes != num_classes_of(model):
        reset_classifier(model, num_classes)
    return model


def _load_weights(loaded: LoadedModel, path: str, num_classes: int | None) -> nn.Module:
    """The model with the file's weights; the classifier's size follows the file unless ``num_classes`` says."""
    state_dict, note = read_state_dict(path)
    loaded.notes.append(note)
    model, spec = loaded.model, loaded.spec
    head = classifier_keys(model)
    fresh: tuple[str, ...] = ()
    file_classes = int(state_dict[head[0]].shape[0]) if head and head[0] in state_dict else None
    if file_classes is not None and file_classes != num_classes_of(model):
        if num_classes is None:
            model = build(spec, False, file_classes)
        else:
            state_dict, fresh = {k: v for k, v in state_dict.items() if k not in head}, head
            loaded.notes.append(f"classifier re-initialised for {num_classes} classes (the weights have "
                                f"{file_classes})")
    _load_strict(model, state_dict, f"weights in {path} do not match {spec}",
                 "check the model name matches the checkpoint", fresh=fresh)
    return model


def _load_strict(model: nn.Module, state_dict: dict, what: str, advice: str, fresh: tuple = ()) -> None:
    """Load every key or fail with what is missing, unexpected or misshapen; ``fresh`` keys may be missing.

    A file written once per storage (safetensors) lacks the second name of a tied tensor, and one without
    state_dict metadata (safetensors, a cleaned checkpoint) gets the model's own, which modules that check
    the version of their saved form (torchvision's MNASNet) need.
    """
    expected = model.state_dict()
    loaded = {t.data_ptr() for k, t in expected.items() if k in state_dict}
    missing = [k for k in expected if k not in state_dict and k not in fresh and expected[k].data_ptr() not in loaded]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = [f"{len(lst)} {kind} ({', '.join(lst[:3])}{', ...' if len(lst) > 3 else ''})"
                 for kind, lst in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                 if lst]
        raise SeifyError(f"{what}: {'; '.join(parts)}; {advice}")
    if getattr(state_dict, "_metadata", None) is None:
        state_dict = OrderedDict(state_dict)
        state_dict._metadata = getattr(expected, "_metadata", None)  # type: ignore[attr-defined]
    model.load_state_dict(state_dict, strict=False)  # every key checked above


def has_frozen_batchnorm(model: nn.Module) -> bool:
    """torchvision builds pretrained detectors with FrozenBatchNorm2d, and untrained ones with BatchNorm2d."""
    from torchvision.ops import FrozenBatchNorm2d
    return any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())


def freeze_batchnorm(model: nn.Module) -> None:
    """Replace BatchNorm2d by FrozenBatchNorm2d (what a pretrained torchvision detector has), in place."""
    from torchvision.ops import FrozenBatchNorm2d
    for m in list(model.modules()):
        for child_name, child in list(m.named_children()):
            if type(child) is nn.BatchNorm2d:
                setattr(m, child_name, FrozenBatchNorm2d(child.num_features, child.eps))


# ---------------------------------------------------------------- the classifier


def classifier_name(model: nn.Module) -> str | None:
    """Path of the final classifier layer: timm's ``get_classifier()``, a detector's box classifier, else the last
    Linear."""
    get_classifier = getattr(model, "get_classifier", None)
    target = get_classifier() if callable(get_classifier) else \
        getattr(getattr(getattr(model, "roi_heads", None), "box_predictor", None), "cls_score", None)
    last_linear = None
    for name, m in model.named_modules():
        if target is not None and m is target:
            return name
        if isinstance(m, nn.Linear):
            last_linear = name
    return last_linear


def num_classes_of(model: nn.Module) -> int:
    declared = getattr(model, "num_classes", None)
    if isinstance(declared, int):
        return declared
    head = _dense_head(model)
    if head is not None:
        return head
    name = classifier_name(model)
    return getattr(model.get_submodule(name), "out_features", 0) if name else 0


def _dense_head(model: nn.Module) -> int | None:
    """Classes of a torchvision detector (box classifier) or segmenter (last conv of its head), else None."""
    box = getattr(getattr(getattr(model, "roi_heads", None), "box_predictor", None), "cls_score", None)
    if isinstance(box, nn.Linear):
        return box.out_features
    head = getattr(model, "classifier", None)
    last = head[-1] if isinstance(head, nn.Sequential) else None
    if type(model).__module__.startswith("torchvision.models.segmentation") and isinstance(last, nn.Conv2d):
        return last.out_channels
    return None


def reset_classifier(model: nn.Module, num_classes: int) -> None:
    """A fresh classifier for ``num_classes`` (timm's ``reset_classifier``; the last Linear for torchvision)."""
    timm_reset = getattr(model, "reset_classifier", None)
    if callable(timm_reset):
        timm_reset(num_classes)
        return
    name = classifier_name(model)
    old = model.get_submodule(name) if name else None
    if name is None or not isinstance(old, nn.Linear):
        raise SeifyError(f"cannot find the classifier of {type(model).__name__} to resize it")
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr,
            nn.Linear(old.in_features, num_classes, bias=old.bias is not None))


def reorder_classifier(model: nn.Module, order: list[int]) -> None:
    """Permute the classifier's output rows: new class i is old class ``order[i]``."""
    name = classifier_name(model)
    if name is None:
        raise SeifyError(f"cannot find the classifier of {type(model).__name__}")
    head = model.get_submodule(name)
    index = torch.tensor(order)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(p[index])


def classifier_keys(model: nn.Module) -> tuple[str, ...]:
    name = classifier_name(model)
    return tuple(f"{name}.{p}" for p, _ in model.get_submodule(name).named_parameters()) if name else ()


def data_config(model: nn.Module, spec: str) -> dict:
    """Input size, normalisation and resize settings: timm's data config, or torchvision's weight transforms."""
    if not spec.startswith(TORCHVISION):
        from timm.data import resolve_model_data_config
        cfg = resolve_model_data_config(model)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}
    import torchvision
    cfg = {"input_size": [3, 224, 224], "interpolation": "bilinear", "mean": list(IMAGENET_MEAN),
           "std": list(IMAGENET_STD), "crop_pct": 0.875, "crop_mode": "center"}
    try:
        t = torchvision.models.get_model_weights(spec[len(TORCHVISION):]).DEFAULT.transforms()
        crop = t.crop_size[0]
        cfg.update(input_size=[3, crop, crop], interpolation=t.interpolation.value,
                   mean=list(t.mean), std=list(t.std), crop_pct=round(crop / t.resize_size[0], 4))
    except (ValueError, AttributeError, IndexError, TypeError):
        pass
    return cfg
