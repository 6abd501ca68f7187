"""A model spec and the architecture it names: timm names (``resnet50``), pretrained tags (``resnet50.a1_in1k``),
``hf-hub:`` ids and torchvision names (``torchvision:resnet50``), with fresh or pretrained weights, and the data
config (input size, normalisation, crop) that goes with them."""
from __future__ import annotations

import contextlib
import difflib
import inspect
import json
import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import read_recipe
from ..errors import SeifyError, first_line
from .classifier import num_classes_of, reset_classifier

TORCHVISION, HUB, LOCAL = "torchvision:", "hf-hub:", "local-dir:"
WEIGHTS = "model.safetensors"  # the weights of a hub folder (timm's and seify's)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Spec:
    """A spec read once: which library builds it, and the name that library knows it by."""
    text: str
    library: str  # "timm" (hf-hub ids included) or "torchvision"
    name: str  # without the torchvision: prefix

    @classmethod
    def parse(cls, text: str) -> "Spec":
        if text.startswith(TORCHVISION):
            return cls(text, "torchvision", text[len(TORCHVISION):])
        return cls(text, "timm", text)

    @property
    def hub(self) -> bool:
        """An ``hf-hub:`` id: its configuration comes from the Hugging Face hub, weights or not."""
        return self.text.startswith(HUB)

    @property
    def folder(self) -> Path | None:
        """The folder a ``local-dir:`` spec names (timm's or seify's hub layout), else None."""
        return Path(self.text[len(LOCAL):]) if self.text.startswith(LOCAL) else None

    def check_known(self) -> None:
        """Refuse a name neither library has, suggesting the nearest ones."""
        import timm
        import torchvision
        if self.hub or self.folder is not None:
            return
        if self.library == "torchvision":
            name, known, prefix = self.name, torchvision.models.list_models(), TORCHVISION
        else:
            name, known, prefix = self.name.split(".", 1)[0], timm.list_models(), ""
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(prefix + c for c in close)}?" if close else \
                "; see timm.list_models() or torchvision.models.list_models() (prefix those with 'torchvision:')"
            raise SeifyError(f"unknown model '{self.text}'{hint}")


def check_known(spec: str) -> None:
    Spec.parse(spec).check_known()


def build(spec: str, pretrained: bool, num_classes: int | None, offline: bool = False,
          model_args: dict | None = None) -> nn.Module:
    """The architecture ``spec`` names, with fresh or pretrained weights (and timm's ``model_args``).

    ``offline``: never reach the network (rebuilding a file: an ``hf-hub:`` config must be in the local cache).
    """
    parsed = Spec.parse(spec)
    try:
        if parsed.library == "torchvision":
            return _build_torchvision(parsed.name, pretrained, num_classes)
        import timm
        kwargs: dict[str, Any] = {**(model_args or {}), **({} if num_classes is None else {"num_classes": num_classes})}
        with _hub_offline_unless_reachable((pretrained and parsed.folder is None) or parsed.hub, offline):
            return timm.create_model(spec, pretrained=pretrained, **kwargs)
    except SeifyError:
        raise
    except Exception as e:
        reason = first_line(e).split(". ")[0]
        if offline and parsed.hub:
            raise SeifyError(f"{spec}: its configuration is not in the local Hugging Face cache, and seify does not "
                             "go to the network to rebuild a file; convert it again where the hub is reachable"
                             ) from e
        if parsed.hub and not pretrained:
            raise _hub_unreachable(spec, e) from e
        if not pretrained:
            raise
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


@contextlib.contextmanager
def _regnet_widths_on_cpu():
    """torchvision's RegNet builders compute their stage widths with tensors and read them back (``tolist``), which
    the meta device cannot do: those few numbers are computed on the CPU, the model still where it is built."""
    from torchvision.models import regnet
    compute = regnet.BlockParams.from_init_params

    def on_cpu(*args, **kwargs):
        with torch.device("cpu"):
            return compute(*args, **kwargs)
    regnet.BlockParams.from_init_params = on_cpu
    try:
        yield
    finally:
        regnet.BlockParams.from_init_params = compute


def _build_torchvision(name: str, pretrained: bool, num_classes: int | None) -> nn.Module:
    with _regnet_widths_on_cpu():
        return _torchvision_model(name, pretrained, num_classes)


