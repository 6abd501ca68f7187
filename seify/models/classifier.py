"""The classifier of a timm or torchvision model (or a detector's box classifier): find it, size it, reorder it."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import SeifyError


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
