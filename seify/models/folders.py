"""timm's hub folders as MODEL (``local-dir:PATH``): config.json (architecture, model_args, num_classes,
pretrained_cfg) and the weights beside it, loaded strictly.

timm's own ``local-dir:`` builds the architecture and, without ``pretrained=True``, leaves its weights random: a
folder holding trained weights would be evaluated, converted and analyzed with random ones. Here a folder always
brings its weights, and a folder without them is refused: naming the architecture itself asks for random weights.
Every value of config.json is checked before anything is allocated.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import read_state_dict
from ..errors import SeifyError, first_line
from ..limits import MAX_CHANNELS, MAX_CLASSES, MAX_IMAGE_SIZE
from .files import load_strict

CONFIG = "config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm's save_for_hf writes, newest first


def read_config(folder: Path) -> dict:
    """The folder's config.json, checked: one line for each way a folder can be damaged."""
    where = f"local-dir:{folder}"
    if not folder.exists():
        raise SeifyError(f"{where}: {folder} does not exist")
    if not folder.is_dir():
        raise SeifyError(f"{where}: {folder} is a file; local-dir: takes a folder holding {CONFIG} and "
                         f"{WEIGHT_FILES[0]} (what seify export --format timm writes)")
    path = folder / CONFIG
    if not path.is_file():
        raise SeifyError(f"{where}: {folder} has no {CONFIG}; local-dir: takes a folder that timm's save_for_hf "
                         "or seify export wrote")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise SeifyError(f"{where}: {path} is not readable JSON ({first_line(e)})") from e
    if not isinstance(config, dict):
        raise SeifyError(f"{where}: {path} holds a JSON {type(config).__name__}, not an object with an architecture")
    if config.get("library_name") == "seify":  # else seify_file would have found its weights and recipe
        raise SeifyError(f"{where}: a seify folder without a readable {WEIGHT_FILES[0]} holding its recipe; export it "
                         "again")
    _check_values(config, path)
    return config


def _check_values(config: dict, path: Path) -> None:
    import timm
    architecture = config.get("architecture")
    if not isinstance(architecture, str) or not architecture:
        raise SeifyError(f"{path} names no architecture (its \"architecture\" key)")
    if not timm.is_model(architecture):
        raise SeifyError(f"{path} names architecture '{architecture}', which timm {timm.__version__} does not know")
    args = config.get("model_args", {})
    if not isinstance(args, dict):
        raise SeifyError(f"{path}: model_args must be an object, not {type(args).__name__}")
    for attn in _attn_layers(args):
        _check_attn(attn, path)
    classes = config.get("num_classes", 1)
    if isinstance(classes, bool) or not isinstance(classes, int) or not 0 <= classes <= MAX_CLASSES:
        raise SeifyError(f"{path}: num_classes must be a whole number from 0 to {MAX_CLASSES:,}, not {classes!r}")
    size = (config.get("pretrained_cfg") or {}).get("input_size", [3, 224, 224])
    if not (isinstance(size, list) and len(size) == 3 and all(isinstance(v, int) and v > 0 for v in size)
            and size[0] <= MAX_CHANNELS and max(size[1:]) <= MAX_IMAGE_SIZE):
        raise SeifyError(f"{path}: pretrained_cfg.input_size must be [channels, height, width] with at most "
                         f"{MAX_CHANNELS} channels and {MAX_IMAGE_SIZE} px a side, not {size!r}")


def _attn_layers(args: Any) -> list:
    """Every ``attn_layer`` value in model_args, however deep (``block_args``, per-stage lists)."""
    if isinstance(args, dict):
        return [v for k, v in args.items() if k == "attn_layer"] + \
            [a for k, v in args.items() if k != "attn_layer" for a in _attn_layers(v)]
    if isinstance(args, (list, tuple)):
        return [a for v in args for a in _attn_layers(v)]
    return []


def _check_attn(attn, path: Path) -> None:
    from timm.layers import get_attn
    try:
        get_attn(attn)
    except (AssertionError, TypeError, ValueError) as e:
        raise SeifyError(f"{path}: attn_layer {attn!r} is not an attention layer timm knows") from e


def build_folder(folder: Path, meta: bool) -> tuple[nn.Module, dict]:
    """The folder's architecture with its weights (strictly: a missing, extra or misshapen key is named), and its
    config."""
    import timm
    from timm.models._pretrained import PretrainedCfg
    config = read_config(folder)
    weights = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    architecture = config["architecture"]
    if weights is None:
        raise SeifyError(f"local-dir:{folder} has no {WEIGHT_FILES[0]}: its config.json describes {architecture} "
                         f"without weights; pass {architecture} itself for random weights, or add the weights")
    kwargs = {"num_classes": config.get("num_classes", 1000), **config.get("model_args", {})}
    known = {f.name for f in dataclasses.fields(PretrainedCfg)}
    overlay = {k: v for k, v in (config.get("pretrained_cfg") or {}).items() if k in known}
    try:
        model = timm.create_model(architecture, pretrained=False, pretrained_cfg_overlay=overlay, **kwargs)
    except Exception as e:  # a model_args value the architecture does not take
        raise SeifyError(f"{folder / CONFIG}: timm cannot build {architecture} with its model_args "
                         f"({first_line(e)[:120]})") from e
    if weights is not None:
        state_dict = _shapes_only(weights) if meta else read_state_dict(weights)[0]
        load_strict(model, state_dict, f"{weights} does not match the {architecture} its config.json describes",
                    "export the folder again")
    return model.eval(), config


def _shapes_only(weights: Path) -> dict:
    """The file's tensors as meta tensors (names and shapes: from the safetensors header, no data read; from a
    pytorch_model.bin, read without running pickled code): enough to check a folder whose model is only counted."""
    if weights.suffix != ".safetensors":
        return {k: torch.empty(v.shape, device="meta") for k, v in read_state_dict(weights)[0].items()}
    from safetensors import safe_open
    with safe_open(str(weights), "pt") as f:
        return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