def _torchvision_model(name: str, pretrained: bool, num_classes: int | None) -> nn.Module:
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


def seify_file(spec: str) -> str | None:
    """The seify file a spec names: a path, a ``local-dir:`` folder that ``seify export --format folder`` wrote, or
    such a folder uploaded to the Hugging Face hub (``hf-hub:ORG/NAME``, fetched once); None for anything else."""
    parsed = Spec.parse(spec)
    if parsed.folder is not None:
        weights = parsed.folder / WEIGHTS
        return str(weights) if weights.is_file() and read_recipe(weights) is not None else None
    if parsed.hub:
        return _hub_seify_file(spec)
    return spec if spec.endswith(".safetensors") and Path(spec).is_file() else None


def _hub_seify_file(spec: str) -> str | None:
    from huggingface_hub import hf_hub_download
    repo, _, revision = spec[len(HUB):].partition("@")
    with _hub_offline_unless_reachable(True):
        try:
            config = json.loads(Path(hf_hub_download(repo, "config.json", revision=revision or None)).read_text())
            if not isinstance(config, dict) or config.get("library_name") != "seify":
                return None  # a timm model on the hub: timm builds it
            return hf_hub_download(repo, WEIGHTS, revision=revision or None)
        except (OSError, ValueError) as e:  # the hub's errors are OSErrors; a damaged config a ValueError
            raise _hub_unreachable(spec, e) from e


def _hub_unreachable(spec: str, e: Exception) -> SeifyError:
    reason = first_line(e).split(". ")[0]
    return SeifyError(f"could not fetch the configuration of {spec} from the Hugging Face hub ({reason}); are you "
                      "offline? Pass a timm name with {weights} instead", "weights")


def data_config(model: nn.Module, spec: str) -> dict:
    """Input size, normalisation and resize settings: timm's data config, or torchvision's weight transforms."""
    parsed = Spec.parse(spec)
    if parsed.library == "timm":
        from timm.data import resolve_model_data_config
        cfg = resolve_model_data_config(model)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}
    import torchvision
    config = {"input_size": [3, 224, 224], "interpolation": "bilinear", "mean": list(IMAGENET_MEAN),
              "std": list(IMAGENET_STD), "crop_pct": 0.875, "crop_mode": "center"}
    try:
        t = torchvision.models.get_model_weights(parsed.name).DEFAULT.transforms()
        crop = t.crop_size[0]
        config.update(input_size=[3, crop, crop], interpolation=t.interpolation.value,
                      mean=list(t.mean), std=list(t.std), crop_pct=round(crop / t.resize_size[0], 4))
    except (ValueError, AttributeError, IndexError, TypeError):
        pass
    return config


def names_files(spec: str) -> bool:
    """Whether MODEL names a model's own files (a seify file, a ``local-dir:`` folder) rather than an
    architecture."""
    return Spec.parse(spec).folder is not None or Path(spec).is_file()


def files_read(*specs: str | None) -> tuple[Path, ...]:
    """Every file (or folder) that reading these MODEL and ``--weights`` spellings opens: a path as given (a link
    too: compared by what it points to), a ``local-dir:`` folder and the files in it, an ``hf-hub:`` id's files
    in the local cache. What a command writes is compared with each, so that no spelling lets it write over its
    input."""
    found: list[Path] = []
    for spec in specs:
        if not spec:
            continue
        parsed = Spec.parse(spec)
        if parsed.folder is not None:
            found.append(parsed.folder)
            found += [f for f in parsed.folder.iterdir() if f.is_file()] if parsed.folder.is_dir() else []
        elif parsed.hub:
            found += _cached(spec)
        elif Path(spec).exists():
            found.append(Path(spec))
    return tuple(found)


def _cached(spec: str) -> list[Path]:
    """The files of a hub repository already in the local cache (nothing is downloaded to find them)."""
    from huggingface_hub import try_to_load_from_cache
    repo, _, revision = spec[len(HUB):].partition("@")
    paths = [try_to_load_from_cache(repo, name, revision=revision or None)
             for name in ("config.json", WEIGHTS, "pytorch_model.bin")]
    return [Path(p) for p in paths if isinstance(p, str)]
