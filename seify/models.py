"""Turning a model spec and weights into an nn.Module.

Specs: timm names (``resnet50``), pretrained tags (``resnet50.a1_in1k``), ``hf-hub:`` ids, torchvision names
as ``torchvision:resnet50``, and files written by seify (rebuilt from their recipe).
"""
from __future__ import annotations

import contextlib
import difflib
import pickle
import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import SeifyError

TORCHVISION = "torchvision:"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_CHECKPOINT_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")  # timm's order: EMA first


@dataclass
class LoadedModel:
    model: nn.Module
    spec: str
    num_classes: int
    data_config: dict
    notes: list[str]
    recipe: dict | None = None  # set when the spec was a seify file


def is_seify_file(spec: str) -> bool:
    return spec.endswith(".safetensors") and Path(spec).is_file() and _read_recipe_or_none(spec) is not None


def _read_recipe_or_none(path: str):
    from .checkpoint import read_recipe
    return read_recipe(path)


def create(spec: str, *, pretrained: bool = False, weights: str | None = None,
           num_classes: int | None = None) -> LoadedModel:
    """Build the model ``spec`` names, with ``weights`` from a file or the hub's ``pretrained`` ones."""
    if is_seify_file(spec):
        if pretrained or weights:
            raise SeifyError(f"{spec} is a seify file and carries its own weights; drop --pretrained/--weights")
        from .checkpoint import load_with_recipe
        model, recipe = load_with_recipe(spec)
        return LoadedModel(model, spec, recipe["num_classes"], recipe["data_config"], [], recipe)
    if pretrained and weights:
        raise SeifyError("pass either --pretrained or --weights, not both")
    if Path(spec).suffix in (".safetensors", ".pth", ".pt", ".bin") or Path(spec).exists():
        raise SeifyError(f"{spec} is not a seify file; to load a checkpoint pass the architecture and the file: "
                         f"seify convert resnet50 --weights {spec}")
    check_known(spec)
    notes = [] if weights or pretrained else ["random weights: pass --weights or --pretrained to convert a "
                                              "trained model"]
    model = build(spec, pretrained, num_classes)
    if weights:
        state_dict, note = read_state_dict(weights)
        notes.append(note)
        head, fresh = _classifier_keys(model), ()
        file_classes = int(state_dict[head[0]].shape[0]) if head and head[0] in state_dict else None
        if file_classes is not None and file_classes != _num_classes(model):
            if num_classes is None:
                model = build(spec, False, file_classes)
            else:
                state_dict, fresh = {k: v for k, v in state_dict.items() if k not in head}, head
                notes.append(f"classifier re-initialised for {num_classes} classes (the weights have "
                             f"{file_classes})")
        _load_strict(model, state_dict, spec, weights, fresh=fresh)
    model.eval()
    return LoadedModel(model, spec, _num_classes(model), data_config(model, spec), notes)


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


def build(spec: str, pretrained: bool, num_classes: int | None) -> nn.Module:
    """The architecture ``spec`` names (a timm or torchvision name), with fresh or pretrained weights."""
    try:
        if spec.startswith(TORCHVISION):
            return _build_torchvision(spec[len(TORCHVISION):], pretrained, num_classes)
        import timm
        kwargs = {} if num_classes is None else {"num_classes": num_classes}
        with _hub_offline_unless_reachable(pretrained):
            return timm.create_model(spec, pretrained=pretrained, **kwargs)
    except SeifyError:
        raise
    except Exception as e:
        if not pretrained:
            raise
        reason = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
        raise SeifyError(f"could not fetch pretrained weights for {spec} ({reason}); are you offline? "
                         "Pass a local checkpoint with --weights PATH instead") from e


@contextlib.contextmanager
def _hub_offline_unless_reachable(pretrained: bool):
    """Without a network, let the Hugging Face hub use its cache at once instead of retrying for a minute."""
    import huggingface_hub.constants as hub
    offline = hub.HF_HUB_OFFLINE
    if pretrained and not offline:
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
        kwargs = {} if num_classes is None else {"num_classes": num_classes}
        return torchvision.models.get_model(name, weights=None, **kwargs)
    model = torchvision.models.get_model(name, weights="DEFAULT")
    if num_classes is not None and num_classes != _num_classes(model):
        reset_classifier(model, num_classes)
    return model


def classifier_name(model: nn.Module) -> str | None:
    """Path of the final classifier layer: timm's ``get_classifier()``, else the last Linear."""
    target = model.get_classifier() if hasattr(model, "get_classifier") else None
    last_linear = None
    for name, m in model.named_modules():
        if target is not None and m is target:
            return name
        if isinstance(m, nn.Linear):
            last_linear = name
    return last_linear


def _num_classes(model: nn.Module) -> int:
    if isinstance(getattr(model, "num_classes", None), int):
        return model.num_classes
    name = classifier_name(model)
    return model.get_submodule(name).out_features if name else 0


def reset_classifier(model: nn.Module, num_classes: int) -> None:
    """A fresh classifier for ``num_classes`` (timm's ``reset_classifier``; the last Linear for torchvision)."""
    if hasattr(model, "reset_classifier"):
        model.reset_classifier(num_classes)
        return
    name = classifier_name(model)
    if name is None:
        raise SeifyError(f"cannot find the classifier of {type(model).__name__} to resize it")
    old = model.get_submodule(name)
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr,
            nn.Linear(old.in_features, num_classes, bias=old.bias is not None))


def _classifier_keys(model: nn.Module) -> tuple[str, ...]:
    name = classifier_name(model)
    return tuple(f"{name}.{p}" for p, _ in model.get_submodule(name).named_parameters()) if name else ()


def read_state_dict(path: str) -> tuple[dict, str]:
    """A plain state_dict from ``path``; never runs pickled code. Returns it and a note on where it came from."""
    p = Path(path)
    if not p.is_file():
        raise SeifyError(f"weights file {path} does not exist")
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(p)), f"weights: {path}"
        except SafetensorError as e:
            raise SeifyError(f"{path} is not a readable safetensors file: {e}") from e
    try:
        checkpoint = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise SeifyError(f"refusing to load {path}: it holds pickled code, not just tensors ("
                         f"{str(e).strip().splitlines()[0][:120]}). Re-save it as a state_dict or safetensors "
                         "from a trusted environment") from e
    except Exception as e:
        raise SeifyError(f"{path} is not a readable PyTorch checkpoint: {str(e).splitlines()[0][:160]}") from e
    where = f"weights: {path}"
    if isinstance(checkpoint, dict):
        for key in _CHECKPOINT_KEYS:
            if isinstance(checkpoint.get(key), dict):
                checkpoint, where = checkpoint[key], f"weights: {path} ['{key}']"
                break
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise SeifyError(f"{path} holds no state_dict (a dict of tensors, possibly under 'state_dict', "
                         "'model' or 'state_dict_ema')")
    from timm.models import clean_state_dict
    return clean_state_dict(checkpoint), where


def _load_strict(model: nn.Module, state_dict: dict, spec: str, path: str, fresh: tuple = ()) -> None:
    """Load every key or fail with what is missing, unexpected or misshapen; ``fresh`` keys may be missing."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and k not in fresh]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = [f"{len(lst)} {what} ({', '.join(lst[:3])}{', ...' if len(lst) > 3 else ''})"
                 for what, lst in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                 if lst]
        raise SeifyError(f"weights in {path} do not match {spec}: {'; '.join(parts)}; "
                         "check the model name matches the checkpoint")
    model.load_state_dict(state_dict, strict=not fresh)


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
